//! Issue 18 item 5, "upgrades lose nothing": a second `latch agent` of the same instance takes
//! the running one's listeners and programs over under load; nothing is refused, nothing goes
//! around latch, and the old agent exits once drained. A new agent that cannot start leaves
//! the old one serving.
//!
//! Plain relays (`tcp`, PostgreSQL without TLS) go to the new agent with their sockets and
//! carry on there after the old agent has exited; a session whose TLS latch terminates is
//! drained by the old agent.
//!
//! The workload's direct path to the target is blocked (an iptables rule resets connections to
//! it that do not carry latch's mark), so a connection that bypassed latch fails.
use std::{
    io::BufRead as _,
    process::{Command, Stdio},
    time::Duration,
};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    servers::{EchoServer, free_port},
    tcp_policy,
};

/// latch's default SO_MARK on its own outbound sockets.
const MARK: &str = "0x1a7c0001";

/// An iptables rule rejecting connections to the target that do not carry latch's mark;
/// removed on drop.
struct DirectPathBlocked(Vec<String>);

impl DirectPathBlocked {
    fn new(target: std::net::SocketAddr) -> Self {
        let rule: Vec<String> = [
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &target.ip().to_string(),
            "--dport",
            &target.port().to_string(),
            "-m",
            "mark",
            "!",
            "--mark",
            MARK,
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let iptables = bins::tool("iptables", "the Debian package iptables");
        let out = Command::new(&iptables)
            .arg("-I")
            .args(&rule)
            .output()
            .expect("run iptables");
        assert!(
            out.status.success(),
            "iptables -I failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let me = Self(rule);
        // The block works: this process, outside the intercepted cgroup, cannot reach it.
        assert!(
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_err(),
            "the direct path to {target} is not blocked"
        );
        me
    }
}

impl Drop for DirectPathBlocked {
    fn drop(&mut self) {
        let _ = Command::new(bins::tool("iptables", "the Debian package iptables"))
            .arg("-D")
            .args(&self.0)
            .output();
    }
}

struct Setup {
    target: EchoServer,
    cg: TestCgroup,
    policy: String,
    _blocked: DirectPathBlocked,
    /// Shared by both agents: the upgrade socket lives there.
    state: TempDir,
    instance: String,
    listen: String,
}

fn setup(name: &str) -> Setup {
    let target = EchoServer::start("127.0.0.2");
    let blocked = DirectPathBlocked::new(target.addr);
    let policy = tcp_policy("echo", "127.0.0.2", target.addr.port());
    Setup {
        target,
        cg: TestCgroup::new(),
        policy,
        _blocked: blocked,
        state: TempDir::new("upgrade-state"),
        instance: format!("test-upgrade-{name}-{}", std::process::id()),
        listen: format!("127.0.0.1:{}", free_port("127.0.0.1")),
    }
}

impl Setup {
    fn args<'a>(&'a self, grace: &'a str) -> Vec<&'a str> {
        vec![
            "--instance",
            &self.instance,
            "--state-dir",
            self.state.path().to_str().unwrap(),
            "--listen",
            &self.listen,
            "--grace-period",
            grace,
        ]
    }

    fn echo(&self) -> bool {
        self.cg
            .command(bins::probe())
            .args(["echo", &self.target.addr.to_string(), "1", "1000"])
            .output()
            .expect("probe")
            .status
            .success()
    }
}

/// Parses `key=value` words of the probe's first line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// Runs an agent that should fail to start, its output in a file of `dir`; one still running
/// after 20 s is killed (by its pid) and reported as started. Returns (success, stderr).
fn must_fail(mut cmd: Command, dir: &TempDir) -> (bool, String) {
    let err = dir.path().join("failing.err");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start latch agent");
    let status = latch_tests::wait_for(Duration::from_secs(20), || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (
        status.is_none_or(|s| s.success()),
        std::fs::read_to_string(&err).unwrap_or_default(),
    )
}

/// Outcomes other than `relayed` in an agent's audit trail.
fn not_relayed(agent: &Agent) -> Vec<serde_json::Value> {
    agent
        .audit()
        .into_iter()
        .filter(|r| r["outcome"] != "relayed")
        .collect()
}

#[test]
fn an_upgrade_under_load_refuses_nothing_and_the_old_agent_exits() {
    let s = setup("load");
    let mut old = Agent::start_args(&s.policy, &s.cg, &s.args("30"));
    assert!(s.echo(), "latch does not relay to the target");

    // 20 held relays pinging every 50 ms and 100 new connections a second, for 6 s.
    let probe =
        s.cg.command(bins::probe())
            .args(["steady", &s.target.addr.to_string(), "20", "6000", "100"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the probe");
    std::thread::sleep(Duration::from_millis(1500));
    let new = Agent::start_args(&s.policy, &s.cg, &s.args("30"));
    let out = probe.wait_with_output().expect("probe");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let first = text.lines().next().unwrap_or_default();
    eprintln!("probe: {text}");
    assert!(
        field(first, "new_ok") >= 400,
        "too few new connections: {text}"
    );
    assert_eq!(
        field(first, "new_failed"),
        0,
        "new connections failed during the upgrade:\n{text}\nold agent:\n{}\nnew agent:\n{}",
        old.log(),
        new.log()
    );
    assert_eq!(
        field(first, "held_failed"),
        0,
        "held relays were cut:\n{text}\nold agent:\n{}",
        old.log()
    );
    assert_eq!(field(first, "held_ok"), 20, "{text}");

    // The held relays have closed: the old agent has nothing left to drain and exits.
    let status = old.exited_within(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old agent did not exit cleanly after the upgrade ({status:?}):\n{}",
        old.log()
    );
    let old_log = old.log();
    assert!(
        old_log.contains("the new agent is ready"),
        "old agent:\n{old_log}"
    );
    // The new agent serves: new connections after the upgrade are its.
    assert!(s.echo(), "no relay after the upgrade:\n{}", new.log());
    assert!(new.count("relayed") > 0, "{}", new.log());
    // Nothing went around latch (the target saw only latch's connections, all of which the
    // probe accounted for) and nothing was refused by either agent.
    assert_eq!(new.count("refused"), 0, "{}", new.log());
    assert_eq!(new.count("failed"), 0, "{}", new.log());
    assert_eq!(not_relayed(&old), Vec::<serde_json::Value>::new());
    assert_eq!(not_relayed(&new), Vec::<serde_json::Value>::new());
    drop(old);
    assert!(new.stop().success());
}

#[test]
fn a_new_agent_with_a_bad_policy_leaves_the_old_one_serving() {
    let s = setup("bad");
    let mut old = Agent::start_args(&s.policy, &s.cg, &s.args("3"));
    assert!(s.echo());

    let dir = TempDir::new("upgrade-bad");
    let bad = dir.write(
        "policy.yaml",
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nspec: [",
    );
    let mut cmd = Command::new(bins::latch());
    cmd.arg("agent")
        .arg("--policy")
        .arg(&bad)
        .arg("--cgroup")
        .arg(s.cg.path())
        .args(s.args("3"))
        .args(["--admin", "127.0.0.1:0"]);
    let (ok, stderr) = must_fail(cmd, &dir);
    assert!(!ok, "an agent with a bad policy started:\n{stderr}");

    // A new agent that fails after the hand-over began (its programs loaded, then its audit
    // log cannot be opened: the path is a directory) is no different: the old agent sees it
    // go and carries on.
    let mut cmd = Command::new(bins::latch());
    cmd.arg("agent")
        .arg("--policy")
        .arg(old.dir.path().join("policy.yaml"))
        .arg("--cgroup")
        .arg(s.cg.path())
        .args(s.args("3"))
        .args(["--admin", "127.0.0.1:0", "--audit-log"])
        .arg(dir.path())
        .env("LATCH_LOG", "info");
    let (ok, stderr) = must_fail(cmd, &dir);
    assert!(!ok, "the agent started:\n{stderr}");
    assert!(
        stderr.contains("upgrading"),
        "the failing agent never reached the running one:\n{stderr}"
    );
    old.wait_log("upgrade abandoned", 1);

    for _ in 0..5 {
        assert!(s.echo(), "the old agent stopped serving:\n{}", old.log());
    }
    assert_eq!(old.count("refused"), 0, "{}", old.log());
    assert_eq!(not_relayed(&old), Vec::<serde_json::Value>::new());
    // And it still takes a good upgrade afterwards.
    let new = Agent::start_args(&s.policy, &s.cg, &s.args("3"));
    assert!(
        old.exited_within(Duration::from_secs(10)).is_some(),
        "{}",
        old.log()
    );
    assert!(s.echo(), "{}", new.log());
    drop(old);
    assert!(new.stop().success());
}

/// Whether process `pid` is gone (or a zombie waiting for a parent that is not this test).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Runs `latch upgrade --pid PID` with its output (and the new agent's, which inherits it) in
/// files of `dir`: (success, stdout, stderr) once the command returns.
fn latch_upgrade(pid: u32, dir: &TempDir) -> (bool, String, String) {
    let out = dir.path().join("upgrade.out");
    let err = dir.path().join("upgrade.err");
    let status = Command::new(bins::latch())
        .args(["upgrade", "--pid", &pid.to_string()])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .expect("latch upgrade");
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    (status.success(), read(&out), read(&err))
}

/// Ends an agent `latch upgrade` started (not this test's child) by its pid.
struct Started(u32);

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the agent this test had `latch upgrade` start, by its pid.
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        latch_tests::eventually(Duration::from_secs(15), || gone(self.0));
    }
}

/// systemd's `ExecReload=latch upgrade --pid $MAINPID`, without systemd: the binary starts
/// with the running agent's own arguments and takes over; with a bad policy file it fails
/// and the running agent carries on.
#[test]
fn latch_upgrade_replaces_the_agent_by_pid_and_fails_cleanly_on_a_bad_policy() {
    let s = setup("cmd");
    let mut old = Agent::start_args(&s.policy, &s.cg, &s.args("3"));
    assert!(s.echo());
    let policy = old.dir.path().join("policy.yaml");
    let good = std::fs::read_to_string(&policy).unwrap();

    // A bad policy file: the running agent keeps its configuration, the upgrade fails.
    old.rewrite_policy("apiVersion: latch.dev/v1alpha1\nkind: Policy\nspec: [");
    old.wait_log("reload rejected", 1);
    let (ok, _, stderr) = latch_upgrade(old.pid(), &s.state);
    assert!(!ok, "the upgrade succeeded with a bad policy: {stderr}");
    assert!(stderr.contains("carries on"), "{stderr}");
    for _ in 0..3 {
        assert!(s.echo(), "the old agent stopped serving:\n{}", old.log());
    }

    old.rewrite_policy(&good);
    old.wait_log("configuration reloaded", 1);
    let (ok, stdout, stderr) = latch_upgrade(old.pid(), &s.state);
    assert!(ok, "{stderr}\n{}", old.log());
    let new_pid: u32 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stdout:?}"));
    let _new = Started(new_pid);
    assert!(
        old.exited_within(Duration::from_secs(10)).is_some(),
        "{}",
        old.log()
    );
    assert!(s.echo(), "nothing serves after `latch upgrade`");
    assert!(!gone(new_pid));
}

/// Links attached to a cgroup, per bpftool.
fn links_on(cgroup_id: u64) -> usize {
    let out = Command::new(bins::tool("bpftool", "bpftool"))
        .args(["-j", "link", "show"])
        .output()
        .expect("bpftool");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["cgroup_id"].as_u64() == Some(cgroup_id))
        .count()
}

/// Removes an instance's pins even when the test fails.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(bins::latch())
            .args(["cleanup", "--instance", &self.0])
            .output();
    }
}

