//! `mysql: {direct: true}` end to end: the application's own connection goes to MariaDB
//! 10.11; latch passes the server's greeting on, authenticates on that connection with the
//! policy's credentials (mirroring every round to the application so that the sequence ids
//! stay exact), and steps out before its last packet: the server's OK or ERR reaches the
//! application on its plain TCP socket. Real clients (the `mariadb` CLI, mysql_async in
//! `latch-probe`) in the intercepted cgroup, holding no password.
use std::{
    process::{Command, Output},
    time::Duration,
};

use latch_tests::stdout_ok as ok;
use latch_tests::{
    eventually,
    mariadb::{ED25519_USER, NATIVE_USER},
    my_setup::{ED_PW, NATIVE_PW, Setup},
    pg_setup::stdout,
};

const DIRECT: &str = "  mysql: {direct: true}\n";

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_within(cmd, Duration::from_secs(60))
}

/// The sockets (`socket:[inode]`) process `pid` has descriptors of.
fn sockets(pid: u32) -> std::collections::HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the descriptors")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("socket:["))
        .collect()
}

#[test]
fn the_cli_runs_on_its_own_connection_as_the_policys_user_on_native_and_ed25519_accounts() {
    let s = Setup::new(NATIVE_USER, NATIVE_PW, DIRECT);
    // The first connection asks the server for the account's plugin (a mirrored switch); the
    // second answers in its first response.
    for _ in 0..2 {
        assert_eq!(
            ok(&mut s.cli("select current_user()")),
            format!("{NATIVE_USER}@%")
        );
    }
    // The ed25519 account: the server's switch to client_ed25519 is mirrored to the client as
    // a switch to mysql_native_password.
    s.set_secret(ED25519_USER, ED_PW);
    assert_eq!(
        ok(&mut s.cli("select current_user(), database()")),
        format!("{ED25519_USER}@%\tappdb")
    );
    s.agent.wait_count("relayed", 3);
    let status = s.agent.ebpf();
    assert_eq!(status["redirected"], 0, "{status}");
    assert_eq!(status["direct_handovers"], 3, "{status}");
    assert_eq!(s.agent.count("failed"), 0);
    s.agent.assert_direct_maps_drain();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn mysql_async_sees_the_servers_connection_id_runs_its_suite_and_kill_query_works() {
    let s = Setup::new(ED25519_USER, ED_PW, DIRECT);
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
    let status = s.agent.ebpf();
    assert_eq!(status["redirected"], 0, "{status}");
    assert_eq!(s.agent.count("failed"), 0);
    s.agent.assert_direct_maps_drain();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn wrong_credentials_get_the_servers_own_access_denied() {
    for (user, pw) in [(NATIVE_USER, NATIVE_PW), (ED25519_USER, ED_PW)] {
        let s = Setup::new(user, "not-the-password", DIRECT);
        // Twice: without and with the account's plugin known.
        for _ in 0..2 {
            let err = s.cli_refused("select 1");
            assert!(
                err.contains("ERROR 1045 (28000)")
                    && err.contains(&format!("Access denied for user '{user}'@"))
                    && !err.contains("latch"),
                "{user}: {err}"
            );
        }
        s.set_secret(user, pw);
        assert_eq!(ok(&mut s.cli("select 7")), "7");
        s.agent.assert_direct_maps_drain();
        s.assert_log_clean();
        assert!(s.agent.stop().success());
    }
}

#[test]
fn after_the_hand_over_the_agent_holds_nothing_of_the_session_and_it_keeps_working() {
    let s = Setup::new(NATIVE_USER, NATIVE_PW, DIRECT);
    assert_eq!(ok(&mut s.cli("select 1")), "1");
    s.agent.wait_count("relayed", 1);
    let mut long = s.cli("select sleep(3), current_user()");
    let child = long
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start mariadb");
    let handed = eventually(Duration::from_secs(10), || {
        s.agent.ebpf()["direct_handovers"] == 2
    });
    assert!(handed, "{}", s.agent.ebpf());
    // The session is running its query on a connection the agent has no descriptor of and
    // no map entry for. (The agent's own descriptors may grow by a startup thread's runtime
    // or a kept broker socket pair, neither of them the session's.)
    std::thread::sleep(Duration::from_millis(300));
    let app = sockets(child.id());
    assert!(!app.is_empty(), "the client holds no socket");
    let shared: Vec<_> = sockets(s.agent.pid()).intersection(&app).cloned().collect();
    assert!(
        shared.is_empty(),
        "the agent holds the session's socket: {shared:?}"
    );
    assert_eq!(s.agent.ebpf()["direct_entries"], 0, "{}", s.agent.ebpf());
    let out = child.wait_with_output().expect("wait for mariadb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), format!("0\t{NATIVE_USER}@%"));
    s.agent.assert_direct_maps_drain();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn a_workload_the_policy_does_not_admit_gets_an_err_in_place_of_the_greeting() {
    let spec = format!("{DIRECT}  workloads:\n    - uid: 4242\n");
    let s = Setup::new(NATIVE_USER, NATIVE_PW, &spec);
    let err = s.cli_refused("select 1");
    assert!(
        // The CLI words an ERR in place of the greeting its own way, the code and text inside.
        err.contains("1045") && err.contains("not admitted by the policy"),
        "{err}"
    );
    let records = s.agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "denied");
    assert_eq!(s.agent.count("denied"), 1);
    // The server never saw an authentication attempt for it.
    assert!(!s.db.log().contains("Access denied"), "{}", s.db.log());
    s.agent.assert_direct_maps_drain();
    assert!(s.agent.stop().success());
}

/// PyMySQL (a third client implementation of the authentication exchange): the switch latch
/// mirrors, then queries and CONNECTION_ID() against the id the greeting gave it. With a read
/// timeout: a socket in a sock map whose received bytes the stream verdict sends elsewhere is
/// woken all the same (`sk_psock_verdict_data_ready`), and a recv(2) blocked on it without a
/// timeout then returns EAGAIN, which PyMySQL's default blocking socket turns into a crash
/// (docs/direct-mode.md, "Limits"). With a timeout Python polls before it reads and retries.
const PYMYSQL: &str = r#"
import sys
import pymysql
host, port, user, db = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
con = pymysql.connect(host=host, port=port, user=user, database=db, read_timeout=30)
cur = con.cursor()
cur.execute("SELECT CURRENT_USER(), CONNECTION_ID()")
who, cid = cur.fetchone()
cur.execute("SELECT COUNT(*) FROM information_schema.PLUGINS")
print(f"user={who} id_matches={cid == con.server_thread_id[0]}")
con.close()
"#;

#[test]
fn pymysql_authenticates_through_the_mirrored_switch_on_both_account_plugins() {
    let s = Setup::new(ED25519_USER, ED_PW, DIRECT);
    for (user, pw) in [
        (ED25519_USER, ED_PW),
        (NATIVE_USER, NATIVE_PW),
        (NATIVE_USER, NATIVE_PW),
    ] {
        s.set_secret(user, pw);
        let out = run(&mut latch_tests::mariadb::python_client(
            &s.cg, s.db.addr, PYMYSQL,
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("No module named 'pymysql'"),
            "PyMySQL is missing: run `cargo xtask setup`"
        );
        assert!(out.status.success(), "{err}\n{}", s.agent.log());
        assert_eq!(stdout(&out), format!("user={user}@% id_matches=True"));
    }
    assert_eq!(s.agent.ebpf()["direct_handovers"], 3, "{}", s.agent.ebpf());
    s.agent.assert_direct_maps_drain();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}
