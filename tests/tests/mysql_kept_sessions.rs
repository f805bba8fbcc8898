//! `mysql.keepSessions` (on by default): a session the application ends with COM_QUIT is reset
//! by the server and kept for the workload's next connection, which then costs the server no
//! new connection and no login. Real MariaDB 10.11 and MySQL 9.7, the `mariadb` CLI in the
//! intercepted cgroup, holding no password.
use std::process::Command;

use latch_tests::stdout_ok as ok;
use latch_tests::{
    Agent, TempDir, TestCgroup,
    mariadb::{APP_DB, NATIVE_USER},
    my_setup::{NATIVE_PW, Setup},
    mysql_server::{MySql, policies_yaml, without_kept_sessions},
    postgres::secrets_yaml,
};

/// The server's count of connections made to it so far, before the one that asks.
fn connections(s: &Setup) -> u64 {
    let line = s.db.sql("SHOW GLOBAL STATUS LIKE 'Connections'");
    line.split('\t')
        .nth(1)
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        - 1
}

/// Runs the CLI (which must succeed) and waits until latch has closed its connection, so
/// that a session it keeps is back in the pool before the next one.
fn synced(s: &Setup, cmd: &mut Command) -> String {
    let before = s.agent.count("relayed");
    let out = ok(cmd);
    s.agent.wait_count("relayed", before + 1);
    out
}

fn connection_id(s: &Setup) -> u64 {
    synced(s, &mut s.cli("select connection_id()"))
        .parse()
        .unwrap()
}

