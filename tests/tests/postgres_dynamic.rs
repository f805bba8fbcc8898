//! OpenBao's database secrets engine end to end: the app (psql, no password) gets a session as
//! a PostgreSQL role that OpenBao minted for latch; the lease is reused while valid and revoked
//! when the agent stops (`revokeOnShutdown`).
use latch_tests::{
    Agent, TempDir, TestCgroup,
    openbao::{OpenBao, ROOT_TOKEN},
    postgres::{self, PgCluster},
    servers::free_port,
};

const ADMIN_PW: &str = "bao-admin-Pw-3c1d";

#[test]
fn psql_gets_a_role_minted_by_openbao_and_the_lease_is_revoked_on_stop() {
    let pg = PgCluster::start("127.0.0.2", "s-unused-1", "s-unused-2", "s-unused-3");
    pg.sql(&format!("alter role postgres password '{ADMIN_PW}'"));
    let vault = OpenBao::start(
        format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap(),
    );
    vault.cli(&["secrets", "enable", "database"]);
    vault.cli(
        &[
            "write",
            "database/config/orders",
            "plugin_name=postgresql-database-plugin",
            &format!(
                "connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@{}/postgres?sslmode=disable",
                pg.addr
            ),
            "username=postgres",
            &format!("password={ADMIN_PW}"),
            "allowed_roles=orders-rw",
        ],
    );
    vault.cli(&[
        "write",
        "database/roles/orders-rw",
        "db_name=orders",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' \
             VALID UNTIL '{{expiration}}'; GRANT CONNECT ON DATABASE postgres TO \"{{name}}\";",
        "default_ttl=1h",
    ]);

    let dir = TempDir::new("pg-dynamic");
    let token = dir.write("token", ROOT_TOKEN);
    let resources = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: bao}}\nspec:\n  \
         vault:\n    address: {}\n    insecure: true\n    revokeOnShutdown: true\n    auth: {{token: {{file: {}}}}}\n\
         ---\napiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: orders}}\nspec:\n  \
         destination: {{address: {}, port: {}}}\n  protocol: postgres\n  \
         workloads: all\n  tls: {{mode: disable}}\n  credentials:\n    dynamic: {{store: bao, path: database/creds/orders-rw}}\n",
        vault.url(),
        token.display(),
        pg.addr.ip(),
        pg.addr.port()
    );
    let cg = TestCgroup::new();
    let agent = Agent::start(&resources, &cg);
    let psql = || {
        let out = cg
            .command(postgres::bin("psql"))
            .args([
                "-h",
                &pg.addr.ip().to_string(),
                "-p",
                &pg.addr.port().to_string(),
            ])
            .args(["-U", "whoever", "-d", "postgres", "-w", "-X", "-A", "-t"])
            .args(["-c", "select current_user"])
            .env_remove("PGPASSWORD")
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let first = psql();
    assert!(
        first.starts_with("v-"),
        "not an OpenBao-minted role: {first:?}"
    );
    assert_eq!(psql(), first, "the lease should be reused while valid");
    agent.wait_count("relayed", 2);
    let exists = |role: &str| {
        pg.sql(&format!(
            "select count(*) from pg_roles where rolname = '{role}'"
        ))
    };
    assert_eq!(exists(&first), "1");

    assert!(agent.stop().success());
    assert_eq!(
        exists(&first),
        "0",
        "the lease was not revoked when the agent stopped"
    );
}
