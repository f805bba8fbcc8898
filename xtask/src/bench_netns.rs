//! `cargo xtask bench`, network namespaces: the bulk throughput of one connection from a
//! "pod" (a network namespace with a veth to the host) directly and through latch, and what
//! preparing namespaces costs the agent (time, memory, descriptors) for 1000 of them.

use crate::proc::{self, Guard, TempDir};
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The bench pod's veth: host side and pod side (link-local, only on this pair).
const HOST: Ipv4Addr = Ipv4Addr::new(169, 254, 253, 1);
const POD: Ipv4Addr = Ipv4Addr::new(169, 254, 253, 2);
/// Namespaces prepared at once in the cost measurement.
const MANY: usize = 1000;

pub fn run(latch: &Path, seconds: u32, repeat: u32) -> Result<()> {
    let tmp = TempDir::new("latch-bench-netns")?;
    let pod = BenchPod::create()?;
    let port = proc::free_port(HOST)?;
    let policy = crate::policy::write_tcp(tmp.path(), "bench-pod-iperf3", HOST, port)?;
    let mut direct = Vec::new();
    let mut through = Vec::new();
    for round in 1..=repeat {
        for via_latch in [false, true] {
            let label = if via_latch {
                "pod through latch"
            } else {
                "pod direct"
            };
            print!("bench: round {round}/{repeat}: {label:<24} ");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            let bps = pod.iperf3(latch, &policy, port, seconds, via_latch, tmp.path())?;
            println!("{:8.2} Gbit/s", bps / 1e9);
            if via_latch { &mut through } else { &mut direct }.push(bps);
            proc::check_interrupted()?;
        }
    }
    let (d, l) = (
        crate::bench::median(&direct).unwrap_or(0.0),
        crate::bench::median(&through).unwrap_or(0.0),
    );
    println!(
        "\none TCP connection from a pod (network namespace + veth) to the host side, iperf3 -t \
         {seconds}, median of {repeat}:\n"
    );
    println!("{:<24} {:>10} {:>10}", "case", "Gbit/s", "vs direct");
    println!("{:<24} {:>10.2} {:>10}", "pod direct", d / 1e9, "1.00");
    println!(
        "{:<24} {:>10.2} {:>10.2}",
        "pod through latch",
        l / 1e9,
        l / d
    );
    let pg = pod_pgbench(latch, &pod, tmp.path(), seconds, repeat);
    drop(pod);
    pg.and(preparation_cost(latch, tmp.path()))
}