#[test]
fn the_next_connection_gets_the_quit_session_back_as_it_was_opened() {
    let s = Setup::new(NATIVE_USER, NATIVE_PW, "");
    s.db.sql(&format!(
        "CREATE TABLE {APP_DB}.kept (a int) ENGINE=InnoDB; \
         CREATE DATABASE other; GRANT ALL ON other.* TO {NATIVE_USER}@'%'"
    ));
    let before = connections(&s);
    // The first session leaves everything a session can change behind it: a user variable,
    // a temporary table, a session variable, an open transaction, another database.
    let first = synced(
        &s,
        s.cli(
            "set @left := 'behind'; create temporary table tmp_left (a int); \
             set session sql_mode = 'ANSI_QUOTES'; set names latin1; begin; \
             insert into kept values (1); use other; select connection_id()",
        )
        .arg("--default-character-set=utf8mb4"),
    );
    // The next connection is told the same connection id (the server's truth) and finds none
    // of it: the reset rolled the transaction back, the session is in its own database and
    // has the character set the application asked for at connect.
    let next = synced(
        &s,
        s.cli(
            "select connection_id(), ifnull(@left, 'unset'), database(), \
             @@session.sql_mode = @@global.sql_mode, @@in_transaction, \
             (select count(*) from kept), @@character_set_client",
        )
        .arg("--default-character-set=utf8mb4"),
    );
    assert_eq!(next, format!("{first}\tunset\t{APP_DB}\t1\t0\t0\tutf8mb4"));
    let gone = latch_tests::run_within(
        s.cli("select * from tmp_left")
            .arg("--default-character-set=utf8mb4"),
        std::time::Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(
        !gone.status.success() && err.contains("1146"),
        "the temporary table survived: {err}"
    );
    s.agent.wait_count("relayed", 3);
    // Three connections, one login at the server (and this count's own).
    assert_eq!(connections(&s), before + 2);
    // The session is kept (the metric counts it).
    assert!(
        s.agent
            .metrics()
            .contains("latch_kept_connections{protocol=\"mysql\"} 1\n"),
        "{}",
        s.agent.metrics()
    );
    let last = synced(
        &s,
        s.cli("select connection_id()")
            .arg("--default-character-set=utf8mb4"),
    );
    assert_eq!(last, first);
    s.agent.wait_count("relayed", 4);
    assert_eq!(s.agent.count("failed"), 0);
    // The agent stops: the kept session ends with a COM_QUIT, not as an aborted client.
    let aborted = s.db.sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'");
    assert!(s.agent.stop().success());
    let ended = latch_tests::eventually(std::time::Duration::from_secs(5), || {
        !s.db
            .sql("SELECT id FROM information_schema.processlist")
            .lines()
            .any(|l| l.trim() == first)
    });
    assert!(ended, "the kept session outlived the agent");
    assert_eq!(
        s.db.sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'"),
        aborted
    );
}

#[test]
fn rotated_credentials_or_a_killed_session_get_a_new_login() {
    let s = Setup::new(NATIVE_USER, NATIVE_PW, "");
    let first = connection_id(&s);
    assert_eq!(connection_id(&s), first, "the session was not kept");
    // The password rotates in the store (and at the server): the kept session logged in with
    // the old one, so the next connection logs in anew, with the new one.
    let new_pw = "rotated-Kept-7c1d";
    s.db.sql(&format!(
        "ALTER USER {NATIVE_USER}@'%' IDENTIFIED BY '{new_pw}'"
    ));
    s.set_secret(NATIVE_USER, new_pw);
    let second = connection_id(&s);
    assert_ne!(
        second, first,
        "a session of the old credentials was handed out"
    );
    assert_eq!(connection_id(&s), second);
    // A kept session the server ends (KILL) is never handed out.
    s.db.sql(&format!("KILL {second}"));
    let third = connection_id(&s);
    assert_ne!(third, second);
    assert_eq!(
        synced(&s, &mut s.cli("select current_user()")),
        format!("{NATIVE_USER}@%")
    );
    // A connection that asks for another character set than the kept session was opened
    // with gets a session of its own, with what it asked for.
    let other = synced(
        &s,
        s.cli("select connection_id(), @@character_set_client")
            .arg("--default-character-set=latin1"),
    );
    let (id, charset) = other.split_once('\t').unwrap();
    assert_ne!(id.parse::<u64>().unwrap(), third);
    assert_eq!(charset, "latin1");
    assert!(
        s.agent
            .log()
            .contains("the kept session does not fit this connection")
    );
    let log = s.agent.log();
    assert!(!log.contains(new_pw) && !log.contains(NATIVE_PW));
    assert_eq!(s.agent.count("failed"), 0);
    assert!(s.agent.stop().success());
}

#[test]
fn with_keep_sessions_false_every_connection_logs_in_and_the_server_gets_its_com_quit() {
    let s = Setup::with_policy(NATIVE_USER, NATIVE_PW, "", |y| without_kept_sessions(&y));
    let aborted = |s: &Setup| s.db.sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'");
    let aborted_before = aborted(&s);
    // (Each count asks on a connection of its own.)
    let before = connections(&s) + 1;
    let ids: Vec<u64> = (0..3).map(|_| connection_id(&s)).collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
    assert_eq!(connections(&s), before + 3);
    // The application's COM_QUIT, held back while latch could keep the session, reached the
    // server: it counted no client as aborted.
    assert_eq!(aborted(&s), aborted_before);
    assert!(s.agent.stop().success());
}

#[test]
fn on_mysql_9_the_kept_session_comes_back_reset_too() {
    const USER: &str = "kept_app";
    const PW: &str = "kept-Secret-4e0a";
    let db = MySql::start(&["127.0.0.31"], None);
    db.create_user(USER, PW);
    let dir = TempDir::new("my-kept");
    let secrets = dir.write("secrets.yaml", &secrets_yaml(USER, PW));
    // Plain text, and the server's cache is empty: latch asks for its RSA key to log in.
    let yaml = policies_yaml(
        &secrets,
        &[(
            "kept-9",
            db.addrs[0],
            "  mysql: {serverPublicKey: request}\n",
        )],
    );
    let cg = TestCgroup::new();
    let agent = Agent::start(&yaml, &cg);
    let cli = |sql: &str| {
        let mut cmd = db.cli_in(&cg, db.addrs[0], "app_without_password", sql);
        cmd.arg("--default-character-set=utf8mb4");
        let before = agent.count("relayed");
        let out = ok(&mut cmd);
        agent.wait_count("relayed", before + 1);
        out
    };
    let first = cli("set @left := 1; set names latin1; select connection_id()");
    let next =
        cli("select connection_id(), ifnull(@left, 'unset'), database(), @@character_set_client");
    assert_eq!(next, format!("{first}\tunset\t{APP_DB}\tutf8mb4"));
    assert!(!agent.log().contains(PW));
    assert_eq!(agent.count("failed"), 0);
    assert!(agent.stop().success());
}

#[test]
fn a_change_of_its_policy_lets_the_kept_sessions_go_and_another_policys_does_not() {
    let mut yaml = String::new();
    let s = Setup::with_policy(NATIVE_USER, NATIVE_PW, "", |y| {
        yaml = y.clone();
        y
    });
    let first = connection_id(&s);
    assert_eq!(connection_id(&s), first, "the session was not kept");
    // Another policy comes, written above this one (which moves it down the file): this
    // one's kept session stays.
    let other = "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: unrelated\n\
                 spec:\n  destination:\n    address: 127.0.0.9\n    port: 9\n  protocol: tcp\n  workloads: all\n---\n";
    s.agent.rewrite_policy(&format!("{other}{yaml}"));
    s.agent.wait_log("configuration reloaded", 1);
    assert_eq!(
        connection_id(&s),
        first,
        "another policy's change closed it"
    );
    // The same credentials, now cached: a changed policy all the same. What was kept under
    // the old one is closed, and the next connection logs in.
    s.agent.rewrite_policy(&yaml.replace(
        "    password: {path: db, field: password}\n",
        "    password: {path: db, field: password}\n    cache: {ttl: 1m}\n",
    ));
    s.agent.wait_log("configuration reloaded", 2);
    let next = connection_id(&s);
    assert_ne!(next, first, "a session kept under the old policy served");
    assert_eq!(connection_id(&s), next);
    assert!(s.agent.stop().success());
}

#[test]
fn another_workload_or_another_program_never_gets_the_kept_session() {
    let s = Setup::new(NATIVE_USER, NATIVE_PW, "");
    let first = connection_id(&s);
    assert_eq!(connection_id(&s), first, "the session was not kept");
    let template = s.cli("select connection_id()");
    let args: Vec<_> = template.get_args().map(|a| a.to_owned()).collect();
    let id_of = |cmd: &mut Command| -> u64 {
        cmd.args(&args).env_remove("MYSQL_PWD");
        synced(&s, cmd).parse().unwrap()
    };
    // Another workload: a cgroup below the test's, with a cgroup id of its own.
    let other = s.cg.path().join("other-workload");
    std::fs::create_dir(&other).unwrap();
    let mut in_other = Command::new("sh");
    in_other
        .args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
        .arg(other.join("cgroup.procs"))
        .arg(template.get_program());
    let theirs = id_of(&mut in_other);
    assert_ne!(theirs, first, "another workload got the kept session");
    // Another program in the same workload (a copy of the client: another executable).
    let dir = latch_tests::TempDir::new("my-kept-exe");
    let copy = dir.path().join("mariadb-copy");
    std::fs::copy(template.get_program(), &copy).unwrap();
    let copied = id_of(&mut s.cg.command(&copy));
    assert!(
        copied != first && copied != theirs,
        "another program got a kept session"
    );
    // Each keeps its own: the first program still gets the first session.
    assert_eq!(connection_id(&s), first);
    assert_eq!(id_of(&mut s.cg.command(&copy)), copied);
    assert!(s.agent.stop().success());
}
