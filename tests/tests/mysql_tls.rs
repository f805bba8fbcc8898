//! `protocol: mysql` with TLS on both legs: MariaDB 10.11 with a certificate, latch verifying
//! it (`tls.mode: verify-full` with the test CA), and by default (`appTls` auto over that
//! verified leg) TLS toward the application with a certificate from the node-local CA that
//! `latch ca export` prints. The `mariadb` CLI inside the test cgroup holds no password.
use std::{
    path::Path,
    process::{Command, Output},
};

use latch_tests::{
    Agent, TempDir, TestCgroup,
    certs::TestCa,
    mariadb::{APP_DB, MariaDb, policy_yaml},
    postgres::secrets_yaml,
};

const NATIVE_PW: &str = "native-Secret-tls-41a";
const ED_PW: &str = "ed25519-Secret-tls-9b2";
/// An account the server lets in only over TLS.
const TLS_USER: &str = "tls_app";
const TLS_PW: &str = "tls-Secret-77c0";

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_within(cmd, std::time::Duration::from_secs(60))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// A server with a certificate for db.test and 127.0.0.2, and [`TLS_USER`] `REQUIRE SSL`.
fn tls_server(certs: &TestCa) -> MariaDb {
    let db = MariaDb::start_with(
        "127.0.0.2",
        NATIVE_PW,
        ED_PW,
        Some((&certs.server_cert(), &certs.server_key())),
    );
    db.sql(&format!(
        "CREATE USER {TLS_USER}@'%' IDENTIFIED BY '{TLS_PW}' REQUIRE SSL"
    ));
    db.sql(&format!("GRANT ALL ON {APP_DB}.* TO {TLS_USER}@'%'"));
    db
}

/// What the server says of the session latch opened: its user and its TLS cipher.
const SERVER_LEG: &str = "SELECT CONCAT(CURRENT_USER(), ' ', VARIABLE_VALUE <> '') FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'Ssl_cipher'";

/// The TLS server, and an agent whose policy verifies it (`verify-full` with the test CA) and
/// says nothing of `appTls` (auto: TLS toward the application over that verified leg).
struct Verified {
    certs: TestCa,
    db: MariaDb,
    dir: TempDir,
    state: std::path::PathBuf,
    cg: TestCgroup,
    agent: Agent,
}

fn verified(name: &str) -> Verified {
    let certs = TestCa::new("db.test", &["DNS:db.test", "IP:127.0.0.2"]);
    let db = tls_server(&certs);
    let dir = TempDir::new(name);
    let secrets = dir.write("secrets.yaml", &secrets_yaml(TLS_USER, TLS_PW));
    let state = dir.path().join("state");
    let cg = TestCgroup::new();
    let yaml = policy_yaml(
        "orders-db",
        db.addr,
        &secrets,
        &format!(
            "  tls: {{mode: verify-full, ca: {}}}\n",
            certs.ca().display()
        ),
    );
    assert!(!yaml.contains("appTls"));
    let state_arg = state.display().to_string();
    let agent = Agent::start_args(&yaml, &cg, &["--state-dir", &state_arg]);
    Verified {
        certs,
        db,
        dir,
        state,
        cg,
        agent,
    }
}

