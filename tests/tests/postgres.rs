//! `protocol: postgres` end to end: real PostgreSQL 15, real clients (psql, pgbench,
//! tokio-postgres) inside the intercepted cgroup, holding no password. latch authenticates to
//! the server with the policy's credentials from a `file` store.
use std::process::{Command, Output, Stdio};

use latch_tests::{
    bins,
    pg_setup::{MD5_PW, PLAIN_PW, SCRAM_PW, Setup, stdout},
    postgres::{APP_DB, MD5_USER, PLAIN_USER, SCRAM_USER},
};

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_ok(cmd)
}

#[test]
fn psql_without_a_password_runs_as_the_policys_user_and_md5_and_cleartext_are_never_volunteered() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, "");
    let out = run(&mut s.psql(APP_DB, "select current_user || ' ' || current_database()"));
    assert_eq!(stdout(&out), format!("{SCRAM_USER} {APP_DB}"));

    // The store changes to roles whose server asks for MD5, then the password in clear text,
    // over an unverified connection: latch refuses to answer (docs/threat-model.md).
    for (user, pw) in [(MD5_USER, MD5_PW), (PLAIN_USER, PLAIN_PW)] {
        s.set_secret(user, pw);
        let err = s.psql_refused("postgres", "select current_user");
        assert!(
            err.contains("which the policy does not allow"),
            "{user}: {err}"
        );
        assert!(
            !err.contains(pw),
            "{user}: the password reached the application"
        );
    }
    // The refused methods never reached the server's password check.
    s.agent.wait_count("failed", 2);
    s.set_secret(SCRAM_USER, SCRAM_PW);
    let out = run(&mut s.psql("postgres", "select current_user"));
    assert_eq!(stdout(&out), SCRAM_USER);
    s.agent.wait_count("relayed", 2);
    s.assert_log_clean();
    let log = s.pg.log();
    assert!(!log.contains("authentication failed"), "{log}");
    let metrics = s.agent.metrics();
    assert!(
        metrics.contains("latch_secret_resolve_seconds_count{store=\"local\"} 4"),
        "store latency not measured:\n{metrics}"
    );
    assert!(s.agent.stop().success());
}

#[test]
fn a_wrong_password_in_the_store_reaches_the_app_as_fatal_28p01_naming_the_policy() {
    let canary = "canary-Pw-0b5e9";
    let s = Setup::new(SCRAM_USER, canary, "");
    let out = s.psql(APP_DB, "select 1").output().expect("run psql");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FATAL"), "{err}");
    assert!(err.contains("policy \"orders-db\""), "{err}");
    assert!(err.contains("rejected the policy's credentials"), "{err}");
    assert!(!err.contains(canary), "{err}");

    let out = s.probe(APP_DB, "whoami").output().expect("run probe");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FATAL 28P01"), "{err}");
    assert!(
        !err.contains(canary) && !stdout(&out).contains(canary),
        "{err}"
    );

    // No credentials at all for the policy's path: 28000, naming what is missing.
    s.secrets
        .write("secrets.yaml", "other: {username: x, password: y}\n");
    let out = s.probe(APP_DB, "whoami").output().expect("run probe");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FATAL 28000") && err.contains("orders-db"),
        "{err}"
    );

    s.agent.wait_count("failed", 3);
    assert_eq!(s.agent.count("relayed"), 0);
    let metrics = s.agent.metrics();
    assert!(
        metrics.contains("latch_secret_errors_total{store=\"local\",error=\"field_missing\"}")
            || metrics.contains("latch_secret_errors_total{store=\"local\",error=\"not_found\"}"),
        "store errors not counted:\n{metrics}"
    );
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn a_workload_the_policy_does_not_admit_gets_fatal_28000_and_nothing_else() {
    // Only uid 4242 may use the database; psql runs as root.
    let s = Setup::new(SCRAM_USER, SCRAM_PW, "  workloads:\n    - uid: 4242\n");
    let out = s.psql(APP_DB, "select 1").output().expect("run psql");
    assert!(
        !out.status.success(),
        "a workload outside the policy got a session"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FATAL"), "{err}");
    assert!(err.contains("not admitted by the policy"), "{err}");
    assert!(err.contains("policy \"orders-db\""), "{err}");
    let records = s.agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "denied");
    assert_eq!(records[0]["workload"]["uid"], 0);
    assert_eq!(
        records[0]["secrets"][1], "local:db#password",
        "{:?}",
        records[0]
    );
    assert_eq!(s.agent.count("denied"), 1);
    assert_eq!(s.agent.count("relayed"), 0);
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn tokio_postgres_prepared_statements_copy_listen_notify_and_big_rows() {
    let s = Setup::with_agent_args(SCRAM_USER, SCRAM_PW, "", &["--fast-path"]);
    let out = run(&mut s.probe(APP_DB, "suite"));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("user={SCRAM_USER} db={APP_DB}")),
        "{text}"
    );
    assert!(text.ends_with("suite ok"), "{text}");
    s.agent.wait_count("relayed", 1);
    // Both legs are plain and the fast path is on: after authentication the kernel carried the client's messages
    // (the 6 MiB parameter included) straight to the server.
    let records = s.agent.wait_audit(1);
    assert_eq!(records[0]["fast_path"], true, "{}", records[0]);
    assert!(
        records[0]["bytes_to_target"].as_u64().unwrap_or(0) > 6 << 20,
        "{}",
        records[0]
    );
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn cancel_through_latch_with_tokio_postgres_and_psql_sigint() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, "");
    let out = run(&mut s.probe(APP_DB, "cancel"));
    let text = stdout(&out);
    assert!(text.contains("cancelled in"), "{text}");
    assert!(text.contains(&format!("user={SCRAM_USER}")), "{text}");

    // psql: Ctrl-C while pg_sleep runs.
    s.assert_psql_sigint_cancels(APP_DB);
    let log = s.agent.log();
    assert_eq!(log.matches("cancel request forwarded").count(), 2, "{log}");
    assert!(s.agent.stop().success());
}

