//! A real container runtime: podman runs a container (an image built locally from
//! busybox-static, no registry) in a network namespace of its own below the intercepted
//! cgroup; latch on the host brokers its connection to a server on the host side and audits
//! the container id.
use std::{net::IpAddr, time::Duration};

use latch_tests::{
    Agent, TestCgroup,
    cgroup::v2_root,
    container::{self, Container, ContainerNet},
    servers::EchoServer,
    tcp_policy,
};

#[test]
fn a_podman_containers_connection_is_brokered_from_its_own_address_and_audited_with_its_id() {
    container::require_podman();
    let cg = TestCgroup::new();
    let cg_rel = format!("/{}", cg.path().strip_prefix(v2_root()).unwrap().display());
    let net = ContainerNet::new();
    let host = net.host_ip().to_string();
    let echo = EchoServer::start(&host);
    // podman puts the container's cgroup (libpod-<id>) right below the parent it is given.
    let agent = Agent::start_args(
        &tcp_policy("echo", &host, echo.addr.port()),
        &cg,
        &["--runtime-cgroup-root", &cg_rel],
    );
    let nc = Container::run(
        &cg,
        &net.path(),
        &[
            "sh",
            "-c",
            &format!("echo hello | nc -w 5 {host} {}", echo.addr.port()),
        ],
    );
    let code = nc.wait(Duration::from_secs(30));
    let logs = nc.logs();
    assert_eq!(
        code,
        0,
        "nc in the container failed:\n{logs}\n{}",
        agent.log()
    );
    assert!(logs.contains("hello"), "no echo through latch:\n{logs}");
    assert_eq!(
        echo.peers(),
        vec![IpAddr::V4(net.container_ip())],
        "the server saw the container's own address"
    );
    let records = agent.wait_audit(1);
    let r = &records[0];
    assert_eq!(r["outcome"], "relayed", "{r}");
    assert_eq!(r["workload"]["container_id"], nc.id(), "{r}");
    assert_eq!(r["workload"]["cgroup"], nc.expected_cgroup(), "{r}");
    drop(nc);
    agent.stop();
}
