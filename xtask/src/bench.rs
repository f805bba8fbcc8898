//! `cargo xtask bench`: criterion micro-benchmarks (when the agent has any) and the bulk
//! throughput of one TCP connection (iperf3): direct, through latch, through HAProxy, through socat;
//! the network-namespace cases of [`crate::bench_netns`]; then the PostgreSQL cases of
//! [`crate::bench_pg`], the MySQL cases of [`crate::bench_my`], the HTTP cases of
//! [`crate::bench_http`]; then the cost of a connection, held idle and opened, against HAProxy
//! ([`crate::bench_conns`]).

use crate::proc::{self, Guard, TempDir, run};
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Length of each iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Runs per case (interleaved); the table shows the median.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Skip the criterion micro-benchmarks.
    #[arg(long)]
    no_micro: bool,
    /// Skip the PostgreSQL cases (pgbench, COPY: direct vs latch vs pgbouncer).
    #[arg(long, conflicts_with = "pg_only")]
    no_pg: bool,
    /// Only the PostgreSQL cases (no iperf3).
    #[arg(long)]
    pg_only: bool,
    /// Skip the network-namespace cases (iperf3 and pgbench from a pod, the cost of 1000
    /// namespaces).
    #[arg(long, conflicts_with = "netns_only")]
    no_netns: bool,
    /// Only the network-namespace cases.
    #[arg(long, conflicts_with = "pg_only")]
    netns_only: bool,
    /// Skip the connections cases (idle cost per connection, new connections per second,
    /// system calls per connection: latch vs HAProxy).
    #[arg(long, conflicts_with = "conns_only")]
    no_conns: bool,
    /// Only the connections cases.
    #[arg(long, conflicts_with_all = ["pg_only", "netns_only"])]
    conns_only: bool,
    /// Skip the MySQL cases (sysbench through latch vs direct).
    #[arg(long, conflicts_with = "mysql_only")]
    no_mysql: bool,
    /// Only the MySQL cases.
    #[arg(long, conflicts_with_all = ["pg_only", "netns_only", "conns_only"])]
    mysql_only: bool,
    /// Skip the HTTP cases (wrk: direct vs latch vs nginx as a reverse proxy).
    #[arg(long, conflicts_with = "http_only")]
    no_http: bool,
    /// Only the HTTP cases.
    #[arg(long, conflicts_with_all = ["pg_only", "netns_only", "conns_only", "mysql_only"])]
    http_only: bool,
}

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const HAPROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const SOCAT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Direct,
    Latch,
    /// Through latch with `--fast-path` (the kernel carries the application's sends).
    LatchFast,
    Haproxy,
    Socat,
    /// iperf3 -R: the target sends, the application receives.
    DirectReverse,
    LatchReverse,
}

impl Case {
    const ALL: [Case; 7] = [
        Case::Direct,
        Case::Latch,
        Case::LatchFast,
        Case::Haproxy,
        Case::Socat,
        Case::DirectReverse,
        Case::LatchReverse,
    ];

    fn label(self) -> &'static str {
        match self {
            Case::Direct => "direct",
            Case::Latch => "latch (tcp relay)",
            Case::LatchFast => "latch --fast-path",
            Case::Haproxy => "haproxy (splice-auto)",
            Case::Socat => "socat (userspace copy)",
            Case::DirectReverse => "direct -R",
            Case::LatchReverse => "latch -R",
        }
    }

    fn reverse(self) -> bool {
        matches!(self, Case::DirectReverse | Case::LatchReverse)
    }

    fn through_latch(self) -> bool {
        matches!(self, Case::Latch | Case::LatchFast | Case::LatchReverse)
    }
}

/// The fixed parts of one bench session: ports, generated files, the long-running proxies.
struct Rig {
    dir: PathBuf,
    latch: PathBuf,
    policy: PathBuf,
    port: u16,
    haproxy_port: u16,
    socat_port: u16,
    seconds: u32,
}

