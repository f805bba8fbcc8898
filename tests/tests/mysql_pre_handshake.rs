//! Before the handshake completes, latch answers odd and hostile bytes as MariaDB 10.11 does.
//! The same byte sequences (`latch-probe mypre`, cases in `tests/src/bin/probe/mypre.rs`) go
//! to a real MariaDB 10.11 directly and, from inside the intercepted cgroup, to latch in front
//! of it; [`TABLE`] is what the client observes from each: the ERR packets after the greeting
//! (code, SQLSTATE, sequence id) and whether the connection was closed. Where latch differs
//! on purpose, the row says so and why.
use std::process::{Command, Output};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    mariadb::{MariaDb, NATIVE_USER, policy_yaml},
    postgres::secrets_yaml,
};

const NATIVE_PW: &str = "native-Secret-pre-61a";
const ED_PW: &str = "ed25519-Secret-pre-2f4";

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_within(cmd, std::time::Duration::from_secs(120))
}

#[test]
fn before_the_handshake_latch_answers_the_same_bytes_as_mariadb() {
    let db = MariaDb::start("127.0.0.2", NATIVE_PW, ED_PW);
    let dir = TempDir::new("my-pre");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(NATIVE_USER, NATIVE_PW));
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy_yaml("orders-db", db.addr, &secrets, ""), &cg);
    let target = db.addr.to_string();
    // Both at once: the stall case waits out each side's timeout.
    let mut direct_cmd = Command::new(bins::probe());
    direct_cmd.args(["mypre", &target]);
    let mut latch_cmd = cg.command(bins::probe());
    latch_cmd.args(["mypre", &target]);
    let (direct, through) = std::thread::scope(|s| {
        let d = s.spawn(|| run(&mut direct_cmd));
        let l = run(&mut latch_cmd);
        (d.join().expect("direct probe"), l)
    });
    let text = |o: &Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (direct, through) = (text(&direct), text(&through));
    eprintln!("MariaDB directly:\n{direct}\nthrough latch:\n{through}");
    let seen = |out: &str, case: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("case={case} ")))
            .and_then(|l| l.split(" raw=").next())
            .unwrap_or_else(|| panic!("no line for {case} in:\n{out}"))
            .to_owned()
    };
    let mut wrong = Vec::new();
    for (case, mariadb, latch) in TABLE {
        let latch = latch.unwrap_or(mariadb);
        let mariadb = *mariadb;
        let (d, l) = (seen(&direct, case), seen(&through, case));
        if d != mariadb {
            wrong.push(format!(
                "{case}: MariaDB said {d:?}, the table says {mariadb:?}"
            ));
        }
        if l != latch {
            wrong.push(format!(
                "{case}: latch said {l:?}, the table says {latch:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}\n{}", wrong.join("\n"), agent.log());
    assert_eq!(
        TABLE.len(),
        direct.lines().count(),
        "a case is missing from the table"
    );
    assert!(agent.stop().success());
}

/// Case (see `probe/mypre.rs`), what the client sees from MariaDB 10.11, and from latch when
/// that differs on purpose (`None`: the same). Every case starts after the greeting, which
/// both send.
const TABLE: &[(&str, &str, Option<&str>)] = &[
    // Nothing, then a close: no answer.
    ("close-at-once", "greeting=yes answer=none closed=yes", None),
    // "GET / HTTP/1.1": the header's sequence id (0x20) is wrong; refused on the header,
    // with the sequence id the server expected.
    (
        "garbage-http",
        "greeting=yes answer=ERR 1156 08S01 seq=1 closed=yes",
        None,
    ),
    (
        "empty-packet",
        "greeting=yes answer=ERR 1043 08S01 seq=2 closed=yes",
        None,
    ),
    (
        "short-response",
        "greeting=yes answer=ERR 1043 08S01 seq=2 closed=yes",
        None,
    ),
    // A response cut short, then a close: no answer.
    (
        "truncated-response",
        "greeting=yes answer=none closed=yes",
        None,
    ),
    (
        "response-without-user",
        "greeting=yes answer=ERR 1043 08S01 seq=2 closed=yes",
        None,
    ),
    // A client without CLIENT_PROTOCOL_41: the ERR has no SQLSTATE.
    (
        "pre-41-client",
        "greeting=yes answer=ERR 1043 - seq=2 closed=yes",
        None,
    ),
    (
        "wrong-seq-0",
        "greeting=yes answer=ERR 1156 08S01 seq=1 closed=yes",
        None,
    ),
    (
        "wrong-seq-5",
        "greeting=yes answer=ERR 1156 08S01 seq=1 closed=yes",
        None,
    ),
    // A 16 MiB packet length: MariaDB waits for the rest (up to its max_allowed_packet).
    // latch differs on purpose: it reads no handshake packet over 64 KiB (bounded memory per
    // connection before anyone is authenticated) and closes at once, without an ERR.
    (
        "length-16m",
        "greeting=yes answer=none closed=no",
        Some("greeting=yes answer=none closed=yes"),
    ),
    // A well-formed response for user `x`, no password: MariaDB has no such user. latch
    // differs by design: it authenticates with the policy's credentials and the client gets
    // the server's OK (`mysql_refusals.rs` has the refused variants).
    (
        "valid-response",
        "greeting=yes answer=ERR 1045 28000 seq=2 closed=yes",
        Some("greeting=yes answer=bytes=11 closed=no"),
    ),
    // The same response made for mysql_clear_password: the server asks the client to switch
    // to its account's plugin (its greeting's nonce again), and waits for the answer.
    (
        "clear-password-response",
        "greeting=yes answer=SWITCH mysql_native_password data=21 seq=2 closed=no",
        None,
    ),
    // An SSLRequest to a server that offered no TLS, then a plain response.
    (
        "ssl-request-then-plain",
        "greeting=yes answer=ERR 1043 08S01 seq=2 closed=yes",
        None,
    ),
    // A client that sends nothing: closed without a word after the connect timeout (10 s
    // for both: MariaDB's connect_timeout default, latch's APP_RESPONSE_TIMEOUT).
    ("stall", "greeting=yes answer=none closed=yes", None),
];
