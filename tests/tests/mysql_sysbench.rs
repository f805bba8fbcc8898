//! sysbench (its MariaDB driver, libmariadb) through latch, holding no password: a short
//! `oltp_read_only` run against real MariaDB 10.11 completes without an error. Throughput is
//! `cargo xtask bench`'s business, not this test's.
use std::process::Command;

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    mariadb::{APP_DB, MariaDb, NATIVE_USER, policy_yaml},
    postgres::secrets_yaml,
};

const NATIVE_PW: &str = "native-Secret-sb-0a7";
const ED_PW: &str = "ed25519-Secret-sb-3c9";

fn sysbench(db: &MariaDb, user: &str, password: Option<&str>, action: &str) -> Vec<String> {
    let mut args = vec![
        "oltp_read_only".to_owned(),
        "--db-driver=mysql".to_owned(),
        format!("--mysql-host={}", db.addr.ip()),
        format!("--mysql-port={}", db.addr.port()),
        format!("--mysql-user={user}"),
        format!("--mysql-db={APP_DB}"),
        "--tables=1".to_owned(),
        "--table-size=1000".to_owned(),
        "--threads=2".to_owned(),
        "--time=5".to_owned(),
        "--db-ps-mode=auto".to_owned(),
    ];
    if let Some(pw) = password {
        args.push(format!("--mysql-password={pw}"));
    }
    args.push(action.to_owned());
    args
}

#[test]
fn sysbench_oltp_read_only_runs_through_latch_without_a_password() {
    let tool = bins::tool("sysbench", "sysbench");
    let db = MariaDb::start("127.0.0.2", NATIVE_PW, ED_PW);
    // The table, made directly with the password (not what is measured).
    let out = Command::new(&tool)
        .args(sysbench(&db, NATIVE_USER, Some(NATIVE_PW), "prepare"))
        .output()
        .expect("run sysbench prepare");
    assert!(
        out.status.success(),
        "sysbench prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = TempDir::new("my-sysbench");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(NATIVE_USER, NATIVE_PW));
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy_yaml("orders-db", db.addr, &secrets, ""), &cg);
    let mut run = cg.command(&tool);
    run.args(sysbench(&db, "app_without_password", None, "run"));
    let out = latch_tests::run_within(&mut run, std::time::Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sysbench run: {}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let field = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in sysbench's output:\n{stdout}"))
    };
    let transactions = field("transactions:");
    assert!(transactions > 0, "{stdout}");
    assert_eq!(field("ignored errors:"), 0, "{stdout}");
    assert_eq!(field("reconnects:"), 0, "{stdout}");
    // Two threads, two sessions, each brokered by latch.
    agent.wait_count("relayed", 2);
    assert_eq!(agent.count("failed"), 0);
    let log = agent.log();
    assert!(!log.contains(NATIVE_PW), "{log}");
    assert!(agent.stop().success());
}
