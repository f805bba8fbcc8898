//! Limits: connections per workload, handshake timeout, and an accept loop that survives
//! running out of file descriptors.
use std::{
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    postgres::{self, PgCluster},
    servers::{EchoServer, free_port},
    tcp_policy,
};

fn probe(cg: &TestCgroup, args: &[&str]) -> (bool, String) {
    let out = cg
        .command(bins::probe())
        .args(args)
        .output()
        .expect("run latch-probe");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Issue 18: a flood of refusals is not a flood of log lines. Each refusal is counted (and
/// audited, within the audit's own rate limit); the log says a few a second and how many it
/// left out.
#[test]
fn a_refusal_storm_writes_one_line_per_reason_a_second_with_the_count() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &tcp_policy("capped", "127.0.0.2", target.addr.port()),
        &cg,
        &["--max-per-workload", "1"],
    );
    // 300 connections held at once: one gets through, 299 are refused.
    let (_, out) = probe(&cg, &["hold", &target.addr.to_string(), "300", "1500"]);
    assert!(out.contains("echoed=1 refused=299"), "{out}");
    assert!(
        agent
            .metrics()
            .contains("latch_connections_refused_total{reason=\"workload_limit\"} 299"),
        "{}",
        agent.metrics()
    );
    // The storm is over once a second passes with no refusal; then every summary is out.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let log = agent.log();
    // The first refusal of the storm in full, the rest as counts, one line a second.
    let full = log
        .lines()
        .filter(|l| l.contains("refused: workload over its connection limit"))
        .count();
    let counts: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("in the last second: workload over its connection limit"))
        .map(|l| {
            let n = l.split("refused ").nth(1).and_then(|r| r.split(' ').next());
            n.and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no count in {l:?}"))
        })
        .collect();
    assert!(
        full >= 1 && full + counts.len() <= 6,
        "{full} full lines and {} summaries for 299 refusals in under 2 s:\n{log}",
        counts.len()
    );
    assert_eq!(
        full as u64 + counts.iter().sum::<u64>(),
        299,
        "every refusal is logged or counted once:\n{log}"
    );
    // The audit trail has the same summaries.
    let summarised: u64 = agent
        .audit()
        .iter()
        .filter(|r| r["reason"] == "workload over its connection limit")
        .filter_map(|r| r["count"].as_u64())
        .sum();
    assert_eq!(
        summarised,
        counts.iter().sum::<u64>(),
        "{:?}",
        agent.audit()
    );
    // A lone refusal after the storm is logged in full again.
    let _ = probe(&cg, &["hold", &target.addr.to_string(), "2", "200"]);
    let later = agent
        .log()
        .lines()
        .filter(|l| l.contains("refused: workload over its connection limit"))
        .count();
    assert_eq!(later, full + 1, "{}", agent.log());
    assert!(agent.stop().success());
}

