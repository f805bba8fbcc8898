//! `protocol: postgres` with TLS toward the application: latch answers SSLRequest with 'S' and
//! presents a certificate for the destination the application asked for, issued by the
//! node-local CA that `latch ca export` prints — with `appTls: {mode: enable}`, and by default
//! (`auto`) when latch verifies the server itself (`tls.mode: verify-full`). Otherwise the
//! default declines ('N') as a server without SSL does: it never claims TLS it cannot stand
//! behind.
use std::process::Output;

use latch_tests::{
    Agent, TempDir, TestCgroup,
    certs::TestCa,
    postgres::{APP_DB, PgCluster, SCRAM_USER, ServerTls, policy_yaml, secrets_yaml},
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
    let ca_pem = latch_tests::export_node_ca(&state);
    assert!(
        ca_pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{ca_pem}"
    );
    let ca_file = dir.write("latch-ca.pem", &ca_pem);
    let other_state = dir.path().join("other-state");
    let other_ca = dir.write("other-ca.pem", &latch_tests::export_node_ca(&other_state));
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

/// What the server says of the leg latch opened to it, and who the session runs as.
const SERVER_LEG: &str =
    "select ssl::text || ' ' || current_user from pg_stat_ssl where pid = pg_backend_pid()";

/// A PostgreSQL 15 cluster on 127.0.0.2 with TLS, its certificate from `certs`.
fn tls_cluster(certs: &TestCa) -> PgCluster {
    PgCluster::start_with(
        "127.0.0.2",
        SCRAM_PW,
        "x-md5",
        "x-plain",
        Some(ServerTls {
            cert: &certs.server_cert(),
            key: &certs.server_key(),
        }),
    )
}

/// pg8000 (a pure-Python client with its own TLS through Python's `ssl`): `ssl` is `prefer`
/// (pg8000's default: TLS if offered, unchecked), `require` (`ssl_context=True`: TLS or fail,
/// unchecked) or a CA file to verify the certificate and the address against. Prints
/// `app=<TLS to latch> server=<ssl of the server leg> user=<current_user>` or `error: ...`.
const PG8000: &str = r#"
import ssl, sys
import pg8000.native
host, port, db, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
modes = {"prefer": None, "require": True}
ctx = modes[mode] if mode in modes else ssl.create_default_context(cafile=mode)
try:
    con = pg8000.native.Connection("nobody", host=host, port=port, database=db, ssl_context=ctx)
except Exception as e:
    print(f"error: {type(e).__name__}: {e}")
    sys.exit(1)
(server, user), = con.run("select ssl, current_user from pg_stat_ssl where pid = pg_backend_pid()")
print(f"app={isinstance(con._usock, ssl.SSLSocket)} server={server} user={user}")
con.close()
"#;

fn pg8000(cg: &TestCgroup, pg: &PgCluster, ssl: &str) -> (bool, String) {
    let out = cg
        .command("python3")
        .args(["-c", PG8000])
        .arg(pg.addr.ip().to_string())
        .arg(pg.addr.port().to_string())
        .args([APP_DB, ssl])
        .output()
        .expect("run python3 (pg8000: `cargo xtask setup` installs it)");
    let (stdout, stderr) = text(&out);
    assert!(
        !stderr.contains("No module named 'pg8000'"),
        "pg8000 is missing: run `cargo xtask setup`"
    );
    (out.status.success(), format!("{stdout}{stderr}"))
}

#[test]
fn by_default_sslmode_require_works_when_latch_verifies_the_server() {
    let certs = TestCa::new("db.test", &["DNS:db.test", "IP:127.0.0.2"]);
    let pg = tls_cluster(&certs);
    let dir = TempDir::new("pg-app-tls-auto");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(SCRAM_USER, SCRAM_PW));
    let state = dir.path().join("state");
    let cg = TestCgroup::new();
    // No appTls: the default, over the default server-leg mode (verify-full).
    let yaml = policy_yaml(
        "orders-db",
        pg.addr,
        &secrets,
        &format!(
            "  tls: {{mode: verify-full, ca: {}}}\n",
            certs.ca().display()
        ),
    );
    assert!(!yaml.contains("appTls"));
    let state_arg = state.display().to_string();
    let agent = Agent::start_args(&yaml, &cg, &["--state-dir", &state_arg]);
    assert!(
        !state.join("ca").exists(),
        "the CA is made on first use, not at start"
    );
    let want = format!("true {SCRAM_USER}");

    // libpq require and prefer: TLS to latch (\conninfo), TLS to the server (pg_stat_ssl).
    for sslmode in ["require", "prefer"] {
        let out = psql(&cg, &pg, &[("PGSSLMODE", sslmode)], "\\conninfo");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{sslmode}: {stderr}\n{}", agent.log());
        assert!(stdout.contains("SSL connection"), "{sslmode}: {stdout}");
        let out = psql(&cg, &pg, &[("PGSSLMODE", sslmode)], SERVER_LEG);
        assert_eq!(text(&out).0, want, "{sslmode}: {}", text(&out).1);
    }
    // The CA was created on that first use, in a directory closed to others.
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(state.join("ca")).unwrap());
    assert_eq!(mode & 0o777, 0o700);
    let ca_file = dir.write("latch-ca.pem", &latch_tests::export_node_ca(&state));
    let ca_path = ca_file.display().to_string();
    // verify-full with the node CA: the application checks latch's certificate for 127.0.0.2.
    let out = psql(
        &cg,
        &pg,
        &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &ca_path)],
        SERVER_LEG,
    );
    assert_eq!(text(&out).0, want, "verify-full: {}", text(&out).1);
    // disable: plain to latch, still verified TLS to the server.
    let out = psql(&cg, &pg, &[("PGSSLMODE", "disable")], "\\conninfo");
    assert!(out.status.success(), "disable: {}", text(&out).1);
    assert!(!text(&out).0.contains("SSL connection"), "{}", text(&out).0);
    let out = psql(&cg, &pg, &[("PGSSLMODE", "disable")], SERVER_LEG);
    assert_eq!(text(&out).0, want, "disable: {}", text(&out).1);

    // pg8000: its own protocol code and Python's TLS, unchecked and checked against the CA.
    let want = format!("app=True server=True user={SCRAM_USER}");
    for ssl in ["prefer", "require", ca_path.as_str()] {
        let (ok, out) = pg8000(&cg, &pg, ssl);
        assert!(ok, "pg8000 {ssl}: {out}\n{}", agent.log());
        assert_eq!(out, want, "pg8000 {ssl}");
    }
    assert!(!agent.log().contains(SCRAM_PW));
    assert!(agent.stop().success());
}

