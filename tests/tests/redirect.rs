//! The foundation, end to end: unmodified clients in an intercepted cgroup reach their targets
//! through latch's broker; everything else connects directly; nothing is left behind.
use std::{
    io::Read as _,
    net::TcpStream,
    process::{Command, Output},
    time::Duration,
};

use latch_tests::{
    Agent, TestCgroup, bins, eventually,
    servers::{EchoServer, NGINX_BODY, Nginx, free_port},
    tcp_policy,
};

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_ok(cmd)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn curl(cmd: &mut Command, url: &str) -> String {
    stdout(&run(cmd.args(["-sS", "--max-time", "10", url])))
}

#[test]
fn curl_in_the_cgroup_goes_through_the_broker_and_curl_outside_does_not() {
    let nginx = Nginx::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("web", "127.0.0.2", nginx.addr.port()), &cg);

    let inside = curl(&mut cg.command(bins::tool("curl", "curl")), &nginx.url());
    assert_eq!(inside, NGINX_BODY);
    agent.wait_count("relayed", 1);

    let outside = curl(&mut Command::new(bins::tool("curl", "curl")), &nginx.url());
    assert_eq!(outside, NGINX_BODY);
    // Give a (wrongly) brokered connection time to be counted, then check it was not.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        agent.count("relayed"),
        1,
        "a connection from outside the cgroup was brokered"
    );
    assert_eq!(agent.status()["ebpf"]["redirected"].as_u64(), Some(1));

    let metrics = agent.metrics();
    assert!(
        metrics.contains("latch_connections_total{policy=\"web\",outcome=\"relayed\"} 1"),
        "{metrics}"
    );
    assert!(agent.stop().success());
}

#[test]
fn tcp_echo_keeps_bytes_and_getpeername_reports_the_original_destination() {
    let v4 = EchoServer::start("127.0.0.2");
    let v6 = EchoServer::start("::1");
    let policies = format!(
        "{}---\n{}",
        tcp_policy("echo4", "127.0.0.2", v4.addr.port()),
        tcp_policy("echo6", "::1", v6.addr.port())
    );
    let cg = TestCgroup::new();
    let agent = Agent::start(&policies, &cg);
    let mapped = format!("[::ffff:127.0.0.2]:{}", v4.addr.port());
    for (target, expected_peer) in [
        (v4.addr.to_string(), v4.addr.to_string()),
        (v6.addr.to_string(), v6.addr.to_string()),
        (mapped.clone(), mapped.clone()),
    ] {
        // `echo` itself fails unless getpeername equals the address it connected to.
        let out = run(cg
            .command(bins::probe())
            .args(["echo", &target, "1", "100000"]));
        assert_eq!(stdout(&out).trim(), "ok=1 failed=0");
        let out = run(cg.command(bins::probe()).args(["peer", &target]));
        assert!(
            stdout(&out).starts_with(&format!("peer={expected_peer} ")),
            "getpeername for {target}: {}",
            stdout(&out)
        );
    }
    // Each probe run opened exactly one connection per target, all brokered.
    agent.wait_count("relayed", 6);
    assert_eq!(v4.accepted(), 4);
    assert_eq!(v6.accepted(), 2);
    assert!(agent.stop().success());
}

#[test]
fn two_hundred_concurrent_connections_each_carry_their_own_bytes() {
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("echo", "127.0.0.2", echo.addr.port()), &cg);
    let out = run(cg
        .command(bins::probe())
        .args(["echo", &echo.addr.to_string(), "200", "65536"]));
    assert_eq!(stdout(&out).trim(), "ok=200 failed=0");
    agent.wait_count("relayed", 200);
    assert_eq!(echo.accepted(), 200);
    assert_eq!(agent.count("active"), 0);
    // The kernel's records went with the connections: accepted ones at accept, per-socket
    // ones when the sockets closed.
    let cleaned = || {
        let ebpf = &agent.status()["ebpf"];
        ebpf["socks_entries"] == 0 && ebpf["conns_entries"] == 0
    };
    assert!(
        eventually(Duration::from_secs(5), cleaned),
        "eBPF maps not cleaned: {}",
        agent.status()["ebpf"]
    );
    assert!(
        agent
            .metrics()
            .contains("latch_ebpf_map_entries{map=\"socks\"} 0"),
        "no map occupancy metric"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_target_that_resets_is_seen_as_a_reset_not_as_a_clean_end() {
    // The server reads 1000 bytes of each connection and closes with the rest unread, so its
    // kernel resets the connection. A relay that answered that with a plain close would hand
    // the application an end-of-stream that looks like a complete (empty) reply.
    let resetting = EchoServer::start_resetting_after("127.0.0.2", 1000);
    let cg = TestCgroup::new();
    let policy = tcp_policy("resets", "127.0.0.2", resetting.addr.port());
    let agent = Agent::start(&policy, &cg);
    let addr = resetting.addr.to_string();
    let out = cg
        .command(bins::probe())
        .args(["echo", &addr, "8", "16384"])
        .output()
        .expect("run latch-probe");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout(&out).trim(), "ok=0 failed=8", "{err}");
    assert!(
        !err.contains("echo differs"),
        "a connection ended cleanly after the target reset it: {err}"
    );
    agent.wait_count("relayed", 8);
    assert!(agent.stop().success());
}

