//! What intercepted connections meet when latch cannot broker them: fail closed or open,
//! during a graceful shutdown and across a crash and restart (pinned links).
use std::{
    io::{Read as _, Write as _},
    process::Stdio,
};

use latch_tests::{
    Agent, TestCgroup, bins, leftovers,
    servers::{EchoServer, free_port},
    tcp_policy,
};

fn echo(cg: &TestCgroup, addr: std::net::SocketAddr) -> bool {
    cg.command(bins::probe())
        .args(["echo", &addr.to_string(), "1", "1000"])
        .output()
        .expect("probe")
        .status
        .success()
}

fn pins(instance: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/sys/fs/bpf/latch/{instance}"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// Links attached to a cgroup, per bpftool.
fn links_on(cgroup_id: u64) -> usize {
    let out = std::process::Command::new(bins::tool("bpftool", "bpftool"))
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

/// An echo target, a cgroup, and a tcp policy for that target.
fn echo_setup() -> (EchoServer, TestCgroup, String) {
    let target = EchoServer::start("127.0.0.2");
    let policy = tcp_policy("echo", "127.0.0.2", target.addr.port());
    (target, TestCgroup::new(), policy)
}

/// A pin instance name and a fixed broker address for an agent that keeps interception.
fn kept(name: &str) -> (String, String) {
    (
        format!("test-{name}-{}", std::process::id()),
        format!("127.0.0.1:{}", free_port("127.0.0.1")),
    )
}

fn keep_args<'a>(instance: &'a str, listen: &'a str) -> [&'a str; 5] {
    [
        "--keep-interception",
        "--instance",
        instance,
        "--listen",
        listen,
    ]
}

#[test]
fn kept_interception_fails_closed_while_the_agent_is_down_and_the_next_agent_takes_over() {
    let (target, cg, policy) = echo_setup();
    let (instance, listen) = kept("keep");
    let args = keep_args(&instance, &listen);

    let first = Agent::start_args(&policy, &cg, &args);
    assert!(echo(&cg, target.addr));
    first.wait_count("relayed", 1);
    first.crash();

    // The agent is gone, its links are not: connections fail rather than bypass latch.
    assert_eq!(pins(&instance).len(), 5, "expected 5 pinned links");
    assert_eq!(links_on(cg.id()), 5);
    assert!(
        !echo(&cg, target.addr),
        "a connection went through while latch was down"
    );
    assert_eq!(
        target.accepted(),
        1,
        "a connection reached the target without latch"
    );

    // The next agent takes the pins over: its own 5 links, the old ones detached.
    let second = Agent::start_args(&policy, &cg, &args);
    assert!(echo(&cg, target.addr));
    second.wait_count("relayed", 1);
    assert_eq!(
        links_on(cg.id()),
        5,
        "old links were not detached after the take-over"
    );
    assert!(second.signal_and_wait(libc::SIGTERM).success());
    assert_eq!(
        pins(&instance).len(),
        5,
        "a kept agent's links must stay pinned after a stop"
    );

    let out = std::process::Command::new(bins::latch())
        .args(["cleanup", "--instance", &instance])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 5 pinned links"));
    leftovers::assert_none(cg.id(), None);
    assert!(
        echo(&cg, target.addr),
        "after cleanup connections go direct again"
    );
}

#[test]
fn without_kept_interception_a_crash_leaves_nothing_attached() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("echo", "127.0.0.2", target.addr.port()), &cg);
    assert!(echo(&cg, target.addr));
    agent.crash();
    leftovers::assert_none(cg.id(), None);
    // Nothing intercepts any more: the connection goes to the target directly.
    assert!(echo(&cg, target.addr));
    assert_eq!(target.accepted(), 2);
}