#[test]
fn by_default_tls_is_never_offered_over_a_server_leg_latch_does_not_verify() {
    let certs = TestCa::new("db.test", &["DNS:db.test", "IP:127.0.0.2"]);
    let pg = tls_cluster(&certs);
    let dir = TempDir::new("pg-app-tls-declined");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(SCRAM_USER, SCRAM_PW));
    let cg = TestCgroup::new();
    let ca = certs.ca().display().to_string();
    // (server leg, what pg_stat_ssl says of it): encrypted but unverified, or plain.
    let cases = [
        ("{mode: require}".to_string(), "true"),
        (format!("{{mode: verify-ca, ca: {ca}}}"), "true"),
        ("{mode: prefer}".to_string(), "true"),
        ("{mode: disable}".to_string(), "false"),
    ];
    for (tls, server_ssl) in cases {
        let state = dir.path().join(format!("state-{}", tls.len()));
        let yaml = policy_yaml("orders-db", pg.addr, &secrets, &format!("  tls: {tls}\n"));
        let state_arg = state.display().to_string();
        let agent = Agent::start_args(&yaml, &cg, &["--state-dir", &state_arg]);
        // require: refused as by a server without SSL, before anything else happens.
        let out = psql(&cg, &pg, &[("PGSSLMODE", "require")], "select 1");
        assert!(!out.status.success(), "tls {tls}: require was accepted");
        assert!(
            text(&out).1.contains("server does not support SSL"),
            "tls {tls}: {}",
            text(&out).1
        );
        // prefer: goes on in plain text to latch, and the server leg is what the policy says.
        let out = psql(&cg, &pg, &[("PGSSLMODE", "prefer")], "\\conninfo");
        assert!(out.status.success(), "tls {tls}: {}", text(&out).1);
        assert!(!text(&out).0.contains("SSL connection"), "tls {tls}");
        let out = psql(&cg, &pg, &[("PGSSLMODE", "prefer")], SERVER_LEG);
        assert_eq!(
            text(&out).0,
            format!("{server_ssl} {SCRAM_USER}"),
            "tls {tls}: {}",
            text(&out).1
        );
        // pg8000 asking for TLS is told no; by default it goes on in plain text.
        let (ok, out) = pg8000(&cg, &pg, "require");
        assert!(
            !ok && out.contains("Server refuses SSL"),
            "tls {tls}: {out}"
        );
        let (ok, out) = pg8000(&cg, &pg, "prefer");
        assert!(ok, "tls {tls}: {out}");
        assert_eq!(
            out,
            format!(
                "app=False server={} user={SCRAM_USER}",
                if server_ssl == "true" {
                    "True"
                } else {
                    "False"
                }
            )
        );
        assert!(!state.join("ca").exists(), "tls {tls}: a CA was made");
        assert!(agent.stop().success());
    }
}

