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

/// The bytes of `hex` with the source location fields (`F`, `L`, `R`) taken out of every v3
/// ErrorResponse: latch does not pretend to be postmaster.c.
fn without_location(hex: &str) -> Vec<u8> {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while let Some((&tag, r)) = rest.split_first() {
        if tag != b'E' || r.len() < 4 || r[0] != 0 {
            out.push(tag);
            rest = r;
            continue;
        }
        let len = i32::from_be_bytes([r[0], r[1], r[2], r[3]]) as usize;
        let mut fields = &r[4..len.min(r.len())];
        let mut body = Vec::new();
        while let Some((&t, f)) = fields.split_first() {
            if t == 0 {
                break;
            }
            let end = f.iter().position(|&b| b == 0).unwrap_or(f.len() - 1);
            if !matches!(t, b'F' | b'L' | b'R') {
                body.push(t);
                body.extend_from_slice(&f[..=end]);
            }
            fields = &f[end + 1..];
        }
        body.push(0);
        out.push(b'E');
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(&body);
        rest = &r[len.min(r.len())..];
    }
    out
}

/// `latch-probe pgpre` output: case → (closed, bytes without source locations).
fn pre_startup_answers(cmd: &mut Command) -> Vec<(String, (bool, Vec<u8>))> {
    let out = crate::run_ok(cmd);
    stdout(&out)
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            let case = f
                .next()
                .and_then(|c| c.strip_prefix("case="))
                .expect("case");
            let closed = f.next() == Some("closed=yes");
            let hex = f
                .next()
                .and_then(|b| b.strip_prefix("bytes="))
                .expect("bytes");
            (case.to_owned(), (closed, without_location(hex)))
        })
        .collect()
}

impl Setup {
    /// Every path before a StartupMessage, sent to PostgreSQL directly (over TCP, and over its
    /// Unix socket, where it declines GSSAPI encryption as latch does) and through latch: latch
    /// must send the same bytes (less source locations) and close the same way.
    pub fn assert_pre_startup_as_postgres(&self) {
        let addr = self.pg.addr.to_string();
        let socket = self.pg.unix_socket();
        let tcp = pre_startup_answers(Command::new(bins::probe()).args(["pgpre", &addr]));
        let unix = pre_startup_answers(Command::new(bins::probe()).arg("pgpre").arg(&socket));
        let latch = pre_startup_answers(self.cg.command(bins::probe()).args(["pgpre", &addr]));
        assert_eq!(tcp.len(), latch.len());
        let mut wrong = Vec::new();
        for ((case, direct), ((_, local), (_, brokered))) in tcp.iter().zip(unix.iter().zip(&latch))
        {
            // Over TCP this server offers GSSAPI encryption ('G'); latch never does.
            let reference = if case.contains("gss") { local } else { direct };
            if !case.contains("gss") && direct != local {
                wrong.push(format!(
                    "{case}: PostgreSQL over TCP {direct:?}, over Unix {local:?}"
                ));
            }
            if brokered != reference {
                wrong.push(format!(
                    "{case}: latch closed={} {:?}\n    PostgreSQL closed={} {:?}",
                    brokered.0,
                    String::from_utf8_lossy(&brokered.1),
                    reference.0,
                    String::from_utf8_lossy(&reference.1)
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}

impl Setup {
    /// The pid in the BackendKeyData the application got is the server's: `pg_backend_pid()`
    /// says so, a NOTIFY it sends carries it, and `pg_terminate_backend` on it ends the session.
    pub fn assert_session_pids_agree(&self) {
        let out = crate::run_ok(self.cg.command(bins::probe()).args([
            "pgraw",
            &self.pg.addr.to_string(),
            &format!("session-pids {}", postgres::APP_DB),
        ]));
        let text = stdout(&out);
        let field = |name: &str| {
            text.split(' ')
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_owned()
        };
        let key_pid = field("key_pid");
        assert_eq!(field("backend_pid"), key_pid, "{text}");
        assert_eq!(field("notify_pid"), key_pid, "{text}");
        assert_eq!(field("terminated"), "t", "{text}");
        assert_eq!(field("then"), "57P01", "{text}");
    }

    /// The application's key is the server's own: a CancelRequest with it, sent straight to
    /// the server (from outside the test cgroup), cancels the application's `pg_sleep`.
    pub fn assert_cancel_at_the_server_with_the_applications_key(&self) {
        let mut probe = self
            .cg
            .command(bins::probe())
            .args([
                "pgraw",
                &self.pg.addr.to_string(),
                &format!("sleep-key {}", postgres::APP_DB),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start probe");
        let mut lines = BufReader::new(probe.stdout.take().unwrap()).lines();
        let first = lines.next().expect("probe output").expect("read probe");
        let num = |name: &str| -> i32 {
            first
                .split(' ')
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {first}"))
        };
        let (pid, secret) = (num("pid"), num("secret"));
        let running = || {
            self.pg.sql(
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(20)' \
                 and state = 'active'",
            ) == "1"
        };
        assert!(eventually(Duration::from_secs(15), running), "no pg_sleep");
        let mut cancel = std::net::TcpStream::connect(self.pg.addr).expect("connect");
        let mut req = 16i32.to_be_bytes().to_vec();
        req.extend_from_slice(&80_877_102u32.to_be_bytes());
        req.extend_from_slice(&pid.to_be_bytes());
        req.extend_from_slice(&secret.to_be_bytes());
        cancel.write_all(&req).expect("send cancel");
        let _ = std::io::Read::read(&mut cancel, &mut [0u8; 1]);
        let started = Instant::now();
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        assert!(probe.wait().unwrap().success(), "{rest:?}");
        assert!(
            rest.iter().any(|l| l.contains("57014")),
            "not cancelled after {:?}: {rest:?}",
            started.elapsed()
        );
    }
}
