//! Hot reload: a changed policy file applies to new connections without a restart; an invalid
//! one is rejected and the running set stays; live connections are not dropped.
use std::{
    io::{Read as _, Write as _},
    time::Duration,
};

use latch_tests::{Agent, TestCgroup, bins, servers::EchoServer, tcp_policy};

fn echo_ok(cg: &TestCgroup, addr: std::net::SocketAddr) {
    let out = cg
        .command(bins::probe())
        .args(["echo", &addr.to_string(), "1", "1000"])
        .output()
        .expect("probe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_rewritten_policy_file_moves_interception_to_the_new_destination() {
    let a = EchoServer::start("127.0.0.2");
    let b = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("svc", "127.0.0.2", a.addr.port()), &cg);
    echo_ok(&cg, a.addr);
    agent.wait_count("relayed", 1);

    agent.rewrite_policy(&tcp_policy("svc", "127.0.0.2", b.addr.port()));
    agent.wait_log("configuration reloaded", 1);
    echo_ok(&cg, b.addr); // now intercepted
    agent.wait_count("relayed", 2);
    echo_ok(&cg, a.addr); // no longer intercepted: goes direct
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        agent.count("relayed"),
        2,
        "the old destination is still intercepted"
    );
    assert_eq!(a.accepted(), 2);
    assert_eq!(b.accepted(), 1);
    assert!(agent.stop().success());
}

#[test]
fn an_invalid_policy_file_is_rejected_and_the_running_set_stays() {
    let a = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("svc", "127.0.0.2", a.addr.port()), &cg);
    agent.rewrite_policy(
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {name: svc}\nspec:\n  \
         destination: {address: 127.0.0.2, prot: 80}\n  protocol: tcp\n",
    );
    agent.wait_log("reload rejected", 1);
    let log = agent.log();
    assert!(
        log.contains("policy.yaml:5:"),
        "the error lacks file:line: {log}"
    );
    assert!(log.contains("unknown field"), "{log}");
    echo_ok(&cg, a.addr);
    agent.wait_count("relayed", 1);
    assert!(agent.stop().success());
}

#[test]
fn sighup_reloads_and_live_connections_survive_a_reload() {
    let a = EchoServer::start("127.0.0.2");
    let b = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("svc", "127.0.0.2", a.addr.port()), &cg);

    // A long-lived client in the cgroup: a shell running the probe's raw peer check would exit;
    // use python for an interactive echo session that outlives the reload.
    let script = format!(
        "import socket,sys,time\ns=socket.create_connection(('127.0.0.2',{}))\n\
         s.sendall(b'before');print(s.recv(100).decode(),flush=True)\n\
         sys.stdin.readline()\ns.sendall(b'after');print(s.recv(100).decode(),flush=True)\n",
        a.addr.port()
    );
    let mut client = cg
        .command("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = client.stdout.take().unwrap();
    let mut first = [0u8; 7];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"before\n");

    // Write the new file without renaming (no inotify rename event needed), then SIGHUP.
    std::fs::write(
        agent.dir.path().join("policy.yaml"),
        tcp_policy("other", "127.0.0.2", b.addr.port()),
    )
    .unwrap();
    // SAFETY: kill(2) on the agent process this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    agent.wait_log("cause=\"SIGHUP\"", 1);

    client.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(
        rest, "after\n",
        "the live connection did not survive the reload"
    );
    assert!(client.wait().unwrap().success());
    echo_ok(&cg, b.addr);
    agent.wait_count("relayed", 2);
    assert_eq!(a.accepted(), 1);
    assert!(agent.stop().success());
}