#[test]
fn an_application_that_resets_is_seen_by_the_target_as_a_reset() {
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("aborts", "127.0.0.2", echo.addr.port()), &cg);
    // Without latch, as a baseline of what the server sees.
    let out = run(Command::new(bins::probe()).args(["abort", &echo.addr.to_string(), "4"]));
    assert_eq!(stdout(&out).trim(), "echoed=4 refused=0");
    assert!(
        eventually(Duration::from_secs(5), || echo.resets() == 4),
        "the server never saw the direct connections' resets"
    );
    let out = run(cg
        .command(bins::probe())
        .args(["abort", &echo.addr.to_string(), "8"]));
    assert_eq!(stdout(&out).trim(), "echoed=8 refused=0");
    agent.wait_count("relayed", 8);
    assert!(
        eventually(Duration::from_secs(5), || echo.resets() == 12),
        "the target did not see the application's resets: {} of 12",
        echo.resets()
    );
    assert!(agent.stop().success());
}

/// Connects straight to the broker's port; returns what the broker sent back (it must be
/// nothing: the connection is reset or closed without a byte).
fn direct_to_broker(cmd: Option<&TestCgroup>, addr: std::net::SocketAddr) -> Vec<u8> {
    match cmd {
        None => {
            let mut s = TcpStream::connect(addr).expect("connect to broker");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        }
        Some(cg) => {
            // The probe prints nothing the broker sent; it only connects. Use curl to send a
            // request and show the broker answered nothing.
            let out = cg
                .command(bins::tool("curl", "curl"))
                .args(["-sS", "--max-time", "5", &format!("http://{addr}/")])
                .output()
                .expect("run curl");
            assert!(
                !out.status.success(),
                "curl got an answer from the broker directly"
            );
            out.stdout
        }
    }
}

#[test]
fn a_connection_the_kernel_did_not_redirect_gets_nothing() {
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("echo", "127.0.0.2", echo.addr.port()), &cg);
    let v4 = agent.listener(false);
    let v6 = agent.listener(true);
    assert!(direct_to_broker(None, v4).is_empty());
    assert!(direct_to_broker(None, v6).is_empty());
    assert!(direct_to_broker(Some(&cg), v4).is_empty());
    agent.wait_count("refused", 3);
    assert_eq!(agent.count("relayed"), 0);
    assert_eq!(
        echo.accepted(),
        0,
        "a refused connection reached the target"
    );
    let metrics = agent.metrics();
    assert!(
        metrics.contains("latch_connections_refused_total{reason=\"not_redirected\"} 3"),
        "{metrics}"
    );
    assert!(
        agent
            .log()
            .contains("refused a connection the kernel did not redirect")
    );
    assert!(agent.stop().success());
}

