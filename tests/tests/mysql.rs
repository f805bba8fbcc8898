//! `protocol: mysql` end to end: real MariaDB 10.11, real clients (the `mariadb` CLI and
//! mysql_async in `latch-probe`) inside the intercepted cgroup, holding no password. latch
//! authenticates to the server with the policy's credentials from a `file` store.
use std::process::{Command, Output};

use latch_tests::stdout_ok as ok;
use latch_tests::{
    mariadb::{ED25519_USER, NATIVE_USER},
    my_setup::{ED_PW, NATIVE_PW, Setup},
    mysql_server::without_kept_sessions,
    pg_setup::stdout,
};

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_within(cmd, std::time::Duration::from_secs(60))
}

#[test]
fn the_cli_without_a_password_runs_as_the_policys_user_on_native_and_ed25519_accounts() {
    let s = Setup::new(NATIVE_USER, NATIVE_PW, "");
    assert_eq!(
        ok(&mut s.cli("select current_user()")),
        format!("{NATIVE_USER}@%")
    );
    // The same policy, the store now naming the ed25519 account.
    s.set_secret(ED25519_USER, ED_PW);
    assert_eq!(
        ok(&mut s.cli("select current_user(), database()")),
        format!("{ED25519_USER}@%\tappdb")
    );
    s.agent.wait_count("relayed", 2);
    assert_eq!(s.agent.count("failed"), 0);
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn mysql_async_sees_the_real_connection_id_and_runs_queries_prepared_statements_and_big_blobs() {
    let s = Setup::new(ED25519_USER, ED_PW, "");
    let who = ok(&mut s.probe("whoami"));
    let fields: Vec<&str> = who.split(' ').collect();
    assert_eq!(fields[0], format!("user={ED25519_USER}@%"), "{who}");
    let id = fields[1].trim_start_matches("id=");
    assert_eq!(fields[2], format!("greeted={id}"), "{who}");
    assert_eq!(ok(&mut s.probe("suite")), "suite ok");
    assert_eq!(
        ok(&mut s.probe("infile")),
        "infile rows=1000 sum=499500 then=1"
    );
    let killed = ok(&mut s.probe("kill"));
    assert!(killed.starts_with("killed in "), "{killed}");
    // COM_CHANGE_USER: latch re-authenticates with the policy's credential (this policy has
    // one, as at connect); the application's "root"/"guess" never reaches the server.
    let changed = ok(&mut s.probe("changeuser"));
    assert_eq!(
        changed,
        format!("change_user=ok\nafter={ED25519_USER}@%"),
        "{changed}"
    );
    // COM_RESET_CONNECTION passes: the session's variables are gone, the user stays.
    assert_eq!(
        ok(&mut s.probe("reset")),
        format!("reset=ok user={ED25519_USER}@% x=NULL")
    );
    let log = s.db.log();
    assert!(!log.contains("user 'root'"), "{log}");
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn compressing_clients_compress_to_the_server_too_through_queries_blobs_infile_and_change_user() {
    // CLIENT_COMPRESS passes through: both legs speak the compressed protocol, and latch still
    // sees the commands inside the frames (COM_CHANGE_USER is its own).
    let s = Setup::new(ED25519_USER, ED_PW, "");
    let compressed = |scenario| s.probe_with("compression=fast", scenario);
    assert_eq!(ok(&mut compressed("compression")), "compression=ON");
    let who = ok(&mut compressed("whoami"));
    let fields: Vec<&str> = who.split(' ').collect();
    assert_eq!(fields[0], format!("user={ED25519_USER}@%"), "{who}");
    assert_eq!(fields[2], fields[1].replace("id=", "greeted="), "{who}");
    assert_eq!(ok(&mut compressed("suite")), "suite ok");
    assert_eq!(
        ok(&mut compressed("bigquery")),
        "bigquery length=1000000 then=1"
    );
    assert_eq!(
        ok(&mut compressed("infile")),
        "infile rows=1000 sum=499500 then=1"
    );
    assert_eq!(
        ok(&mut compressed("changeuser")),
        format!("change_user=ok\nafter={ED25519_USER}@%")
    );
    // The mariadb CLI's --compress.
    let mut cli = s.cli("SHOW SESSION STATUS LIKE 'Compression'");
    cli.arg("--compress");
    assert_eq!(ok(&mut cli), "Compression\tON");
    // A statement longer than a frame latch writes (64 KiB): the server answers after the
    // frames latch wrote, the application counts its own.
    let long = format!("SELECT LENGTH('{}')", "x".repeat(100_000));
    let mut cli = s.cli(&long);
    cli.arg("--compress");
    assert_eq!(ok(&mut cli), "100000");
    // A session kept after a client that does not compress (compressed ones are not kept) is
    // offered to the next connection without compression, so a compressing client fits it
    // and is told its connection id.
    assert_eq!(ok(&mut s.probe("compression")), "compression=OFF");
    let who = ok(&mut compressed("whoami"));
    let fields: Vec<&str> = who.split(' ').collect();
    assert_eq!(fields[2], fields[1].replace("id=", "greeted="), "{who}");
    assert_eq!(ok(&mut compressed("compression")), "compression=OFF");
    s.agent.wait_count("relayed", 11);
    assert_eq!(s.agent.count("failed"), 0);
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn a_wrong_password_in_the_store_reaches_the_app_as_1045_naming_the_policy() {
    let canary = "canary-Pw-7d31";
    let s = Setup::new(NATIVE_USER, canary, "");
    let err = s.cli_refused("select 1");
    assert!(err.contains("ERROR 1045 (28000)"), "{err}");
    assert!(err.contains("policy \"orders-db\""), "{err}");
    assert!(err.contains("rejected the policy's credentials"), "{err}");
    assert!(!err.contains(canary), "{err}");

    // No credentials at all for the policy's path: 1045, naming the class of failure.
    s.secrets
        .write("secrets.yaml", "other: {username: x, password: y}\n");
    let err = s.cli_refused("select 1");
    assert!(
        err.contains("ERROR 1045") && err.contains("orders-db") && err.contains("not in the store"),
        "{err}"
    );
    let out = run(&mut s.probe("whoami"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1045"), "{err}");
    s.agent.wait_count("failed", 3);
    assert_eq!(s.agent.count("relayed"), 0);
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn a_workload_the_policy_does_not_admit_gets_an_err_and_the_server_is_never_contacted() {
    let s = Setup::new(NATIVE_USER, NATIVE_PW, "  workloads:\n    - uid: 4242\n");
    let before = s.db.sql("SHOW GLOBAL STATUS LIKE 'Connections'");
    let err = s.cli_refused("select 1");
    // An ERR in place of the greeting, as MariaDB answers a host it does not let in; the
    // 10.11 client adds that it came before TLS could have been set up.
    assert!(err.contains("1045"), "{err}");
    assert!(err.contains("not admitted by the policy"), "{err}");
    assert!(err.contains("policy \"orders-db\""), "{err}");
    let records = s.agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "denied");
    assert_eq!(s.agent.count("relayed"), 0);
    // Only the admin query above and this one reached the server.
    let after = s.db.sql("SHOW GLOBAL STATUS LIKE 'Connections'");
    let n = |s: &str| s.split('\t').nth(1).unwrap().parse::<u64>().unwrap();
    assert_eq!(n(&after), n(&before) + 1, "{before} -> {after}");
    assert!(s.agent.stop().success());
}

#[test]
fn rotation_is_picked_up_by_the_next_connection_after_one_refused_try() {
    // Credentials cached for an hour: the next connection first tries the cached (old)
    // password, is refused, refreshes, and retries once — invisibly to the application. (No
    // session is kept, so that the next connection logs in.)
    let s = Setup::with_policy(NATIVE_USER, NATIVE_PW, "", |yaml| {
        without_kept_sessions(&yaml.replace(
            "    password: {path: db, field: password}\n",
            "    password: {path: db, field: password}\n    cache: {ttl: 1h}\n",
        ))
    });
    assert_eq!(
        ok(&mut s.cli("select current_user()")),
        format!("{NATIVE_USER}@%")
    );
    let new_pw = "rotated-Secret-91ab";
    s.db.sql(&format!(
        "ALTER USER {NATIVE_USER}@'%' IDENTIFIED BY '{new_pw}'"
    ));
    s.set_secret(NATIVE_USER, new_pw);
    assert_eq!(
        ok(&mut s.cli("select current_user()")),
        format!("{NATIVE_USER}@%")
    );
    let log = s.agent.log();
    assert!(log.contains("retrying once with refreshed ones"), "{log}");
    assert!(!log.contains(new_pw) && !log.contains(NATIVE_PW));
    s.agent.wait_count("relayed", 2);
    assert_eq!(s.agent.count("failed"), 0);
    assert!(s.agent.stop().success());
}

#[test]
fn with_mysql_roles_the_user_the_application_sends_selects_the_credentials() {
    let s = roles_setup();
    let as_user = |user: &str| s.db.cli_in(&s.cg, user, "select current_user()");
    assert_eq!(ok(&mut as_user("reporting")), format!("{NATIVE_USER}@%"));
    assert_eq!(ok(&mut as_user(ED25519_USER)), format!("{ED25519_USER}@%"));
    // A user no role names: refused as the server refuses an unknown user.
    let out = run(&mut as_user("stranger"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ERROR 1045") && err.contains("Access denied for user 'stranger'"),
        "{err}"
    );
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

/// A policy with `mysql.roles`: `reporting` takes the native account's credentials from
/// `db`, [`ED25519_USER`] the ed25519 account's from `ed`.
fn roles_setup() -> Setup {
    let s = Setup::with_policy(NATIVE_USER, NATIVE_PW, "", |yaml| {
        let creds = "  credentials:\n    store: local\n    username: {path: db, field: username}\n    password: {path: db, field: password}\n";
        assert!(yaml.contains(creds), "{yaml}");
        yaml.replace(
            creds,
            &format!(
                "  mysql:\n    roles:\n      reporting: {{store: local, username: {{path: db, field: username}}, password: {{path: db, field: password}}}}\n      {ED25519_USER}: {{store: local, username: {{path: ed, field: username}}, password: {{path: ed, field: password}}}}\n"
            ),
        )
    });
    s.secrets.write(
        "secrets.yaml",
        &format!(
            "db:\n  username: {NATIVE_USER}\n  password: \"{NATIVE_PW}\"\ned:\n  username: {ED25519_USER}\n  password: \"{ED_PW}\"\n"
        ),
    );
    s
}

#[test]
fn com_change_user_reauthenticates_with_the_roles_credentials_or_fails_as_mariadb_does() {
    let s = roles_setup();
    // What MariaDB itself does, asked directly (with the real password at connect) to change
    // to a user it does not know, four times: 1045 three times, the session staying the
    // previous user's, then 1047 (its limit of three failed changes per connection).
    let direct_url = format!(
        "mysql://{NATIVE_USER}:{NATIVE_PW}@{}:{}/{}",
        s.db.addr.ip(),
        s.db.addr.port(),
        latch_tests::mariadb::APP_DB
    );
    let direct = ok(Command::new(latch_tests::bins::probe())
        .args(["my", &direct_url])
        .arg("changeuser:stranger,stranger,stranger,stranger"));
    eprintln!("directly:\n{direct}");
    let refused = format!(
        "stranger: 1045 28000 Access denied for user 'stranger'@'localhost' (using password: YES) after={NATIVE_USER}@%"
    );
    // Through latch, holding no password: to users the roles name (ed25519, then back to the
    // native account through its role name), then to one no role names.
    let through = ok(s
        .cg
        .command(latch_tests::bins::probe())
        .args(["my", &s.db.url("reporting")])
        .arg(format!("changeuser:{ED25519_USER},reporting,stranger")));
    assert_eq!(
        through,
        format!(
            "{ED25519_USER}: ok after={ED25519_USER}@% x=NULL\n\
             reporting: ok after={NATIVE_USER}@% x=NULL\n\
             {}",
            direct.lines().next().unwrap()
        )
    );
    assert!(direct.starts_with(&refused), "{direct}");
    // The same four refusals through latch: what the application sees is what MariaDB said.
    let through = ok(s
        .cg
        .command(latch_tests::bins::probe())
        .args(["my", &s.db.url("reporting")])
        .arg("changeuser:stranger,stranger,stranger,stranger"));
    assert_eq!(through, direct);
    // The store's password for the ed25519 role is wrong: the server refuses latch's
    // COM_CHANGE_USER, the application hears 1045 naming the policy (no secret), and the
    // session stays the previous user's, as the server left it.
    s.secrets.write(
        "secrets.yaml",
        &format!(
            "db:\n  username: {NATIVE_USER}\n  password: \"{NATIVE_PW}\"\ned:\n  username: {ED25519_USER}\n  password: \"canary-Wrong-ed\"\n"
        ),
    );
    let through = ok(s
        .cg
        .command(latch_tests::bins::probe())
        .args(["my", &s.db.url("reporting")])
        .arg(format!("changeuser:{ED25519_USER}")));
    assert_eq!(
        through,
        format!(
            "{ED25519_USER}: 1045 28000 latch: policy \"orders-db\": the target {} rejected the policy's credentials (server error 1045) after={NATIVE_USER}@% x=NULL",
            s.db.addr
        )
    );
    s.agent.wait_count("relayed", 3);
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

/// A hand-made compressed client: logs in with CLIENT_COMPRESS (no password), then sends one
/// frame holding a COM_PING and, behind it, a COM_CHANGE_USER carrying credentials of its own.
/// Prints `answered` if anything comes back, `closed` if the connection ends.
const HIDDEN_CHANGE_USER: &str = r#"
import socket, struct, sys
host, port, user, db = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port))
s.settimeout(10)
def read_exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b
def packet(seq, payload):
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload
h = read_exact(4)
read_exact(h[0] | h[1] << 8 | h[2] << 16)
# PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH, COMPRESS, CONNECT_WITH_DB
caps = 0x200 | 0x8000 | 0x80000 | 0x20 | 0x8
hello = struct.pack("<IIB23x", caps, 1 << 24, 45) + user.encode() + b"\0" + b"\0"
hello += db.encode() + b"\0" + b"mysql_native_password\0"
s.sendall(packet(1, hello))
h = read_exact(4)
ok = read_exact(h[0] | h[1] << 8 | h[2] << 16)
assert ok[0] == 0, ok
change = b"\x11root\0" + bytes([13]) + b"canary-secret" + db.encode() + b"\0"
plain = packet(0, b"\x0e") + packet(0, change)
s.sendall(struct.pack("<I", len(plain))[:3] + b"\0" + b"\0\0\0" + plain)
try:
    got = s.recv(100)
    print("answered" if got else "closed")
except (ConnectionResetError, socket.timeout) as e:
    print("closed" if isinstance(e, ConnectionResetError) else "timeout")
"#;

#[test]
fn a_com_change_user_hidden_behind_another_command_in_a_compressed_frame_ends_the_session() {
    // latch performs a COM_CHANGE_USER itself only when a frame holds it alone; anywhere else
    // in a frame it would pass on with the application's own credentials, so the session
    // ends there and the frame never reaches the server.
    let s = Setup::new(NATIVE_USER, NATIVE_PW, "");
    let out = run(&mut latch_tests::mariadb::python_client(
        &s.cg,
        s.db.addr,
        HIDDEN_CHANGE_USER,
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", s.agent.log());
    assert_eq!(stdout(&out), "closed", "{}", s.agent.log());
    s.agent
        .wait_log("a COM_CHANGE_USER inside a compressed frame", 1);
    // The agent serves the next connection as before.
    assert_eq!(
        ok(&mut s.cli("select current_user()")),
        format!("{NATIVE_USER}@%")
    );
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

/// PyMySQL (a pure-Python client, its own protocol code), no password: queries, parameters,
/// a server-side prepared statement (SQL PREPARE/EXECUTE: PyMySQL has no COM_STMT_PREPARE),
/// and CONNECTION_ID() against the id the greeting gave it.
const PYMYSQL: &str = r#"
import sys
import pymysql
host, port, user, db = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
con = pymysql.connect(host=host, port=port, user=user, database=db)
cur = con.cursor()
cur.execute("SELECT CURRENT_USER(), CONNECTION_ID()")
who, cid = cur.fetchone()
cur.execute("CREATE TEMPORARY TABLE p (id INT, name VARCHAR(32))")
cur.executemany("INSERT INTO p VALUES (%s, %s)", [(i, f"row {i}") for i in range(100)])
cur.execute("SELECT COUNT(*), SUM(id) FROM p WHERE name LIKE %s", ("row%",))
n, total = cur.fetchone()
cur.execute("PREPARE s FROM 'SELECT ? * ?'")
cur.execute("SET @a = 6, @b = 7")
cur.execute("EXECUTE s USING @a, @b")
(product,) = cur.fetchone()
print(f"user={who} id_matches={cid == con.server_thread_id[0]} rows={n} sum={total} prepared={product}")
con.close()
"#;

#[test]
fn pymysql_without_a_password_runs_queries_and_a_prepared_statement_and_sees_its_connection_id() {
    let s = Setup::new(NATIVE_USER, NATIVE_PW, "");
    let out = run(&mut latch_tests::mariadb::python_client(
        &s.cg, s.db.addr, PYMYSQL,
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named 'pymysql'"),
        "PyMySQL is missing: run `cargo xtask setup`"
    );
    assert!(out.status.success(), "{err}\n{}", s.agent.log());
    assert_eq!(
        stdout(&out),
        format!("user={NATIVE_USER}@% id_matches=True rows=100 sum=4950 prepared=42")
    );
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}
