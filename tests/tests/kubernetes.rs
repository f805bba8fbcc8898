//! Pod-aware policies: the agent watches this node's pods on a Kubernetes API server (the test
//! server of `latch_tests::kube_api`, speaking the real list/watch shapes) and admits
//! connections of simulated pods by their namespace, service account and labels. psql in the
//! pods holds no password; PostgreSQL is real.
use std::{ffi::OsStr, process::Output, time::Duration};

use latch_tests::{
    Agent, TempDir, TestCgroup, eventually, http,
    kube_api::{KubeApi, PodSpecT, labels_of},
    pg_setup,
    pod::Pod,
    postgres::{self, PgCluster, SCRAM_USER, policy_yaml, secrets_yaml},
    run_within,
};

const NODE: &str = "test-node";

/// `--runtime-cgroup-root` for pods laid out under `cg`.
fn kubepods_root(cg: &TestCgroup) -> String {
    format!(
        "/{}/kubepods.slice",
        cg.path().file_name().unwrap().to_string_lossy()
    )
}

fn psql_in_pod(pod: &Pod, pg: &PgCluster) -> Output {
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
        "SELECT current_user",
    ])
    .env_remove("PGPASSWORD")
    .env_remove("PGPASSFILE");
    run_within(&mut cmd, Duration::from_secs(30))
}

fn admitted(pod: &Pod, pg: &PgCluster) -> bool {
    let out = psql_in_pod(pod, pg);
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == SCRAM_USER
}

fn spec(pod: &Pod, namespace: &str, sa: &str, labels: &[(&str, &str)]) -> PodSpecT {
    PodSpecT {
        uid: pod.uid().to_owned(),
        namespace: namespace.into(),
        name: format!("app-{}", pod.index()),
        service_account: sa.into(),
        node: NODE.into(),
        labels: labels_of(labels),
    }
}

fn audits_of(agent: &Agent, pod: &Pod) -> Vec<serde_json::Value> {
    agent
        .audit()
        .into_iter()
        .filter(|r| r["workload"]["pod_uid"] == pod.uid())
        .collect()
}

/// psql from `pod`: whether it got in, and the audit record of its connection (audit records
/// are written asynchronously: waits for it).
fn connect(agent: &Agent, pod: &Pod, pg: &PgCluster) -> (bool, serde_json::Value) {
    let before = audits_of(agent, pod).len();
    let ok = admitted(pod, pg);
    let record = latch_tests::wait_for(Duration::from_secs(10), || {
        audits_of(agent, pod).into_iter().nth(before)
    })
    .unwrap_or_else(|| panic!("no audit record for pod {}:\n{}", pod.uid(), agent.log()));
    (ok, record)
}

/// Fields drop in this order: the agent first, the pods before their cgroup.
struct Setup {
    agent: Agent,
    pod1: Pod,
    pod2: Pod,
    _cg: TestCgroup,
    pg: PgCluster,
    api: KubeApi,
    _secrets: TempDir,
    _kube: TempDir,
}

/// Two pods, PostgreSQL on pod 1's veth letting both pods' addresses in, and an agent whose
/// policy admits `{namespace: shop, serviceAccount: orders, labels: {app: orders}}` only.
/// The API describes pod 1 (`shop`/`orders`, app=orders) and, if `describe_pod2`, pod 2
/// (`shop`/`orders`, app=web), plus a pod of another node. `tls`: the API server is served
/// over TLS, verified with the kubeconfig's CA.
fn setup(describe_pod2: bool, tls: bool) -> Setup {
    setup_with(describe_pod2, tls, &[], |_| String::new())
}

