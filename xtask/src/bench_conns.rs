//! `cargo xtask bench`, connections section: what a connection costs latch and HAProxy
//! (`mode tcp`, `option splice-auto`) side by side in one run.
//!
//! - Idle cost: a client opens N connections, moves 100 kB each way on every one (so the
//!   relays have spliced or copied data), then holds them; the proxy's descriptors and resident
//!   memory are read from /proc before and while they are held. Per connection = difference / N.
//! - Opening cost: `ab -c 32`, one connection per request, to nginx — direct, through latch,
//!   through HAProxy — and the proxy's system calls per connection, counted by `strace -c -f`
//!   over a run of its own (tracing slows the proxy, so that run is not the one timed).
//!
//! The clients of the latch cases run under `latch run` (a cgroup of their own, intercepted);
//! the agent is that process, so its PID is the one measured.

use crate::bench_cpu::{self, Mark, PerOp, Ticks};
use crate::proc::{self, Guard, TempDir};
use anyhow::{Context, Result, bail};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const HAPROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Connections held for the idle-cost case.
const HELD: usize = 1000;
/// Requests per `ab` run (timed), and per `strace`d run.
const REQUESTS: u32 = 20_000;
const TRACED_REQUESTS: u32 = 2_000;

/// Opens `n` connections to host:port, moves 100 kB each way on each, prints `held`, and keeps
/// them until stdin closes. Waits for a `go` line first, so the proxy can be measured idle.
const HOLD_PY: &str = r#"
import asyncio, resource, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
CHUNK = b"x" * 100_000
async def one():
    r, w = await asyncio.open_connection(host, port)
    w.write(CHUNK)
    await w.drain()
    await r.readexactly(len(CHUNK))
    return w
async def main():
    print("ready", flush=True)
    sys.stdin.readline()
    held = []
    for i in range(0, n, 100):
        held += await asyncio.gather(*(one() for _ in range(min(100, n - i))))
    print("held", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"#;

/// Echoes every byte back, for any number of connections.
const ECHO_PY: &str = r#"
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def echo(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main():
    s = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]), backlog=4096)
    await s.serve_forever()
asyncio.run(main())
"#;

struct Rig {
    dir: PathBuf,
    latch: PathBuf,
    policy: PathBuf,
    echo_port: u16,
    http_port: u16,
    haproxy_echo: u16,
    haproxy_http: u16,
    haproxy_pid: u32,
}

/// Per-connection idle cost of one proxy.
struct Idle {
    fds: f64,
    kib: f64,
}

/// One proxy's opening cost.
struct Opening {
    per_second: f64,
    /// The proxy's CPU time (user and system, all its threads) and the rest of the machine's,
    /// per connection.
    cpu: Option<PerOp>,
    /// The whole machine's CPU time per connection, in µs.
    machine: Option<f64>,
    syscalls: Option<f64>,
}

/// One `ab` run: its rate, and the CPU time per connection.
struct Run {
    per_second: f64,
    cpu: Option<PerOp>,
    machine: Option<f64>,
}

