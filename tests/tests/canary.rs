//! Canary secrets: a password that only the secrets file holds is used for real PostgreSQL
//! sessions — successful ones and failing ones (rotated role password, MD5 and clear-text
//! rejections) — and is then looked for in every channel latch has: its stderr at trace level,
//! the audit file, /metrics, /status, and every byte psql and the probe received.
use std::process::Command;

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    postgres::{self, MD5_USER, PLAIN_USER, PgCluster, SCRAM_USER, policy_yaml, secrets_yaml},
};

const CANARY: &str = "cAnArY-8d1f2e7b-do-not-leak";

/// The canary as it would look if printed as hex or base64, as well as verbatim.
fn forms() -> Vec<String> {
    use std::fmt::Write as _;
    let hex = CANARY.bytes().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    let bytes_debug = format!("{:?}", CANARY.as_bytes());
    vec![
        CANARY.to_string(),
        CANARY.to_lowercase(),
        hex,
        bytes_debug[1..40].to_string(),
        base64(CANARY.as_bytes()),
    ]
}

fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    // Without padding, and only whole 4-character groups, so the text is position independent.
    out.truncate(out.len() / 4 * 4);
    out
}

fn run(cmd: &mut Command, received: &mut String) -> bool {
    let out = cmd.output().expect("run client");
    received.push_str(&String::from_utf8_lossy(&out.stdout));
    received.push_str(&String::from_utf8_lossy(&out.stderr));
    out.status.success()
}

#[test]
fn the_canary_password_never_leaves_the_secrets_file() {
    let pg = PgCluster::start("127.0.0.6", CANARY, "md5-role-pw-1", "plain-role-pw-1");
    let dir = TempDir::new("canary");
    let file = dir.write("secrets.yaml", &secrets_yaml(SCRAM_USER, CANARY));
    let cg = TestCgroup::new();
    let agent = Agent::start_logging(
        &policy_yaml("canary-db", pg.addr, &file, ""),
        &cg,
        &[],
        "trace",
    );
    let psql = |sql: &str| {
        let mut cmd = cg.command(postgres::bin("psql"));
        cmd.args(["-w", "-X", "-h", "127.0.0.6", "-p"])
            .arg(pg.addr.port().to_string())
            .args(["-U", "app", "-d", postgres::APP_DB, "-c", sql])
            .env_remove("PGPASSWORD");
        cmd
    };
    let probe_pg = |scenario: &str| {
        let mut cmd = cg.command(bins::probe());
        cmd.args([
            "pg",
            &format!(
                "host=127.0.0.6 port={} user=app dbname={}",
                pg.addr.port(),
                postgres::APP_DB
            ),
            scenario,
        ]);
        cmd
    };
    let mut received = String::new();

    // Working sessions: SCRAM through psql and tokio-postgres.
    assert!(
        run(&mut psql("select current_user"), &mut received),
        "{received}"
    );
    assert!(received.contains(SCRAM_USER), "{received}");
    assert!(run(&mut probe_pg("whoami"), &mut received), "{received}");

    // The role's password changes behind latch's back: SCRAM fails (after a refresh and retry).
    pg.sql(&format!(
        "ALTER ROLE {SCRAM_USER} PASSWORD 'rotated-elsewhere-1'"
    ));
    assert!(!run(&mut psql("select 1"), &mut received));
    assert!(!run(&mut probe_pg("whoami"), &mut received));
    // The canary as the MD5 role's and the clear-text role's password: both rejected.
    dir.write("secrets.yaml", &secrets_yaml(MD5_USER, CANARY));
    assert!(!run(&mut psql("select 1"), &mut received));
    dir.write("secrets.yaml", &secrets_yaml(PLAIN_USER, CANARY));
    assert!(!run(&mut psql("select 1"), &mut received));
    assert!(
        received.contains("28P01") || received.contains("password authentication failed"),
        "the failures were not authentication failures: {received}"
    );

    let records = agent.wait_audit(6);
    assert_eq!(
        records.iter().filter(|r| r["outcome"] == "failed").count(),
        4,
        "{records:#?}"
    );
    let log = agent.log();
    assert!(
        log.contains("TRACE"),
        "LATCH_LOG=trace produced no trace lines:\n{log}"
    );
    let channels = [
        ("agent stderr (trace)", log),
        (
            "audit file",
            std::fs::read_to_string(agent.dir.path().join("audit.jsonl")).unwrap(),
        ),
        ("/metrics", agent.metrics()),
        ("/status", agent.status().to_string()),
        ("bytes received by psql and the probe", received),
    ];
    for (name, text) in &channels {
        assert!(!text.is_empty(), "{name} is empty");
        for form in forms() {
            assert!(
                !text.contains(&form),
                "the canary ({form}) leaked into {name}:\n{text}"
            );
        }
    }
    assert!(agent.stop().success());
}