/// [`setup`] with more agent arguments, and more policy documents (made from pod 1, whose
/// host address the targets listen on).
fn setup_with(
    describe_pod2: bool,
    tls: bool,
    extra_args: &[&str],
    extra_yaml: impl FnOnce(&Pod) -> String,
) -> Setup {
    latch_tests::require_root();
    let api = if tls {
        KubeApi::start_tls()
    } else {
        KubeApi::start()
    };
    let cg = TestCgroup::new();
    let pod1 = Pod::new(&cg, 1);
    let pod2 = Pod::new(&cg, 2);
    api.put_pod(&spec(&pod1, "shop", "orders", &[("app", "orders")]));
    if describe_pod2 {
        api.put_pod(&spec(&pod2, "shop", "orders", &[("app", "web")]));
    }
    api.put_pod(&PodSpecT {
        uid: "7d1f7d6e-0000-4000-8000-000000000001".into(),
        namespace: "shop".into(),
        name: "elsewhere".into(),
        service_account: "orders".into(),
        node: "another-node".into(),
        labels: labels_of(&[("app", "orders")]),
    });
    let pg = PgCluster::start(
        &pod1.host_ip4().to_string(),
        pg_setup::SCRAM_PW,
        pg_setup::MD5_PW,
        pg_setup::PLAIN_PW,
    );
    pg.hba_allow(&format!("{}/32", pod1.pod_ip4()));
    pg.hba_allow(&format!("{}/32", pod2.pod_ip4()));
    let secrets = TempDir::new("k8s-secrets");
    let file = secrets.write(
        "secrets.yaml",
        &secrets_yaml(SCRAM_USER, pg_setup::SCRAM_PW),
    );
    let yaml = policy_yaml(
        "orders-db",
        pg.addr,
        &file,
        "  workloads:\n    - namespace: shop\n      serviceAccount: orders\n      labels: {app: orders}\n",
    ) + &extra_yaml(&pod1);
    let kube = TempDir::new("kubeconfig");
    let kubeconfig = kube.write("config", &api.kubeconfig());
    let root = kubepods_root(&cg);
    let agent = Agent::start_env(
        &yaml,
        &cg,
        &[
            &["--runtime-cgroup-root", &root, "--node-name", NODE],
            extra_args,
        ]
        .concat(),
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("HOME", OsStr::new("/nonexistent")),
        ],
    );
    Setup {
        agent,
        pod1,
        pod2,
        _cg: cg,
        pg,
        api,
        _secrets: secrets,
        _kube: kube,
    }
}

#[test]
fn only_the_pod_the_policy_selects_gets_in_and_label_changes_and_deletions_take_effect() {
    let s = setup(true, true);
    let (agent, api, pg) = (&s.agent, &s.api, &s.pg);
    assert!(
        api.field_selectors()
            .iter()
            .all(|f| f == &format!("spec.nodeName={NODE}")),
        "the agent asked for other pods than its node's: {:?}",
        api.field_selectors()
    );
    assert!(
        agent.log().contains("api=https://127.0.0.1:"),
        "the agent did not reach the API over TLS:\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains(latch_tests::kube_api::TOKEN),
        "the API token is in the agent's log"
    );
    let pods = &agent.status()["pods"];
    assert_eq!(pods["synced"], true, "{pods}");
    assert_eq!(pods["count"], 2, "only this node's pods are cached: {pods}");

    // Pod 1 matches namespace, service account and labels; pod 2 differs by a label.
    let (ok, r) = connect(agent, &s.pod1, pg);
    assert!(ok, "psql in pod 1 failed:\n{}", agent.log());
    assert_eq!(r["outcome"], "relayed", "{r}");
    assert_eq!(r["workload"]["pod"]["namespace"], "shop", "{r}");
    assert_eq!(r["workload"]["pod"]["serviceAccount"], "orders", "{r}");
    assert_eq!(r["workload"]["pod"]["labels"]["app"], "orders", "{r}");

    let (ok, r) = connect(agent, &s.pod2, pg);
    assert!(!ok, "pod 2 (app=web) got in");
    assert_eq!(r["outcome"], "denied", "{r}");
    assert_eq!(r["workload"]["pod"]["labels"]["app"], "web", "{r}");

    // A label change takes effect on the next connection (once the watch delivers it).
    api.set_labels(s.pod2.uid(), &[("app", "orders")]);
    assert!(
        eventually(Duration::from_secs(10), || admitted(&s.pod2, pg)),
        "pod 2 relabelled app=orders never got in:\n{}",
        agent.log()
    );
    api.set_labels(s.pod1.uid(), &[("app", "orders-v2")]);
    assert!(
        eventually(Duration::from_secs(10), || !admitted(&s.pod1, pg)),
        "pod 1 relabelled away still gets in"
    );
    let (ok, r) = connect(agent, &s.pod1, pg);
    assert!(!ok);
    assert_eq!(r["outcome"], "denied", "{r}");

    // Deleting pod 2 removes it from the cache: its cgroup (still there) gets nothing.
    api.delete_pod(s.pod2.uid());
    assert!(
        eventually(Duration::from_secs(10), || agent.status()["pods"]["count"]
            == 1),
        "the deleted pod stays in the cache: {}",
        agent.status()["pods"]
    );
    let (ok, r) = connect(agent, &s.pod2, pg);
    assert!(!ok, "a deleted pod's cgroup got in");
    assert_eq!(r["outcome"], "denied", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("no metadata from the Kubernetes API"),
        "{r}"
    );
}

