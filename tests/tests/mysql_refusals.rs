//! `protocol: mysql` refusals end to end, each told to a client holding no password as an ERR
//! packet naming the policy and the class of failure: the server rejecting the store's
//! password (1045), a target nothing listens on (1429, MariaDB's "Unable to connect to foreign
//! data source": the server-side counterpart of the client's 2003), and a store that cannot be
//! read (1429, "the secret store is unreachable", without the store's path). A canary
//! password is then looked for in every byte the client received and in the agent's log.
//! (A workload the policy does not admit: `mysql.rs`.)
use std::process::{Command, Output};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    mariadb::{MariaDb, NATIVE_USER, policy_yaml},
    postgres::secrets_yaml,
    servers::free_port,
};

const NATIVE_PW: &str = "native-Secret-ref-5b0";
const ED_PW: &str = "ed25519-Secret-ref-c13";
const CANARY: &str = "cAnArY-my-4e9a0c-do-not-leak";

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_within(cmd, std::time::Duration::from_secs(60))
}

/// The `mariadb` CLI in `cg` toward `addr`, which must fail: its stderr.
fn cli_refused(db: &MariaDb, cg: &TestCgroup) -> String {
    let out = run(&mut db.cli_in(cg, "app_without_password", "select 1"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "mariadb succeeded: {err}");
    err
}

/// The canary verbatim, lowercased and as hex (as raw bytes would show it).
fn canary_forms() -> Vec<String> {
    let hex: String = CANARY.bytes().map(|b| format!("{b:02x}")).collect();
    vec![CANARY.to_owned(), CANARY.to_lowercase(), hex]
}

#[test]
fn a_rejected_canary_password_reaches_the_app_as_1045_naming_the_policy_and_nowhere_else() {
    let db = MariaDb::start("127.0.0.2", NATIVE_PW, ED_PW);
    let dir = TempDir::new("my-refuse-pw");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(NATIVE_USER, CANARY));
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy_yaml("orders-db", db.addr, &secrets, ""), &cg);
    let err = cli_refused(&db, &cg);
    assert!(
        err.contains("ERROR 1045 (28000)")
            && err.contains("latch: policy \"orders-db\"")
            && err.contains("rejected the policy's credentials"),
        "{err}"
    );
    // Every byte a raw client received, greeting included: the ERR comes with sequence id 2
    // (after the greeting and the response) and no form of the password is in them.
    let out =
        run(cg
            .command(bins::probe())
            .args(["mypre", &db.addr.to_string(), "valid-response"]));
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        line.starts_with(
            "case=valid-response greeting=yes answer=ERR 1045 28000 seq=2 closed=yes raw="
        ),
        "{line}"
    );
    let log = agent.log();
    for form in canary_forms() {
        assert!(
            !line.contains(&form),
            "the password reached the client: {line}"
        );
        assert!(!err.contains(&form), "{err}");
        assert!(
            !log.contains(&form),
            "the password is in the agent's log:\n{log}"
        );
    }
    assert!(agent.stop().success());
}

#[test]
fn a_target_nothing_listens_on_is_told_as_1429_naming_the_policy() {
    // A server for the CLI's arguments' sake, and a policy for a port where nothing listens.
    let db = MariaDb::start("127.0.0.2", NATIVE_PW, ED_PW);
    let dir = TempDir::new("my-refuse-dial");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(NATIVE_USER, NATIVE_PW));
    let cg = TestCgroup::new();
    let port = free_port("127.0.0.2");
    let dead = std::net::SocketAddr::new(db.addr.ip(), port);
    let agent = Agent::start(&policy_yaml("orders-db", dead, &secrets, ""), &cg);
    let mut cli = db.cli_in(&cg, "app_without_password", "select 1");
    cli.args(["-P", &port.to_string()]);
    let out = run(&mut cli);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // latch reaches for the target before it greets the application, so the ERR comes in
    // place of the greeting, as a server's own "too many connections" does; the 10.11 client
    // reports such an ERR wrapped ("Received error packet before completion of TLS
    // handshake ... 1429 - ...").
    assert!(
        err.contains("1429 - latch: policy \"orders-db\": could not reach the target"),
        "{err}"
    );
    agent.wait_count("failed", 1);
    assert!(agent.stop().success());
}

#[test]
fn a_store_that_cannot_be_read_is_told_as_1429_without_the_stores_path() {
    let db = MariaDb::start("127.0.0.2", NATIVE_PW, ED_PW);
    let dir = TempDir::new("my-refuse-store");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(NATIVE_USER, NATIVE_PW));
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy_yaml("orders-db", db.addr, &secrets, ""), &cg);
    std::fs::remove_file(&secrets).expect("remove the secrets file");
    let err = cli_refused(&db, &cg);
    assert!(
        err.contains("ERROR 1429 (HY000)")
            && err.contains("latch: policy \"orders-db\"")
            && err.contains("the secret store is unreachable"),
        "{err}"
    );
    assert!(
        !err.contains("secrets.yaml") && !err.contains(&dir.path().display().to_string()),
        "{err}"
    );
    assert!(agent.stop().success());
}