#[test]
fn a_node_ca_that_cannot_be_made_is_an_error_to_the_application_not_a_decline() {
    let certs = TestCa::new("db.test", &["DNS:db.test", "IP:127.0.0.2"]);
    let pg = tls_cluster(&certs);
    let dir = TempDir::new("pg-app-tls-no-ca");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(SCRAM_USER, SCRAM_PW));
    // The state directory would be below a regular file: the CA cannot be created.
    let blocker = dir.write("not-a-dir", "");
    let state_arg = blocker.join("state").display().to_string();
    let cg = TestCgroup::new();
    let yaml = policy_yaml(
        "orders-db",
        pg.addr,
        &secrets,
        &format!(
            "  tls: {{mode: verify-full, ca: {}}}\n",
            certs.ca().display()
        ),
    );
    let agent = Agent::start_args(&yaml, &cg, &["--state-dir", &state_arg]);
    for sslmode in ["require", "prefer"] {
        let out = psql(&cg, &pg, &[("PGSSLMODE", sslmode)], "select 1");
        let (stdout, stderr) = text(&out);
        assert!(
            !out.status.success(),
            "{sslmode}: went on without TLS: {stdout}"
        );
        assert!(
            !stderr.contains("does not support SSL"),
            "{sslmode}: {stderr}"
        );
        assert!(
            stderr.contains("error response during SSL exchange")
                || stderr.contains("no certificate for TLS toward the application"),
            "{sslmode}: {stderr}"
        );
    }
    // pg8000 reads the ErrorResponse as it comes (it does not expect one there).
    let (ok, out) = pg8000(&cg, &pg, "prefer");
    assert!(!ok, "pg8000 went on without TLS: {out}");
    let log = agent.log();
    assert!(
        log.contains("no certificate for TLS toward the application")
            && log.contains("creating the CA directory"),
        "{log}"
    );
    // Without TLS toward latch nothing needs the CA.
    let out = psql(&cg, &pg, &[("PGSSLMODE", "disable")], SERVER_LEG);
    assert_eq!(
        text(&out).0,
        format!("true {SCRAM_USER}"),
        "{}",
        text(&out).1
    );
    assert!(agent.stop().success());
}
