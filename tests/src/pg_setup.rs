//! One PostgreSQL end-to-end set-up: a cluster with a SCRAM, an MD5 and a clear-text role, a
//! secrets file, a test cgroup and an agent with policy `orders-db`; clients run in the cgroup
//! and hold no password.
use std::process::Command;

use crate::{
    Agent, TempDir, TestCgroup, bins,
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
        let pg = PgCluster::start("127.0.0.2", SCRAM_PW, MD5_PW, PLAIN_PW);
        let secrets = TempDir::new("pg-secrets");
        let file = secrets.write("secrets.yaml", &secrets_yaml(user, password));
        let cg = TestCgroup::new();
        let agent = Agent::start(&policy_yaml("orders-db", pg.addr, &file, extra_spec), &cg);
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
}
