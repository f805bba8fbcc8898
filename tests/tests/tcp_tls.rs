//! `protocol: tcp` with a `tls` block: the application speaks plain bytes to the destination,
//! latch makes TLS to it — verified with the policy's CA, a client certificate from the store —
//! and relays. nginx from Debian asks for the client certificate and names it in its answer;
//! curl inside the intercepted cgroup holds no certificate.
use std::{path::PathBuf, process::Command, time::Duration};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins, nginx_api::NginxApi, nginx_api::TOKEN, run_within,
};

fn indent(p: PathBuf) -> String {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect()
}

fn policy(nginx: &NginxApi, secrets: &std::path::Path, ca: &std::path::Path) -> String {
    format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata:\n  name: local\nspec:\n  \
         file: {{path: {}}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: cache\nspec:\n  \
         destination:\n    address: \"{}\"\n    port: {}\n  protocol: tcp\n  workloads: all\n  \
         tls:\n    mode: verify-full\n    ca: {}\n    serverName: api.test\n    \
         clientCert: {{store: local, path: client, field: cert}}\n    \
         clientKey: {{store: local, path: client, field: key}}\n",
        secrets.display(),
        nginx.mtls_addr.ip(),
        nginx.mtls_addr.port(),
        ca.display()
    )
}

fn curl(cmd: &mut Command, args: &[&str]) -> (String, String) {
    let out = run_within(
        cmd.args(["-sS", "--max-time", "60", "-w", "[%{http_code}]"])
            .args(args),
        Duration::from_secs(90),
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tcp_policy_makes_verified_tls_with_a_client_certificate_from_the_store() {
    let nginx = NginxApi::start("127.0.0.2");
    let (cert, key) = nginx.ca.client_cert("cache-client");
    let secrets = TempDir::new("tcp-tls-secrets");
    let file = secrets.write(
        "secrets.yaml",
        &format!(
            "client:\n  cert: |\n{}  key: |\n{}",
            indent(cert),
            indent(key)
        ),
    );
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(&nginx, &file, &nginx.ca.ca()), &cg);
    let auth = format!("Authorization: Bearer {TOKEN}");
    // nginx's mTLS port speaks only TLS: plain bytes from outside latch get 400.
    let url = format!("http://{}/", nginx.mtls_addr);
    let (out, _) = curl(
        &mut Command::new(bins::tool("curl", "curl")),
        &["-H", &auth, &url],
    );
    assert!(out.ends_with("[400]"), "{out}");
    // Through latch: plain HTTP from the application, TLS with the client certificate to nginx.
    let (out, err) = curl(
        &mut cg.command(bins::tool("curl", "curl")),
        &["-H", &auth, &url],
    );
    assert!(
        out.contains("client=[CN=cache-client") && out.ends_with("[200]"),
        "{out}{err}\n{}",
        agent.log()
    );
    let audit = agent.wait_audit(1);
    assert_eq!(audit[0]["outcome"], "relayed", "{audit:?}");
    drop(agent);

    // A policy CA that did not sign nginx's certificate: nothing is relayed, the audit says why.
    let cg2 = TestCgroup::new();
    let wrong = Agent::start(&policy(&nginx, &file, &nginx.ca.other_ca()), &cg2);
    let (out, _) = curl(
        &mut cg2.command(bins::tool("curl", "curl")),
        &["-H", &auth, &url],
    );
    assert!(!out.contains("client="), "{out}");
    let audit = wrong.wait_audit(1);
    assert_eq!(audit[0]["outcome"], "failed", "{audit:?}");
    assert!(
        audit[0]["reason"].as_str().unwrap_or("").contains("TLS"),
        "{audit:?}"
    );
}
