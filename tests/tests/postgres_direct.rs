//! `direct: true` end to end: the application's own connection goes to PostgreSQL 15; latch
//! answers its startup, authenticates on that connection with the policy's credentials, and
//! leaves it to the kernel. Real clients (psql, pgbench, tokio-postgres) in the intercepted
//! cgroup, holding no password.
use std::{
    process::{Command, Output},
    time::Duration,
};

use latch_tests::{
    bins, eventually,
    pg_setup::{SCRAM_PW, Setup, stdout},
    postgres::{APP_DB, MD5_USER, PLAIN_USER, SCRAM_USER},
};

const DIRECT: &str = "  tls: {mode: disable}\n  direct: true\n";

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_ok(cmd)
}

#[test]
fn psql_gets_its_own_connection_authenticated_with_scram_and_never_md5_or_cleartext() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, DIRECT);
    // psql's default sslmode=prefer sends an SSLRequest first: latch answers 'N'.
    let out = run(&mut s.psql(APP_DB, "select current_user || ' ' || current_database()"));
    assert_eq!(stdout(&out), format!("{SCRAM_USER} {APP_DB}"));
    // On the application's own connection, the application reads whatever latch sends: a
    // method that shows the password is never answered there.
    for (user, pw) in [
        (MD5_USER, latch_tests::pg_setup::MD5_PW),
        (PLAIN_USER, latch_tests::pg_setup::PLAIN_PW),
    ] {
        s.set_secret(user, pw);
        let err = s.psql_refused("postgres", "select current_user");
        assert!(!err.contains(pw), "{user}: {err}");
    }
    s.set_secret(SCRAM_USER, SCRAM_PW);
    assert_eq!(
        stdout(&run(&mut s.psql("postgres", "select current_user"))),
        SCRAM_USER
    );

    // The sessions were the applications' own connections: nothing was redirected to the
    // broker, and each was handed over after latch's startup.
    s.agent.wait_count("relayed", 2);
    let status = s.agent.ebpf();
    assert_eq!(status["redirected"], 0, "{status}");
    assert_eq!(status["direct_enrolled"], 4, "{status}");
    assert_eq!(status["direct_handovers"], 2, "{status}");
    let metrics = s.agent.metrics();
    assert!(
        metrics.contains("latch_direct_handovers_total 2"),
        "{metrics}"
    );
    s.agent.assert_direct_maps_drain();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn tokio_postgres_suite_and_pgbench_run_on_handed_over_connections() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, DIRECT);
    let out = run(&mut s.probe(APP_DB, "suite"));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("user={SCRAM_USER} db={APP_DB}")),
        "{text}"
    );
    assert!(text.ends_with("suite ok"), "{text}");

    s.pgbench(&["-i", "-s", "1", "-q", APP_DB]);
    // Persistent connections, then a new connection per transaction.
    for extra in [&[][..], &["-C"][..]] {
        let mut args = vec!["-n", "-S", "-T", "2", "-c", "4", "-j", "2"];
        args.extend(extra);
        args.push(APP_DB);
        let text = s.pgbench(&args);
        assert!(text.contains("number of failed transactions: 0"), "{text}");
    }
    let status = s.agent.ebpf();
    assert_eq!(status["redirected"], 0, "{status}");
    assert!(
        status["direct_handovers"].as_u64().unwrap_or(0) > 10,
        "{status}"
    );
    assert_eq!(s.agent.count("failed"), 0);
    s.agent.assert_direct_maps_drain();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn cancel_reaches_the_server_with_tokio_postgres_and_psql_sigint() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, DIRECT);
    let out = run(&mut s.probe(APP_DB, "cancel"));
    let text = stdout(&out);
    assert!(text.contains("cancelled in"), "{text}");

    s.assert_psql_sigint_cancels(APP_DB);
    // The lobby logs a cancel once it has passed it on, which can be after psql, answered by
    // the server, has returned.
    s.agent.wait_log("ended=Cancel", 2);
    let log = s.agent.log();
    assert_eq!(log.matches("ended=Cancel").count(), 2, "{log}");
    assert!(s.agent.stop().success());
}