#[test]
fn a_client_that_sends_and_closes_before_the_broker_accepts_is_served_and_its_port_serves_no_one_else()
 {
    // The target keeps what each connection sent.
    let sink = std::net::TcpListener::bind("127.0.0.2:0").expect("bind the sink");
    let target = sink.local_addr().unwrap();
    let (tx, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in sink.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut got = Vec::new();
            let _ = conn.read_to_end(&mut got);
            if tx.send(got).is_err() {
                return;
            }
        }
    });
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("sink", "127.0.0.2", target.port()), &cg);
    let broker = agent.listener(false);
    let src = free_port("127.0.0.1").to_string();
    // A stopped agent accepts nothing: the kernel completes the handshake into the broker's
    // accept queue, and the client has sent its bytes and closed before the broker sees it
    // (what a busy broker meets with `nc -z` or a metrics client that sends and closes).
    agent.signal(libc::SIGSTOP);
    let out = latch_tests::run_within(
        cg.command(bins::probe())
            .args(["post", &src, &target.to_string(), "metric 1\n"]),
        Duration::from_secs(10),
    );
    let other = {
        let (src, broker) = (src.clone(), broker.to_string());
        std::thread::spawn(move || {
            latch_tests::run_within(
                Command::new(bins::probe()).args(["from", &src, &broker]),
                Duration::from_secs(20),
            )
        })
    };
    // Meanwhile a process outside the cgroup takes the same source port and connects to the
    // broker itself: the 4-tuple the client's record is kept under.
    std::thread::sleep(Duration::from_millis(1500));
    agent.signal(libc::SIGCONT);
    assert_eq!(stdout(&out).trim(), "posted");
    let got = received
        .recv_timeout(Duration::from_secs(10))
        .expect("the client's connection never reached the target");
    assert_eq!(String::from_utf8_lossy(&got), "metric 1\n");
    let other = other.join().expect("the other process's thread");
    assert_ne!(stdout(&other).trim(), "echoed");
    // Nothing else reached the target: not the other process's bytes under the client's record.
    if let Ok(more) = received.recv_timeout(Duration::from_millis(1000)) {
        panic!(
            "a second connection reached the target with {:?}",
            String::from_utf8_lossy(&more)
        );
    }
    agent.wait_count("relayed", 1);
    assert!(
        !agent
            .log()
            .contains("refused a connection the kernel did not redirect conn=1 "),
        "the client's own connection was refused: {}",
        agent.log()
    );
    assert!(agent.stop().success());
}

#[test]
fn a_client_that_resets_before_the_broker_accepts_raises_no_alarm_and_is_audited() {
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("echo", "127.0.0.2", echo.addr.port()), &cg);
    // The agent stopped: the client's connection waits in the broker's accept queue while the
    // client aborts it (a health check with SO_LINGER 0); the reset takes its kernel record.
    agent.signal(libc::SIGSTOP);
    let out = latch_tests::run_within(
        cg.command(bins::probe())
            .args(["rst", &echo.addr.to_string()]),
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(300));
    agent.signal(libc::SIGCONT);
    assert_eq!(stdout(&out).trim(), "reset");
    let records = agent.wait_audit(1);
    let reason = records[0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.starts_with("reset by its peer before latch accepted it; no kernel record"),
        "{records:?}"
    );
    // Not the warning meant for a process that reached the broker without the kernel.
    let log = agent.log();
    assert!(
        !log.contains("refused a connection the kernel did not redirect"),
        "{log}"
    );
    assert!(
        !agent.metrics().contains("reason=\"not_redirected\"} 1"),
        "{}",
        agent.metrics()
    );
    // The agent serves the next connection as ever.
    let out = run(cg
        .command(bins::probe())
        .args(["echo", &echo.addr.to_string(), "1", "100"]));
    assert_eq!(stdout(&out).trim(), "ok=1 failed=0");
    assert!(agent.stop().success());
}

#[test]
fn the_brokers_own_outbound_connection_is_not_looped() {
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    // The agent runs inside the very cgroup it intercepts: without the SO_MARK skip its
    // connection to the target would be redirected back to itself.
    let agent = Agent::start_inside(&tcp_policy("echo", "127.0.0.2", echo.addr.port()), &cg);
    let out = run(cg
        .command(bins::probe())
        .args(["echo", &echo.addr.to_string(), "3", "1000"]));
    assert_eq!(stdout(&out).trim(), "ok=3 failed=0");
    agent.wait_count("relayed", 3);
    assert_eq!(agent.count("refused"), 0);
    assert_eq!(echo.accepted(), 3);
    let status = agent.status();
    assert_eq!(status["ebpf"]["redirected"].as_u64(), Some(3), "{status}");
    assert!(agent.stop().success());
}

#[test]
fn host_policies_resolve_names_for_ipv4_and_ipv6() {
    let v4 = EchoServer::start("127.0.0.1");
    let v6 = EchoServer::start("::1");
    // Both servers share nothing but the name: give each its own port under one host policy
    // each, both named `localhost`.
    let policies = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: lo4}}\nspec:\n  \
         destination: {{host: localhost, port: {}}}\n  protocol: tcp\n  workloads: all\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: lo6}}\nspec:\n  \
         destination: {{host: localhost, port: {}}}\n  protocol: tcp\n  workloads: all\n",
        v4.addr.port(),
        v6.addr.port()
    );
    let cg = TestCgroup::new();
    let agent = Agent::start(&policies, &cg);
    run(cg
        .command(bins::probe())
        .args(["echo", &v4.addr.to_string(), "1", "1000"]));
    run(cg
        .command(bins::probe())
        .args(["echo", &v6.addr.to_string(), "1", "1000"]));
    agent.wait_count("relayed", 2);
    assert!(agent.stop().success());
}
