//! Who may use what: workload selectors admit or deny, and every decision is audited.
use std::os::unix::process::CommandExt as _;

use latch_tests::{Agent, TestCgroup, bins, servers::EchoServer};

fn policy(port: u16, workloads: &str) -> String {
    format!(
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: guarded}}\nspec:\n  \
         destination: {{address: 127.0.0.2, port: {port}}}\n  protocol: tcp\n  workloads:\n{workloads}"
    )
}

fn echo(cg: &TestCgroup, addr: std::net::SocketAddr, uid: Option<u32>) -> bool {
    let mut cmd = cg.command(bins::probe());
    cmd.args(["echo", &addr.to_string(), "1", "100"]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("probe").status.success()
}

#[test]
fn a_workload_the_policy_does_not_name_is_denied_and_audited() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(target.addr.port(), "    - uid: 4242\n"), &cg);

    assert!(
        !echo(&cg, target.addr, None),
        "root was admitted by a uid 4242 policy"
    );
    assert!(
        echo(&cg, target.addr, Some(4242)),
        "uid 4242 was not admitted"
    );

    let records = agent.wait_audit(2);
    let denied = &records[0];
    assert_eq!(denied["v"], 1);
    assert_eq!(denied["outcome"], "denied");
    assert_eq!(denied["policy"], "guarded");
    assert_eq!(denied["workload"]["uid"], 0);
    assert_eq!(denied["workload"]["comm"], "latch-probe");
    assert_eq!(denied["destination"], target.addr.to_string());
    let relayed = &records[1];
    assert_eq!(relayed["outcome"], "relayed");
    assert_eq!(relayed["workload"]["uid"], 4242);
    assert_eq!(relayed["bytes_to_target"], 100);
    assert_eq!(relayed["bytes_to_app"], 100);
    assert_eq!(
        target.accepted(),
        1,
        "the denied connection reached the target"
    );
    assert_eq!(agent.count("denied"), 1);
    assert!(
        agent
            .metrics()
            .contains("latch_connections_denied_total{policy=\"guarded\"} 1")
    );
    assert!(agent.stop().success());
}

#[test]
fn cgroup_and_executable_selectors_match_the_kernels_view() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let root = latch_tests::cgroup::v2_root();
    let rel = format!("/{}", cg.path().strip_prefix(&root).unwrap().display());
    let probe = bins::probe().canonicalize().unwrap();
    let workloads = format!(
        "    - cgroup: {rel}\n      exe: {}\n    - exe: /usr/bin/curl\n      uid: 1\n",
        probe.display()
    );
    let agent = Agent::start(&policy(target.addr.port(), &workloads), &cg);
    assert!(
        echo(&cg, target.addr, None),
        "the probe in the named cgroup was denied"
    );
    // A different executable in the same cgroup: python is not named.
    let out = cg
        .command("python3")
        .args([
            "-c",
            &format!(
                "import socket; s=socket.create_connection(('127.0.0.2',{})); s.sendall(b'x'); \
                 print(s.recv(1))",
                target.addr.port()
            ),
        ])
        .output()
        .expect("python3");
    assert!(
        !out.status.success(),
        "python was admitted by an exe selector for the probe"
    );
    let records = agent.wait_audit(2);
    assert_eq!(records[0]["outcome"], "relayed");
    assert_eq!(records[0]["workload"]["exe"], probe.display().to_string());
    assert_eq!(records[0]["workload"]["cgroup"], rel);
    assert_eq!(records[1]["outcome"], "denied");
    assert!(
        records[1]["workload"]["exe"]
            .as_str()
            .unwrap_or("")
            .contains("python"),
        "{:?}",
        records[1]
    );
    assert!(agent.stop().success());
}

#[test]
fn refusals_are_audited_too() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(target.addr.port(), "    - uid: 0\n"), &cg);
    let broker = agent.listener(false);
    drop(std::net::TcpStream::connect(broker).expect("connect to broker"));
    let records = agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "refused");
    assert_eq!(records[0]["destination"], broker.to_string());
    assert!(
        records[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not redirected")
    );
    assert!(agent.stop().success());
}
