//! A policy with several credentials for one server (issue 12): two roles with different
//! privileges, selected by the user name the application asks for; a database allow-list and
//! an `options` rule. Shared by the relay and direct-mode tests.
use std::process::{Command, Output};

use crate::{
    bins,
    pg_setup::{SCRAM_PW, Setup, stdout},
    postgres::{self, APP_DB, SCRAM_USER},
};

/// The role a migration tool asks for, and the one it maps to on the server.
pub const MIGRATOR: &str = "migrator";
pub const RW_ROLE: &str = "latch_rw";
pub const RW_PW: &str = "rw-Secret-5c1d";
/// The read-only role.
pub const READER: &str = "reader";
pub const RO_ROLE: &str = "latch_ro";
pub const RO_PW: &str = "ro-Secret-8e2a";

/// The secrets file: one entry per role.
pub fn roles_secrets(rw_pw: &str) -> String {
    format!(
        "migrator: {{username: {RW_ROLE}, password: \"{rw_pw}\"}}\n\
         reader: {{username: {RO_ROLE}, password: \"{RO_PW}\"}}\n"
    )
}

/// `postgres:` with two roles and `more` (further keys, 4 spaces in), in place of the
/// policy's `credentials:` block.
fn with_roles(yaml: String, more: &str) -> String {
    let single = "  credentials:\n    store: local\n    username: {path: db, field: username}\n    \
                  password: {path: db, field: password}\n";
    assert!(yaml.contains(single), "policy shape changed:\n{yaml}");
    let role = |name: &str| {
        format!(
            "      {name}: {{store: local, username: {{path: {name}, field: username}}, \
             password: {{path: {name}, field: password}}, cache: {{ttl: 1h}}}}\n"
        )
    };
    let roles = format!(
        "  postgres:\n    roles:\n{}{}{more}",
        role(MIGRATOR),
        role(READER)
    );
    yaml.replace(single, &roles)
}

impl Setup {
    /// A cluster with roles `latch_rw` (may create tables) and `latch_ro` (may only read), and a
    /// policy that holds both: `migrator` → latch_rw, `reader` → latch_ro. `extra_spec` as for
    /// [`Setup::new`]; `more` goes under `postgres:`.
    pub fn with_roles(extra_spec: &str, more: &str) -> Setup {
        let more = more.to_owned();
        let s = Setup::with_policy(SCRAM_USER, SCRAM_PW, extra_spec, move |y| {
            with_roles(y, &more)
        });
        s.secrets.write("secrets.yaml", &roles_secrets(RW_PW));
        s.pg.sql(&format!(
            "CREATE ROLE {RW_ROLE} LOGIN PASSWORD '{RW_PW}'; \
             CREATE ROLE {RO_ROLE} LOGIN PASSWORD '{RO_PW}'; \
             GRANT CONNECT ON DATABASE {APP_DB} TO {RW_ROLE}, {RO_ROLE}"
        ));
        let admin = s.pg.admin(&[
            "-d",
            APP_DB,
            "-c",
            &format!("GRANT CREATE, USAGE ON SCHEMA public TO {RW_ROLE}"),
        ]);
        assert!(admin.status.success(), "{admin:?}");
        s
    }

