//! Namespace churn under load: 200 network namespaces appear and go while connections flow;
//! each is served while it exists, and afterwards the agent holds what it held before
//! (descriptors, threads, map entries, memory).
use std::{
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use latch_tests::{Agent, TestCgroup, bins, eventually, run_ok, servers::EchoServer, tcp_policy};

fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The agent's descriptors other than pipes: the relay keeps a bounded pool of idle pipes
/// per connection thread (tested in `limits`), which grows with the threads the load ran on;
/// what namespaces and connections hold must all come back.
fn fds(pid: u32) -> usize {
    fd_targets(pid)
        .iter()
        .filter(|t| !t.starts_with("pipe:"))
        .count()
}

fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.display().to_string())
        .collect()
}

/// (namespaces in the agent's table, cookies in its LATCH_NETNS)
fn netns_counts(agent: &Agent) -> (usize, usize) {
    let s = agent.status();
    (
        s["netns"].as_array().expect("netns").len(),
        s["ebpf"]["netns_map"].as_array().expect("netns_map").len(),
    )
}

fn served(agent: &Agent, inode: u64) -> bool {
    agent.status()["netns"]
        .as_array()
        .expect("netns")
        .iter()
        .any(|n| n["inode"] == inode)
}

/// A named namespace, deleted on drop.
struct Named(String);

impl Drop for Named {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn two_hundred_namespaces_come_and_go_under_load_and_leave_nothing() {
    use std::os::unix::fs::MetadataExt as _;
    latch_tests::require_root();
    let echo = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("echo", "127.0.0.2", echo.addr.port()), &cg);
    let pid = agent.pid();
    let addr = echo.addr.to_string();
    let probe = |conns: &str| {
        let out = cg
            .command(bins::probe())
            .args(["echo", &addr, conns, "1000"])
            .output()
            .expect("probe");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(probe("20"), "ok=20 failed=0", "warm-up");
    let (fds0, threads0, rss0) = (
        fds(pid),
        proc_status(pid, "Threads"),
        proc_status(pid, "VmRSS"),
    );
    let counts0 = netns_counts(&agent);

    // Load: connections through latch for as long as the churn lasts.
    let stop = AtomicBool::new(false);
    let (ok, bad) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let counter = if probe("10") == "ok=10 failed=0" {
                    &ok
                } else {
                    &bad
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        for i in 0..200 {
            let name = Named(format!("latch-churn-{}-{i}", std::process::id()));
            run_ok(Command::new("ip").args(["netns", "add", &name.0]));
            let inode = std::fs::metadata(format!("/run/netns/{}", name.0))
                .expect("stat namespace")
                .ino();
            let ready = eventually(Duration::from_secs(5), || served(&agent, inode));
            if !ready {
                stop.store(true, Ordering::Relaxed);
                panic!("namespace {} was never prepared", name.0);
            }
            drop(name);
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(ok.load(Ordering::Relaxed) > 0, "no load ran");
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "connections failed under churn"
    );

    // Threads: the periodic namespace sweep runs on tokio's blocking pool, whose thread stays
    // 10 s after its last sweep, so one may come or go between two counts; any thread left per
    // namespace would keep the count above where it started.
    let back = eventually(Duration::from_secs(25), || {
        netns_counts(&agent) == counts0
            && fds(pid) <= fds0
            && proc_status(pid, "Threads") <= threads0
    });
    assert!(
        back,
        "namespaces {:?} (before {counts0:?}), threads {} (before {threads0}), fds {} \
         (before {fds0}): {:?}",
        netns_counts(&agent),
        proc_status(pid, "Threads"),
        fds(pid),
        fd_targets(pid)
    );
    let rss = proc_status(pid, "VmRSS");
    assert!(
        rss < rss0 + 16 * 1024,
        "VmRSS grew from {rss0} kB to {rss} kB over 200 namespaces"
    );
    agent.stop();
}