pub fn run_bench(args: &Args) -> Result<()> {
    proc::require_root("bench")?;
    if args.seconds == 0 || args.repeat == 0 {
        bail!("--seconds and --repeat must be at least 1");
    }
    crate::setup::run_setup()?;
    if !args.no_micro && !args.mysql_only {
        micro()?;
    }
    let latch = proc::latch_bin(true)?;
    if args.conns_only {
        println!("\nbench: connections (latch vs haproxy)");
        return crate::bench_conns::run(&latch, args.repeat);
    }
    if args.http_only {
        println!("\nbench: HTTP (direct vs latch vs nginx reverse proxy)");
        return crate::bench_http::run(&latch, args.seconds, args.repeat);
    }
    let iperf = if args.pg_only || args.netns_only || args.mysql_only {
        Ok(())
    } else {
        iperf_cases(args, &latch)
    };
    proc::check_interrupted()?;
    let netns = if args.pg_only || args.no_netns || args.mysql_only {
        Ok(())
    } else {
        println!("\nbench: network namespaces (pods)");
        crate::bench_netns::run(&latch, args.seconds, args.repeat)
    };
    proc::check_interrupted()?;
    let pg = if args.no_pg || args.netns_only || args.mysql_only {
        Ok(())
    } else {
        println!("\nbench: PostgreSQL (direct vs latch vs pgbouncer)");
        crate::bench_pg::run(&latch, args.seconds, args.repeat)
    };
    proc::check_interrupted()?;
    let my = if args.no_mysql || args.pg_only || args.netns_only {
        Ok(())
    } else {
        println!("\nbench: MySQL (sysbench: direct vs latch)");
        crate::bench_my::run(&latch, args.seconds, args.repeat)
    };
    proc::check_interrupted()?;
    let conns = if args.no_conns || args.pg_only || args.netns_only || args.mysql_only {
        Ok(())
    } else {
        println!("\nbench: connections (latch vs haproxy)");
        crate::bench_conns::run(&latch, args.repeat)
    };
    proc::check_interrupted()?;
    let http = if args.no_http || args.pg_only || args.netns_only || args.mysql_only {
        Ok(())
    } else {
        println!("\nbench: HTTP (direct vs latch vs nginx reverse proxy)");
        crate::bench_http::run(&latch, args.seconds, args.repeat)
    };
    iperf.and(netns).and(pg).and(my).and(http).and(conns)
}

fn iperf_cases(args: &Args, latch: &Path) -> Result<()> {
    let latch = latch.to_path_buf();
    let tmp = TempDir::new("latch-bench")?;
    let port = proc::free_port(SERVER)?;
    let rig = Rig {
        dir: tmp.path().to_path_buf(),
        latch,
        policy: crate::policy::write_tcp(tmp.path(), "bench-iperf3", SERVER, port)?,
        port,
        haproxy_port: proc::free_port(HAPROXY)?,
        socat_port: proc::free_port(SOCAT)?,
        seconds: args.seconds,
    };
    let _haproxy = start_haproxy(tmp.path(), &rig)?;
    let _socat = start_socat(tmp.path(), &rig)?;

    let mut samples: Vec<(Case, Vec<f64>, Option<String>)> =
        Case::ALL.iter().map(|&c| (c, Vec::new(), None)).collect();
    for round in 1..=args.repeat {
        for (case, got, failed) in samples.iter_mut() {
            if failed.is_some() {
                continue;
            }
            print!(
                "bench: round {round}/{}: {:<24} ",
                args.repeat,
                case.label()
            );
            let _ = std::io::Write::flush(&mut std::io::stdout());
            match rig.measure(*case) {
                Ok(bps) => {
                    println!("{:8.2} Gbit/s", bps / 1e9);
                    got.push(bps);
                }
                Err(e) => {
                    println!("failed: {e:#}");
                    *failed = Some(format!("{e:#}"));
                }
            }
            proc::check_interrupted()?;
        }
    }

    println!(
        "\none TCP connection, iperf3 -t {} to {SERVER}, median of {} run(s); -R: the target \
         sends (ratio to direct -R):\n",
        args.seconds, args.repeat
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "({cpus} CPUs, load average {}: other work on the machine moves these numbers; use --repeat)\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("{:<24} {:>10} {:>10}", "case", "Gbit/s", "vs direct");
    let baseline = |case: Case| {
        let direct = if case.reverse() {
            Case::DirectReverse
        } else {
            Case::Direct
        };
        samples
            .iter()
            .find(|s| s.0 == direct)
            .and_then(|s| median(&s.1))
    };
    let mut any_failed = false;
    for (case, got, failed) in &samples {
        let direct = baseline(*case);
        match (median(got), failed) {
            (Some(m), None) => {
                let ratio = direct.map_or("-".to_string(), |d| format!("{:.2}", m / d));
                println!("{:<24} {:>10.2} {:>10}", case.label(), m / 1e9, ratio);
            }
            _ => {
                any_failed = true;
                let why = failed.as_deref().unwrap_or("no result");
                println!("{:<24} {:>10} {:>10}   {why}", case.label(), "failed", "-");
            }
        }
    }
    if any_failed {
        bail!("some bench cases failed");
    }
    Ok(())
}

/// `latch run --policy <policy> --state-dir <state_dir>`: the caller adds options, `--` and
/// the command.
pub fn latch_run(latch: &Path, policy: &Path, state_dir: &Path) -> Command {
    let mut c = Command::new(latch);
    c.arg("run")
        .arg("--policy")
        .arg(policy)
        .arg("--state-dir")
        .arg(state_dir);
    c
}

/// `argv` as one shell command line (each word single-quoted).
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The criterion benchmarks of the agent and the wire crates (every package with a `benches/`
/// directory).
fn micro() -> Result<()> {
    let root = proc::root();
    let mut cmd = proc::cargo();
    cmd.args(["bench", "--benches"]);
    let mut any = false;
    for (dir, package) in [
        ("agent", "latch"),
        ("pg", "latch-pg"),
        ("mysql", "latch-mysql"),
    ] {
        let has =
            std::fs::read_dir(root.join(dir).join("benches")).is_ok_and(|mut d| d.next().is_some());
        if has {
            cmd.args(["-p", package]);
            any = true;
        }
    }
    if !any {
        println!("bench: no criterion benchmarks, skipping `cargo bench`");
        return Ok(());
    }
    println!("\nbench: criterion micro-benchmarks");
    run(&mut cmd)
}

impl Rig {
    /// One iperf3 run (fresh one-shot server); received bits per second.
    fn measure(&self, case: Case) -> Result<f64> {
        let mut server = Guard::spawn(
            "iperf3 server",
            Command::new("iperf3")
                .args([
                    "-s",
                    "-1",
                    "-B",
                    &SERVER.to_string(),
                    "-p",
                    &self.port.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
            libc::SIGTERM,
        )?;
        proc::wait_listening(&mut server, SERVER, self.port)?;
        let (addr, port) = match case {
            Case::Direct
            | Case::Latch
            | Case::LatchFast
            | Case::DirectReverse
            | Case::LatchReverse => (SERVER, self.port),
            Case::Haproxy => (HAPROXY, self.haproxy_port),
            Case::Socat => (SOCAT, self.socat_port),
        };
        let mut cmd = if case.through_latch() {
            let mut c = latch_run(&self.latch, &self.policy, &self.dir.join("latch-state"));
            if case == Case::LatchFast {
                c.arg("--fast-path");
            }
            c.args(["--", "iperf3"]);
            c
        } else {
            Command::new("iperf3")
        };
        cmd.args(["-c", &addr.to_string(), "-p", &port.to_string()])
            .args(["-t", &self.seconds.to_string(), "-J"]);
        if case.reverse() {
            cmd.arg("-R");
        }
        // The client's (and latch's) stderr goes to a file: shown when the run fails, not in the table.
        let err_path = self.dir.join("client.stderr");
        cmd.stderr(std::fs::File::create(&err_path)?);
        let timeout = Duration::from_secs(u64::from(self.seconds) + 30);
        let result = proc::run_capture(&mut cmd, timeout).and_then(|(status, stdout)| {
            match (status.success(), parse_iperf3(&stdout)) {
                (true, Ok(bps)) => Ok(bps),
                (_, Err(e)) => Err(e.context(format!("client exited {status}"))),
                (false, Ok(_)) => bail!("client exited {status}"),
            }
        });
        result.map_err(|e| {
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            match stderr.trim() {
                "" => e,
                text => e.context(format!("stderr: {text}")),
            }
        })
    }
}

/// `end.sum_received.bits_per_second` from `iperf3 -J`, or iperf3's own error message.
pub fn parse_iperf3(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).with_context(|| {
        format!(
            "iperf3 output is not JSON: {:?}",
            json.chars().take(200).collect::<String>()
        )
    })?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("iperf3 JSON has no end.sum_received.bits_per_second")
}

fn start_haproxy(dir: &Path, rig: &Rig) -> Result<Guard> {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global
    maxconn 1024

defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 1m
    timeout server 1m

frontend bench
    bind {HAPROXY}:{}
    default_backend iperf3

backend iperf3
    server iperf3 {SERVER}:{}
",
            rig.haproxy_port, rig.port
        ),
    )?;
    let mut g = Guard::spawn(
        "haproxy",
        Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null()),
        libc::SIGTERM,
    )?;
    proc::wait_listening(&mut g, HAPROXY, rig.haproxy_port)?;
    Ok(g)
}