pub fn run(latch: &Path, repeat: u32) -> Result<()> {
    for tool in ["ab", "strace", "nginx", "haproxy", "python3"] {
        if !proc::succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
            bail!("`{tool}` is missing: `cargo xtask setup` installs it");
        }
    }
    let tmp = TempDir::new("latch-bench-conns")?;
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("hold.py"), HOLD_PY)?;
    std::fs::write(dir.join("echo.py"), ECHO_PY)?;
    let echo_port = proc::free_port(SERVER)?;
    let http_port = proc::free_port(SERVER)?;
    let mut echo = Guard::spawn(
        "echo server",
        Command::new("python3")
            .arg(dir.join("echo.py"))
            .args([&SERVER.to_string(), &echo_port.to_string()])
            .stdin(Stdio::null()),
        libc::SIGTERM,
    )?;
    proc::wait_listening(&mut echo, SERVER, echo_port)?;
    let _nginx = start_nginx(&dir, http_port)?;
    let haproxy_echo = proc::free_port(HAPROXY)?;
    let haproxy_http = proc::free_port(HAPROXY)?;
    let haproxy = start_haproxy(&dir, [(haproxy_echo, echo_port), (haproxy_http, http_port)])?;
    let policy = dir.join("policies.yaml");
    std::fs::write(
        &policy,
        format!(
            "{}---\n{}",
            crate::policy::tcp("bench-echo", SERVER, echo_port),
            crate::policy::tcp("bench-http", SERVER, http_port)
        ),
    )?;
    let rig = Rig {
        dir,
        latch: latch.to_path_buf(),
        policy,
        echo_port,
        http_port,
        haproxy_echo,
        haproxy_http,
        haproxy_pid: haproxy.pid(),
    };

    println!("bench: {HELD} idle connections (100 kB each way first), latch then haproxy");
    let latch_idle = rig.idle_latch()?;
    let haproxy_idle = rig.idle_haproxy()?;
    println!(
        "bench: new connections/s, ab -c 32 -n {REQUESTS}, one connection per request, \
         {repeat} round(s), each in another order"
    );
    let [direct, latch_open, haproxy_open] = rig.openings(repeat)?;

    println!(
        "\nconnections: idle cost per held connection, and opening cost (nginx target, \
         {REQUESTS} requests, one connection each; rates are medians of {repeat})\n"
    );
    println!(
        "{:<24} {:>10} {:>12} {:>12} {:>10} {:>14} {:>14}",
        "case", "fds/conn", "KiB/conn", "conns/s", "vs direct", "syscalls/conn", "CPU µs/conn"
    );
    let row = |label: &str, idle: Option<&Idle>, open: &Opening| {
        let (fds, kib) = idle.map_or(("-".into(), "-".into()), |i| {
            (format!("{:.2}", i.fds), format!("{:.1}", i.kib))
        });
        println!(
            "{:<24} {:>10} {:>12} {:>12.0} {:>10.2} {:>14} {:>14}",
            label,
            fds,
            kib,
            open.per_second,
            open.per_second / direct.per_second,
            open.syscalls.map_or("-".into(), |s| format!("{s:.1}")),
            open.cpu.map_or("-".into(), |c| format!("{:.0}", c.total())),
        );
    };
    row("direct", None, &direct);
    row("latch (tcp relay)", Some(&latch_idle), &latch_open);
    row("haproxy (splice-auto)", Some(&haproxy_idle), &haproxy_open);
    println!(
        "\nlatch vs haproxy: {:.2}× the connections/s, {} the CPU per connection, {:.2}× the \
         descriptors and {:.2}× the memory per idle connection",
        latch_open.per_second / haproxy_open.per_second,
        match (latch_open.cpu, haproxy_open.cpu) {
            (Some(l), Some(h)) if h.total() > 0.0 => format!("{:.2}×", l.total() / h.total()),
            _ => "-".into(),
        },
        latch_idle.fds / haproxy_idle.fds,
        latch_idle.kib / haproxy_idle.kib,
    );
    // Issue #18's goal: 1.2 × HAProxy's connections a second, in the same run.
    let goal = GOAL_VS_HAPROXY * haproxy_open.per_second;
    let what = format!("{GOAL_VS_HAPROXY:.2}× haproxy");
    for (name, open) in [("latch", &latch_open), ("haproxy", &haproxy_open)] {
        if let Some(cpu) = &open.cpu {
            println!(
                "{}",
                bench_cpu::verdict(name, &what, goal, "connection", cpu, direct.machine)
            );
        }
    }
    Ok(())
}

/// The new connections a second latch should reach, as a share of HAProxy's (issue #18).
const GOAL_VS_HAPROXY: f64 = 1.2;

#[derive(Clone, Copy, PartialEq)]
enum Via {
    Direct,
    Latch,
    Haproxy,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Latch => "latch",
            Via::Haproxy => "haproxy",
        }
    }
}

impl Rig {
    fn latch_run(&self, argv: &[&str]) -> Command {
        let mut c =
            crate::bench::latch_run(&self.latch, &self.policy, &self.dir.join("latch-state"));
        c.arg("--").args(argv).env("LATCH_LOG", "warn");
        c
    }

    fn idle_latch(&self) -> Result<Idle> {
        let hold = self.dir.join("hold.py").display().to_string();
        let port = self.echo_port.to_string();
        let n = HELD.to_string();
        let mut cmd = self.latch_run(&["python3", &hold, &SERVER.to_string(), &port, &n]);
        let mut client = Holder::spawn(&mut cmd)?;
        let pid = client.child.id();
        client.wait_for("ready")?;
        let before = usage(pid)?;
        client.go()?;
        client.wait_for("held")?;
        let during = usage(pid)?;
        client.finish()?;
        Ok(during.minus(&before, HELD))
    }