/// With `--keep-interception` the new agent takes the pins over and pins its own links; the
/// old agent's links go when it detaches, so the cgroup ends with the new agent's 5 links.
#[test]
fn an_upgrade_with_kept_interception_leaves_the_new_agents_links_pinned() {
    let s = setup("keep");
    let _cleanup = Cleanup(s.instance.clone());
    let mut args = s.args("3");
    args.push("--keep-interception");
    let mut old = Agent::start_args(&s.policy, &s.cg, &args);
    assert_eq!(links_on(s.cg.id()), 5);
    let new = Agent::start_args(&s.policy, &s.cg, &args);
    assert!(
        old.exited_within(Duration::from_secs(10)).is_some(),
        "{}",
        old.log()
    );
    assert_eq!(
        links_on(s.cg.id()),
        5,
        "the old agent's links are still attached"
    );
    let pins = std::fs::read_dir(format!("/sys/fs/bpf/latch/{}", s.instance))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pins, 5, "the new agent's links are not pinned");
    assert!(s.echo(), "{}", new.log());
    assert!(new.signal_and_wait(libc::SIGTERM).success());
    let out = Command::new(bins::latch())
        .args(["cleanup", "--instance", &s.instance])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    latch_tests::leftovers::assert_none(s.cg.id(), None);
}