#[test]
fn the_cli_verifies_latchs_node_ca_certificate_and_latch_verifies_the_server() {
    let Verified {
        certs,
        db,
        dir,
        state,
        cg,
        agent,
    } = verified("my-tls");
    let want = format!("{TLS_USER}@% 1");

    // Plain text to latch: the REQUIRE SSL account still gets in, latch's leg is TLS.
    let out = run(db.cli_in(&cg, "nobody", SERVER_LEG).arg("--skip-ssl"));
    assert_eq!(
        text(&out).0,
        want,
        "plain: {}\n{}",
        text(&out).1,
        agent.log()
    );

    let ca_file = dir.write("latch-ca.pem", &latch_tests::export_node_ca(&state));
    // The CLI verifies latch's certificate (for 127.0.0.2) against the node CA.
    let verify = |ca: &Path| {
        let mut cmd = db.cli_in(&cg, "nobody", SERVER_LEG);
        cmd.args(["--ssl", "--ssl-verify-server-cert"])
            .arg(format!("--ssl-ca={}", ca.display()));
        run(&mut cmd)
    };
    let out = verify(&ca_file);
    assert!(
        out.status.success(),
        "verified: {}\n{}",
        text(&out).1,
        agent.log()
    );
    assert_eq!(text(&out).0, want);
    // The application's leg is TLS: the CLI's own status says so.
    let mut status = db.cli_in(&cg, "nobody", "\\s");
    status
        .args(["--ssl", "--ssl-verify-server-cert"])
        .arg(format!("--ssl-ca={}", ca_file.display()));
    let out = run(&mut status);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "status: {stderr}\n{}", agent.log());
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("SSL:") && l.contains("Cipher in use")),
        "{stdout}"
    );
    // Another CA: the CLI refuses latch's certificate.
    let out = verify(&certs.other_ca());
    assert!(!out.status.success(), "a foreign CA was accepted");
    assert!(
        text(&out).1.contains("certificate") || text(&out).1.contains("TLS/SSL"),
        "{}",
        text(&out).1
    );
    let log = agent.log();
    assert!(!log.contains(TLS_PW), "a password in the agent log:\n{log}");
    assert!(agent.stop().success());
}

#[test]
fn verify_full_against_another_name_fails_with_an_err_naming_the_policy_and_the_tls_failure() {
    let certs = TestCa::new("db.test", &["DNS:db.test", "IP:127.0.0.2"]);
    let db = tls_server(&certs);
    let dir = TempDir::new("my-tls-name");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(TLS_USER, TLS_PW));
    let cg = TestCgroup::new();
    let yaml = policy_yaml(
        "orders-db",
        db.addr,
        &secrets,
        &format!(
            "  tls: {{mode: verify-full, ca: {}, serverName: other.test}}\n",
            certs.ca().display()
        ),
    );
    let agent = Agent::start(&yaml, &cg);
    let out = run(db.cli_in(&cg, "nobody", "SELECT 1").arg("--skip-ssl"));
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "connected despite the wrong name");
    assert!(
        stderr.contains("latch: policy \"orders-db\"") && stderr.contains("TLS to target"),
        "{stderr}"
    );
    assert!(
        stderr.contains("NotValidForName") || stderr.contains("name"),
        "{stderr}"
    );
    assert!(agent.stop().success());
}

/// An account that needs a client certificate with this subject (`REQUIRE SUBJECT`).
const X509_USER: &str = "x509_app";
const X509_PW: &str = "x509-Secret-5e21";
const X509_SUBJECT: &str = "latch-app";

/// The policy's `tls` for the client-certificate case, certificate and key from the store.
fn x509_tls(certs: &TestCa, with_client_cert: bool) -> String {
    let client = if with_client_cert {
        ", clientCert: {path: client, field: cert}, clientKey: {path: client, field: key}"
    } else {
        ""
    };
    format!(
        "  tls: {{mode: verify-full, ca: {}{client}}}\n",
        certs.ca().display()
    )
}

fn indented(pem: &Path) -> String {
    std::fs::read_to_string(pem)
        .expect("read PEM")
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect()
}