    fn idle_haproxy(&self) -> Result<Idle> {
        let hold = self.dir.join("hold.py");
        let mut cmd = Command::new("python3");
        cmd.arg(hold).args([
            &HAPROXY.to_string(),
            &self.haproxy_echo.to_string(),
            &HELD.to_string(),
        ]);
        let mut client = Holder::spawn(&mut cmd)?;
        client.wait_for("ready")?;
        let before = usage(self.haproxy_pid)?;
        client.go()?;
        client.wait_for("held")?;
        let during = usage(self.haproxy_pid)?;
        client.finish()?;
        Ok(during.minus(&before, HELD))
    }

    fn ab_url(&self, via: Via) -> String {
        match via {
            Via::Direct | Via::Latch => format!("http://{SERVER}:{}/", self.http_port),
            Via::Haproxy => format!("http://{HAPROXY}:{}/", self.haproxy_http),
        }
    }

    /// Each case's opening rate `repeat` times, the order of the cases rotating from round to
    /// round (each run leaves tens of thousands of TIME_WAIT sockets that the next one's
    /// connects meet, so no case always comes last), then the system calls of each proxy.
    fn openings(&self, repeat: u32) -> Result<[Opening; 3]> {
        const CASES: [Via; 3] = [Via::Direct, Via::Latch, Via::Haproxy];
        let mut runs: [Vec<Run>; 3] = Default::default();
        for round in 0..repeat as usize {
            for i in 0..CASES.len() {
                let k = (round + i) % CASES.len();
                let run = self.rate(CASES[k])?;
                println!(
                    "bench: {:<10} {:8.0} connections/s{}",
                    CASES[k].name(),
                    run.per_second,
                    run.cpu.map_or(String::new(), |c| format!(
                        ", {:.0} µs of the proxy's CPU each ({:.0} in the kernel)",
                        c.total(),
                        c.system
                    ))
                );
                runs[k].push(run);
            }
        }
        let mut out = Vec::new();
        for (via, runs) in CASES.into_iter().zip(runs) {
            let rates: Vec<f64> = runs.iter().map(|r| r.per_second).collect();
            let cpu: Vec<PerOp> = runs.iter().filter_map(|r| r.cpu).collect();
            let machine: Vec<f64> = runs.iter().filter_map(|r| r.machine).collect();
            let url = self.ab_url(via);
            let syscalls = match via {
                Via::Direct => None,
                Via::Latch => Some(self.traced_latch(&url)?),
                Via::Haproxy => Some(self.traced(self.haproxy_pid, &url, None)?),
            };
            if let Some(s) = &syscalls {
                println!(
                    "bench: {:<10} {:.1} system calls per connection ({})",
                    via.name(),
                    s.total,
                    s.top
                );
            }
            out.push(Opening {
                per_second: crate::bench::median(&rates).context("no rounds")?,
                cpu: bench_cpu::median(&cpu),
                machine: crate::bench::median(&machine),
                syscalls: syscalls.map(|s| s.total),
            });
        }
        out.try_into()
            .map_err(|_| anyhow::anyhow!("three cases measured"))
    }

    /// One `ab` run's connections per second through `via`, and the proxy's CPU time over it
    /// (latch's agent is measured while its client waits to exit, so its start and exit are
    /// not counted).
    fn rate(&self, via: Via) -> Result<Run> {
        let url = self.ab_url(via);
        let ab = format!("ab -q -r -c 32 -n {REQUESTS} {url}");
        if via == Via::Latch {
            let (out, cpu) = agent_measured(|script| self.latch_run(&["sh", "-c", script]), &ab)?;
            return Ok(Run {
                per_second: parse_ab(&out)?,
                cpu: cpu.per_op(f64::from(REQUESTS)),
                machine: cpu.machine_per_op(f64::from(REQUESTS)),
            });
        }
        let before = match via {
            Via::Haproxy => Mark::take(self.haproxy_pid)?,
            _ => Mark::machine()?,
        };
        let (status, out) = proc::run_capture(
            Command::new("sh").args(["-c", &ab]).stderr(Stdio::null()),
            Duration::from_secs(300),
        )?;
        if !status.success() {
            bail!("ab exited {status}: {out}");
        }
        let ticks = before.since()?;
        Ok(Run {
            per_second: parse_ab(&out)?,
            cpu: (via == Via::Haproxy)
                .then(|| ticks.per_op(f64::from(REQUESTS)))
                .flatten(),
            machine: ticks.machine_per_op(f64::from(REQUESTS)),
        })
    }

