//! One MySQL end-to-end set-up: MariaDB 10.11 with a mysql_native_password and an ed25519
//! account, a secrets file, a test cgroup and an agent with policy `orders-db`; clients run in
//! the cgroup and hold no password.
use std::{process::Command, time::Duration};

use crate::{
    Agent, TempDir, TestCgroup, bins,
    mariadb::{MariaDb, policy_yaml},
    postgres::secrets_yaml,
};

pub const NATIVE_PW: &str = "native-Secret-3c1d";
pub const ED_PW: &str = "ed25519-Secret-8e0f";

/// A server, a secrets file for `user`/`password`, and an agent with policy `orders-db`.
pub struct Setup {
    pub agent: Agent,
    pub cg: TestCgroup,
    pub db: MariaDb,
    pub secrets: TempDir,
}

impl Setup {
    pub fn new(user: &str, password: &str, extra_spec: &str) -> Setup {
        Setup::with_policy(user, password, extra_spec, |y| y)
    }

    /// As [`Setup::new`], with the policy document passed through `edit` first.
    pub fn with_policy(
        user: &str,
        password: &str,
        extra_spec: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Setup {
        let db = MariaDb::start("127.0.0.2", NATIVE_PW, ED_PW);
        let secrets = TempDir::new("my-secrets");
        let file = secrets.write("secrets.yaml", &secrets_yaml(user, password));
        let cg = TestCgroup::new();
        let agent = Agent::start(
            &edit(policy_yaml("orders-db", db.addr, &file, extra_spec)),
            &cg,
        );
        Setup {
            agent,
            cg,
            db,
            secrets,
        }
    }

    pub fn set_secret(&self, user: &str, password: &str) {
        self.secrets
            .write("secrets.yaml", &secrets_yaml(user, password));
    }

    /// The mariadb CLI in the cgroup, holding no password.
    pub fn cli(&self, sql: &str) -> Command {
        self.db.cli_in(&self.cg, "app_without_password", sql)
    }

    /// The CLI in the cgroup, which must fail; returns what it printed on stderr.
    pub fn cli_refused(&self, sql: &str) -> String {
        let out = crate::run_within(&mut self.cli(sql), Duration::from_secs(60));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "mariadb succeeded: {err}");
        err
    }

    /// `latch-probe my <url> <scenario>` (mysql_async) in the cgroup.
    pub fn probe(&self, scenario: &str) -> Command {
        let mut cmd = self.cg.command(bins::probe());
        cmd.args(["my", &self.db.url("app_without_password"), scenario]);
        cmd
    }

    /// As [`Setup::probe`], with `options` (`name=value&...`) on the URL.
    pub fn probe_with(&self, options: &str, scenario: &str) -> Command {
        let mut cmd = self.cg.command(bins::probe());
        let url = format!("{}?{options}", self.db.url("app_without_password"));
        cmd.args(["my", &url, scenario]);
        cmd
    }

    /// No password (nor the canary) in the agent's log.
    pub fn assert_log_clean(&self) {
        let log = self.agent.log();
        for pw in [NATIVE_PW, ED_PW, "canary"] {
            assert!(
                !log.contains(pw),
                "a password appears in the agent log:\n{log}"
            );
        }
    }
}