/// Fail mode closed (the default): a pod the API does not describe is waited for (up to a
/// second), then refused and audited.
#[test]
fn a_pod_the_api_has_not_described_is_refused_and_audited_until_it_is() {
    let s = setup(false, false);
    let (agent, api, pg) = (&s.agent, &s.api, &s.pg);
    let uid2 = s.pod2.uid();
    let (ok, r) = connect(agent, &s.pod2, pg);
    assert!(!ok, "an unknown pod got in");
    assert_eq!(r["outcome"], "denied", "{r}");
    assert_eq!(r["workload"]["pod_unknown"], true, "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "pod {uid2}: no metadata from the Kubernetes API yet"
        )) && reason.contains("refused (fail closed)"),
        "{r}"
    );
    // Admission waited for the metadata (the watch was in sync) before refusing.
    let waited = r["duration_ms"].as_f64().unwrap();
    assert!(
        (900.0..5000.0).contains(&waited),
        "refused after {waited} ms, not after the one-second wait: {r}"
    );
    api.put_pod(&spec(&s.pod2, "shop", "orders", &[("app", "orders")]));
    assert!(
        eventually(Duration::from_secs(10), || admitted(&s.pod2, pg)),
        "pod 2 never got in once described:\n{}",
        agent.log()
    );
}

/// A pod's containers can connect before the watch delivers the pod: admission waits for the
/// metadata (woken by the pod cache), and the connection gets its credential once it arrives.
#[test]
fn a_pod_whose_metadata_arrives_just_after_its_first_connect_is_admitted() {
    let s = setup(false, false);
    let (agent, api, pg) = (&s.agent, &s.api, &s.pg);
    let delay = Duration::from_millis(200);
    // psql is running in the pod (it connects as it starts).
    let psql_running = || {
        std::fs::read_to_string(s.pod2.cgroup_path().join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "psql")
            })
    };
    let (ok, r) = std::thread::scope(|scope| {
        let first = scope.spawn(|| connect(agent, &s.pod2, pg));
        // Described only once psql runs (however slowly it started), and a moment later.
        assert!(
            eventually(Duration::from_secs(20), psql_running),
            "psql never ran in the pod"
        );
        std::thread::sleep(delay);
        api.put_pod(&spec(&s.pod2, "shop", "orders", &[("app", "orders")]));
        first.join().unwrap()
    });
    assert!(
        ok,
        "the pod's first connection did not get in:\n{r}\n{}",
        agent.log()
    );
    assert_eq!(r["outcome"], "relayed", "{r}");
    assert_eq!(r["workload"]["pod"]["labels"]["app"], "orders", "{r}");
    assert!(r["workload"].get("pod_unknown").is_none(), "{r}");
    // Admitted while the pod was still unknown: its handshake includes the wait.
    let handshake = r["handshake_ms"].as_f64().unwrap();
    assert!(
        handshake >= delay.as_millis() as f64,
        "the connection did not wait for the pod (handshake {handshake} ms): {r}"
    );
}