#[test]
fn a_workload_over_its_limit_is_refused_audited_and_counted() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &tcp_policy("capped", "127.0.0.2", target.addr.port()),
        &cg,
        &["--max-per-workload", "2"],
    );
    // Five connections held open at once from one cgroup: two get through, three are reset.
    let (_, out) = probe(&cg, &["hold", &target.addr.to_string(), "5", "1500"]);
    assert!(
        out.contains("echoed=2 refused=3"),
        "expected 2 through and 3 refused: {out}\n{}",
        agent.log()
    );
    // The slots come back when the connections close.
    let (ok, out) = probe(&cg, &["echo", &target.addr.to_string(), "2", "1000"]);
    assert!(ok, "after the held connections closed: {out}");

    let records = agent.wait_audit(7);
    // One record per refused connection (the summary of the storm, a second later, has a
    // `count` and no connection).
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["outcome"] == "refused" && r["count"].is_null())
        .collect();
    assert_eq!(refused.len(), 3, "{records:#?}");
    for r in &refused {
        assert_eq!(r["policy"], "capped");
        assert!(
            r["reason"]
                .as_str()
                .unwrap()
                .contains("too many connections from this workload (at most 2 at once)"),
            "{r}"
        );
        let rel = cg
            .path()
            .strip_prefix(latch_tests::cgroup::v2_root())
            .unwrap()
            .display()
            .to_string();
        assert_eq!(r["workload"]["cgroup"], format!("/{rel}"));
    }
    assert!(
        agent
            .metrics()
            .contains("latch_connections_refused_total{reason=\"workload_limit\"} 3"),
        "{}",
        agent.metrics()
    );
    assert_eq!(
        target.accepted(),
        4,
        "a refused connection reached the target"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_postgres_client_over_the_limit_gets_sqlstate_53300() {
    let pg = PgCluster::start("127.0.0.3", "scram-pw-x1", "md5-pw-x1", "plain-pw-x1");
    let secrets = TempDir::new("limit-pg");
    let file = secrets.write(
        "secrets.yaml",
        &postgres::secrets_yaml(postgres::SCRAM_USER, "scram-pw-x1"),
    );
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &postgres::policy_yaml("pg-capped", pg.addr, &file, ""),
        &cg,
        &["--max-per-workload", "1"],
    );
    // One session held open by psql (pg_sleep), a second one refused while it lasts.
    let psql = |sql: &str| {
        let mut cmd = cg.command(postgres::bin("psql"));
        cmd.args(["-w", "-X", "-A", "-t", "-h", "127.0.0.3", "-p"])
            .arg(pg.addr.port().to_string())
            .args([
                "-U",
                postgres::SCRAM_USER,
                "-d",
                postgres::APP_DB,
                "-c",
                sql,
            ])
            .env_remove("PGPASSWORD");
        cmd
    };
    let mut holder = psql("select pg_sleep(3)").spawn().expect("psql");
    // The first session holds the workload's slot once its query runs on the server.
    assert!(
        latch_tests::eventually(Duration::from_secs(10), || pg.sql(
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(3)' \
             and state = 'active'"
        ) == "1"),
        "the first session never started its query:\n{}",
        agent.log()
    );
    let second = psql("select 1").output().expect("psql");
    let _ = holder.wait();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "second session was admitted");
    assert!(
        err.contains("too many connections from this workload (at most 1 at once)"),
        "psql said: {err}"
    );
    let records = agent.wait_audit(2);
    assert!(records.iter().any(|r| r["outcome"] == "refused"));
    assert!(agent.stop().success());
}

/// A listener whose accept queue is full: further SYNs are dropped, so a connect to it hangs.
struct BlackHole {
    addr: SocketAddr,
    _listener: std::net::TcpListener,
    _fillers: Vec<std::net::TcpStream>,
}

impl BlackHole {
    fn start(ip: &str) -> Self {
        let addr: SocketAddr = format!("{ip}:{}", free_port(ip)).parse().unwrap();
        let listener = TcpListener::bind(addr).expect("bind black hole");
        // Backlog 0: the kernel keeps one connection in the queue, then drops SYNs.
        // SAFETY: listen(2) on a socket this function owns.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let fillers = (0..3)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
            })
            .collect();
        Self {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// Runs one echo client through `agent` to `target`, whose handshake never finishes: the
/// client must fail within a few seconds (not wait for the connect timeout), and the agent must
/// audit and count it as cut at a 1 s `--handshake-timeout`.
fn assert_cut_at_the_timeout(agent: Agent, cg: &TestCgroup, target: &str, policy: &str) {
    let started = Instant::now();
    let (ok, out) = probe(cg, &["echo", target, "1", "10"]);
    let took = started.elapsed();
    assert!(
        !ok,
        "a connection whose handshake never ends succeeded: {out}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the client waited {took:?}: {out}"
    );
    let records = agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "failed");
    assert_eq!(
        records[0]["reason"], "handshake did not finish within 1s",
        "{records:#?}"
    );
    let metric = format!("latch_connections_total{{policy=\"{policy}\",outcome=\"timed_out\"}} 1");
    assert!(agent.metrics().contains(&metric), "{}", agent.metrics());
    assert!(agent.stop().success());
}

#[test]
fn a_handshake_that_takes_too_long_is_cut_at_the_timeout() {
    let hole = BlackHole::start("127.0.0.4");
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &tcp_policy("slow", "127.0.0.4", hole.addr.port()),
        &cg,
        // The connect timeout alone would wait 30 s.
        &["--handshake-timeout", "1", "--connect-timeout", "30"],
    );
    assert_cut_at_the_timeout(agent, &cg, &hole.addr.to_string(), "slow");
}

