//! `cargo xtask bench`, HTTP cases: wrk against nginx with a bearer check, side by side in
//! one run — directly (wrk holds the token), through latch (`latch run`, wrk holds nothing,
//! latch injects the token), and through nginx as a reverse proxy adding the same header —
//! with keep-alive, and with a new connection per request.

use crate::bench_conns::agent_measured;
use crate::bench_cpu::{self, Mark, PerOp};
use crate::proc::{self, Guard, TempDir};
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BACKEND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const PROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const TOKEN: &str = "bench-token-4f1c";

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Direct,
    Latch,
    NginxProxy,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Latch, Route::NginxProxy];
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Latch => "latch",
            Route::NginxProxy => "nginx reverse proxy",
        }
    }
}

struct Rig {
    latch: PathBuf,
    dir: PathBuf,
    policy: PathBuf,
    port: u16,
    proxy_port: u16,
    /// The reverse proxy's process (one nginx process: no master, one worker).
    proxy_pid: u32,
    seconds: u32,
}

/// One wrk run: requests per second, the 99th percentile latency (ms), and the proxy's and
/// the rest of the machine's CPU time per request (none for direct).
#[derive(Clone, Copy)]
struct Sample {
    rps: f64,
    p99_ms: f64,
    cpu: Option<PerOp>,
    /// The whole machine's CPU time per request (µs).
    machine: Option<f64>,
}

/// The requests a second latch should reach, as a share of direct (issue #15).
const GOAL_VS_DIRECT: f64 = 0.9;

pub fn run(latch: &Path, seconds: u32, repeat: u32) -> Result<()> {
    let tmp = TempDir::new("latch-bench-http")?;
    let dir = tmp.path().to_path_buf();
    let port = proc::free_port(BACKEND)?;
    let proxy_port = proc::free_port(PROXY)?;
    let _backend = nginx(
        &dir,
        "backend",
        &format!(
            "server {{ listen {BACKEND}:{port};\n  location / {{ if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401; }}\n    default_type text/plain; return 200 \"ok\\n\"; }} }}\n"
        ),
        BACKEND,
        port,
    )?;
    let proxy = nginx(
        &dir,
        "proxy",
        &format!(
            "upstream backend {{ server {BACKEND}:{port}; keepalive 64; }}\n\
             server {{ listen {PROXY}:{proxy_port};\n  location / {{ proxy_pass http://backend; proxy_http_version 1.1;\n    \
             proxy_set_header Connection \"\"; proxy_set_header Authorization \"Bearer {TOKEN}\"; }} }}\n"
        ),
        PROXY,
        proxy_port,
    )?;
    let secrets = dir.join("secrets.yaml");
    std::fs::write(&secrets, format!("api:\n  password: \"{TOKEN}\"\n"))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600))?;
    let policy = dir.join("http.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata:\n  name: local\nspec:\n  \
             file: {{path: {}}}\n---\napiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  \
             name: bench-http\nspec:\n  destination: {{address: {BACKEND}, port: {port}}}\n  \
             protocol: http\n  workloads: all\n  tls: {{mode: disable}}\n  \
             credentials: {{store: local, password: {{path: api, field: password}}}}\n  \
             http: {{inject: bearer}}\n",
            secrets.display()
        ),
    )?;
    let rig = Rig {
        latch: latch.to_path_buf(),
        dir,
        policy,
        port,
        proxy_port,
        proxy_pid: proxy.pid(),
        seconds,
    };
    let mut failed = false;
    for keep_alive in [true, false] {
        let mut samples: Vec<(Route, Vec<Sample>)> =
            Route::ALL.iter().map(|&r| (r, Vec::new())).collect();
        for round in 1..=repeat {
            for (route, got) in samples.iter_mut() {
                print!(
                    "bench: round {round}/{repeat}: http {} {:<22} ",
                    if keep_alive { "keep-alive" } else { "new conn" },
                    route.label()
                );
                let _ = std::io::Write::flush(&mut std::io::stdout());
                match rig.measure(*route, keep_alive) {
                    Ok(s) => {
                        println!(
                            "{:10.0} req/s  p99 {:.2} ms{}",
                            s.rps,
                            s.p99_ms,
                            s.cpu.map_or(String::new(), |c| format!(
                                "  {:.0} µs of the proxy's CPU each ({:.0} in the kernel)",
                                c.total(),
                                c.system
                            ))
                        );
                        got.push(s);
                    }
                    Err(e) => {
                        println!("failed: {e:#}");
                        failed = true;
                    }
                }
                proc::check_interrupted()?;
            }
        }
        println!(
            "\nHTTP GET to nginx with a bearer check, wrk -t1 -c8 -d{seconds}s, {}, median of {repeat} run(s):\n",
            if keep_alive {
                "keep-alive"
            } else {
                "a new connection per request"
            }
        );
        println!(
            "{:<22} {:>10} {:>10} {:>10} {:>14} {:>13}",
            "case", "req/s", "vs direct", "p99 ms", "p99 vs direct", "CPU µs/req"
        );
        let med = |v: &[Sample], f: fn(&Sample) -> f64| {
            crate::bench::median(&v.iter().map(f).collect::<Vec<_>>())
        };
        let direct = &samples[0].1;
        let (d_rps, d_p99) = (med(direct, |s| s.rps), med(direct, |s| s.p99_ms));
        let d_machine =
            crate::bench::median(&direct.iter().filter_map(|s| s.machine).collect::<Vec<_>>());
        let mut verdicts = Vec::new();
        for (route, got) in &samples {
            let cpu = bench_cpu::median(&got.iter().filter_map(|s| s.cpu).collect::<Vec<_>>());
            if let (Some(cpu), Some(d)) = (&cpu, d_rps) {
                verdicts.push(bench_cpu::verdict(
                    route.label(),
                    &format!("{GOAL_VS_DIRECT:.2}× direct"),
                    GOAL_VS_DIRECT * d,
                    "request",
                    cpu,
                    d_machine,
                ));
            }
            match (med(got, |s| s.rps), med(got, |s| s.p99_ms)) {
                (Some(rps), Some(p99)) => println!(
                    "{:<22} {:>10.0} {:>10} {:>10.2} {:>14} {:>13}",
                    route.label(),
                    rps,
                    d_rps.map_or("-".into(), |d| format!("{:.2}", rps / d)),
                    p99,
                    d_p99.map_or("-".into(), |d| format!("{:+.2} ms", p99 - d)),
                    cpu.map_or("-".into(), |c| format!("{:.0}", c.total())),
                ),
                _ => println!("{:<22} {:>10}", route.label(), "failed"),
            }
        }
        println!();
        for v in verdicts {
            println!("{v}");
        }
        println!();
    }
    if failed {
        bail!("some HTTP bench cases failed");
    }
    Ok(())
}