/// A `latch-probe across` run: held connections with data moved once, waiting for the go file
/// to move data again.
struct Across {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    go: std::path::PathBuf,
}

impl Across {
    fn start(s: &Setup, target: std::net::SocketAddr, conns: usize, bytes: usize) -> Self {
        let go = s.state.path().join(format!("go-{}", target.port()));
        let mut child =
            s.cg.command(bins::probe())
                .args([
                    "across",
                    &target.to_string(),
                    &conns.to_string(),
                    &bytes.to_string(),
                ])
                .arg(&go)
                .stdout(Stdio::piped())
                .spawn()
                .expect("start the probe");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut me = Self { child, out, go };
        let before = me.line();
        assert_eq!(
            before,
            format!("before ok={conns} failed=0"),
            "the held connections did not get through before the upgrade"
        );
        me
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("probe output");
        line.trim_end().to_string()
    }

    /// Moves data again on every connection and closes them: the probe's report.
    fn finish(mut self) -> String {
        std::fs::write(&self.go, "").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).unwrap();
        let _ = self.child.wait();
        rest
    }
}

impl Drop for Across {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Relay records (those with a policy) of an audit trail.
fn sessions(records: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    records
        .into_iter()
        .filter(|r| r["policy"].is_string())
        .collect()
}

/// The held plain relays move to the new agent: once the old agent has exited (its process
/// gone, long before its 30 s grace period), the same connections carry data both ways and
/// close cleanly, and the one audit record of each session comes from the agent that saw it
/// end, with the bytes of the whole session. They move again on the next upgrade.
#[test]
fn held_plain_relays_move_to_the_new_agent_and_outlive_the_old_one() {
    const CONNS: usize = 8;
    const BYTES: usize = 300_000;
    let s = setup("relays");
    let mut old = Agent::start_args(&s.policy, &s.cg, &s.args("30"));
    let old_pid = old.pid();
    let held = Across::start(&s, s.target.addr, CONNS, BYTES);
    let mut new = Agent::start_args(&s.policy, &s.cg, &s.args("30"));
    let status = old.exited_within(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old agent is still draining ({status:?}): its relays were not handed over:\n{}",
        old.log()
    );
    assert!(gone(old_pid), "process {old_pid} is still there");
    let old_log = old.log();
    assert!(
        old_log.contains(&format!("handed_over={CONNS}")),
        "old agent:\n{old_log}"
    );
    // The new agent counts them as its own.
    assert!(
        latch_tests::eventually(
            Duration::from_secs(5),
            || new.status()["connections"]["active"] == CONNS as i64
        ),
        "status: {:#}\n{}",
        new.status(),
        new.log()
    );
    // And hands them on to the agent after it.
    let new_pid = new.pid();
    let third = Agent::start_args(&s.policy, &s.cg, &s.args("30"));
    let status = new.exited_within(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the second agent is still draining ({status:?}):\n{}",
        new.log()
    );
    assert!(gone(new_pid), "process {new_pid} is still there");

    let report = held.finish();
    assert!(
        report.starts_with(&format!("after ok={CONNS} failed=0")),
        "the held connections broke after the old agents exited:\n{report}\nlast agent:\n{}",
        third.log()
    );
    for agent in [&old, &new] {
        assert!(
            sessions(agent.audit()).is_empty(),
            "an agent wrote records of sessions it handed over: {:#?}",
            agent.audit()
        );
    }
    let records = sessions(third.wait_audit(CONNS));
    assert_eq!(records.len(), CONNS, "{records:#?}");
    let mut ids: Vec<u64> = records
        .iter()
        .map(|r| r["conn"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), CONNS, "one record per session: {records:#?}");
    for r in &records {
        assert_eq!(r["outcome"], "relayed", "{r:#}");
        assert_eq!(r["policy"], "echo", "{r:#}");
        assert_eq!(r["bytes_to_target"], 2 * BYTES as u64, "{r:#}");
        assert_eq!(r["bytes_to_app"], 2 * BYTES as u64, "{r:#}");
        assert!(r["workload"]["pid"].as_u64().is_some(), "{r:#}");
    }
    assert!(third.stop().success());
}

/// A session whose TLS latch terminates cannot move: the old agent keeps serving it (the data
/// after the upgrade goes through the old agent), drains it, writes its record, and exits
/// once it closed.
#[test]
fn a_session_whose_tls_latch_terminates_is_drained_by_the_old_agent() {
    let s = setup("tls");
    let ca = latch_tests::certs::TestCa::new("tls-echo.test", &["DNS:tls-echo.test"]);
    let port = free_port("127.0.0.2");
    let mut socat = Command::new(bins::tool("socat", "the Debian package socat"))
        .arg(format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.2,reuseaddr,fork,cert={},key={},verify=0",
            ca.server_cert().display(),
            ca.server_key().display()
        ))
        .arg("EXEC:cat")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start socat");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let target: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    assert!(
        latch_tests::eventually(Duration::from_secs(5), || std::net::TcpStream::connect(
            target
        )
        .is_ok()),
        "socat does not listen"
    );
    let _ = socat.try_wait();
    let _socat = Kill(socat);
    let policy = format!(
        "{}  tls:\n    mode: verify-full\n    ca: {}\n    serverName: tls-echo.test\n",
        tcp_policy("tls-echo", "127.0.0.2", port),
        ca.ca().display()
    );
    let mut old = Agent::start_args(&policy, &s.cg, &s.args("30"));
    let held = Across::start(&s, target, 2, 50_000);
    let new = Agent::start_args(&policy, &s.cg, &s.args("30"));
    old.wait_log("live relays handed to the new agent", 1);
    assert!(
        old.log().contains("handed_over=0"),
        "old agent:\n{}",
        old.log()
    );
    assert!(
        old.exited_within(Duration::from_secs(2)).is_none(),
        "the old agent exited with TLS sessions open:\n{}",
        old.log()
    );
    let report = held.finish();
    assert!(
        report.starts_with("after ok=2 failed=0"),
        "the TLS sessions broke:\n{report}\nold agent:\n{}",
        old.log()
    );
    // They closed: the old agent has nothing left to drain.
    assert!(
        old.exited_within(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        old.log()
    );
    let records = sessions(old.audit());
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(r["bytes_to_target"], 100_000, "{r:#}");
    }
    assert!(sessions(new.audit()).is_empty(), "{:#?}", new.audit());
    assert!(new.stop().success());
}