#[test]
fn a_require_subject_account_gets_in_with_the_policys_client_certificate_and_not_without() {
    let certs = TestCa::new("db.test", &["DNS:db.test", "IP:127.0.0.2"]);
    let db = MariaDb::start_tls(
        "127.0.0.2",
        NATIVE_PW,
        ED_PW,
        Some((&certs.server_cert(), &certs.server_key())),
        Some(&certs.ca()),
    );
    db.sql(&format!(
        "CREATE USER {X509_USER}@'%' IDENTIFIED BY '{X509_PW}' REQUIRE SUBJECT '/CN={X509_SUBJECT}'"
    ));
    db.sql(&format!("GRANT ALL ON {APP_DB}.* TO {X509_USER}@'%'"));
    let (cert, key) = certs.client(X509_SUBJECT);
    let dir = TempDir::new("my-x509");
    let secrets = dir.write(
        "secrets.yaml",
        &format!(
            "{}client:\n  cert: |\n{}  key: |\n{}",
            secrets_yaml(X509_USER, X509_PW),
            indented(&cert),
            indented(&key)
        ),
    );
    let cg = TestCgroup::new();
    let x509_leg = "SELECT CONCAT(CURRENT_USER(), ' ', VARIABLE_VALUE <> '') FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'Ssl_cipher'";

    // The application holds no password and no certificate; latch presents the store's.
    let yaml = policy_yaml("orders-db", db.addr, &secrets, &x509_tls(&certs, true));
    let agent = Agent::start(&yaml, &cg);
    let out = run(db.cli_in(&cg, "nobody", x509_leg).arg("--skip-ssl"));
    assert_eq!(
        text(&out).0,
        format!("{X509_USER}@% 1"),
        "{}\n{}",
        text(&out).1,
        agent.log()
    );
    let log = agent.log();
    assert!(
        !log.contains(X509_PW) && !log.contains("PRIVATE KEY"),
        "{log}"
    );
    assert!(agent.stop().success());

    // The same policy without the client certificate: the server refuses the account, and
    // the application hears a 1045 naming the policy.
    let yaml = policy_yaml("orders-db", db.addr, &secrets, &x509_tls(&certs, false));
    let agent = Agent::start(&yaml, &cg);
    let out = run(db.cli_in(&cg, "nobody", "SELECT 1").arg("--skip-ssl"));
    let (_, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "connected without the client certificate"
    );
    assert!(
        stderr.contains("ERROR 1045") && stderr.contains("latch: policy \"orders-db\""),
        "{stderr}"
    );
    // The server's own view: it refused the account, for want of the certificate.
    assert!(
        db.log()
            .contains(&format!("Access denied for user '{X509_USER}'")),
        "{}",
        db.log()
    );
    assert!(agent.stop().success());
}

#[test]
fn a_kept_session_keeps_its_verified_tls_leg_for_plain_and_tls_applications_alike() {
    // (The CA's files must outlive the agent that reads them.)
    let Verified {
        certs: _certs,
        db,
        dir,
        state,
        cg,
        agent,
    } = verified("my-tls-kept");
    let ca_file = dir.write("latch-ca.pem", &latch_tests::export_node_ca(&state));
    let sql = format!("{SERVER_LEG} UNION ALL SELECT CONNECTION_ID()");
    // Each run waits for latch to close its connection (and keep the session).
    let mut closed = 0;
    let mut leg = |tls: bool| {
        let mut cmd = db.cli_in(&cg, "nobody", &sql);
        if tls {
            cmd.args(["--ssl", "--ssl-verify-server-cert"])
                .arg(format!("--ssl-ca={}", ca_file.display()));
        } else {
            cmd.arg("--skip-ssl");
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "{}\n{}", text(&out).1, agent.log());
        closed += 1;
        agent.wait_count("relayed", closed);
        text(&out).0
    };
    let plain = leg(false);
    let (who, id) = plain.split_once('\n').unwrap();
    assert_eq!(who, format!("{TLS_USER}@% 1"));
    // The application's own TLS is its leg's business: the server's session, over TLS that
    // latch verified, is the one kept.
    assert_eq!(leg(true), plain, "the TLS application got another session");
    assert_eq!(leg(false), format!("{TLS_USER}@% 1\n{id}"));
    assert!(!agent.log().contains(TLS_PW));
    // The agent stops: the kept session says COM_QUIT inside its TLS, and the server counts
    // no aborted client.
    let aborted = db.sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'");
    assert!(agent.stop().success());
    let ended = latch_tests::eventually(std::time::Duration::from_secs(5), || {
        !db.sql("SELECT id FROM information_schema.processlist")
            .lines()
            .any(|l| l.trim() == id)
    });
    assert!(ended, "the kept session outlived the agent");
    assert_eq!(db.sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'"), aborted);
}