#[test]
fn pre_startup_paths_answer_as_postgresql_15_does() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, DIRECT);
    s.assert_pre_startup_as_postgres();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn the_pid_and_key_the_client_holds_are_the_servers() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, DIRECT);
    s.assert_session_pids_agree();
    s.assert_cancel_at_the_server_with_the_applications_key();
    assert!(s.agent.stop().success());
}

#[test]
fn an_application_that_reads_late_still_gets_every_answer() {
    // latch hands the connection over only once the application has read what latch put in
    // its receive queue; an application slow to read must lose nothing.
    let s = Setup::new(SCRAM_USER, SCRAM_PW, DIRECT);
    let out = run(s.cg.command(bins::probe()).args([
        "pgraw",
        &s.pg.addr.to_string(),
        &format!("late-reader {APP_DB}"),
    ]));
    let text = stdout(&out);
    // AuthenticationOk, ParameterStatus…, BackendKeyData, then the server's own
    // ReadyForQuery.
    assert!(text.starts_with("result=session tags=RS"), "{text}");
    assert!(text.contains("SKZ user="), "{text}");
    assert!(text.ends_with(&format!("user={SCRAM_USER}")), "{text}");
    s.agent.wait_count("relayed", 1);
    s.agent.assert_direct_maps_drain();
    assert!(s.agent.stop().success());
}

#[test]
fn failures_reach_the_application_as_fatal_errors_and_leave_nothing_behind() {
    let canary = "canary-Pw-d1rect";
    let s = Setup::new(SCRAM_USER, canary, DIRECT);
    // The server refuses the password and closes the connection: its own FATAL 28P01 reaches
    // the application (a message latch sent after the close would come too late); the audit
    // record says what happened.
    let out = s.probe(APP_DB, "whoami").output().expect("run probe");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FATAL 28P01"), "{err}");
    assert!(
        !err.contains(canary) && !stdout(&out).contains(canary),
        "{err}"
    );
    let records = s.agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "failed", "{}", records[0]);
    assert!(
        records[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ended the startup")),
        "{}",
        records[0]
    );

    // Hostile first packets, all at once (bounded: the lobby keeps at most 16 KiB per
    // application): each is answered as PostgreSQL 15 answers it (see pg::pre_startup):
    // closed without a word, FATAL 0A000 in the old protocol's format (not parsed as an
    // ErrorResponse here), or 'N' and then FATAL 08P01.
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
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start probe")
        })
        .collect();
    for ((name, want), child) in scenarios.iter().zip(children) {
        let out = child.wait_with_output().expect("wait probe");
        let text = stdout(&out);
        assert!(out.status.success(), "{name}: {text}");
        assert!(text.starts_with(want), "{name}: {text}");
    }

    // The right password: sessions work again.
    s.set_secret(SCRAM_USER, SCRAM_PW);
    assert_eq!(
        stdout(&run(&mut s.psql(APP_DB, "select current_user"))),
        SCRAM_USER
    );
    s.agent.wait_count("failed", 1 + scenarios.len() as u64);
    s.agent.wait_count("relayed", 1);
    s.agent.assert_direct_maps_drain();
    assert!(!s.agent.log().contains(canary));
    assert!(s.agent.stop().success());
}

#[test]
fn a_workload_the_policy_does_not_admit_gets_fatal_28000() {
    let spec = format!("{DIRECT}  workloads:\n    - uid: 4242\n");
    let s = Setup::new(SCRAM_USER, SCRAM_PW, &spec);
    let out = s.psql(APP_DB, "select 1").output().expect("run psql");
    assert!(
        !out.status.success(),
        "a workload outside the policy got a session"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not admitted by the policy"), "{err}");
    let records = s.agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "denied");
    assert_eq!(s.agent.count("denied"), 1);
    // The server never saw a StartupMessage for it.
    assert!(
        !s.pg.log().contains("connection authorized"),
        "{}",
        s.pg.log()
    );
    s.agent.assert_direct_maps_drain();
    assert!(s.agent.stop().success());
}

