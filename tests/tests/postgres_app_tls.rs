//! `protocol: postgres` with TLS toward the application (`appTls: {mode: enable}`): latch
//! answers SSLRequest with 'S' and presents a certificate for the destination the application
//! asked for, issued by the node-local CA that `latch ca export` prints.
use std::{
    path::Path,
    process::{Command, Output},
};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    postgres::{APP_DB, PgCluster, SCRAM_USER, policy_yaml, secrets_yaml},
};

const SCRAM_PW: &str = "app-tls-Secret-7";

fn psql(cg: &TestCgroup, pg: &PgCluster, envs: &[(&str, &str)], sql: &str) -> Output {
    pg.psql_in(cg, "nobody", APP_DB, sql)
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .envs(envs.iter().copied())
        .output()
        .expect("run psql")
}

fn export_ca(state_dir: &Path) -> String {
    let out = Command::new(bins::latch())
        .args(["ca", "export", "--state-dir"])
        .arg(state_dir)
        .output()
        .expect("run latch ca export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn applications_get_tls_with_a_node_local_ca_certificate() {
    let pg = PgCluster::start("127.0.0.2", SCRAM_PW, "x-md5", "x-plain");
    let dir = TempDir::new("pg-app-tls");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(SCRAM_USER, SCRAM_PW));
    let state = dir.path().join("state");
    // Exported before the agent ever ran: the CA is created then, and the agent loads it.
    let ca_pem = export_ca(&state);
    assert!(
        ca_pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{ca_pem}"
    );
    let ca_file = dir.write("latch-ca.pem", &ca_pem);
    let other_state = dir.path().join("other-state");
    let other_ca = dir.write("other-ca.pem", &export_ca(&other_state));
    assert_ne!(ca_pem, std::fs::read_to_string(&other_ca).unwrap());
    let mode =
        std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(state.join("ca/ca.key")).unwrap());
    assert_eq!(mode & 0o777, 0o600);

    let cg = TestCgroup::new();
    let yaml = policy_yaml(
        "orders-db",
        pg.addr,
        &secrets,
        "  tls: {mode: disable}\n  appTls: {mode: enable}\n",
    );
    let state_arg = state.display().to_string();
    let agent = Agent::start_args(&yaml, &cg, &["--state-dir", &state_arg]);
    let ca_path = ca_file.display().to_string();
    let other_path = other_ca.display().to_string();

    // require / prefer: encrypted without checks; the query runs as the policy's user.
    for sslmode in ["require", "prefer"] {
        let out = psql(&cg, &pg, &[("PGSSLMODE", sslmode)], "\\conninfo");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{sslmode}: {stderr}\n{}", agent.log());
        assert!(stdout.contains("SSL connection"), "{sslmode}: {stdout}");
        let out = psql(&cg, &pg, &[("PGSSLMODE", sslmode)], "select current_user");
        assert_eq!(text(&out).0, SCRAM_USER, "{sslmode}: {}", text(&out).1);
    }
    // verify-full with the exported CA: the certificate names 127.0.0.2.
    let out = psql(
        &cg,
        &pg,
        &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &ca_path)],
        "select current_user",
    );
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "verify-full: {stderr}\n{}",
        agent.log()
    );
    assert_eq!(stdout, SCRAM_USER);
    // verify-full against another CA fails on the client side.
    let out = psql(
        &cg,
        &pg,
        &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &other_path)],
        "select 1",
    );
    assert!(
        !out.status.success(),
        "verify-full with a foreign CA passed"
    );
    assert!(
        text(&out).1.contains("certificate verify failed"),
        "{}",
        text(&out).1
    );
    // disable: plain text still works.
    let out = psql(&cg, &pg, &[("PGSSLMODE", "disable")], "\\conninfo");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "disable: {stderr}");
    assert!(!stdout.contains("SSL connection"), "{stdout}");

    // A bulk result over the TLS leg to the application (the copy relay).
    let out = psql(
        &cg,
        &pg,
        &[("PGSSLMODE", "require")],
        "select sum(length(repeat('x', g))) from generate_series(1, 3000) g",
    );
    assert_eq!(text(&out).0, "4501500", "{}", text(&out).1);

    let log = agent.log();
    assert!(!log.contains(SCRAM_PW));
    assert!(agent.stop().success());
}

#[test]
fn without_app_tls_latch_declines_and_require_fails_cleanly() {
    let pg = PgCluster::start("127.0.0.2", SCRAM_PW, "x-md5", "x-plain");
    let dir = TempDir::new("pg-app-tls-off");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(SCRAM_USER, SCRAM_PW));
    let cg = TestCgroup::new();
    let yaml = policy_yaml("orders-db", pg.addr, &secrets, "  tls: {mode: disable}\n");
    let state_arg = dir.path().join("state").display().to_string();
    let agent = Agent::start_args(&yaml, &cg, &["--state-dir", &state_arg]);
    let out = psql(&cg, &pg, &[("PGSSLMODE", "prefer")], "select current_user");
    assert_eq!(text(&out).0, SCRAM_USER, "{}", text(&out).1);
    let out = psql(&cg, &pg, &[("PGSSLMODE", "require")], "select 1");
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("does not support SSL"),
        "{}",
        text(&out).1
    );
    // No CA was needed, so none was created.
    assert!(!dir.path().join("state/ca").exists());
    assert!(agent.stop().success());
}