impl Rig {
    fn measure(&self, route: Route, keep_alive: bool) -> Result<Sample> {
        let (ip, port) = match route {
            Route::NginxProxy => (PROXY, self.proxy_port),
            _ => (BACKEND, self.port),
        };
        let mut wrk: Vec<String> = vec![
            "wrk".into(),
            "-t1".into(),
            "-c8".into(),
            format!("-d{}s", self.seconds),
            "--latency".into(),
        ];
        if route == Route::Direct {
            wrk.extend(["-H".into(), format!("Authorization: Bearer {TOKEN}")]);
        }
        if !keep_alive {
            wrk.extend(["-H".into(), "Connection: close".into()]);
        }
        wrk.push(format!("http://{ip}:{port}/"));
        if route == Route::Latch {
            let agent = |script: &str| {
                let mut c = crate::bench::latch_run(
                    &self.latch,
                    &self.policy,
                    &self.dir.join("latch-state"),
                );
                c.args(["--", "sh", "-c", script])
                    // The policy's `tls: disable` warning would land among the results.
                    .env("LATCH_LOG", "error");
                c
            };
            let (out, cpu) = agent_measured(agent, &crate::bench::shell_words(&wrk))?;
            let mut sample = parse_wrk(&out)?;
            let requests = sample.rps * f64::from(self.seconds);
            sample.cpu = cpu.per_op(requests);
            sample.machine = cpu.machine_per_op(requests);
            return Ok(sample);
        }
        let proxy = route == Route::NginxProxy;
        let before = if proxy {
            Mark::take(self.proxy_pid)?
        } else {
            Mark::machine()?
        };
        let mut cmd = Command::new(&wrk[0]);
        cmd.args(&wrk[1..]);
        let (status, out) = proc::run_capture(
            &mut cmd,
            std::time::Duration::from_secs(u64::from(self.seconds) + 60),
        )?;
        if !status.success() {
            bail!("wrk failed: {out}");
        }
        let mut sample = parse_wrk(&out)?;
        let ticks = before.since()?;
        let requests = sample.rps * f64::from(self.seconds);
        if proxy {
            sample.cpu = ticks.per_op(requests);
        }
        sample.machine = ticks.machine_per_op(requests);
        Ok(sample)
    }
}

/// Requests/sec and the 99% latency from wrk's output; refuses a run with non-2xx answers.
fn parse_wrk(out: &str) -> Result<Sample> {
    if out.contains("Non-2xx or 3xx responses") {
        bail!("wrk saw error responses: {out}");
    }
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {out}"))?;
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .and_then(|v| {
            let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => return None,
            })
        })
        .with_context(|| format!("no 99% latency in wrk's output: {out}"))?;
    Ok(Sample {
        rps,
        p99_ms: p99,
        cpu: None,
        machine: None,
    })
}

fn nginx(dir: &Path, name: &str, servers: &str, ip: Ipv4Addr, port: u16) -> Result<Guard> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let dd = d.display();
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dd}/nginx.pid;\n\
             error_log {dd}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 10000000;\n  client_body_temp_path {dd}/body;\n  \
             proxy_temp_path {dd}/proxy;\n  fastcgi_temp_path {dd}/fastcgi;\n  \
             uwsgi_temp_path {dd}/uwsgi;\n  scgi_temp_path {dd}/scgi;\n{servers}}}\n"
        ),
    )?;
    let mut g = Guard::spawn(
        &format!("nginx {name}"),
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&d)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        libc::SIGTERM,
    )?;
    proc::wait_listening(&mut g, ip, port)?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 10s test @ http://127.0.0.2:80/\n  1 threads and 8 connections\n  \
                   Latency Distribution\n     50%  101.00us\n     99%    1.25ms\n  \
                   812345 requests in 10.00s, 120.00MB read\nRequests/sec:  81234.50\n";
        let s = parse_wrk(out).unwrap();
        assert_eq!((s.rps, s.p99_ms), (81234.5, 1.25));
        assert!(parse_wrk("Non-2xx or 3xx responses: 5\nRequests/sec: 1\n").is_err());
    }
}