#[test]
fn rotation_keeps_open_sessions_and_the_next_connection_uses_the_new_password() {
    let s = Setup::new(SCRAM_USER, SCRAM_PW, DIRECT);
    // Rotated in the server and in the store while a session is open.
    let new_pw = "rotated-Direct-77c1";
    s.hold_while(APP_DB, || {
        s.pg.sql(&format!("ALTER ROLE {SCRAM_USER} PASSWORD '{new_pw}'"));
        s.set_secret(SCRAM_USER, new_pw);
    });
    s.agent.wait_count("relayed", 2);
    assert_eq!(s.agent.count("failed"), 0);
    let log = s.agent.log();
    assert!(!log.contains(new_pw) && !log.contains(SCRAM_PW));
    assert!(s.agent.stop().success());
}

#[test]
fn direct_mode_works_over_ipv6() {
    let s = Setup::at("::1", SCRAM_USER, SCRAM_PW, DIRECT);
    assert_eq!(
        stdout(&run(&mut s.psql(APP_DB, "select current_user"))),
        SCRAM_USER
    );
    let text = stdout(&run(&mut s.probe(APP_DB, "whoami")));
    assert!(text.contains(&format!("user={SCRAM_USER}")), "{text}");
    s.agent.wait_count("relayed", 2);
    let status = s.agent.ebpf();
    assert_eq!(status["redirected"], 0, "{status}");
    assert_eq!(status["direct_handovers"], 2, "{status}");
    s.agent.assert_direct_maps_drain();
    assert!(s.agent.stop().success());
}