    /// The agent of a `latch run` whose client waits for a line on stdin before `ab` starts,
    /// so strace is attached to the agent (not the client) first.
    fn traced_latch(&self, url: &str) -> Result<Traced> {
        let script = format!(
            "echo ready; read go; ab -q -r -c 32 -n {TRACED_REQUESTS} {url} >/dev/null; echo done"
        );
        let mut cmd = self.latch_run(&["sh", "-c", &script]);
        let mut client = Holder::spawn(&mut cmd)?;
        client.wait_for("ready")?;
        let pid = client.child.id();
        let per_conn = self.traced(pid, url, Some(&mut client))?;
        client.finish()?;
        Ok(per_conn)
    }

    /// System calls of `pid` (all its threads) per connection over `TRACED_REQUESTS`
    /// connections: run by `client` (after a `go`), or by an `ab` started here.
    fn traced(&self, pid: u32, url: &str, client: Option<&mut Holder>) -> Result<Traced> {
        let out = self.dir.join(format!("strace-{pid}.txt"));
        let mut strace = Guard::spawn(
            "strace",
            Command::new("strace")
                .args(["-c", "-f", "-o"])
                .arg(&out)
                .args(["-p", &pid.to_string()])
                .stdin(Stdio::null())
                .stderr(Stdio::null()),
            libc::SIGINT,
        )?;
        // strace attaches every thread before it traces; give it that moment.
        std::thread::sleep(Duration::from_millis(500));
        match client {
            Some(c) => {
                c.go()?;
                c.wait_for("done")?;
            }
            None => {
                let n = TRACED_REQUESTS.to_string();
                let (status, text) = proc::run_capture(
                    Command::new("ab")
                        .args(["-q", "-r", "-c", "32", "-n", &n, url])
                        .stderr(Stdio::null()),
                    Duration::from_secs(300),
                )?;
                if !status.success() {
                    bail!("ab exited {status}: {text}");
                }
            }
        }
        strace.stop();
        let summary = std::fs::read_to_string(&out).context("strace wrote no summary")?;
        let per = |calls: u64| calls as f64 / f64::from(TRACED_REQUESTS);
        let top: Vec<String> = strace_calls(&summary)
            .into_iter()
            .filter(|(calls, _)| per(*calls) >= 0.5)
            .map(|(calls, name)| format!("{name} {:.1}", per(calls)))
            .collect();
        Ok(Traced {
            total: per(strace_total(&summary)?),
            top: top.join(", "),
        })
    }
}

/// System calls per connection: all of them, and the most made ones ("name count, ...").
struct Traced {
    total: f64,
    top: String,
}

/// A client that talks to us on its stdin/stdout (see `HOLD_PY`); killed if dropped early.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn spawn(cmd: &mut Command) -> Result<Holder> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the bench client")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Holder {
            child,
            stdin,
            stdout,
        })
    }

    fn wait_for(&mut self, word: &str) -> Result<()> {
        self.read_until(word).map(drop)
    }

    /// The lines before `word`.
    fn read_until(&mut self, word: &str) -> Result<String> {
        let mut text = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("the bench client exited before saying {word:?}: {text}");
            }
            if line.trim() == word {
                return Ok(text);
            }
            text.push_str(&line);
        }
    }

    fn go(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(b"go\n")?;
        Ok(stdin.flush()?)
    }

    fn finish(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            proc::check_interrupted()?;
            if std::time::Instant::now() > deadline {
                bail!("the bench client did not exit within 60 s of its stdin closing");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!("the bench client exited {status}");
        }
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Descriptors and resident memory of a process.
struct Usage {
    fds: usize,
    rss_kib: u64,
}

impl Usage {
    fn minus(&self, before: &Usage, n: usize) -> Idle {
        Idle {
            fds: (self.fds as f64 - before.fds as f64) / n as f64,
            kib: (self.rss_kib as f64 - before.rss_kib as f64) / n as f64,
        }
    }
}

fn usage(pid: u32) -> Result<Usage> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(Usage { fds, rss_kib })
}

