//! Bounded soak and failure tests: a thousand concurrent connections, repeatedly; kill -9 of
//! the agent under load and a restart with the same policy and cgroup. Nothing may leak:
//! descriptors, memory, eBPF map entries, links, pins, cgroups.
use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use latch_tests::{
    Agent, TestCgroup, bins, eventually, leftovers, servers::EchoServer, tcp_policy,
};

const CONNS: &str = "1000";

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn load(cg: &TestCgroup, addr: std::net::SocketAddr, bytes: &str) -> Child {
    cg.command(bins::probe())
        .args(["echo", &addr.to_string(), CONNS, bytes])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start latch-probe")
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("wait latch-probe");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    text.push_str(&err.lines().take(5).collect::<Vec<_>>().join("\n"));
    (out.status.success(), text)
}

/// Ids of the eBPF maps process `pid` holds (from /proc/<pid>/fdinfo).
fn held_maps(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("read fdinfo")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// Entries in the agent's `LATCH_SOCKS`, `LATCH_CONNS` and `LATCH_FAST_KEYS` maps.
fn map_entries(pid: u32) -> (usize, usize, usize) {
    let bpftool = bins::tool("bpftool", "the Debian package bpftool");
    let out = std::process::Command::new(&bpftool)
        .args(["-j", "map", "show"])
        .output()
        .expect("bpftool map show");
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let held = held_maps(pid);
    let count = |name: &str| {
        let map = maps
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == name && m["id"].as_u64().is_some_and(|id| held.contains(&id)))
            .unwrap_or_else(|| panic!("no map {name} held by pid {pid} (holds {held:?})"));
        let id = map["id"].as_u64().unwrap().to_string();
        let dump = std::process::Command::new(&bpftool)
            .args(["-j", "map", "dump", "id", &id])
            .output()
            .expect("bpftool map dump");
        serde_json::from_slice::<serde_json::Value>(&dump.stdout)
            .expect("dump JSON")
            .as_array()
            .map_or(0, Vec::len)
    };
    (
        count("LATCH_SOCKS"),
        count("LATCH_CONNS"),
        count("LATCH_FAST_KEYS"),
    )
}

fn wait_idle(agent: &Agent) {
    assert!(
        eventually(Duration::from_secs(10), || agent.count("active") == 0),
        "connections still active"
    );
}

#[test]
fn a_thousand_concurrent_connections_three_times_leak_nothing() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("soak", "127.0.0.2", target.addr.port()), &cg);
    let pid = agent.pid();
    // Warm up (runtime threads, lazily built state), then take the baseline.
    let (ok, out) = finish(load(&cg, target.addr, "1000"));
    assert!(ok, "warm-up: {out}");
    wait_idle(&agent);
    let (fd0, rss0) = (fds(pid), rss_kib(pid));
    let mut rss = Vec::new();
    for round in 1..=3 {
        let started = Instant::now();
        let (ok, out) = finish(load(&cg, target.addr, "65536"));
        assert!(ok, "round {round}: {out}\n{}", agent.log());
        assert!(out.contains("ok=1000 failed=0"), "round {round}: {out}");
        eprintln!(
            "round {round}: 1000 x 64 KiB echoed in {:?}",
            started.elapsed()
        );
        wait_idle(&agent);
        rss.push(rss_kib(pid));
    }
    let (fd1, (socks, conns, fast_keys)) = (fds(pid), map_entries(pid));
    eprintln!(
        "fds: baseline {fd0}, after {fd1}; VmRSS KiB: baseline {rss0}, after rounds {rss:?}; \
         map entries: LATCH_SOCKS {socks}, LATCH_CONNS {conns}, LATCH_FAST_KEYS {fast_keys}"
    );
    // ±2: admin HTTP connections of this test's own /status polls may be open or closed.
    assert!(fd1 <= fd0 + 2, "descriptors leaked: {fd0} -> {fd1}");
    assert_eq!(
        conns, 0,
        "LATCH_CONNS keeps records of accepted connections"
    );
    assert_eq!(socks, 0, "LATCH_SOCKS keeps records of closed sockets");
    assert_eq!(
        fast_keys, 0,
        "LATCH_FAST_KEYS keeps the 4-tuples of closed fast-path sockets"
    );
    // Memory: the first round may grow pools; later rounds must not keep growing.
    assert!(
        rss[2] <= rss[0] + 16 * 1024,
        "VmRSS grew from {} to {} KiB over two rounds",
        rss[0],
        rss[2]
    );
    let status = agent.status();
    assert_eq!(status["ebpf"]["map_errors"], 0);
    assert_eq!(status["connections"]["relayed"], 4000);
    assert!(agent.stop().success());
}

#[test]
fn kill_9_under_load_then_a_restart_serves_again_and_nothing_leaks() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let policy = tcp_policy("restart", "127.0.0.2", target.addr.port());
    let first = Agent::start(&policy, &cg);
    let running = load(&cg, target.addr, "1048576");
    // Kill it while the relays are busy.
    assert!(
        eventually(Duration::from_secs(10), || first.count("active") >= 100),
        "load never got going"
    );
    first.crash();
    let (ok, out) = finish(running);
    assert!(!ok, "no connection noticed the agent's death: {out}");
    eprintln!(
        "load during kill -9: {}",
        out.lines().next().unwrap_or_default()
    );
    // The links died with the process; nothing is pinned; the test cgroup stays ours.
    leftovers::assert_none(cg.id(), None);

    let second = Agent::start(&policy, &cg);
    let pid = second.pid();
    let (ok, out) = finish(load(&cg, target.addr, "1000"));
    assert!(ok, "after restart: {out}\n{}", second.log());
    wait_idle(&second);
    let fd0 = fds(pid);
    let (ok, out) = finish(load(&cg, target.addr, "65536"));
    assert!(ok && out.contains("ok=1000 failed=0"), "{out}");
    wait_idle(&second);
    let (socks, conns, fast_keys) = map_entries(pid);
    eprintln!(
        "after restart: fds {fd0} -> {}, LATCH_SOCKS {socks}, LATCH_CONNS {conns}, \
         LATCH_FAST_KEYS {fast_keys}",
        fds(pid)
    );
    let fd1 = fds(pid);
    assert!(fd1 <= fd0 + 2, "descriptors leaked: {fd0} -> {fd1}");
    assert_eq!((socks, conns, fast_keys), (0, 0, 0));
    assert!(second.stop().success());
}
