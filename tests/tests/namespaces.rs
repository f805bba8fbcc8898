//! Applications in network namespaces of their own (pods, containers, `unshare -n`) are
//! brokered like host processes: the broker listens in their namespace, reaches the target
//! from it (so the target sees the pod's own address), and a namespace that goes away leaves
//! nothing of it in the agent.
use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use latch_tests::{
    Agent, Killed, TempDir, TestCgroup, bins, eventually,
    pod::Pod,
    postgres::{self, PgCluster, SCRAM_USER, policy_yaml, secrets_yaml},
    run_within,
    servers::{EchoServer, Nginx, free_port},
    tcp_policy,
};

/// `--runtime-cgroup-root` for pods laid out under `cg` (the kubelet's root there).
fn kubepods_root(cg: &TestCgroup) -> String {
    format!(
        "/{}/kubepods.slice",
        cg.path().file_name().unwrap().to_string_lossy()
    )
}

/// Policies joined into one YAML stream.
fn policies(docs: &[String]) -> String {
    docs.join("---\n")
}

fn stdout(cmd: &mut Command) -> String {
    let out = run_within(cmd, Duration::from_secs(30));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `socat` echoing on `127.0.0.1:port` inside the pod's own namespace (not intercepted: it
/// runs outside the pod's cgroup); returns once it listens.
fn loopback_echo(pod: &Pod, port: u16) -> Killed {
    let child = pod
        .netns_command("socat")
        .args([
            format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"),
            "EXEC:/bin/cat".into(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start socat (cargo xtask setup installs it)");
    let guard = Killed(child);
    let listening = eventually(Duration::from_secs(5), || {
        let out = pod
            .netns_command("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("run ss");
        !out.stdout.is_empty()
    });
    assert!(
        listening,
        "socat never listened on 127.0.0.1:{port} in the pod"
    );
    guard
}

/// The agent's prepared namespaces as (inode, cookie), and the cookies in its LATCH_NETNS.
fn prepared(agent: &Agent) -> (Vec<(u64, u64)>, Vec<u64>) {
    let status = agent.status();
    let table = status["netns"]
        .as_array()
        .expect("netns in status")
        .iter()
        .map(|n| {
            (
                n["inode"].as_u64().expect("inode"),
                n["cookie"].as_u64().expect("cookie"),
            )
        })
        .collect();
    let kernel = status["ebpf"]["netns_map"]
        .as_array()
        .expect("ebpf.netns_map in status")
        .iter()
        .map(|c| c.as_u64().expect("cookie"))
        .collect();
    (table, kernel)
}

/// Runs the bash `script` in `cg`, in a network namespace of its own that no one pinned
/// (`unshare -n`); returns its stdout and stderr.
fn in_new_netns(cg: &TestCgroup, script: &str) -> (String, String) {
    let out = run_within(
        cg.command("unshare").args(["-n", "bash", "-c", script]),
        Duration::from_secs(30),
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn netns_inode(pod: &Pod) -> u64 {
    std::fs::metadata(pod.netns_path())
        .expect("stat the pod's namespace")
        .ino()
}

#[test]
fn pods_are_brokered_over_their_veth_and_their_own_loopback_from_their_own_address() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let pod1 = Pod::new(&cg, 1);
    let pod2 = Pod::new(&cg, 2);
    let echo4 = EchoServer::start(&pod1.host_ip4().to_string());
    let echo6 = EchoServer::start(&pod1.host_ip6().to_string());
    let echo2 = EchoServer::start(&pod2.host_ip4().to_string());
    let nginx = Nginx::start(&pod2.host_ip4().to_string());
    let loop_port = free_port("127.0.0.1");
    let _loop1 = loopback_echo(&pod1, loop_port);
    let yaml = policies(&[
        tcp_policy("echo4", &echo4.addr.ip().to_string(), echo4.addr.port()),
        tcp_policy("echo6", &echo6.addr.ip().to_string(), echo6.addr.port()),
        tcp_policy("echo2", &echo2.addr.ip().to_string(), echo2.addr.port()),
        tcp_policy("web", &nginx.addr.ip().to_string(), nginx.addr.port()),
        tcp_policy("pod-loopback", "127.0.0.1", loop_port),
    ]);
    let agent = Agent::start_args(&yaml, &cg, &["--runtime-cgroup-root", &kubepods_root(&cg)]);

    let cases: [(&Pod, SocketAddr); 4] = [
        (&pod1, echo4.addr),
        (&pod1, echo6.addr),
        (&pod1, SocketAddr::from(([127, 0, 0, 1], loop_port))),
        (&pod2, echo2.addr),
    ];
    for (pod, addr) in cases {
        let got = stdout(
            pod.command(bins::probe())
                .args(["echo", &addr.to_string(), "2", "1000"]),
        );
        assert_eq!(got, "ok=2 failed=0", "pod {} to {addr}", pod.index());
    }
    let code = stdout(pod2.command("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &nginx.url(),
    ]));
    assert_eq!(code, "200", "curl in pod 2 through latch to nginx");

    // The targets saw each pod's own address, as they would without latch.
    assert_eq!(echo4.peers(), vec![IpAddr::V4(pod1.pod_ip4()); 2]);
    assert_eq!(echo6.peers(), vec![IpAddr::V6(pod1.pod_ip6()); 2]);
    assert_eq!(echo2.peers(), vec![IpAddr::V4(pod2.pod_ip4()); 2]);

    // Each audit record names its pod and container; every connect found the broker.
    agent.wait_count("relayed", 9);
    let records = agent.wait_audit(9);
    for r in &records {
        assert_eq!(r["outcome"], "relayed", "{r}");
        let pod = if r["policy"] == "echo2" || r["policy"] == "web" {
            &pod2
        } else {
            &pod1
        };
        assert_eq!(r["workload"]["pod_uid"], pod.uid(), "{r}");
        assert_eq!(r["workload"]["container_id"], pod.container_id(), "{r}");
    }
    assert_eq!(agent.status()["ebpf"]["netns_unprepared"], 0);
    agent.stop();
}

/// psql in `pod` against `pg` as the SCRAM role, holding no password.
fn psql_in_pod(pod: &Pod, pg: &PgCluster, sql: &str) -> std::process::Output {
    let mut cmd = pod.command(postgres::bin("psql"));
    cmd.args([
        "-h",
        &pg.addr.ip().to_string(),
        "-p",
        &pg.addr.port().to_string(),
        "-U",
        SCRAM_USER,
        "-d",
        "postgres",
        "-w",
        "-X",
        "-A",
        "-t",
        "-c",
        sql,
    ])
    .env_remove("PGPASSWORD")
    .env_remove("PGPASSFILE");
    run_within(&mut cmd, Duration::from_secs(30))
}

/// A cluster on the host side of `pod`'s veth that lets only `pod`'s address in, and an agent
/// for `cg` whose PostgreSQL policy adds `extra_spec`.
fn pg_for_pod(cg: &TestCgroup, pod: &Pod, extra_spec: &str) -> (PgCluster, TempDir, Agent) {
    let pg = PgCluster::start(
        &pod.host_ip4().to_string(),
        latch_tests::pg_setup::SCRAM_PW,
        latch_tests::pg_setup::MD5_PW,
        latch_tests::pg_setup::PLAIN_PW,
    );
    pg.hba_allow(&format!("{}/32", pod.pod_ip4()));
    let secrets = TempDir::new("pg-secrets");
    let file = secrets.write(
        "secrets.yaml",
        &secrets_yaml(SCRAM_USER, latch_tests::pg_setup::SCRAM_PW),
    );
    let yaml = policy_yaml("orders-db", pg.addr, &file, extra_spec);
    let agent = Agent::start(&yaml, cg);
    (pg, secrets, agent)
}

#[test]
fn direct_mode_serves_an_application_in_a_pod() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let pod = Pod::new(&cg, 1);
    let (pg, _secrets, agent) = pg_for_pod(&cg, &pod, "  tls: {mode: disable}\n  direct: true\n");
    let out = psql_in_pod(&pod, &pg, "SELECT inet_client_addr()");
    assert!(
        out.status.success(),
        "psql in the pod, direct mode: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        pod.pod_ip4().to_string()
    );
    let ebpf = &agent.status()["ebpf"];
    assert_eq!(ebpf["direct_handovers"], 1, "{ebpf}");
    assert_eq!(
        ebpf["redirected"], 0,
        "the application's own connection: {ebpf}"
    );
    agent.stop();
}

#[test]
fn pods_keep_their_source_address_for_pg_hba() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let pod1 = Pod::new(&cg, 1);
    let pod2 = Pod::new(&cg, 2);
    // Only pod 1's address may log in.
    let (pg, _secrets, agent) = pg_for_pod(&cg, &pod1, "  tls: {mode: disable}\n");
    let psql = |pod: &Pod| psql_in_pod(pod, &pg, "SELECT inet_client_addr()");
    let out = psql(&pod1);
    assert!(
        out.status.success(),
        "psql in pod 1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        pod1.pod_ip4().to_string(),
        "the server saw pod 1's own address"
    );
    let out = psql(&pod2);
    assert!(!out.status.success(), "pod 2 is not in pg_hba.conf");
    let needle = format!("no pg_hba.conf entry for host \"{}\"", pod2.pod_ip4());
    assert!(
        eventually(Duration::from_secs(5), || pg.log().contains(&needle)),
        "the server refused pod 2 by its own address:\n{}",
        pg.log()
    );
    agent.stop();
}

#[test]
fn a_pod_created_after_the_agent_started_is_brokered_from_its_first_connect_and_leaves_nothing() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let loop_port = free_port("127.0.0.1");
    let agent = Agent::start_args(
        &tcp_policy("pod-loopback", "127.0.0.1", loop_port),
        &cg,
        &["--runtime-cgroup-root", &kubepods_root(&cg)],
    );
    let (before, _) = prepared(&agent);
    let pod = Pod::new(&cg, 1);
    let inode = netns_inode(&pod);
    let server = loopback_echo(&pod, loop_port);
    let got = stdout(pod.command(bins::probe()).args([
        "echo",
        &format!("127.0.0.1:{loop_port}"),
        "1",
        "100",
    ]));
    assert_eq!(got, "ok=1 failed=0", "the pod's first connection");
    assert_eq!(
        agent.status()["ebpf"]["netns_unprepared"],
        0,
        "no connect met an unprepared namespace"
    );
    let (table, kernel) = prepared(&agent);
    let cookie = table
        .iter()
        .find(|(i, _)| *i == inode)
        .map(|(_, c)| *c)
        .unwrap_or_else(|| panic!("the pod's namespace {inode} is not prepared: {table:?}"));
    assert!(kernel.contains(&cookie), "LATCH_NETNS lacks the pod");
    assert!(before.iter().all(|(i, _)| *i != inode));

    drop(server);
    pod.delete();
    let gone = eventually(Duration::from_secs(10), || {
        let (table, kernel) = prepared(&agent);
        table.iter().all(|(i, _)| *i != inode) && !kernel.contains(&cookie)
    });
    assert!(gone, "the deleted pod's namespace is still served");
    assert_eq!(agent.wait_audit(1)[0]["outcome"], "relayed");
    agent.stop();
}

/// A port below 1024 on loopback that nothing holds now (the broker's default is one, so that
/// no local user can hold it).
fn free_privileged_port() -> u16 {
    (700..1000)
        .find(|p| {
            std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && std::net::TcpListener::bind(("::1", *p)).is_ok()
        })
        .expect("a free port below 1024")
}

/// Issue 11, "the broker's port can be squatted": the default broker port is below 1024, so
/// the agent keeps CAP_NET_BIND_SERVICE to bind it in namespaces that appear later.
#[test]
fn with_a_privileged_broker_port_a_pod_created_later_is_still_served() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let loop_port = free_port("127.0.0.1");
    let broker = free_privileged_port();
    let agent = Agent::start_args(
        &tcp_policy("pod-loopback", "127.0.0.1", loop_port),
        &cg,
        &[
            "--runtime-cgroup-root",
            &kubepods_root(&cg),
            "--listen",
            &format!("127.0.0.1:{broker}"),
            "--listen",
            &format!("[::1]:{broker}"),
        ],
    );
    assert!(
        eventually(Duration::from_secs(5), || agent
            .log()
            .contains("CAP_NET_BIND_SERVICE")),
        "the agent does not keep CAP_NET_BIND_SERVICE:\n{}",
        agent.log()
    );
    let pod = Pod::new(&cg, 1);
    let _server = loopback_echo(&pod, loop_port);
    let got = stdout(pod.command(bins::probe()).args([
        "echo",
        &format!("127.0.0.1:{loop_port}"),
        "1",
        "100",
    ]));
    assert_eq!(got, "ok=1 failed=0", "{}", agent.log());
    assert_eq!(agent.wait_audit(1)[0]["outcome"], "relayed");
    pod.delete();
    agent.stop();
}

#[test]
fn a_connect_from_a_namespace_latch_has_not_prepared_is_refused_audited_and_the_namespace_prepared()
{
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let port = free_port("127.0.0.1");
    let agent = Agent::start(&tcp_policy("loopback", "127.0.0.1", port), &cg);
    // A namespace no runtime pinned anywhere: the agent learns of it from the kernel, when a
    // connect there matches a policy.
    let script = format!(
        "ip link set lo up\n\
         if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo first=connected; else echo first=failed; fi\n\
         socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork EXEC:/bin/cat & S=$!\n\
         for i in $(seq 100); do ss -Hltn 'sport = :{port}' | grep -q . && break; sleep 0.05; done\n\
         sleep 0.5\n\
         echo second=$({probe} echo 127.0.0.1:{port} 1 100)\n\
         kill $S\n",
        probe = bins::probe().display()
    );
    let (text, err) = in_new_netns(&cg, &script);
    assert!(text.contains("first=failed"), "{text}\n{err}");
    assert!(
        err.contains("Operation not permitted"),
        "the first connect is refused plainly (EPERM), not sent into the void:\n{err}"
    );
    assert!(
        text.contains("second=ok=1 failed=0"),
        "the namespace is served once the kernel reported it:\n{text}\n{err}"
    );
    let records = agent.wait_audit(2);
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["outcome"] == "refused" && r["count"].is_null())
        .collect();
    assert_eq!(refused.len(), 1, "{records:#?}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("network namespace not prepared"),
        "{records:#?}"
    );
    assert_eq!(refused[0]["policy"], "loopback");
    assert_eq!(refused[0]["workload"]["comm"], "bash");
    assert_eq!(agent.status()["ebpf"]["netns_unprepared"], 1);
    assert!(
        agent
            .metrics()
            .contains("latch_connections_refused_total{reason=\"netns_unprepared\"} 1"),
        "{}",
        agent.metrics()
    );
    agent.stop();
}