/// A PostgreSQL session, plain on both legs, moves too: once the old agent has exited, the
/// same session answers a query (and a new one works), a query on it is cancelled through the
/// new agent (its cancellation key moved with it), and its one audit record, from the new
/// agent, counts the whole session.
#[test]
fn a_plain_postgres_session_moves_to_the_new_agent() {
    use latch_tests::{
        pg_setup::{SCRAM_PW, Setup as PgSetup},
        postgres::{APP_DB, SCRAM_USER},
    };
    let state = TempDir::new("upgrade-pg-state");
    let instance = format!("test-upgrade-pg-{}", std::process::id());
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let args = [
        "--instance",
        &instance,
        "--state-dir",
        state.path().to_str().unwrap(),
        "--listen",
        &listen,
        "--grace-period",
        "30",
    ];
    let mut s = PgSetup::with_agent_args(SCRAM_USER, SCRAM_PW, "", &args);
    let old_pid = s.agent.pid();
    let mut hold = s
        .probe(APP_DB, "hold-cancel")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start probe");
    let mut lines = std::io::BufReader::new(hold.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("probe output").expect("read probe");
        if line == "ready" {
            break;
        }
    }
    let policy = std::fs::read_to_string(s.agent.dir.path().join("policy.yaml")).unwrap();
    let new = Agent::start_args(&policy, &s.cg, &args);
    let status = s.agent.exited_within(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old agent is still draining ({status:?}):\n{}",
        s.agent.log()
    );
    assert!(gone(old_pid));
    std::io::Write::write_all(&mut hold.stdin.take().unwrap(), b"go\n").unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = hold.wait().unwrap();
    assert!(status.success(), "{rest:?}\nnew agent:\n{}", new.log());
    for session in ["old session ok", "new session ok", "cancelled in"] {
        assert!(
            rest.iter().any(|l| l.starts_with(session)),
            "{rest:?}\nnew agent:\n{}",
            new.log()
        );
    }
    assert!(
        sessions(s.agent.audit()).is_empty(),
        "{:#?}",
        s.agent.audit()
    );
    // The moved session, the new one, the cancel request.
    let records = sessions(new.wait_audit(3));
    // The session that moved keeps the old agent's id (the new agent counts from 2^20 past
    // it); its counts cover both agents: more than the new session's startup and one query.
    // What the moved session moved after the hand-over alone (a query, a cancelled one, a
    // query: about 460 bytes back) is less than that (about 570).
    let (moved, later): (Vec<_>, Vec<_>) = records
        .iter()
        .partition(|r| r["conn"].as_u64().unwrap() < 1 << 20);
    assert_eq!((moved.len(), later.len()), (1, 2), "{records:#?}");
    let moved = moved[0];
    let fresh = later
        .iter()
        .max_by_key(|r| r["bytes_to_app"].as_u64())
        .unwrap();
    assert_eq!(moved["outcome"], "relayed", "{moved:#}");
    assert_eq!(moved["protocol"], "postgres", "{moved:#}");
    let bytes = |r: &serde_json::Value, k: &str| r[k].as_u64().unwrap();
    assert!(
        bytes(moved, "bytes_to_app") > bytes(fresh, "bytes_to_app")
            && bytes(moved, "bytes_to_target") > bytes(fresh, "bytes_to_target"),
        "{records:#?}"
    );
    assert!(moved["handshake_ms"].as_f64().is_some(), "{moved:#}");
    assert!(new.stop().success());
}