/// pgbench select-only from the pod to a PostgreSQL 15 on the host side of its veth:
/// directly (its own password) and through latch (none).
fn pod_pgbench(latch: &Path, pod: &BenchPod, dir: &Path, seconds: u32, repeat: u32) -> Result<()> {
    let pgdir = dir.join("pg");
    std::fs::create_dir(&pgdir)?;
    let pg = crate::pg::Postgres::start(&pgdir, HOST)?;
    let hba = pgdir.join("data").join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba)?;
    text.push_str(&format!("host all all {POD}/32 scram-sha-256\n"));
    std::fs::write(&hba, text)?;
    pg.admin_sql(&pgdir, "SELECT pg_reload_conf()")?;
    let password = format!("pw-{}", std::process::id());
    pg.admin_sql(
        &pgdir,
        &format!("CREATE ROLE bench LOGIN PASSWORD '{password}'"),
    )?;
    pg.admin_sql(&pgdir, "CREATE DATABASE bench OWNER bench")?;
    let out = Command::new("pgbench")
        .args(["-i", "-q", "-s", "5", "-h"])
        .arg(&pgdir)
        .args(["-p", &pg.port.to_string(), "-U", "bench", "bench"])
        .stdin(Stdio::null())
        .output()
        .context("running pgbench -i")?;
    if !out.status.success() {
        bail!(
            "pgbench -i: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let secrets = dir.join("pod-secrets.yaml");
    crate::bench_pg::write_private(
        &secrets,
        &format!("orders-db: {{username: bench, password: {password}}}\n"),
    )?;
    let policy = dir.join("pod-pg.yaml");
    std::fs::write(
        &policy,
        crate::policy::postgres("bench-pod-pg", HOST, pg.port, &secrets)
            + "  tls:\n    mode: disable\n",
    )?;
    let mut direct = Vec::new();
    let mut through = Vec::new();
    for round in 1..=repeat {
        for via_latch in [false, true] {
            let label = if via_latch {
                "pod pgbench through latch"
            } else {
                "pod pgbench direct"
            };
            print!("bench: round {round}/{repeat}: {label:<28} ");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            let mut cmd = if via_latch {
                let mut c = crate::bench::latch_run(latch, &policy, &state_dir(&policy));
                c.arg("--").arg("ip");
                c.env_remove("PGPASSWORD");
                c
            } else {
                let mut c = Command::new("ip");
                c.env("PGPASSWORD", &password);
                c
            };
            cmd.args([
                "netns", "exec", &pod.name, "pgbench", "-n", "-S", "-c", "4", "-j", "2",
            ])
            .args(["-T", &seconds.to_string(), "-h", &HOST.to_string()])
            .args(["-p", &pg.port.to_string(), "-U", "bench", "bench"])
            .env("PGSSLMODE", "disable")
            .stderr(Stdio::null());
            let timeout = Duration::from_secs(u64::from(seconds) * 3 + 60);
            let (status, stdout) = proc::run_capture(&mut cmd, timeout)?;
            if !status.success() {
                bail!("{label}: pgbench exited {status}");
            }
            let tps = crate::bench_pg::parse_tps(&stdout)?;
            println!("{tps:10.1} tps");
            if via_latch { &mut through } else { &mut direct }.push(tps);
            proc::check_interrupted()?;
        }
    }
    let (d, l) = (
        crate::bench::median(&direct).unwrap_or(0.0),
        crate::bench::median(&through).unwrap_or(0.0),
    );
    println!(
        "\npgbench -S -c 4 -j 2 -T {seconds} (scale 5) from the pod to PostgreSQL 15 on the host \
         side, median of {repeat}:\n"
    );
    println!("{:<28} {:>10} {:>10}", "case", "tps", "vs direct");
    println!("{:<28} {:>10.1} {:>10}", "pod pgbench direct", d, "1.00");
    println!(
        "{:<28} {:>10.1} {:>10.2}",
        "pod pgbench through latch",
        l,
        l / d
    );
    Ok(())
}

/// A network namespace with a veth pair to the host, removed on drop.
struct BenchPod {
    name: String,
    host_if: String,
}

impl BenchPod {
    fn create() -> Result<Self> {
        let pid = std::process::id();
        let pod = Self {
            name: format!("latch-bench-pod-{pid}"),
            host_if: format!("lbp{}h", pid % 100_000),
        };
        let ip = |args: &[&str]| proc::run(Command::new("ip").args(args));
        ip(&["netns", "add", &pod.name])?;
        ip(&[
            "link",
            "add",
            &pod.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.name,
        ])?;
        ip(&["addr", "add", &format!("{HOST}/30"), "dev", &pod.host_if])?;
        ip(&["link", "set", &pod.host_if, "up"])?;
        let n = &pod.name;
        ip(&["-n", n, "addr", "add", &format!("{POD}/30"), "dev", "eth0"])?;
        ip(&["-n", n, "link", "set", "eth0", "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        Ok(pod)
    }

    /// One iperf3 run from inside the pod to the host side; received bits per second.
    fn iperf3(
        &self,
        latch: &Path,
        policy: &Path,
        port: u16,
        seconds: u32,
        via_latch: bool,
        dir: &Path,
    ) -> Result<f64> {
        let mut server = Guard::spawn(
            "iperf3 server",
            Command::new("iperf3")
                .args(["-s", "-1", "-B", &HOST.to_string(), "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
            libc::SIGTERM,
        )?;
        proc::wait_listening(&mut server, HOST, port)?;
        let mut cmd = if via_latch {
            let mut c = crate::bench::latch_run(latch, policy, &state_dir(policy));
            c.args(["--", "ip"]);
            c
        } else {
            Command::new("ip")
        };
        cmd.args([
            "netns",
            "exec",
            &self.name,
            "iperf3",
            "-c",
            &HOST.to_string(),
        ])
        .args(["-p", &port.to_string(), "-t", &seconds.to_string(), "-J"]);
        let err_path = dir.join("pod-client.stderr");
        cmd.stderr(std::fs::File::create(&err_path)?);
        let timeout = Duration::from_secs(u64::from(seconds) + 30);
        let (status, stdout) = proc::run_capture(&mut cmd, timeout)?;
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        if !status.success() {
            bail!("iperf3 in the pod exited {status}: {}", stderr.trim());
        }
        crate::bench::parse_iperf3(&stdout).with_context(|| stderr.trim().to_owned())
    }
}

impl Drop for BenchPod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup of the bench's own (never the root), removed on drop.
struct BenchCgroup(PathBuf);

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Named namespaces made in one `ip -batch`, deleted (in one batch) on drop.
struct ManyNamespaces(Vec<String>);

impl ManyNamespaces {
    fn create(n: usize) -> Result<Self> {
        let pid = std::process::id();
        let names: Vec<String> = (0..n)
            .map(|i| format!("latch-bench-ns-{pid}-{i}"))
            .collect();
        let made = Self(names);
        batch(made.0.iter().map(|n| format!("netns add {n}")))?;
        Ok(made)
    }
}

impl Drop for ManyNamespaces {
    fn drop(&mut self) {
        let _ = batch(self.0.iter().map(|n| format!("netns del {n}")));
    }
}

fn batch(lines: impl Iterator<Item = String>) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("ip -batch")?;
    {
        let mut stdin = child.stdin.take().context("ip stdin")?;
        for line in lines {
            std::io::Write::write_all(&mut stdin, format!("{line}\n").as_bytes())?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("ip -batch exited {status}");
    }
    Ok(())
}

fn proc_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn status(admin: &str) -> Result<serde_json::Value> {
    let out = proc::output(Command::new("curl").args(["-sS", &format!("http://{admin}/status")]))?;
    serde_json::from_str(&out).context("agent /status")
}

fn served(admin: &str) -> Result<usize> {
    Ok(status(admin)?["netns"].as_array().map_or(0, Vec::len))
}

fn wait_served(admin: &str, want: usize, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if served(admin)? == want {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!(
                "{} namespaces served after {within:?}, expected {want}",
                served(admin)?
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What 1000 prepared namespaces cost a running agent.
fn preparation_cost(latch: &Path, dir: &Path) -> Result<()> {
    println!("\nbench: preparing {MANY} network namespaces");
    let root = cgroup_v2_root()?;
    let cg = BenchCgroup(root.join(format!("latch-bench-netns-{}", std::process::id())));
    std::fs::create_dir(&cg.0).with_context(|| format!("create {}", cg.0.display()))?;
    let admin = format!("127.0.0.1:{}", proc::free_port(Ipv4Addr::LOCALHOST)?);
    let policy = crate::policy::write_tcp(dir, "bench-netns", HOST, 9)?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let mut agent = Guard::spawn(
        "latch agent",
        Command::new(latch)
            .args(["agent", "--policy"])
            .arg(&policy)
            .arg("--state-dir")
            .arg(state_dir(&policy))
            .arg("--cgroup")
            .arg(&cg.0)
            .args(["--listen", "127.0.0.1:0", "--listen", "[::1]:0"])
            .args(["--admin", &admin, "--instance"])
            .arg(format!("bench-netns-{}", std::process::id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
        libc::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let base = loop {
        agent.ensure_running()?;
        if let Ok(n) = served(&admin) {
            break n;
        }
        if Instant::now() > deadline {
            bail!("the agent did not answer on {admin}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let pid = agent.pid();
    let (rss0, fds0) = (proc_kb(pid, "VmRSS")?, fds(pid)?);
    let started = Instant::now();
    let many = ManyNamespaces::create(MANY)?;
    let made = started.elapsed();
    let all_served = wait_served(&admin, base + MANY, Duration::from_secs(60))? + made;
    let s = status(&admin)?;
    let times = &s["ebpf"]["netns_prepare_us"];
    let at = |q: &str| times[q].as_u64().unwrap_or(0);
    let (rss1, fds1) = (proc_kb(pid, "VmRSS")?, fds(pid)?);
    let started = Instant::now();
    drop(many);
    let released = wait_served(&admin, base, Duration::from_secs(60))? + started.elapsed();
    let (rss2, fds2) = (proc_kb(pid, "VmRSS")?, fds(pid)?);
    agent.stop();
    println!(
        "\n{MANY} named namespaces (`ip -batch`: {:.0} ms to make them):\n",
        made.as_secs_f64() * 1e3
    );
    println!("{:<44} {:>14}", "what", "measured");
    for (label, q) in [
        ("median", "p50"),
        ("99th percentile", "p99"),
        ("longest", "max"),
    ] {
        println!(
            "{:<44} {:>11} µs",
            format!("agent's time to prepare one ({label})"),
            at(q)
        );
    }
    println!(
        "{:<44} {:>11.0} ms",
        "first `ip netns add` to all served",
        all_served.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>11.1} MB",
        "agent memory (VmRSS) for all of them",
        (rss1.saturating_sub(rss0)) as f64 / 1024.0
    );
    println!(
        "{:<44} {:>11.1} kB",
        "agent memory per namespace",
        (rss1.saturating_sub(rss0)) as f64 / MANY as f64
    );
    println!(
        "{:<44} {:>14}",
        "agent descriptors per namespace",
        format!("{:.2}", (fds1 - fds0) as f64 / MANY as f64)
    );
    println!(
        "{:<44} {:>11.0} ms",
        "all deleted to all released",
        released.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>14}",
        "after release: descriptors, VmRSS",
        format!("{} (was {fds0}), {} kB (was {rss0})", fds2, rss2)
    );
    Ok(())
}

fn cgroup_v2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup v2 hierarchy mounted")
}

/// A state directory beside the bench's policy file (in its temporary directory), so that no
/// run leaves `/var/lib/latch` behind.
fn state_dir(policy: &Path) -> PathBuf {
    policy
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join("latch-state")
}