#[test]
fn past_max_direct_startups_a_connection_gets_53300() {
    // The late reader's hand-over waits for it at most --handshake-timeout.
    let s = Setup::with_agent_args(
        SCRAM_USER,
        SCRAM_PW,
        DIRECT,
        &["--max-direct-startups", "1", "--handshake-timeout", "5"],
    );
    // The late reader reads its answers 1.5 s late: its startup holds the only place that long.
    let late =
        s.cg.command(bins::probe())
            .args([
                "pgraw",
                &s.pg.addr.to_string(),
                &format!("late-reader {APP_DB}"),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the late reader");
    let late = latch_tests::Killed(late);
    let authenticated = latch_tests::eventually(Duration::from_secs(10), || {
        s.pg.sql(&format!(
            "select count(*) from pg_stat_activity where usename = '{SCRAM_USER}'"
        ))
        .trim()
            == "1"
    });
    assert!(
        authenticated,
        "the late reader's startup never reached the server"
    );
    let err = s.psql_refused("postgres", "select current_user");
    assert!(
        err.contains("too many direct-mode startups at once (at most 1)"),
        "{err}"
    );
    assert!(
        s.agent
            .metrics()
            .contains("latch_connections_refused_total{reason=\"capacity\"} 1"),
        "{}",
        s.agent.metrics()
    );
    drop(late);
    // The place comes back once the late reader's session has ended (its hand-over waits for
    // the application at most the handshake timeout).
    let ok = latch_tests::eventually(Duration::from_secs(20), || {
        s.psql("postgres", "select 1")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(ok, "no startup ran after the first ended");
}

/// Issue 13 (drift between the relay's admission and direct mode's): a handed-over session is
/// still its workload's connection, so its slot is held until the application closes it, and
/// the refusal reads as the relay's does.
#[test]
fn a_direct_mode_session_holds_its_workloads_slot_until_it_closes() {
    let s = Setup::with_agent_args(SCRAM_USER, SCRAM_PW, DIRECT, &["--max-per-workload", "1"]);
    let holder = s
        .psql(APP_DB, "select pg_sleep(3)")
        .spawn()
        .expect("start psql");
    let holder = latch_tests::Killed(holder);
    let running = eventually(Duration::from_secs(10), || {
        s.pg.sql(
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(3)' \
             and state = 'active'",
        ) == "1"
    });
    assert!(running, "the first session never ran its query");
    let err = s.psql_refused(APP_DB, "select 1");
    assert!(
        err.contains("too many connections from this workload (at most 1 at once)"),
        "the second session was not refused as the relay refuses it: {err}"
    );
    drop(holder);
    // Once the first session's socket is closed, its slot comes back.
    let again = eventually(Duration::from_secs(10), || {
        s.psql(APP_DB, "select 1")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(again, "the slot never came back:\n{}", s.agent.log());
    // (Tries while the slot was still held were refused too.)
    let records = s.agent.audit();
    // (Summaries of a storm of refusals carry a `count` and no connection.)
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["outcome"] == "refused" && r["count"].is_null())
        .collect();
    assert!(!refused.is_empty(), "{records:#?}");
    for r in refused {
        assert_eq!(
            r["reason"], "too many connections from this workload (at most 1 at once)",
            "{r}"
        );
        assert_eq!(r["direct"], true, "{r}");
    }
}

/// Issue 13: `--handshake-timeout` bounds a direct-mode startup as it bounds a relayed one
/// (direct mode had fixed 10/30/10 s timeouts), with the relay's words for the application
/// and the audit.
#[test]
fn the_handshake_timeout_bounds_a_direct_mode_startup_as_it_bounds_the_relay() {
    // A server that accepts and never answers.
    let silent = latch_tests::servers::EchoServer::start_store_and_forward(
        "127.0.0.2",
        Duration::from_secs(120),
    );
    let dir = latch_tests::TempDir::new("direct-timeout");
    let secrets = dir.write(
        "secrets.yaml",
        &latch_tests::postgres::secrets_yaml(SCRAM_USER, SCRAM_PW),
    );
    let cg = latch_tests::TestCgroup::new();
    let agent = latch_tests::Agent::start_args(
        &latch_tests::postgres::policy_yaml("silent", silent.addr, &secrets, DIRECT),
        &cg,
        &["--handshake-timeout", "1"],
    );
    let started = std::time::Instant::now();
    let out = cg
        .command(latch_tests::postgres::bin("psql"))
        .args([
            "-h",
            &silent.addr.ip().to_string(),
            "-p",
            &silent.addr.port().to_string(),
            "-U",
            "app",
            "-d",
            APP_DB,
            "-w",
            "-c",
            "select 1",
        ])
        .env("PGCONNECT_TIMEOUT", "25")
        .env_remove("PGPASSWORD")
        .output()
        .expect("run psql");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the startup took {:?}: {err}",
        started.elapsed()
    );
    assert!(
        err.contains("connecting to the target timed out after 1s"),
        "{err}"
    );
    let record = agent.wait_audit(1)[0].clone();
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(
        record["reason"], "handshake did not finish within 1s",
        "{record}"
    );
    assert!(
        agent
            .metrics()
            .contains("latch_connections_total{policy=\"silent\",outcome=\"timed_out\"} 1"),
        "{}",
        agent.metrics()
    );
    assert!(agent.stop().success());
}

#[test]
fn the_user_the_application_asks_for_selects_one_of_the_policys_credentials() {
    let s = Setup::with_roles(DIRECT, "");
    s.assert_roles_select_credentials();
    s.agent.assert_direct_maps_drain();
    assert!(s.agent.stop().success());
}

#[test]
fn a_database_outside_the_allow_list_and_options_outside_theirs_are_refused_as_postgresql_would() {
    let s = Setup::with_roles(
        DIRECT,
        "    databases: [appdb]\n    options: [statement_timeout]\n",
    );
    s.assert_database_allow_list();
    s.assert_options_restricted();
    s.agent.assert_direct_maps_drain();
    assert!(s.agent.stop().success());
}
