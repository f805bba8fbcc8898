//! The application-to-target fast path: once the broker has nothing in flight, the kernel
//! carries the application's sends straight into the target socket. The hand-over must keep
//! every stream intact and in order, count every byte, and leave nothing behind. It is off
//! unless the agent runs with `--fast-path`.
use std::time::Duration;

use latch_tests::{Agent, TestCgroup, bins, eventually, servers::EchoServer, tcp_policy};

fn metric(agent: &Agent, name: &str) -> u64 {
    agent
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// `latch-probe MODE ADDR CONNS BYTES` inside the test cgroup.
fn probe_command(
    cg: &TestCgroup,
    mode: &str,
    addr: &str,
    conns: usize,
    bytes: usize,
) -> std::process::Command {
    let mut cmd = cg.command(bins::probe());
    cmd.args([mode, addr, &conns.to_string(), &bytes.to_string()]);
    cmd
}

/// Runs the probe, which must succeed; returns its summary line.
fn probe(cg: &TestCgroup, mode: &str, addr: &str, conns: usize, bytes: usize) -> String {
    let out = latch_tests::run_ok(&mut probe_command(cg, mode, addr, conns, bytes));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An echo server on 127.0.0.2, a test cgroup, and an agent (with `args`) relaying the
/// cgroup's connections to the server as `protocol: tcp`.
fn echo_behind_latch(args: &[&str]) -> (EchoServer, TestCgroup, Agent) {
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start_args(
        &tcp_policy("echo", "127.0.0.2", echo.addr.port()),
        &cg,
        args,
    );
    (echo, cg, agent)
}

/// An agent with the fast path on.
fn fast_agent(policies: &str, cg: &TestCgroup) -> Agent {
    Agent::start_args(policies, cg, &["--fast-path"])
}

/// Waits for `conns` relayed connections and checks that each audit record counts `bytes`
/// toward the target (the kernel's share included).
fn assert_every_connection_sent(agent: &Agent, conns: usize, bytes: u64) {
    agent.wait_count("relayed", conns as u64);
    for r in agent.wait_audit(conns) {
        assert_eq!(r["bytes_to_target"], bytes, "{r}");
    }
}

#[test]
fn streams_handed_to_the_kernel_mid_flight_stay_whole_and_in_order() {
    const CONNS: usize = 40;
    const BYTES: usize = 4 << 20;
    let (echo, cg, agent) = echo_behind_latch(&["--fast-path"]);
    // Writes of 1..16 KiB with pauses: the broker relays the first bytes itself and hands
    // over at one of the pauses, while the application keeps writing.
    let got = probe(&cg, "chunks", &echo.addr.to_string(), CONNS, BYTES);
    assert_eq!(got, format!("ok={CONNS} failed=0"));
    agent.wait_count("relayed", CONNS as u64);
    assert_eq!(agent.status()["ebpf"]["fast_enrolled"], CONNS as u64);
    let handed = metric(&agent, "latch_fast_path_handovers_total");
    assert_eq!(
        handed, CONNS as u64,
        "every connection should have been handed over"
    );
    // Every byte is accounted for although the broker never saw most of them.
    let records = agent.wait_audit(CONNS);
    for r in &records {
        assert_eq!(r["fast_path"], true, "{r}");
        assert_eq!(r["bytes_to_target"], BYTES as u64, "{r}");
        assert_eq!(r["bytes_to_app"], BYTES as u64, "{r}");
    }
    let sent = metric(&agent, "latch_relay_bytes_total{direction=\"to_target\"}");
    assert_eq!(sent, (CONNS * BYTES) as u64);
    assert!(agent.stop().success());
}

#[test]
fn a_non_blocking_sender_facing_a_stalled_target_is_not_left_hanging() {
    // The target reads nothing for a second while each (tokio, non-blocking) client pushes
    // 24 MiB: far more than the socket buffers hold; it echoes only after end-of-stream, so
    // nothing arriving wakes the client either. Redirected sends must never meet a full
    // buffer (EAGAIN with no wake-up to follow would hang the client); the kernel hands the
    // flow back to the broker first, and TCP back-pressure does the rest.
    let echo = EchoServer::start_store_and_forward("127.0.0.2", Duration::from_secs(1));
    let cg = TestCgroup::new();
    let agent = fast_agent(&tcp_policy("echo", "127.0.0.2", echo.addr.port()), &cg);
    let out = latch_tests::run_within(
        &mut probe_command(&cg, "echo", &echo.addr.to_string(), 6, 24 << 20),
        Duration::from_secs(60),
    );
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        got.trim(),
        "ok=6 failed=0",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_every_connection_sent(&agent, 6, 24 << 20);
    assert!(agent.stop().success());
}

#[test]
fn a_target_that_resets_mid_stream_fails_the_sender_instead_of_hanging_it() {
    // The target reads 1 MiB and resets; the clients (handed over by then) are still sending.
    let resetting = EchoServer::start_resetting_after("127.0.0.2", 1 << 20);
    let echo = EchoServer::start("127.0.0.3");
    let cg = TestCgroup::new();
    let policies = format!(
        "{}---\n{}",
        tcp_policy("resets", "127.0.0.2", resetting.addr.port()),
        tcp_policy("echo", "127.0.0.3", echo.addr.port())
    );
    let agent = fast_agent(&policies, &cg);
    let out = latch_tests::run_within(
        &mut probe_command(&cg, "chunks", &resetting.addr.to_string(), 4, 64 << 20),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "the sends cannot all have succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.matches("send: ").count() + err.matches("receive: ").count() == 4,
        "each connection should fail with a send or receive error: {err}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok=0 failed=4");
    agent.wait_count("relayed", 4);
    assert_eq!(
        metric(&agent, "latch_fast_path_handovers_total"),
        4,
        "the resets should have met handed-over flows"
    );
    // The agent serves the next connections as before.
    assert_eq!(
        probe(&cg, "chunks", &echo.addr.to_string(), 4, 1 << 20),
        "ok=4 failed=0"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_stream_sent_all_at_once_is_intact_whoever_carries_it() {
    // One large write right after connect: the hand-over races the first bytes.
    let (echo, cg, agent) = echo_behind_latch(&["--fast-path"]);
    let got = probe(&cg, "echo", &echo.addr.to_string(), 100, 1 << 20);
    assert_eq!(got, "ok=100 failed=0");
    assert_every_connection_sent(&agent, 100, 1 << 20);
    assert!(agent.stop().success());
}

#[test]
fn the_fast_path_maps_empty_when_connections_close() {
    let (echo, cg, agent) = echo_behind_latch(&["--fast-path"]);
    // While connections are open, their sockets are in both maps: each application's from its
    // connect, each target's from the hand-over (after the first 64 KiB)...
    let holder = probe_command(&cg, "hold", &echo.addr.to_string(), 30, 3000)
        .arg((128 * 1024).to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start probe");
    let entries = |key: &str| agent.status()["ebpf"][key].as_u64().unwrap_or(u64::MAX);
    assert!(
        eventually(Duration::from_secs(5), || {
            entries("fast_targets_entries") == 30 && entries("fast_socks_entries") == 30
        }),
        "expected 30 enrolled and 30 registered sockets: {}",
        agent.status()["ebpf"]
    );
    let out = holder.wait_with_output().expect("probe");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "echoed=30 refused=0"
    );
    // ...and when they close, they leave both.
    assert!(
        eventually(Duration::from_secs(5), || {
            entries("fast_targets_entries") == 0 && entries("fast_socks_entries") == 0
        }),
        "fast-path maps not emptied: {}",
        agent.status()["ebpf"]
    );
    assert!(agent.stop().success());
}

#[test]
fn short_exchanges_stay_with_the_broker_and_cost_no_hand_over() {
    // One request and its reply per connection: the hand-over would cost more system calls
    // than it saves, so it waits for the first 64 KiB, which these never send.
    let (echo, cg, agent) = echo_behind_latch(&["--fast-path"]);
    let got = probe(&cg, "echo", &echo.addr.to_string(), 20, 4096);
    assert_eq!(got, "ok=20 failed=0");
    assert_every_connection_sent(&agent, 20, 4096);
    assert_eq!(metric(&agent, "latch_fast_path_handovers_total"), 0);
    for r in agent.audit() {
        assert!(r.get("fast_path").is_none(), "{r}");
    }
    // The sockets were enrolled at connect all the same: a longer stream would be handed over.
    assert_eq!(agent.status()["ebpf"]["fast_enrolled"], 20);
    assert!(agent.stop().success());
}

#[test]
fn by_default_every_byte_stays_in_the_broker() {
    let (echo, cg, agent) = echo_behind_latch(&[]);
    let got = probe(&cg, "chunks", &echo.addr.to_string(), 10, 1 << 20);
    assert_eq!(got, "ok=10 failed=0");
    assert_every_connection_sent(&agent, 10, 1 << 20);
    assert_eq!(metric(&agent, "latch_fast_path_handovers_total"), 0);
    for r in agent.audit() {
        assert!(r.get("fast_path").is_none(), "{r}");
    }
    // Nothing was even enrolled: the rules carry no fast-path flag.
    assert_eq!(agent.status()["ebpf"]["fast_enrolled"], 0);
    assert!(agent.stop().success());
}

#[test]
fn ipv6_and_ipv4_mapped_connections_are_handed_over_too() {
    // The sk_msg program finds a flow by the 4-tuple it reads from the socket; the IPv6 and
    // the IPv4-mapped (AF_INET6 socket, IPv4 path) encodings must match sock_ops' and the
    // broker's.
    let v4 = EchoServer::start("127.0.0.2");
    let v6 = EchoServer::start("::1");
    let cg = TestCgroup::new();
    let policies = format!(
        "{}---\n{}",
        tcp_policy("echo4", "127.0.0.2", v4.addr.port()),
        tcp_policy("echo6", "::1", v6.addr.port())
    );
    let agent = fast_agent(&policies, &cg);
    let mapped = format!("[::ffff:127.0.0.2]:{}", v4.addr.port());
    for (addr, handed) in [(v6.addr.to_string(), 5), (mapped, 10)] {
        assert_eq!(probe(&cg, "chunks", &addr, 5, 1 << 20), "ok=5 failed=0");
        agent.wait_count("relayed", handed);
        assert_eq!(
            metric(&agent, "latch_fast_path_handovers_total"),
            handed,
            "{addr}: every connection should have been handed over"
        );
    }
    assert_every_connection_sent(&agent, 10, 1 << 20);
    assert!(agent.stop().success());
}

/// A blocking client (Python, no timeout) sends a request and waits in `recv`; the server
/// resets. Prints the name of what `recv` raised, or what it returned.
const BLOCKING_READER: &str = "\
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b'ping')
try:
    print('returned', s.recv(100))
except OSError as e:
    print(type(e).__name__)
";

fn blocking_read(cmd: &mut std::process::Command, addr: std::net::SocketAddr) -> String {
    cmd.args([
        "-c",
        BLOCKING_READER,
        &addr.ip().to_string(),
        &addr.port().to_string(),
    ]);
    let out = latch_tests::run_within(cmd, Duration::from_secs(20));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_blocking_reader_meets_the_servers_reset_as_a_reset() {
    // An application socket in the kernel's sockmap answers a blocking `recv` woken by a reset
    // with EAGAIN (Linux 6.18 `tcp_bpf_recvmsg`), so by default latch enrols no application
    // socket: the reset reaches the reader as ECONNRESET, as it does directly.
    let server = EchoServer::start_resetting_when_idle("127.0.0.2", 4, Duration::from_millis(300));
    let python = bins::tool("python3", "python3");
    let direct = blocking_read(&mut std::process::Command::new(&python), server.addr);
    assert_eq!(direct, "ConnectionResetError", "directly");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("resets", "127.0.0.2", server.addr.port()), &cg);
    assert_eq!(
        blocking_read(&mut cg.command(&python), server.addr),
        "ConnectionResetError",
        "through latch"
    );
    agent.wait_count("relayed", 1);
    assert_eq!(agent.status()["ebpf"]["fast_enrolled"], 0);
    assert!(agent.stop().success());
}
