//! Attacks from another network namespace. 4-tuples repeat in every namespace (loopback
//! above all), so a process that owns a namespace can make the same 4-tuple as a victim's
//! connection. Before every kernel key carried its namespace, each of these worked:
//!
//! 1. fast-path injection: the attacker's sends were redirected into the victim's
//!    authenticated target socket;
//! 2. record replay: a record made in the attacker's namespace was taken by a connection made
//!    straight to the broker, which was then brokered as the recorded workload;
//! 3. direct mode: the attacker's socket took over the victim's startup entries, and the
//!    victim's session failed (or ran on the attacker's connection).
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use latch_tests::{
    Agent, TestCgroup, bins, eventually,
    pg_setup::{SCRAM_PW, Setup},
    pod::Pod,
    postgres::SCRAM_USER,
    run_within,
    servers::{EchoServer, free_port},
    tcp_policy,
};

/// A process this test started, killed by PID on drop, whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn probe");
        let out: ChildStdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits (up to 10 s) for a line starting with `prefix`; returns it.
    fn wait_line(&self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no line starting with {prefix:?} within 10 s"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn fast_path_injection_from_another_namespace_never_reaches_a_victims_session() {
    latch_tests::require_root();
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    // The attacker owns a namespace of its own inside the intercepted cgroup.
    let attacker_ns = Pod::new(&cg, 1);
    let agent = Agent::start_args(
        &tcp_policy("echo", "127.0.0.2", echo.addr.port()),
        &cg,
        &["--fast-path"],
    );
    let broker = agent.listener(false).port().to_string();
    let src = free_port("127.0.0.1").to_string();
    let dst = echo.addr.to_string();
    // It listens on the broker's port in its namespace if it can, connects to the fast-path
    // destination from `src` and waits; 1.5 s in, it starts sending.
    let attacker = Running::spawn(
        attacker_ns
            .command(bins::probe())
            .args(["squat", &broker, &src, &dst, "1500"]),
    );
    attacker.wait_line("connected=");
    // The victim, in the host namespace, makes the same 4-tuple: an authenticated session whose
    // sends the kernel carries after the hand-over.
    let out = run_within(
        cg.command(bins::probe())
            .args(["victim", &src, &dst, "3500"]),
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("echo=ok"), "{text}");
    assert!(
        text.contains("extra=0"),
        "bytes the attacker sent reached the victim's target session:\n{text}"
    );
    attacker.wait_line("sent");
    agent.stop();
}

#[test]
fn a_record_made_in_another_namespace_is_never_taken_by_a_direct_connection_to_the_broker() {
    latch_tests::require_root();
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let accomplice_ns = Pod::new(&cg, 1);
    let agent = Agent::start(&tcp_policy("echo", "127.0.0.2", echo.addr.port()), &cg);
    let broker = agent.listener(false).port();
    let src = free_port("127.0.0.1").to_string();
    // A redirected connect in the accomplice's namespace, from `src`, held open.
    let accomplice = Running::spawn(accomplice_ns.command(bins::probe()).args([
        "squat",
        &broker.to_string(),
        &src,
        &echo.addr.to_string(),
        "4000",
    ]));
    accomplice.wait_line("connected=");
    // A process outside the intercepted cgroup, which the kernel never redirected, connects to
    // the broker itself from the same source port.
    let out = run_within(
        Command::new(bins::probe()).args(["from", &src, &format!("127.0.0.1:{broker}")]),
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("refused"),
        "a connection the kernel did not redirect was brokered: {text}"
    );
    assert_eq!(echo.accepted(), 0, "the host's target was reached");
    let refused = eventually(Duration::from_secs(5), || {
        agent.audit().iter().any(|r| {
            r["outcome"] == "refused"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("not redirected"))
        })
    });
    assert!(refused, "no refusal audited: {:#?}", agent.audit());
    agent.stop();
}

#[test]
fn a_direct_mode_startup_is_never_taken_over_from_another_namespace() {
    latch_tests::require_root();
    let s = Setup::new(
        SCRAM_USER,
        SCRAM_PW,
        "  tls: {mode: disable}\n  direct: true\n",
    );
    let attacker_ns = Pod::new(&s.cg, 1);
    let src = free_port("127.0.0.1").to_string();
    let go = s.secrets.path().join("go");
    // The victim connects from `src` and waits before its startup.
    let victim = Running::spawn(s.cg.command(bins::probe()).args([
        "pgpaused",
        &src,
        &s.pg.addr.to_string(),
        &go.to_string_lossy(),
        &s.connstr("postgres"),
    ]));
    victim.wait_line("connected");
    // In its own namespace the attacker serves the same address and connects to it from the
    // same source port: the same 4-tuple as the victim's.
    let _attacker = Running::spawn(attacker_ns.command(bins::probe()).args([
        "fakepg",
        &s.pg.addr.to_string(),
        &src,
        "8000",
    ]));
    let enrolled = eventually(Duration::from_secs(10), || {
        s.agent.status()["ebpf"]["direct_enrolled"] == 2
    });
    assert!(enrolled, "the attacker's socket was not enrolled");
    std::fs::write(&go, b"go").expect("write go file");
    let line = victim.wait_line("pg=");
    assert_eq!(line, "pg=ok", "the victim's session");
    let records = s.agent.wait_audit(1);
    let pid = victim.child.id();
    assert!(
        records
            .iter()
            .any(|r| r["workload"]["pid"] == pid && r["outcome"] == "relayed"),
        "the victim's session was brokered as someone else: {records:#?}"
    );
}