#[test]
fn a_tls_target_that_never_answers_the_handshake_is_cut_at_the_timeout() {
    // Accepts, then says nothing: the TLS handshake toward it never completes.
    let silent = TcpListener::bind(("127.0.0.6", 0)).expect("bind");
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    let cg = TestCgroup::new();
    let policy = format!(
        "{}  tls:\n    mode: require\n",
        tcp_policy("silent-tls", "127.0.0.6", addr.port())
    );
    let agent = Agent::start_args(&policy, &cg, &["--handshake-timeout", "1"]);
    assert_cut_at_the_timeout(agent, &cg, &addr.to_string(), "silent-tls");
}

#[test]
fn a_postgres_target_that_never_answers_times_out_with_an_error_response() {
    // A server that accepts and then says nothing: latch's startup to it never completes.
    let silent = TcpListener::bind(("127.0.0.5", 0)).expect("bind");
    let addr = silent.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        let silent = silent.try_clone().unwrap();
        std::thread::spawn(move || {
            for s in silent.incoming().flatten() {
                held.lock().unwrap().push(s);
            }
        });
    }
    let secrets = TempDir::new("timeout-pg");
    let file = secrets.write(
        "secrets.yaml",
        &postgres::secrets_yaml("app", "pw-never-used-9"),
    );
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &postgres::policy_yaml("mute-db", addr, &file, "  tls: {mode: disable}\n"),
        &cg,
        &["--handshake-timeout", "1"],
    );
    let started = Instant::now();
    let out = cg
        .command(postgres::bin("psql"))
        .args(["-w", "-X", "-h", "127.0.0.5", "-p"])
        .arg(addr.port().to_string())
        .args(["-U", "app", "-d", "app", "-c", "select 1"])
        .output()
        .expect("psql");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(
        err.contains("latch: policy \"mute-db\": connecting to the target timed out after 1s"),
        "psql said: {err}"
    );
    assert!(!err.contains("pw-never-used-9"));
    let records = agent.wait_audit(1);
    assert_eq!(records[0]["reason"], "handshake did not finish within 1s");
    assert!(agent.stop().success());
    drop(held);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count()
}

fn prlimit_nofile(pid: u32, soft: u64, hard: u64) {
    let prlimit = bins::tool("prlimit", "the Debian package util-linux");
    let st = Command::new(prlimit)
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("run prlimit");
    assert!(st.success(), "prlimit --nofile={soft}:{hard} failed");
}

/// RLIMIT_NOFILE of the running agent is lowered (prlimit(1), from outside) so accept(2) fails
/// with EMFILE; the accept loop backs off instead of dying, and once descriptors are available
/// again the same listener serves.
#[test]
fn running_out_of_file_descriptors_does_not_kill_the_listener() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("fds", "127.0.0.2", target.addr.port()), &cg);
    let (ok, out) = probe(&cg, &["echo", &target.addr.to_string(), "1", "100"]);
    assert!(ok, "{out}");
    let pid = agent.pid();
    let in_use = open_fds(pid) as u64;
    prlimit_nofile(pid, in_use + 2, 20_000);
    let (ok, out) = probe(&cg, &["echo", &target.addr.to_string(), "20", "1000"]);
    assert!(
        !ok,
        "20 connections with 2 spare descriptors all succeeded: {out}"
    );
    agent.wait_log("Too many open files", 1);
    assert!(
        agent.log().contains("accept failed; backing off"),
        "{}",
        agent.log()
    );
    prlimit_nofile(pid, 20_000, 20_000);
    let (ok, out) = probe(&cg, &["echo", &target.addr.to_string(), "20", "1000"]);
    assert!(ok, "the listener did not recover: {out}\n{}", agent.log());
    assert!(agent.stop().success());
}