/// Fail mode open: a connection of a pod whose metadata never arrives goes to the destination
/// the kernel recorded as a plain relay, with no credentials, for any protocol; audited
/// `bypassed` and counted. The password never leaves the store.
#[test]
fn with_fail_mode_open_an_undescribed_pods_connection_goes_to_its_destination_without_credentials()
{
    let echo = std::cell::OnceCell::new();
    let s = setup_with(false, false, &["--fail-mode", "open"], |pod1| {
        let server = latch_tests::servers::EchoServer::start(&pod1.host_ip4().to_string());
        let yaml = format!(
            "---\n{}",
            latch_tests::tcp_policy("echo", &server.addr.ip().to_string(), server.addr.port())
                .replace("workloads: all", "workloads:\n    - namespace: shop")
        );
        let _ = echo.set(server);
        yaml
    });
    let echo = echo.get().unwrap();
    let (agent, pg) = (&s.agent, &s.pg);
    let resolutions = || {
        agent
            .metrics()
            .lines()
            .filter(|l| l.starts_with("latch_secret_resolve_seconds_count"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };

    // PostgreSQL: psql (no password) reaches the real server, which asks for the password
    // latch did not give.
    let out = psql_in_pod(&s.pod2, pg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "psql got in without credentials");
    assert!(
        stderr.contains("no password supplied"),
        "psql did not meet the server's own password request: {stderr}\n{}",
        agent.log()
    );
    let r = latch_tests::wait_for(Duration::from_secs(10), || {
        audits_of(agent, &s.pod2)
            .into_iter()
            .find(|r| r["policy"] == "orders-db")
    })
    .unwrap_or_else(|| panic!("no audit record:\n{}", agent.log()));
    assert_eq!(r["outcome"], "bypassed", "{r}");
    assert_eq!(r["workload"]["pod_unknown"], true, "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("let through to its destination without credentials (fail mode open)"),
        "{r}"
    );
    assert!(r["bytes_to_app"].as_u64().unwrap() > 0, "{r}");

    // tcp: the echo server answers the pod itself, from the pod's own address.
    let got = latch_tests::run_within(
        s.pod2.command(latch_tests::bins::probe()).args([
            "echo",
            &echo.addr.to_string(),
            "1",
            "100",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "ok=1 failed=0",
        "{}",
        agent.log()
    );
    assert_eq!(echo.peers(), [std::net::IpAddr::from(s.pod2.pod_ip4())]);
    let r = latch_tests::wait_for(Duration::from_secs(10), || {
        audits_of(agent, &s.pod2)
            .into_iter()
            .find(|r| r["policy"] == "echo")
    })
    .unwrap_or_else(|| panic!("no audit record of the echo:\n{}", agent.log()));
    assert_eq!(r["outcome"], "bypassed", "{r}");
    assert_eq!(r["bytes_to_target"], 100, "{r}");
    assert_eq!(r["bytes_to_app"], 100, "{r}");

    let metrics = agent.metrics();
    for policy in ["orders-db", "echo"] {
        let line = format!("latch_connections_total{{policy=\"{policy}\",outcome=\"bypassed\"}} 1");
        assert!(metrics.contains(&line), "no {line:?} in:\n{metrics}");
    }
    assert_eq!(
        resolutions(),
        0,
        "a credential was resolved for a let-through connection"
    );

    // The described pod is still brokered with its credential (and only that resolves it).
    let (ok, r) = connect(agent, &s.pod1, pg);
    assert!(ok, "pod 1 did not get in:\n{}", agent.log());
    assert_eq!(r["outcome"], "relayed", "{r}");
    assert!(resolutions() >= 1, "the canary metric never moves");

    // Canary: the password is nowhere in what latch wrote or the pod received.
    let audit = std::fs::read_to_string(agent.dir.path().join("audit.jsonl")).unwrap_or_default();
    for (what, text) in [
        ("the agent's log", agent.log()),
        ("the audit trail", audit),
        ("/metrics", agent.metrics()),
        (
            "psql's output",
            format!("{stderr}{}", String::from_utf8_lossy(&out.stdout)),
        ),
    ] {
        assert!(
            !text.contains(latch_tests::pg_setup::SCRAM_PW),
            "the password is in {what}"
        );
    }
}

#[test]
fn the_pod_cache_relists_after_410_gone_and_recovers_from_an_api_server_restart() {
    let mut s = setup(true, false);
    let pg = &s.pg;
    assert!(!admitted(&s.pod2, pg));
    let lists = s.api.lists();

    // History compacted: the open watch ends with 410 Gone, the agent lists again, and sees
    // the change that only the list shows.
    let uid2 = s.pod2.uid().to_owned();
    let api = &s.api;
    api.expire_history(|| api.set_labels(&uid2, &[("app", "orders")]));
    assert!(
        eventually(Duration::from_secs(15), || admitted(&s.pod2, pg)),
        "the change made across the 410 never reached the agent:\n{}",
        s.agent.log()
    );
    assert!(s.api.gone() >= 1, "no watch met 410 Gone");
    assert!(s.api.lists() > lists, "no relist after 410 Gone");
    assert!(s.agent.log().contains("pod list complete"));

    // API server restart: while it is down, /readyz says the pod cache is not in sync; once
    // back, the agent lists again (ready at once, even with no pod event to come), and a
    // change made after it takes effect.
    let admin = s.agent.admin;
    let lists = s.api.lists();
    let mut saw_not_ready = String::new();
    s.api.restart(Duration::from_secs(1), || {
        eventually(Duration::from_secs(15), || {
            match http::get(admin, "/readyz") {
                Ok((503, body)) => {
                    saw_not_ready = body;
                    true
                }
                _ => false,
            }
        });
    });
    assert!(
        saw_not_ready.contains("pod cache not in sync"),
        "/readyz while the API server was down: {saw_not_ready:?}"
    );
    assert!(
        eventually(Duration::from_secs(30), || matches!(
            http::get(admin, "/readyz"),
            Ok((200, _))
        )),
        "not ready again after the API server came back:\n{}",
        s.agent.log()
    );
    assert!(s.api.lists() > lists, "no list after the restart");
    s.api.set_labels(s.pod2.uid(), &[("app", "web")]);
    assert!(
        eventually(Duration::from_secs(30), || !admitted(&s.pod2, pg)),
        "the change after the restart never reached the agent:\n{}",
        s.agent.log()
    );
    assert!(
        admitted(&s.pod1, pg),
        "pod 1 lost access across the restart"
    );
}

/// The policy spec of the custom-resource tests: PostgreSQL at `pg`, credentials `path` (a
/// Secret's `username` and `password`) from `store`.
fn pg_spec(
    pg: &PgCluster,
    store: &str,
    path: &str,
    workloads: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "destination": {"address": pg.addr.ip().to_string(), "port": pg.addr.port()},
        "protocol": "postgres",
        "tls": {"mode": "disable"},
        "credentials": {"store": store, "username": {"path": path, "field": "username"},
                        "password": {"path": path, "field": "password"}},
        "workloads": workloads,
    })
}

/// Waits until `kind` `ns`/`name` has an Accepted condition with status `expected` ("True" or
/// "False") and returns (status, reason, message). A resource applied before one it refers to
/// (a Policy before its SecretStore: the watches deliver kinds independently) may be
/// reported Invalid first and Valid once the other arrives, as a controller would.
fn wait_accepted(
    api: &KubeApi,
    agent: &Agent,
    kind: &str,
    ns: Option<&str>,
    name: &str,
    expected: &str,
) -> (String, String, String) {
    let mut last = None;
    latch_tests::wait_for(Duration::from_secs(20), || {
        let c = api.accepted(kind, ns, name)?;
        let done = c.0 == expected;
        last = Some(c.clone());
        done.then_some(c)
    })
    .unwrap_or_else(|| {
        panic!(
            "no Accepted={expected} condition on {kind} {ns:?}/{name} (last: {last:?}):\n{}",
            agent.log()
        )
    })
}

#[test]
fn custom_resources_apply_report_their_status_and_a_namespaced_policy_serves_only_its_namespace() {
    latch_tests::require_root();
    let api = KubeApi::start_tls();
    let cg = TestCgroup::new();
    let shop = Pod::new(&cg, 1);
    let bank = Pod::new(&cg, 2);
    api.put_pod(&spec(&shop, "shop", "orders", &[("app", "orders")]));
    api.put_pod(&spec(&bank, "bank", "orders", &[("app", "orders")]));
    let pg = PgCluster::start(
        &shop.host_ip4().to_string(),
        pg_setup::SCRAM_PW,
        pg_setup::MD5_PW,
        pg_setup::PLAIN_PW,
    );
    pg.hba_allow(&format!("{}/32", shop.pod_ip4()));
    pg.hba_allow(&format!("{}/32", bank.pod_ip4()));
    let creds = [("username", SCRAM_USER), ("password", pg_setup::SCRAM_PW)];
    api.put_secret("shop", "db-creds", &creds);
    api.put_secret("bank", "db-creds", &creds);
    let kube = TempDir::new("kubeconfig");
    let kubeconfig = kube.write("config", &api.kubeconfig());
    let token = kube.write("token", latch_tests::kube_api::TOKEN);
    // The files hold only the store whose API address and credentials the namespaced
    // SecretStores use.
    let files = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata:\n  name: cluster-api\nspec:\n  \
         kubernetes: {{apiServer: \"{}\", tokenFile: {}, caFile: {}}}\n",
        api.url(),
        token.display(),
        api.ca_file().unwrap().display()
    );
    let root = kubepods_root(&cg);
    let agent = Agent::start_env(
        &files,
        &cg,
        &[
            "--runtime-cgroup-root",
            &root,
            "--node-name",
            NODE,
            "--kubernetes-api-store",
            "cluster-api",
        ],
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("HOME", OsStr::new("/nonexistent")),
        ],
    );
    assert!(!admitted(&shop, &pg), "a pod got in before any policy");

    // A namespaced store and a namespaced Policy with `workloads: all`: all of *its* namespace.
    api.put_resource(
        "SecretStore",
        Some("shop"),
        "secrets",
        serde_json::json!({"kubernetes": {}}),
    );
    api.put_resource(
        "Policy",
        Some("shop"),
        "orders-db",
        pg_spec(&pg, "secrets", "db-creds", "all".into()),
    );
    let c = wait_accepted(&api, &agent, "Policy", Some("shop"), "orders-db", "True");
    assert_eq!((c.0.as_str(), c.1.as_str()), ("True", "Valid"), "{c:?}");
    let c = wait_accepted(&api, &agent, "SecretStore", Some("shop"), "secrets", "True");
    assert_eq!(c.0, "True", "{c:?}");
    assert!(
        eventually(Duration::from_secs(10), || admitted(&shop, &pg)),
        "the shop pod never got in under Policy shop/orders-db:\n{}",
        agent.log()
    );
    let (ok, r) = connect(&agent, &shop, &pg);
    assert!(ok);
    assert_eq!(r["policy"], "shop/orders-db", "{r}");
    // The bank pod (same service account and labels, another namespace) is refused.
    let (ok, r) = connect(&agent, &bank, &pg);
    assert!(
        !ok,
        "Policy shop/orders-db handed credentials to a pod of namespace bank"
    );
    assert_eq!(r["outcome"], "denied", "{r}");
    assert!(
        api.secret_reads().iter().all(|s| s == "shop/db-creds"),
        "Secrets read: {:?}",
        api.secret_reads()
    );

    // A Policy of namespace bank cannot name shop's pods, nor use shop's store: invalid,
    // with the decoder's reason, and left out.
    api.put_resource(
        "Policy",
        Some("bank"),
        "steal",
        pg_spec(
            &pg,
            "secrets",
            "db-creds",
            serde_json::json!([{"namespace": "shop"}]),
        ),
    );
    let c = wait_accepted(&api, &agent, "Policy", Some("bank"), "steal", "False");
    assert_eq!((c.0.as_str(), c.1.as_str()), ("False", "Invalid"), "{c:?}");
    assert!(c.2.contains("Policy bank/steal"), "{c:?}");
    assert!(
        c.2.contains("SecretStore \"secrets\" is not a valid SecretStore of namespace \"bank\""),
        "{c:?}"
    );
    // A misspelt field: the file decoder's message and hint.
    api.put_resource(
        "Policy",
        Some("bank"),
        "typo",
        serde_json::json!({"destination": {"address": "192.0.2.1", "port": 5432}, "protocl": "postgres", "workloads": "all"}),
    );
    let c = wait_accepted(&api, &agent, "Policy", Some("bank"), "typo", "False");
    assert_eq!(c.0, "False", "{c:?}");
    assert!(
        c.2.contains("Policy bank/typo:") && c.2.contains("protocl"),
        "{c:?}"
    );
    assert!(
        admitted(&shop, &pg),
        "an invalid resource disturbed the valid ones"
    );
    assert!(!admitted(&bank, &pg));

    // Conditions are written when they change, not at every reload (SIGHUP: a reload with
    // nothing changed).
    std::thread::sleep(Duration::from_secs(2));
    let patches = api.status_patches();
    let reloads = agent.log().matches("configuration reloaded").count();
    agent.signal(libc::SIGHUP);
    agent.wait_log("configuration reloaded", reloads + 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        api.status_patches(),
        patches,
        "statuses rewritten unchanged"
    );
    // A changed spec with the same verdict: the condition says which generation it judged.
    api.put_resource(
        "Policy",
        Some("bank"),
        "typo",
        serde_json::json!({"destination": {"address": "192.0.2.1", "port": 5433}, "protocl": "postgres", "workloads": "all"}),
    );
    assert!(
        eventually(Duration::from_secs(10), || api
            .resource("Policy", Some("bank"), "typo")
            .is_some_and(
                |o| o["status"]["conditions"][0]["observedGeneration"] == 2
            )),
        "observedGeneration not updated: {:?}",
        api.resource("Policy", Some("bank"), "typo")
    );

    // A ClusterPolicy has no namespace: it may admit the bank pod, with a store of the files.
    api.delete_resource("Policy", Some("shop"), "orders-db");
    assert!(
        eventually(Duration::from_secs(10), || !admitted(&shop, &pg)),
        "the deleted Policy still admits"
    );
    api.put_resource(
        "ClusterPolicy",
        None,
        "bank-db",
        pg_spec(
            &pg,
            "cluster-api",
            "bank/db-creds",
            serde_json::json!([{"namespace": "bank"}]),
        ),
    );
    let c = wait_accepted(&api, &agent, "ClusterPolicy", None, "bank-db", "True");
    assert_eq!(c.0, "True", "{c:?}");
    assert!(
        eventually(Duration::from_secs(10), || admitted(&bank, &pg)),
        "the bank pod never got in under ClusterPolicy bank-db:\n{}",
        agent.log()
    );
    assert!(!admitted(&shop, &pg));
    drop(agent);
}

/// `namespace: fromPod`: one ClusterPolicy serves the pods of two namespaces, each with the
/// Secret of its own namespace, and only once a reference says so: before, the same policy
/// reads no Secret of any pod's namespace.
#[test]
fn a_cluster_policy_reads_the_secret_of_the_connecting_pods_namespace_only_when_it_says_so() {
    latch_tests::require_root();
    let api = KubeApi::start_tls();
    let cg = TestCgroup::new();
    let shop = Pod::new(&cg, 1);
    let bank = Pod::new(&cg, 2);
    api.put_pod(&spec(&shop, "shop", "orders", &[("app", "orders")]));
    api.put_pod(&spec(&bank, "bank", "orders", &[("app", "orders")]));
    let pg = PgCluster::start(
        &shop.host_ip4().to_string(),
        pg_setup::SCRAM_PW,
        pg_setup::MD5_PW,
        pg_setup::PLAIN_PW,
    );
    pg.hba_allow(&format!("{}/32", shop.pod_ip4()));
    pg.hba_allow(&format!("{}/32", bank.pod_ip4()));
    api.put_secret(
        "shop",
        "db-creds",
        &[("username", SCRAM_USER), ("password", pg_setup::SCRAM_PW)],
    );
    // bank's Secret holds another password: a bank pod that gets in read bank's own Secret.
    api.put_secret(
        "bank",
        "db-creds",
        &[("username", SCRAM_USER), ("password", "not-the-password")],
    );
    let kube = TempDir::new("kubeconfig");
    let kubeconfig = kube.write("config", &api.kubeconfig());
    let token = kube.write("token", latch_tests::kube_api::TOKEN);
    // The store names no namespace: a reference without one, and without fromPod, has no
    // namespace to read (the agent runs outside a pod here, with no service-account file).
    let files = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata:\n  name: cluster-api\nspec:\n  \
         kubernetes: {{apiServer: \"{}\", tokenFile: {}, caFile: {}}}\n",
        api.url(),
        token.display(),
        api.ca_file().unwrap().display()
    );
    let root = kubepods_root(&cg);
    let agent = Agent::start_env(
        &files,
        &cg,
        &["--runtime-cgroup-root", &root, "--node-name", NODE],
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("HOME", OsStr::new("/nonexistent")),
        ],
    );
    // uid 0 admits a host process of the intercepted cgroup too: not a pod, so no namespace.
    let both = serde_json::json!([{"namespace": "shop"}, {"namespace": "bank"}, {"uid": 0}]);
    pg.hba_allow(&format!("{}/32", shop.host_ip4()));
    api.put_resource(
        "ClusterPolicy",
        None,
        "per-namespace",
        pg_spec(&pg, "cluster-api", "db-creds", both.clone()),
    );
    let c = wait_accepted(&api, &agent, "ClusterPolicy", None, "per-namespace", "True");
    assert_eq!(c.0, "True", "{c:?}");
    std::thread::sleep(Duration::from_secs(1));
    let (ok, r) = connect(&agent, &shop, &pg);
    assert!(!ok, "without fromPod a pod got credentials: {r}");
    assert!(
        api.secret_reads().is_empty(),
        "without fromPod a Secret was read: {:?}",
        api.secret_reads()
    );

    // The same policy with `namespace: fromPod` on both references.
    let mut from_pod = pg_spec(&pg, "cluster-api", "db-creds", both);
    from_pod["credentials"]["username"]["namespace"] = "fromPod".into();
    from_pod["credentials"]["password"]["namespace"] = "fromPod".into();
    api.put_resource("ClusterPolicy", None, "per-namespace", from_pod);
    assert!(
        eventually(Duration::from_secs(15), || admitted(&shop, &pg)),
        "the shop pod never got in with fromPod:\n{}",
        agent.log()
    );
    assert!(
        api.secret_reads().iter().all(|s| s == "shop/db-creds"),
        "{:?}",
        api.secret_reads()
    );
    let (ok, r) = connect(&agent, &bank, &pg);
    assert!(!ok, "the bank pod got in with shop's Secret: {r}");
    assert!(
        api.secret_reads().contains(&"bank/db-creds".to_string()),
        "the bank pod's connection did not read bank's Secret: {:?}",
        api.secret_reads()
    );
    // bank's Secret fixed: bank's pod gets in with it, shop's still with shop's.
    api.put_secret(
        "bank",
        "db-creds",
        &[("username", SCRAM_USER), ("password", pg_setup::SCRAM_PW)],
    );
    assert!(admitted(&bank, &pg), "{}", agent.log());
    assert!(admitted(&shop, &pg));
    // A host process the selectors admit (uid 0) is no pod: it has no namespace, and gets
    // nothing.
    let mut host = cg.command(postgres::bin("psql"));
    host.args([
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
        "SELECT current_user",
    ])
    .env_remove("PGPASSWORD")
    .env_remove("PGPASSFILE");
    let out = run_within(&mut host, Duration::from_secs(30));
    assert!(!out.status.success(), "a host process got credentials");
    let record = latch_tests::wait_for(Duration::from_secs(10), || {
        agent.audit().into_iter().find(|r| {
            r["outcome"] == "denied" && r["reason"].as_str().is_some_and(|s| s.contains("fromPod"))
        })
    })
    .unwrap_or_else(|| panic!("no denial of the host process:\n{}", agent.log()));
    assert!(record["workload"]["pod_uid"].is_null(), "{record}");
    let reads = api.secret_reads();
    assert!(
        reads
            .iter()
            .all(|s| s == "shop/db-creds" || s == "bank/db-creds"),
        "{reads:?}"
    );
    drop(agent);
}
