//! One PostgreSQL end-to-end set-up: a cluster with a SCRAM, an MD5 and a clear-text role, a
//! secrets file, a test cgroup and an agent with policy `orders-db`; clients run in the cgroup
//! and hold no password.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Agent, TempDir, TestCgroup, bins, eventually,
    postgres::{self, PgCluster, policy_yaml, secrets_yaml},
};

pub const SCRAM_PW: &str = "scram-Secret-7f3a";
pub const MD5_PW: &str = "md5-Secret-91bc";
pub const PLAIN_PW: &str = "plain-Secret-4d2e";

/// A cluster, a secrets file for `user`/`password`, and an agent with policy `orders-db`.
pub struct Setup {
    pub agent: Agent,
    pub cg: TestCgroup,
    pub pg: PgCluster,
    pub secrets: TempDir,
}

impl Setup {
    pub fn new(user: &str, password: &str, extra_spec: &str) -> Setup {
        Setup::with_policy(user, password, extra_spec, |yaml| yaml)
    }

    /// As [`Setup::new`], with the server listening on `ip` (127.0.0.2 for the others).
    pub fn at(ip: &str, user: &str, password: &str, extra_spec: &str) -> Setup {
        Setup::build(ip, user, password, extra_spec, |yaml| yaml)
    }

    /// As [`Setup::new`], with the policy document passed through `edit` first.
    pub fn with_policy(
        user: &str,
        password: &str,
        extra_spec: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Setup {
        Setup::build("127.0.0.2", user, password, extra_spec, edit)
    }

    /// As [`Setup::new`], with extra `latch agent` arguments.
    pub fn with_agent_args(user: &str, password: &str, extra_spec: &str, args: &[&str]) -> Setup {
        Setup::build_with("127.0.0.2", user, password, extra_spec, |yaml| yaml, args)
    }

    fn build(
        ip: &str,
        user: &str,
        password: &str,
        extra_spec: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Setup {
        Setup::build_with(ip, user, password, extra_spec, edit, &[])
    }

    fn build_with(
        ip: &str,
        user: &str,
        password: &str,
        extra_spec: &str,
        edit: impl FnOnce(String) -> String,
        args: &[&str],
    ) -> Setup {
        let pg = PgCluster::start(ip, SCRAM_PW, MD5_PW, PLAIN_PW);
        let secrets = TempDir::new("pg-secrets");
        let file = secrets.write("secrets.yaml", &secrets_yaml(user, password));
        let cg = TestCgroup::new();
        let yaml = edit(policy_yaml("orders-db", pg.addr, &file, extra_spec));
        let agent = Agent::start_args(&yaml, &cg, args);
        Setup {
            agent,
            cg,
            pg,
            secrets,
        }
    }

    pub fn set_secret(&self, user: &str, password: &str) {
        self.secrets
            .write("secrets.yaml", &secrets_yaml(user, password));
    }

    /// psql inside the cgroup: no password anywhere, never prompts.
    pub fn psql(&self, db: &str, sql: &str) -> Command {
        let mut cmd = self.cg.command(postgres::bin("psql"));
        cmd.args([
            "-h",
            &self.pg.addr.ip().to_string(),
            "-p",
            &self.pg.addr.port().to_string(),
        ])
        .args([
            "-U",
            "app_without_password",
            "-d",
            db,
            "-w",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-c", sql])
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .env("PGCONNECT_TIMEOUT", "20");
        cmd
    }

    /// psql in the cgroup, which must fail; returns what it printed on stderr.
    pub fn psql_refused(&self, db: &str, sql: &str) -> String {
        let out = self.psql(db, sql).output().expect("run psql");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "psql succeeded: {err}");
        err
    }

    pub fn connstr(&self, db: &str) -> String {
        format!(
            "host={} port={} user=app_without_password dbname={db} connect_timeout=20",
            self.pg.addr.ip(),
            self.pg.addr.port()
        )
    }

    pub fn probe(&self, db: &str, scenario: &str) -> Command {
        let mut cmd = self.cg.command(bins::probe());
        cmd.args(["pg", &self.connstr(db), scenario]);
        cmd
    }

    /// Nothing secret in the agent's log.
    pub fn assert_log_clean(&self) {
        let log = self.agent.log();
        for pw in [SCRAM_PW, MD5_PW, PLAIN_PW, "canary"] {
            assert!(
                !log.contains(pw),
                "a password appears in the agent log:\n{log}"
            );
        }
    }

    /// pgbench inside the cgroup with `args`, holding no password; asserts it succeeded and
    /// returns its output.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let mut cmd = self.cg.command(postgres::bin("pgbench"));
        cmd.args([
            "-h",
            &self.pg.addr.ip().to_string(),
            "-p",
            &self.pg.addr.port().to_string(),
        ])
        .args(["-U", "app_without_password"])
        .args(args)
        .env_remove("PGPASSWORD");
        stdout(&crate::run_ok(&mut cmd))
    }

    /// psql runs `select pg_sleep(30)` and gets Ctrl-C once the server runs it: the query must
    /// be cancelled within 10 s.
    pub fn assert_psql_sigint_cancels(&self, db: &str) {
        let psql = self
            .psql(db, "select pg_sleep(30)")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start psql");
        let running = || {
            self.pg.sql("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'")
                == "1"
        };
        assert!(
            eventually(Duration::from_secs(15), running),
            "psql's query never started"
        );
        let started = Instant::now();
        // SAFETY: kill(2) on the child we started.
        unsafe { libc::kill(psql.id() as i32, libc::SIGINT) };
        let out = psql.wait_with_output().expect("wait psql");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("canceling statement due to user request"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// The probe's `hold` scenario: a session opens, `meanwhile` runs, then the old session
    /// and a new one each run a query. Returns the probe's lines after "ready" and asserts
    /// both sessions worked.
    pub fn hold_while(&self, db: &str, meanwhile: impl FnOnce()) -> Vec<String> {
        let mut hold = self
            .probe(db, "hold")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start probe");
        let mut lines = BufReader::new(hold.stdout.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("probe output").expect("read probe");
            if line == "ready" {
                break;
            }
        }
        meanwhile();
        writeln!(hold.stdin.take().unwrap(), "go").unwrap();
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        let status = hold.wait().unwrap();
        assert!(status.success(), "{rest:?}\n{}", self.agent.log());
        for session in ["old session ok", "new session ok"] {
            assert!(rest.iter().any(|l| l.starts_with(session)), "{rest:?}");
        }
        rest
    }
}

/// A command's standard output, trimmed.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