/// Starts a long-lived relayed session (python, inside the cgroup) that keeps the agent's
/// drain busy; returns the child with its stdin open.
fn long_session(cg: &TestCgroup, port: u16) -> std::process::Child {
    let script = format!(
        "import socket,sys\ns=socket.create_connection(('127.0.0.2',{port}))\n\
         s.sendall(b'x');print(s.recv(1).decode(),flush=True)\nsys.stdin.readline()\n"
    );
    let mut child = cg
        .command("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut first = [0u8; 2];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"x\n");
    child
}

fn during_drain(fail_mode: &str) -> (bool, u64) {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &tcp_policy("echo", "127.0.0.2", target.addr.port()),
        &cg,
        &["--fail-mode", fail_mode, "--grace-period", "20"],
    );
    let mut session = long_session(&cg, target.addr.port());
    agent.signal(libc::SIGTERM);
    agent.wait_log("draining connections", 1);
    let connected = echo(&cg, target.addr);
    let accepted = target.accepted();
    session.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    session.wait().unwrap();
    assert!(agent.wait_exit().success());
    leftovers::assert_none(cg.id(), None);
    (connected, accepted)
}

#[test]
fn fail_closed_refuses_new_connections_while_draining() {
    let (connected, accepted) = during_drain("closed");
    assert!(
        !connected,
        "fail-mode closed let a connection through during shutdown"
    );
    assert_eq!(accepted, 1, "only the long session reached the target");
}

#[test]
fn fail_open_lets_new_connections_go_direct_while_draining() {
    let (connected, accepted) = during_drain("open");
    assert!(
        connected,
        "fail-mode open refused a connection during shutdown"
    );
    assert_eq!(
        accepted, 2,
        "the new connection should have gone to the target directly"
    );
}

#[test]
fn keeping_interception_with_fail_open_is_refused() {
    let cg = TestCgroup::new();
    let dir = latch_tests::TempDir::new("keep-open");
    let policy = dir.write("p.yaml", &tcp_policy("x", "127.0.0.2", 9));
    let out = std::process::Command::new(bins::latch())
        .args(["agent", "--policy"])
        .arg(&policy)
        .arg("--cgroup")
        .arg(cg.path())
        .args([
            "--keep-interception",
            "--fail-mode",
            "open",
            "--listen",
            "127.0.0.1:1",
        ])
        .args(["--admin", "127.0.0.1:0", "--instance", "test-never"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fail-mode closed"));
    leftovers::assert_none(cg.id(), None);
}

/// Issue 11, "the broker's port can be squatted": once latch lets go of its port (a crash
/// with `--keep-interception`), whoever binds it is never sent an intercepted connection.
#[test]
fn a_squatter_on_the_broker_port_while_the_agent_is_down_gets_no_connection() {
    let (target, cg, policy) = echo_setup();
    let (instance, listen) = kept("squat");
    let args = keep_args(&instance, &listen);
    let agent = Agent::start_args(&policy, &cg, &args);
    assert!(echo(&cg, target.addr));
    agent.crash();

    // A local user binds the port latch held; the pinned hooks still match the destination.
    let squatter = std::net::TcpListener::bind(&listen).expect("bind the broker's port");
    squatter.set_nonblocking(true).unwrap();
    assert!(
        !echo(&cg, target.addr),
        "a connection went through while latch was down"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    match squatter.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the squatter on {listen} was sent a connection: {other:?}"),
    }
    assert_eq!(target.accepted(), 1, "a connection bypassed latch");
    drop(squatter);

    let out = std::process::Command::new(bins::latch())
        .args(["cleanup", "--instance", &instance])
        .output()
        .unwrap();
    assert!(out.status.success());
    leftovers::assert_none(cg.id(), None);
}

/// Issue 11: a failed IPv6 bind used to be a warning that silently dropped the IPv6 rules.
/// Someone holding the broker's IPv6 port keeps the agent from starting, as for IPv4.
#[test]
fn an_ipv6_broker_port_someone_else_holds_is_refused_at_start() {
    let cg = TestCgroup::new();
    let dir = latch_tests::TempDir::new("v6-squat");
    let policy = dir.write("p.yaml", &tcp_policy("x", "127.0.0.2", 9));
    let squatter = std::net::TcpListener::bind("[::1]:0").expect("bind [::1]");
    let taken = squatter.local_addr().unwrap();
    let out = std::process::Command::new(bins::latch())
        .args(["agent", "--policy"])
        .arg(&policy)
        .arg("--cgroup")
        .arg(cg.path())
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port("127.0.0.1")),
            "--listen",
            &taken.to_string(),
        ])
        .args(["--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent started: {stderr}");
    assert!(
        stderr.contains(&taken.to_string()),
        "the error does not name {taken}: {stderr}"
    );
    leftovers::assert_none(cg.id(), None);
}