fn start_socat(dir: &Path, rig: &Rig) -> Result<Guard> {
    // socat reports the resets at the end of each iperf3 run; keep that noise out of the table.
    let log = std::fs::File::create(dir.join("socat.log"))?;
    let mut g = Guard::spawn(
        "socat",
        Command::new("socat")
            .arg(format!(
                "TCP-LISTEN:{},bind={SOCAT},reuseaddr,fork",
                rig.socat_port
            ))
            .arg(format!("TCP:{SERVER}:{}", rig.port))
            .stdin(Stdio::null())
            .stderr(log),
        libc::SIGTERM,
    )?;
    proc::wait_listening(&mut g, SOCAT, rig.socat_port)?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_quote_each_word() {
        let argv = ["wrk", "-H", "Connection: close", "it's"].map(String::from);
        assert_eq!(
            shell_words(&argv),
            "'wrk' '-H' 'Connection: close' 'it'\\''s'"
        );
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn parses_iperf3_json() {
        let ok = r#"{"end":{"sum_received":{"bits_per_second":4.2e10}}}"#;
        assert_eq!(parse_iperf3(ok).unwrap(), 4.2e10);
        let err = r#"{"start":{},"error":"unable to connect to server: Connection refused"}"#;
        assert!(format!("{:#}", parse_iperf3(err).unwrap_err()).contains("Connection refused"));
    }
}
