//! The broker listens in at most `--max-namespaces` network namespaces: a workload that makes
//! namespaces without end cannot make the agent hold sockets without end. Past the bound,
//! matching connects fail closed and are audited. (A test binary of its own: other tests'
//! pods would take places under the bound.)
use std::time::Duration;

use latch_tests::{Agent, TestCgroup, pod::Pod, run_within, servers::EchoServer, tcp_policy};

#[test]
fn past_max_namespaces_connects_fail_closed_and_are_audited() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let first = Pod::new(&cg, 1);
    // Room for the agent's own namespace and every named one there is now, `first` included.
    let named = std::fs::read_dir("/run/netns")
        .expect("list /run/netns")
        .count();
    let echo = EchoServer::start(&first.host_ip4().to_string());
    let agent = Agent::start_args(
        &tcp_policy("echo", &first.host_ip4().to_string(), echo.addr.port()),
        &cg,
        &["--max-namespaces", &(1 + named).to_string()],
    );
    let connect = |pod: &Pod| {
        let out = run_within(
            pod.command("bash").args([
                "-c",
                &format!(
                    "exec 3<>/dev/tcp/{}/{} && echo connected",
                    first.host_ip4(),
                    echo.addr.port()
                ),
            ]),
            Duration::from_secs(20),
        );
        (
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (out, err) = connect(&first);
    assert_eq!(out, "connected", "the pod within the bound: {err}");
    let second = Pod::new(&cg, 2);
    let (out, err) = connect(&second);
    assert!(
        out.is_empty() && err.contains("Operation not permitted"),
        "a pod past the bound must fail closed: {out} {err}"
    );
    let refused = latch_tests::eventually(Duration::from_secs(5), || {
        agent.audit().iter().any(|r| {
            r["outcome"] == "refused"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("network namespace not prepared"))
        })
    });
    assert!(refused, "{:#?}", agent.audit());
    assert!(
        agent.log().contains("--max-namespaces"),
        "the warning names the limit:\n{}",
        agent.log()
    );
    agent.stop();
}