#[test]
fn a_namespace_nobody_pinned_is_prepared_by_the_sweep_before_its_processes_connect() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let port = free_port("127.0.0.1");
    let agent = Agent::start(&tcp_policy("loopback", "127.0.0.1", port), &cg);
    // The agent sweeps the processes under its cgroup every 5 s: a namespace that exists for
    // longer than that before it connects is served from its first connect.
    let script = format!(
        "ip link set lo up\n\
         socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork EXEC:/bin/cat & S=$!\n\
         sleep 6\n\
         echo got=$({probe} echo 127.0.0.1:{port} 1 100)\n\
         kill $S\n",
        probe = bins::probe().display()
    );
    let (text, err) = in_new_netns(&cg, &script);
    assert!(text.contains("got=ok=1 failed=0"), "{text}\n{err}");
    assert_eq!(agent.status()["ebpf"]["netns_unprepared"], 0);
    assert_eq!(agent.wait_audit(1)[0]["outcome"], "relayed");
    agent.stop();
}

#[test]
fn a_namespace_whose_broker_port_a_squatter_holds_fails_closed_and_the_squatter_gets_nothing() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let pod = Pod::new(&cg, 1);
    let echo = EchoServer::start(&pod.host_ip4().to_string());
    let broker = free_port("127.0.0.1");
    // Before the agent starts, something in the pod's namespace holds the broker's port there.
    let _squatter = loopback_echo(&pod, broker);
    let agent = Agent::start_args(
        &tcp_policy("echo", &echo.addr.ip().to_string(), echo.addr.port()),
        &cg,
        &["--listen", &format!("127.0.0.1:{broker}")],
    );
    let out = run_within(
        pod.command("bash").args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/{} && echo connected",
                echo.addr.ip(),
                echo.addr.port()
            ),
        ]),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Operation not permitted") && out.stdout.is_empty(),
        "the connect must fail closed, not reach the squatter:\n{err}"
    );
    assert_eq!(echo.accepted(), 0);
    let records = agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "refused", "{records:#?}");
    assert!(
        agent.log().contains("network namespace not prepared"),
        "{}",
        agent.log()
    );
    agent.stop();
}
