//! After attaching and binding, the agent keeps only the capabilities it still needs — and
//! brokering, workload identity of other users' processes and hot reload (which updates eBPF
//! maps) still work with that set.
use std::{os::unix::process::CommandExt as _, time::Duration};

use latch_tests::{Agent, TestCgroup, bins, eventually, servers::EchoServer, tcp_policy};

const CAP_NET_ADMIN: u32 = 12;
const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;

fn caps(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("capability mask")
}

fn echo(cg: &TestCgroup, addr: std::net::SocketAddr, uid: Option<u32>) -> bool {
    let mut cmd = cg.command(bins::probe());
    cmd.args(["echo", &addr.to_string(), "3", "1000"]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("probe").status.success()
}

#[test]
fn the_running_agent_keeps_only_net_admin_sys_admin_sys_ptrace_and_ipc_lock() {
    let first = EchoServer::start("127.0.0.2");
    let second = EchoServer::start("127.0.0.3");
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("one", "127.0.0.2", first.addr.port()), &cg);
    // CAP_SYS_ADMIN: setns(2) into the network namespaces of pods and containers.
    let want = (1u64 << CAP_NET_ADMIN)
        | (1 << CAP_IPC_LOCK)
        | (1 << CAP_SYS_PTRACE)
        | (1 << CAP_SYS_ADMIN);
    // The drop follows the start within moments.
    assert!(
        eventually(Duration::from_secs(5), || caps(agent.pid(), "CapEff")
            == want),
        "CapEff is {:#x}, expected {want:#x}:\n{}",
        caps(agent.pid(), "CapEff"),
        agent.log()
    );
    assert_eq!(caps(agent.pid(), "CapPrm"), want, "permitted set");
    // Capabilities are per thread: the runtime's and the connection threads' too.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.pid())).expect("list threads");
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|h| u64::from_str_radix(h.trim(), 16).expect("capability mask"))
        };
        let Some(eff) = field("CapEff") else { continue };
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        assert_eq!(
            eff,
            want,
            "thread {} ({})",
            task.file_name().to_string_lossy(),
            comm.trim()
        );
        assert_eq!(
            field("CapBnd"),
            Some(want),
            "bounding set of {}",
            comm.trim()
        );
    }
    assert_eq!(caps(agent.pid(), "CapBnd"), want, "bounding set");
    assert_eq!(caps(agent.pid(), "CapInh"), 0, "inheritable set");
    assert_eq!(caps(agent.pid(), "CapAmb"), 0, "ambient set");
    assert!(agent.log().contains("capabilities dropped"));

    // Brokering (SO_MARK needs CAP_NET_ADMIN), for root and for another user — whose
    // executable the agent can only read with CAP_SYS_PTRACE.
    assert!(echo(&cg, first.addr, None), "root's connection failed");
    assert!(
        echo(&cg, first.addr, Some(4242)),
        "uid 4242's connection failed"
    );
    let records = agent.wait_audit(6);
    let other = records
        .iter()
        .find(|r| r["workload"]["uid"] == 4242)
        .expect("a record for uid 4242");
    assert_eq!(other["outcome"], "relayed");
    let probe = bins::probe().canonicalize().unwrap();
    assert_eq!(
        other["workload"]["exe"],
        probe.display().to_string(),
        "no executable for another user's process: {other}"
    );

    // Hot reload after the drop: new rule entries go into the eBPF tries.
    agent.rewrite_policy(&format!(
        "{}---\n{}",
        tcp_policy("one", "127.0.0.2", first.addr.port()),
        tcp_policy("two", "127.0.0.3", second.addr.port())
    ));
    agent.wait_log("configuration reloaded", 1);
    assert!(
        !agent.log().contains("reload failed"),
        "reload failed without capabilities:\n{}",
        agent.log()
    );
    assert!(
        echo(&cg, second.addr, None),
        "the reloaded policy does not broker"
    );
    assert_eq!(second.accepted(), 3);
    assert_eq!(agent.status()["ebpf"]["map_errors"], 0);
    // Stopping (map update, link close) leaves nothing behind; stop() checks that.
    assert!(agent.stop().success());
}
