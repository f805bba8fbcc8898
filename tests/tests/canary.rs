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

/// A store answer's field latch does not use, written with JSON escapes: once parsed, only
/// serde_json's scratch buffer and the parsed document ever hold it unescaped.
fn escaped_note() -> (String, String) {
    let (mut escaped, mut plain) = (String::from("LATCH\\u002dNOTE"), String::from("LATCH-NOTE"));
    for i in 0..32 {
        // Every 16 bytes a `"`, which the answer writes as `\"`: any 32 bytes of the plain
        // text hold two, so no part of it can be read from the answer's raw bytes.
        escaped.push_str(&format!("\\\"k{i:02}-5e1f9a2c7d"));
        plain.push_str(&format!("\"k{i:02}-5e1f9a2c7d"));
    }
    (escaped, plain)
}

/// The unescaped text appears nowhere in the agent's memory after connections whose
/// credentials came from an `exec` store's JSON answer holding it in an unused field. Without
/// wiping what is freed while the answer is parsed, serde_json's scratch buffer (where an
/// escaped string is unescaped) keeps it after it is freed.
#[test]
fn an_escaped_store_answer_leaves_no_unescaped_copy_in_the_agents_memory() {
    use std::os::unix::fs::PermissionsExt as _;
    let pg = PgCluster::start(
        "127.0.0.6",
        "wipe-scram-pw-5b",
        "wipe-md5-1",
        "wipe-plain-1",
    );
    let dir = TempDir::new("canary-wipe");
    let (escaped, plain) = escaped_note();
    let answer = format!(
        "{{\"note\": \"{escaped}\", \"username\": \"{SCRAM_USER}\", \"password\": \"wipe-scram-pw-5b\"}}"
    );
    let helper = dir.write(
        "get-secret.sh",
        &format!("#!/bin/sh\ncat <<'EOF'\n{answer}\nEOF\n"),
    );
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o700)).unwrap();
    let policy = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata:\n  name: helper\nspec:\n  \
         exec: {{command: [{helper}]}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: wipe-db\nspec:\n  \
         destination:\n    address: \"127.0.0.6\"\n    port: {port}\n  protocol: postgres\n  \
         credentials:\n    store: helper\n    username: {{path: db, field: username}}\n    \
         password: {{path: db, field: password}}\n  tls: {{mode: disable}}\n  workloads: all\n",
        helper = helper.display(),
        port = pg.addr.port(),
    );
    let cg = TestCgroup::new();
    let agent = Agent::start_args(&policy, &cg, &["--allow-exec", &helper.to_string_lossy()]);
    // Each connection runs the helper twice (an exec store reads one field at a time).
    for _ in 0..3 {
        let out = cg
            .command(postgres::bin("psql"))
            .args(["-w", "-X", "-h", "127.0.0.6", "-p"])
            .arg(pg.addr.port().to_string())
            .args([
                "-U",
                "app",
                "-d",
                postgres::APP_DB,
                "-tAc",
                "select current_user",
            ])
            .env_remove("PGPASSWORD")
            .output()
            .expect("run psql");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(SCRAM_USER),
            "{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
    }
    // The scan finds what the agent does hold (the helper's path, from the policy)...
    let path = helper.to_string_lossy();
    assert!(
        !latch_tests::memory::find(agent.pid(), path.as_bytes()).is_empty(),
        "the memory scan found not even the policy's helper path"
    );
    // ... and no part of the unescaped note. 12 bytes across a `"`: only the plain text has
    // them (the answer writes `\"`); allocators write their lists into a freed block's first
    // 16 to 32 bytes, so what is past them is looked for, 31 times over.
    let needle = b"5e1f9a2c7d\"k";
    assert!(plain.as_bytes().windows(needle.len()).any(|w| w == needle));
    assert!(!answer.as_bytes().windows(needle.len()).any(|w| w == needle));
    let hits = latch_tests::memory::find(agent.pid(), needle);
    assert!(
        hits.is_empty(),
        "{} pieces of the unescaped note in the agent's memory, e.g. {:x?}",
        hits.len(),
        &hits[..hits.len().min(8)]
    );
    assert!(agent.stop().success());
}