#[test]
fn pgbench_initializes_and_runs_through_latch() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, "");
    s.pgbench(&["-i", "-s", "1", "-q", APP_DB]);
    let text = s.pgbench(&["-T", "3", "-c", "4", "-j", "2", APP_DB]);
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    assert!(text.contains("tps = "), "{text}");
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn rotation_keeps_open_sessions_and_new_connections_use_the_new_password() {
    // Credentials cached for an hour: the new connection first tries the cached (old) password,
    // is refused, refreshes, and retries once — invisibly to the application.
    let s = Setup::with_policy(SCRAM_USER, SCRAM_PW, "", |yaml| {
        yaml.replace(
            "    password: {path: db, field: password}\n",
            "    password: {path: db, field: password}\n    cache: {ttl: 1h}\n",
        )
    });
    let new_pw = "rotated-Secret-55aa";
    s.hold_while(APP_DB, || {
        s.pg.sql(&format!("ALTER ROLE {SCRAM_USER} PASSWORD '{new_pw}'"));
        s.set_secret(SCRAM_USER, new_pw);
    });
    let log = s.agent.log();
    assert!(log.contains("retrying once with refreshed ones"), "{log}");
    assert!(!log.contains(new_pw) && !log.contains(SCRAM_PW));
    s.agent.wait_count("relayed", 2);
    assert_eq!(s.agent.count("failed"), 0);
    assert!(s.agent.stop().success());
}

#[test]
fn hostile_startup_packets_are_answered_as_postgresql_would_and_other_sessions_keep_working() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, "");
    // A healthy session stays open throughout.
    let healthy = s
        .psql(APP_DB, "select pg_sleep(3); select current_user")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start psql");
    // What PostgreSQL 15 itself does (see pg::pre_startup): close without a word, or FATAL
    // 0A000 in the old protocol's format (not parsed as an ErrorResponse here), or 'N' and
    // then FATAL 08P01.
    let scenarios = [
        ("oversized", "result=closed"),
        ("truncated", "result=closed"),
        ("garbage", "result=closed"),
        ("badversion", "result=other"),
        ("ssl-then-data", "result=other"),
        ("stall", "result=closed"),
    ];
    let children: Vec<_> = scenarios
        .iter()
        .map(|(name, _)| {
            s.cg.command(bins::probe())
                .args(["pgraw", &s.pg.addr.to_string(), name])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start probe")
        })
        .collect();
    for ((name, want), child) in scenarios.iter().zip(children) {
        let out = child.wait_with_output().expect("wait probe");
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "{name}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.starts_with(want), "{name}: {text}");
    }
    let out = healthy.wait_with_output().expect("wait psql");
    assert!(out.status.success());
    assert!(stdout(&out).ends_with(SCRAM_USER));
    // A fresh session works too.
    let out = run(&mut s.psql(APP_DB, "select current_user"));
    assert_eq!(stdout(&out), SCRAM_USER);
    s.agent.wait_count("relayed", 2);
    s.agent.wait_count("failed", scenarios.len() as u64);
    assert!(s.agent.stop().success());
}

#[test]
fn pre_startup_paths_answer_as_postgresql_15_does() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, "");
    s.assert_pre_startup_as_postgres();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn the_pid_the_client_holds_is_the_servers_for_pg_backend_pid_notify_and_terminate() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, "");
    s.assert_session_pids_agree();
    assert!(s.agent.stop().success());
}

#[test]
fn the_key_the_client_holds_is_the_servers_and_cancels_through_latch_too() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, "");
    s.assert_cancel_at_the_server_with_the_applications_key();
    // tokio-postgres's CancelToken, through latch, with that same key.
    let text = stdout(&run(&mut s.probe(APP_DB, "cancel")));
    assert!(text.contains("cancelled in"), "{text}");
    // The agent logs once the server has closed the cancel connection, maybe after the
    // client saw 57014.
    let forwarded = || s.agent.log().matches("cancel request forwarded").count() == 1;
    assert!(
        latch_tests::eventually(std::time::Duration::from_secs(5), forwarded),
        "{}",
        s.agent.log()
    );
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn the_user_the_application_asks_for_selects_one_of_the_policys_credentials() {
    let s = Setup::with_roles("", "");
    s.assert_roles_select_credentials();
    s.agent.wait_count("relayed", 5);
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn a_database_outside_the_allow_list_and_options_outside_theirs_are_refused_as_postgresql_would() {
    let s = Setup::with_roles(
        "",
        "    databases: [appdb]\n    options: [statement_timeout]\n",
    );
    s.assert_database_allow_list();
    s.assert_options_restricted();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}