/// Runs `client` (a shell command line) inside the `latch run` that `agent` makes of a script,
/// and measures the agent's and the machine's CPU time while the client runs, not the agent's
/// start or exit. The client's output and the ticks.
pub(crate) fn agent_measured(
    agent: impl FnOnce(&str) -> Command,
    client: &str,
) -> Result<(String, Ticks)> {
    let script = format!("echo ready; read go; {client}; echo done; read end || :");
    let mut holder = Holder::spawn(&mut agent(&script))?;
    holder.wait_for("ready")?;
    let before = Mark::take(holder.child.id())?;
    holder.go()?;
    let out = holder.read_until("done")?;
    let cpu = before.since()?;
    holder.finish()?;
    Ok((out, cpu))
}

/// `Requests per second:` from ab's report.
pub fn parse_ab(out: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("Requests per second:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no \"Requests per second\" in ab's output: {out}"))
}

/// The call count of strace -c's `total` line.
pub fn strace_total(summary: &str) -> Result<u64> {
    let line = summary
        .lines()
        .find(|l| l.trim_end().ends_with(" total"))
        .with_context(|| format!("no total in strace's summary: {summary}"))?;
    // % time, seconds, usecs/call, calls, [errors,] "total"
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad strace total line {line:?}"))
}

/// (calls, name) of each system call in strace -c's table, most called first.
pub fn strace_calls(summary: &str) -> Vec<(u64, String)> {
    let mut calls: Vec<(u64, String)> = summary
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = (*f.last()?).to_owned();
            let calls = f.get(3)?.parse().ok()?;
            (f.len() >= 5 && name != "total").then_some((calls, name))
        })
        .collect();
    calls.sort_by(|a, b| b.cmp(a));
    calls
}

fn start_nginx(dir: &Path, port: u16) -> Result<Guard> {
    // nginx gives its temporary directories to its workers' user: not the policy's directory,
    // which must stay root's.
    std::fs::create_dir(dir.join("nginx-tmp"))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-tmp;
    proxy_temp_path {dir}/nginx-tmp;
    fastcgi_temp_path {dir}/nginx-tmp;
    uwsgi_temp_path {dir}/nginx-tmp;
    scgi_temp_path {dir}/nginx-tmp;
    server {{
        listen {SERVER}:{port} backlog=4096;
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
",
            dir = dir.display()
        ),
    )?;
    let mut g = Guard::spawn(
        "nginx",
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null()),
        libc::SIGQUIT,
    )?;
    proc::wait_listening(&mut g, SERVER, port)?;
    Ok(g)
}

fn start_haproxy(dir: &Path, routes: [(u16, u16); 2]) -> Result<Guard> {
    let cfg = dir.join("haproxy-conns.cfg");
    let mut text = String::from(
        "global
    maxconn 4000

defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 1m
    timeout server 1m
",
    );
    for (i, (front, back)) in routes.iter().enumerate() {
        text += &format!(
            "
listen route{i}
    bind {HAPROXY}:{front}
    server s{i} {SERVER}:{back}
"
        );
    }
    std::fs::write(&cfg, text)?;
    let mut g = Guard::spawn(
        "haproxy",
        Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null()),
        libc::SIGTERM,
    )?;
    for (front, _) in routes {
        proc::wait_listening(&mut g, HAPROXY, front)?;
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_abs_rate() {
        let out = "Concurrency Level:      32\nRequests per second:    6312.55 [#/sec] (mean)\n";
        assert_eq!(parse_ab(out).unwrap(), 6312.55);
        assert!(parse_ab("nothing").is_err());
    }

    #[test]
    fn reads_straces_total_with_and_without_errors() {
        let with = "------ ----------- ----------- --------- --------- ----------------\n\
                    100.00    0.512345          12     41234       123 total\n";
        assert_eq!(strace_total(with).unwrap(), 41234);
        let without = "100.00    0.000100           1       140           total\n";
        assert_eq!(strace_total(without).unwrap(), 140);
        let table = " 40.00    0.000040           2        20           accept4\n\
                     30.00    0.000030           1        30         5 connect\n\
                    100.00    0.000100           1        50         5 total\n";
        assert_eq!(
            strace_calls(table),
            [(30, "connect".to_owned()), (20, "accept4".to_owned())]
        );
    }
}