#[test]
fn over_max_connections_a_connect_is_reset_at_once_rather_than_left_waiting() {
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &tcp_policy("echo", "127.0.0.2", echo.addr.port()),
        &cg,
        &["--max-connections", "2"],
    );
    let addr = echo.addr.to_string();
    // Two connections take the broker's capacity and hold it for 6 s.
    let holder = cg
        .command(bins::probe())
        .args(["hold", &addr, "2", "6000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start holder");
    let _holder = latch_tests::Killed(holder);
    assert!(
        latch_tests::eventually(Duration::from_secs(5), || agent.count("active") == 2),
        "the two held connections never became active"
    );
    let started = Instant::now();
    let (_, out) = probe(&cg, &["hold", &addr, "1", "100"]);
    assert!(out.contains("echoed=0 refused=1"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the third connect waited {:?} instead of being reset",
        started.elapsed()
    );
    assert!(
        agent
            .metrics()
            .contains("latch_connections_refused_total{reason=\"capacity\"} 1"),
        "{}",
        agent.metrics()
    );
}

#[test]
fn the_admin_endpoint_bounds_its_connections_and_closes_idle_ones() {
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("x", "127.0.0.2", 9), &cg);
    // Anyone on the node can open connections to the admin port and send nothing.
    let idle: Vec<std::net::TcpStream> = (0..32)
        .map(|_| std::net::TcpStream::connect(agent.admin).expect("connect to admin"))
        .collect();
    assert!(
        latch_tests::eventually(Duration::from_secs(3), || latch_tests::http::get(
            agent.admin,
            "/healthz"
        )
        .is_err()),
        "a 33rd admin connection was served while 32 idle ones were open"
    );
    // Idle connections are closed after the header timeout; the endpoint serves again.
    assert!(
        latch_tests::eventually(Duration::from_secs(15), || matches!(
            latch_tests::http::get(agent.admin, "/healthz"),
            Ok((200, _))
        )),
        "the admin endpoint never came back after the idle connections timed out"
    );
    drop(idle);
}

#[test]
fn an_idle_connection_holds_its_two_sockets_and_no_pipes() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("idle", "127.0.0.2", target.addr.port()), &cg);
    let before = open_fds(agent.pid());
    // 300 connections, each echoes a byte (both directions splice through a pipe), then idle.
    let conns = 300;
    let holder = cg
        .command(bins::probe())
        .args(["hold", &target.addr.to_string(), &conns.to_string(), "8000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start holder");
    let _holder = latch_tests::Killed(holder);
    assert!(
        latch_tests::eventually(Duration::from_secs(6), || agent.count("active") == conns),
        "the held connections never all became active: {}",
        agent.count("active")
    );
    let during = open_fds(agent.pid());
    let per_conn = (during - before) as f64 / conns as f64;
    // Two sockets each, and the few drained pipes kept for reuse (at most 16 per connection
    // thread); with a pipe pair per direction for life it was 6.
    assert!(
        per_conn < 2.5,
        "{per_conn:.2} descriptors per idle connection ({before} before, {during} with {conns} held)"
    );
    assert!(agent.stop().success());
}

#[test]
fn with_no_pipes_to_be_had_the_relay_copies_through_a_buffer() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &tcp_policy("nopipes", "127.0.0.2", target.addr.port()),
        &cg,
        &["--max-pipes", "0"],
    );
    // One connection first: what the agent makes once, on first use, and keeps (the
    // workload's cgroup watch) is not left behind by the connections counted below.
    let (ok, out) = probe(&cg, &["echo", &target.addr.to_string(), "1", "1024"]);
    assert!(ok, "{out}\n{}", agent.log());
    agent.wait_count("relayed", 1);
    let before = open_fds(agent.pid());
    // 4 connections, each echoing 1 MB.
    let (ok, out) = probe(
        &cg,
        &[
            "echo",
            &target.addr.to_string(),
            "4",
            &(1 << 20).to_string(),
        ],
    );
    assert!(ok, "{out}\n{}", agent.log());
    agent.wait_count("relayed", 5);
    assert!(
        agent.metrics().contains("latch_relay_pipes 0"),
        "a pipe was made past --max-pipes 0:\n{}",
        agent.metrics()
    );
    // Nothing left behind (other descriptors of the agent's may come and go meanwhile).
    assert!(
        latch_tests::eventually(Duration::from_secs(3), || open_fds(agent.pid()) <= before),
        "descriptors left behind after the connections closed: {} > {before}",
        open_fds(agent.pid())
    );
    assert!(agent.stop().success());
}