    /// psql in the cgroup asking for `user` (no password anywhere, never prompts).
    pub fn psql_as(&self, user: &str, db: &str, sql: &str) -> Command {
        let mut cmd = self.cg.command(postgres::bin("psql"));
        cmd.args([
            "-h",
            &self.pg.addr.ip().to_string(),
            "-p",
            &self.pg.addr.port().to_string(),
        ])
        .args(["-U", user, "-d", db, "-w", "-X", "-A", "-t"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .env("PGCONNECT_TIMEOUT", "20");
        cmd
    }

    /// tokio-postgres in the cgroup asking for `user`, running probe scenario `whoami` with
    /// `extra` connection parameters.
    pub fn probe_as(&self, user: &str, db: &str, extra: &str) -> Output {
        let connstr = format!(
            "host={} port={} user={user} dbname={db} connect_timeout=20 {extra}",
            self.pg.addr.ip(),
            self.pg.addr.port()
        );
        self.cg
            .command(bins::probe())
            .args(["pg", &connstr, "whoami"])
            .output()
            .expect("run probe")
    }

    /// The user the application names selects the role, with that role's privileges; a user
    /// the policy does not hold gets PostgreSQL's pg_hba answer, the server untouched.
    pub fn assert_roles_select_credentials(&self) {
        let out = crate::run_ok(&mut self.psql_as(
            MIGRATOR,
            APP_DB,
            &format!(
                "create table t (x int); insert into t values (1); \
                 grant select on t to {RO_ROLE}; select current_user"
            ),
        ));
        assert_eq!(
            stdout(&out),
            format!("CREATE TABLE\nINSERT 0 1\nGRANT\n{RW_ROLE}")
        );
        let out = crate::run_ok(&mut self.psql_as(
            READER,
            APP_DB,
            "select current_user || ' ' || count(*) from t",
        ));
        assert_eq!(stdout(&out), format!("{RO_ROLE} 1"));
        // The reader cannot write.
        let out = self
            .psql_as(READER, APP_DB, "insert into t values (2)")
            .output()
            .expect("run psql");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("permission denied for table t"),
            "{err}"
        );
        // tokio-postgres too.
        let out = self.probe_as(READER, APP_DB, "");
        assert_eq!(
            stdout(&out),
            format!("user={RO_ROLE} db={APP_DB}"),
            "{out:?}"
        );
        let out = self.probe_as(MIGRATOR, APP_DB, "");
        assert_eq!(
            stdout(&out),
            format!("user={RW_ROLE} db={APP_DB}"),
            "{out:?}"
        );

        // A user the policy does not hold: the answer of a server with no pg_hba.conf line
        // for it, naming what the application asked for and nothing else.
        let log_before = self.pg.log().len();
        for user in ["intruder_x9", RO_ROLE, SCRAM_USER] {
            let out = self
                .psql_as(user, APP_DB, "select 1")
                .output()
                .expect("run psql");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{user} got a session");
            assert!(
                err.contains(&format!(
                    "FATAL:  no pg_hba.conf entry for host \"127.0.0.1\", user \"{user}\", database \"{APP_DB}\", no encryption"
                )),
                "{user}: {err}"
            );
            assert!(!err.contains("policy"), "{user}: {err}");
            let out = self.probe_as(user, APP_DB, "");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("FATAL 28000: no pg_hba.conf entry"),
                "{user}: {err}"
            );
        }
        let log = self.pg.log();
        assert!(
            !log[log_before..].contains("intruder_x9"),
            "the server heard of the refused user:\n{}",
            &log[log_before..]
        );
    }

    /// Databases outside `postgres.databases` are refused like a pg_hba.conf line would.
    pub fn assert_database_allow_list(&self) {
        let out = crate::run_ok(&mut self.psql_as(READER, APP_DB, "select current_database()"));
        assert_eq!(stdout(&out), APP_DB);
        for db in ["postgres", "nosuchdb"] {
            let out = self
                .psql_as(READER, db, "select 1")
                .output()
                .expect("run psql");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success()
                    && err.contains(&format!(
                        "FATAL:  no pg_hba.conf entry for host \"127.0.0.1\", user \"{READER}\", database \"{db}\", no encryption"
                    )),
                "{db}: {err}"
            );
        }
    }

    /// `options: [statement_timeout]`: that setting passes; any other is refused as the server
    /// refuses a setting the role may not change.
    pub fn assert_options_restricted(&self) {
        let out = self.probe_as(READER, APP_DB, "options='-c statement_timeout=1234'");
        assert_eq!(
            stdout(&out),
            format!("user={RO_ROLE} db={APP_DB}"),
            "{out:?}"
        );
        let mut psql = self.psql_as(READER, APP_DB, "show statement_timeout");
        psql.env("PGOPTIONS", "-c statement_timeout=1234");
        assert_eq!(stdout(&crate::run_ok(&mut psql)), "1234ms");
        let mut psql = self.psql_as(READER, APP_DB, "select 1");
        psql.env("PGOPTIONS", "-c role=latch_rw");
        let out = psql.output().expect("run psql");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("FATAL:  permission denied to set parameter \"role\""),
            "{err}"
        );
        let out = self.probe_as(READER, APP_DB, "options='-c search_path=x'");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("FATAL 42501: permission denied to set parameter \"search_path\""),
            "{err}"
        );
    }
}
