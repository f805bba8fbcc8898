//! `protocol: postgres` with TLS to the target, per the policy's `tls.mode`: SSLRequest first,
//! rustls, certificate checks as libpq defines them, and SCRAM-SHA-256-PLUS channel binding.
use std::{path::Path, process::Output};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    certs::TestCa,
    postgres::{APP_DB, PgCluster, SCRAM_USER, ServerTls, policy_yaml, secrets_yaml},
};

const SCRAM_PW: &str = "tls-scram-Secret-1";

fn psql(cg: &TestCgroup, pg: &PgCluster, sql: &str) -> Output {
    pg.psql_in(cg, "nobody", APP_DB, sql)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run psql")
}

const SSL_IN_USE: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

fn agent(pg: &PgCluster, cg: &TestCgroup, secrets: &Path, tls: &str) -> Agent {
    Agent::start(
        &policy_yaml("orders-db", pg.addr, secrets, &format!("  tls: {tls}\n")),
        cg,
    )
}

#[test]
fn target_tls_follows_the_policy_mode_and_binds_scram_to_the_channel() {
    let certs = TestCa::new("db.test", &["DNS:db.test", "IP:127.0.0.2"]);
    let pg = PgCluster::start_with(
        "127.0.0.2",
        SCRAM_PW,
        "x-md5",
        "x-plain",
        Some(ServerTls {
            cert: &certs.server_cert(),
            key: &certs.server_key(),
        }),
    );
    let secrets_dir = TempDir::new("pg-tls-secrets");
    let secrets = secrets_dir.write("secrets.yaml", &secrets_yaml(SCRAM_USER, SCRAM_PW));
    let cg = TestCgroup::new();
    let ca = certs.ca().display().to_string();
    let other_ca = certs.other_ca().display().to_string();

    // (tls block, expected `ssl` column or None for a refused connection)
    let cases = [
        ("{mode: require}".to_string(), Some("t")),
        ("{mode: prefer}".to_string(), Some("t")),
        (format!("{{mode: verify-full, ca: {ca}}}"), Some("t")),
        (
            format!("{{mode: verify-full, ca: {ca}, serverName: db.test}}"),
            Some("t"),
        ),
        (
            format!("{{mode: verify-ca, ca: {ca}, serverName: wrong.test}}"),
            Some("t"),
        ),
        (
            format!("{{mode: verify-full, ca: {ca}, serverName: wrong.test}}"),
            None,
        ),
        (format!("{{mode: verify-ca, ca: {other_ca}}}"), None),
        ("{mode: disable}".to_string(), Some("f")),
    ];
    for (tls, want) in cases {
        let agent = agent(&pg, &cg, &secrets, &tls);
        let out = psql(&cg, &pg, SSL_IN_USE);
        let err = String::from_utf8_lossy(&out.stderr);
        match want {
            Some(ssl) => {
                assert!(out.status.success(), "tls {tls}: {err}\n{}", agent.log());
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout).trim(),
                    ssl,
                    "tls {tls}"
                );
                let log = agent.log();
                if ssl == "t" {
                    assert!(
                        log.contains("method=\"SCRAM-SHA-256-PLUS\""),
                        "tls {tls}: no channel binding\n{log}"
                    );
                } else {
                    assert!(log.contains("method=\"SCRAM-SHA-256\""), "tls {tls}\n{log}");
                }
            }
            None => {
                assert!(!out.status.success(), "tls {tls} should have been refused");
                assert!(
                    err.contains("policy \"orders-db\"") && err.contains("TLS to target"),
                    "tls {tls}: {err}"
                );
            }
        }
        assert!(!agent.log().contains(SCRAM_PW));
        assert!(agent.stop().success());
    }

    // A whole tokio-postgres workload over the TLS leg (the generic copy relay).
    let agent = agent(
        &pg,
        &cg,
        &secrets,
        &format!("{{mode: verify-full, ca: {ca}}}"),
    );
    let connstr = format!(
        "host={} port={} user=nobody dbname={APP_DB}",
        pg.addr.ip(),
        pg.addr.port()
    );
    let out = latch_tests::run_ok(cg.command(bins::probe()).args(["pg", &connstr, "suite"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("suite ok"));
    latch_tests::run_ok(cg.command(bins::probe()).args(["pg", &connstr, "cancel"]));
    assert!(agent.stop().success());
}

#[test]
fn md5_and_cleartext_go_only_to_a_server_verified_with_verify_full_and_only_when_named() {
    use latch_tests::{
        pg_setup::{MD5_PW, PLAIN_PW},
        postgres::{MD5_USER, PLAIN_USER},
    };
    let certs = TestCa::new("db.test", &["DNS:db.test", "IP:127.0.0.2"]);
    let pg = PgCluster::start_with(
        "127.0.0.2",
        SCRAM_PW,
        MD5_PW,
        PLAIN_PW,
        Some(ServerTls {
            cert: &certs.server_cert(),
            key: &certs.server_key(),
        }),
    );
    let cg = TestCgroup::new();
    let ca = certs.ca().display().to_string();
    for (user, pw) in [(MD5_USER, MD5_PW), (PLAIN_USER, PLAIN_PW)] {
        let dir = TempDir::new("pg-tls-secrets");
        let secrets = dir.write("secrets.yaml", &secrets_yaml(user, pw));
        // Named by the policy, toward a verified server: used.
        let named = Agent::start(
            &policy_yaml(
                "orders-db",
                pg.addr,
                &secrets,
                &format!(
                    "  tls: {{mode: verify-full, ca: {ca}}}\n  \
                     authentication: {{methods: [md5, password]}}\n"
                ),
            ),
            &cg,
        );
        let out = psql(&cg, &pg, "select current_user");
        assert!(
            out.status.success(),
            "{user}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            named.log()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), user);
        assert!(named.stop().success());

        // Not named (the default is SCRAM only): refused before anything is sent.
        let default = Agent::start(
            &policy_yaml(
                "orders-db",
                pg.addr,
                &secrets,
                &format!("  tls: {{mode: verify-full, ca: {ca}}}\n"),
            ),
            &cg,
        );
        let out = psql(&cg, &pg, "select current_user");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{user} was allowed by default");
        assert!(
            err.contains("which the policy does not allow"),
            "{user}: {err}"
        );
        assert!(!err.contains(pw) && !default.log().contains(pw));
        assert!(default.stop().success());
    }
    assert!(
        !pg.log().contains("authentication failed"),
        "a refused method still reached the server:\n{}",
        pg.log()
    );
}
