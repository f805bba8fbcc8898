//! /readyz reports the secret stores reachable: a Vault (OpenBao) store that stops answering
//! makes the agent unready, naming the store; when it is back, the agent is ready again.
use std::{net::SocketAddr, time::Duration};

use latch_tests::{
    Agent, TempDir, TestCgroup, http,
    openbao::{OpenBao, ROOT_TOKEN},
    servers::free_port,
    tcp_policy,
};

fn wait_readyz(agent: &Agent, code: u16, within: Duration) -> String {
    latch_tests::wait_for(within, || {
        let (got, body) = http::get(agent.admin, "/readyz").expect("GET /readyz");
        (got == code).then_some(body)
    })
    .unwrap_or_else(|| {
        panic!(
            "/readyz still {:?} after {within:?}, expected {code}:\n{}",
            http::get(agent.admin, "/readyz"),
            agent.log()
        )
    })
}

fn store<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["stores"]
        .as_array()
        .expect("stores in /status")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no store {name} in {status:#}"))
}

#[test]
fn readyz_names_an_unreachable_vault_store_and_recovers_when_it_is_back() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let bao = OpenBao::start(addr);
    let dir = TempDir::new("store-health");
    let token = dir.write("token", ROOT_TOKEN);
    let secrets = dir.write("secrets.yaml", "unused: {password: x}\n");
    let yaml = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: bao-main}}\nspec:\n  \
         vault:\n    address: {}\n    insecure: true\n    auth:\n      token: {{file: {}}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: local}}\nspec:\n  \
         file: {{path: {}}}\n---\n{}",
        bao.url(),
        token.display(),
        secrets.display(),
        tcp_policy("web", "127.0.0.2", 8080)
    );
    let cg = TestCgroup::new();
    // Agent::start waits for /readyz 200: both stores were reachable.
    let agent = Agent::start(&yaml, &cg);
    let status = agent.status();
    assert_eq!(store(&status, "bao-main")["reachable"], true, "{status:#}");
    assert_eq!(store(&status, "bao-main")["kind"], "vault");
    assert_eq!(store(&status, "local")["reachable"], true);

    bao.stop();
    let body = wait_readyz(&agent, 503, Duration::from_secs(20));
    assert_eq!(body, "not ready: secret stores unreachable: bao-main\n");
    let status = agent.status();
    let down = store(&status, "bao-main");
    assert_eq!(down["reachable"], false);
    assert!(
        down["error"].as_str().unwrap().contains(&addr.to_string()),
        "{down}"
    );
    assert_eq!(store(&status, "local")["reachable"], true);
    let metrics = agent.metrics();
    assert!(
        metrics.contains("latch_store_up{store=\"bao-main\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("latch_store_up{store=\"local\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains(ROOT_TOKEN) && !status.to_string().contains(ROOT_TOKEN));

    let bao = OpenBao::start(addr);
    wait_readyz(&agent, 200, Duration::from_secs(20));
    assert_eq!(store(&agent.status(), "bao-main")["reachable"], true);
    assert!(agent.stop().success());
    drop(bao);
}
