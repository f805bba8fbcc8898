//! The AWS store with no credential on the machine: the SDKs' chain and `auth: instance` /
//! `auth: container` take the role's temporary credentials from the instance metadata service
//! (IMDSv2, served by `moto_server`) or the container credentials endpoint, and keep them
//! fresh. A separate test binary: these tests change the process environment, so they take
//! [`ENV`] and never run beside the other AWS tests.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use latch::config::{self, AwsAuth, AwsStore, SecretStore, StoreBackend};
use latch::secrets::{Resolver, ResolverOptions, SecretError};
use support::fake_http::{FakeHttp, Seen};
use support::moto::Moto;
use support::*;

/// The process environment belongs to one test at a time.
static ENV: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn aws_store(name: &str, endpoint: &str, auth: AwsAuth) -> SecretStore {
    SecretStore {
        name: name.to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: config::Location::new("test.yaml", 1, 1),
        backend: StoreBackend::Aws(AwsStore {
            region: "us-east-1".to_string(),
            endpoint: Some(endpoint.to_string()),
            auth,
        }),
    }
}

fn resolver(store: SecretStore) -> Resolver {
    Resolver::new(&[store], ResolverOptions::default()).unwrap()
}

/// No credential anywhere the chain looks, then `vars`. Call with [`ENV`] held.
fn keyless_env(home: &std::path::Path, vars: &[(&str, &str)]) {
    let cleared = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "AWS_EC2_METADATA_DISABLED",
    ];
    // SAFETY: every test of this binary holds ENV while it changes or reads the environment.
    unsafe {
        for k in cleared {
            std::env::remove_var(k);
        }
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"));
        std::env::set_var("AWS_CONFIG_FILE", home.join("no-config"));
        std::env::set_var("HOME", home);
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
    }
}

fn create_secret(moto: &Moto) {
    moto.secretsmanager(
        "CreateSecret",
        &serde_json::json!({"Name": "orders-db", "SecretString": r#"{"username":"vm-app","password":"from-imds"}"#}),
    );
}

async fn read_password(r: &Resolver) -> Result<String, SecretError> {
    read_from(r, "aws").await
}

async fn read_from(r: &Resolver, store: &str) -> Result<String, SecretError> {
    let c = r
        .credentials(&static_policy("db", store, "orders-db", None))
        .await?;
    Ok(c.password.as_ref().unwrap().expose().to_string())
}

/// Lines of moto's request log naming `path` with `method`.
fn moto_requests(moto: &Moto, method: &str, path: &str) -> usize {
    let log = std::fs::read_to_string(&moto.log).unwrap();
    let needle = format!("\"{method} {path} HTTP/1.1\"");
    log.lines().filter(|l| l.contains(&needle)).count()
}

const ROLES: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_and_instance_read_with_imdsv2_role_credentials() {
    let _env = ENV.lock().await;
    let moto = Moto::start(None);
    create_secret(&moto);
    let home = tempfile::tempdir().unwrap();
    keyless_env(
        home.path(),
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", &moto.endpoint())],
    );

    // no `auth`: the SDKs' chain finds nothing before the instance metadata service
    let chain = resolver(aws_store("aws", &moto.endpoint(), AwsAuth::Chain));
    assert_eq!(read_password(&chain).await.unwrap(), "from-imds");
    assert_eq!(moto_requests(&moto, "PUT", "/latest/api/token"), 1);
    assert_eq!(moto_requests(&moto, "GET", ROLES), 1);
    assert_eq!(
        moto_requests(&moto, "GET", &format!("{ROLES}default-role")),
        1
    );
    // the role's credentials are kept: a second read asks the metadata service nothing
    assert_eq!(read_password(&chain).await.unwrap(), "from-imds");
    assert_eq!(moto_requests(&moto, "PUT", "/latest/api/token"), 1);

    // `auth: instance`: the metadata service only
    let instance = resolver(aws_store("aws", &moto.endpoint(), AwsAuth::Instance));
    assert_eq!(read_password(&instance).await.unwrap(), "from-imds");
    assert_eq!(moto_requests(&moto, "PUT", "/latest/api/token"), 2);
    assert_eq!(
        moto_requests(&moto, "GET", &format!("{ROLES}default-role")),
        2
    );
    assert!(
        std::fs::read_to_string(&moto.log)
            .unwrap()
            .contains("POST / HTTP/1.1"),
        "no Secrets Manager request reached moto"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_disabled_is_one_clear_error_naming_the_store() {
    let _env = ENV.lock().await;
    let moto = Moto::start(None);
    create_secret(&moto);
    let home = tempfile::tempdir().unwrap();
    keyless_env(
        home.path(),
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &moto.endpoint()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    for auth in [AwsAuth::Chain, AwsAuth::Instance] {
        let r = resolver(aws_store("vm-secrets", &moto.endpoint(), auth.clone()));
        let e = read_from(&r, "vm-secrets").await.unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, SecretError::StoreAuth { .. }),
            "{auth:?}: {e:?}"
        );
        assert!(text.contains("vm-secrets"), "{auth:?}: {text}");
        assert!(
            text.contains("AWS_EC2_METADATA_DISABLED"),
            "{auth:?}: {text}"
        );
    }
    // the chain's message says what each provider lacked, so the fix is clear
    let r = resolver(aws_store("vm-secrets", &moto.endpoint(), AwsAuth::Chain));
    let text = read_from(&r, "vm-secrets").await.unwrap_err().to_string();
    for lacked in [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "profile",
    ] {
        assert!(text.contains(lacked), "{text}");
    }
    assert_eq!(moto_requests(&moto, "PUT", "/latest/api/token"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_metadata_service_is_unreachable() {
    let _env = ENV.lock().await;
    let home = tempfile::tempdir().unwrap();
    // a port nothing listens on
    let closed = format!("http://127.0.0.1:{}", free_port());
    keyless_env(
        home.path(),
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", &closed)],
    );
    let r = resolver(aws_store(
        "vm-secrets",
        "http://127.0.0.1:9",
        AwsAuth::Instance,
    ));
    let e = read_from(&r, "vm-secrets").await.unwrap_err();
    assert!(matches!(e, SecretError::Unreachable { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("vm-secrets"), "{text}");
    assert!(text.contains("instance metadata"), "{text}");
    assert!(text.contains(&closed), "{text}");
    // and what to change
    assert!(text.contains("AWS_EC2_METADATA_SERVICE_ENDPOINT"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_refusal_is_an_auth_error() {
    let _env = ENV.lock().await;
    for status in [401u16, 403] {
        let stub = FakeHttp::start(Arc::new(move |_: &Seen| (status, String::new()))).await;
        let home = tempfile::tempdir().unwrap();
        keyless_env(
            home.path(),
            &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", &stub.url())],
        );
        let r = resolver(aws_store(
            "vm-secrets",
            "http://127.0.0.1:9",
            AwsAuth::Instance,
        ));
        let e = read_from(&r, "vm-secrets").await.unwrap_err();
        assert!(
            matches!(e, SecretError::StoreAuth { .. }),
            "{status}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("vm-secrets"), "{text}");
        assert!(text.contains(&status.to_string()), "{text}");
        let fix = if status == 401 {
            "HttpPutResponseHopLimit"
        } else {
            "HttpEndpoint"
        };
        assert!(text.contains(fix), "{status}: {text}");
        let seen = stub.requests();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].method, "PUT");
        assert_eq!(seen[0].path, "/latest/api/token");
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for `t`.
fn iso8601(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A container credentials endpoint answering credentials that last `lifetime`, requiring
/// `token` in `Authorization`, and taking `delay` to answer every request after the first.
/// It runs on a runtime of its own, so its slow answers never hold up a thread of the runtime
/// the store's code runs on.
struct ContainerStub {
    http: FakeHttp,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ContainerStub {
    fn url(&self) -> String {
        self.http.url()
    }

    fn requests(&self) -> Vec<Seen> {
        self.http.requests()
    }
}

impl Drop for ContainerStub {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn container_stub(token: &'static str, lifetime: Duration, delay: Duration) -> ContainerStub {
    let served = Arc::new(AtomicUsize::new(0));
    let handler: support::fake_http::Handler = Arc::new(move |seen: &Seen| {
        if seen.authorization.as_deref() != Some(token) {
            return (401, r#"{"message":"bad token"}"#.into());
        }
        let n = served.fetch_add(1, Ordering::SeqCst);
        if n > 0 {
            std::thread::sleep(delay);
        }
        let body = serde_json::json!({
            "AccessKeyId": format!("ASIACONTAINER{n}"),
            "SecretAccessKey": "container-secret-canary",
            "Token": "container-session-canary",
            "Expiration": iso8601(SystemTime::now() + lifetime),
        });
        (200, body.to_string())
    });
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let http = runtime.block_on(FakeHttp::start(handler));
        ContainerStub {
            http,
            runtime: Some(runtime),
        }
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn container_credentials_with_authorization_token() {
    let _env = ENV.lock().await;
    let _logs = captured_logs();
    let moto = Moto::start(None);
    create_secret(&moto);
    let stub = container_stub(
        "container-auth-canary",
        Duration::from_secs(3600),
        Duration::ZERO,
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    keyless_env(
        home.path(),
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                &format!("{}/v2/creds", stub.url()),
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "container-auth-canary"),
            // the chain must stop at the container endpoint, before the metadata service
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    for auth in [AwsAuth::Container, AwsAuth::Chain] {
        let r = resolver(aws_store("aws", &moto.endpoint(), auth));
        assert_eq!(read_password(&r).await.unwrap(), "from-imds");
    }
    let seen = stub.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(s.path, "/v2/creds");
        assert_eq!(s.authorization.as_deref(), Some("container-auth-canary"));
    }

    // a wrong token: refused, an auth error naming the store
    keyless_env(
        home.path(),
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                &format!("{}/v2/creds", stub.url()),
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "wrong"),
        ],
    );
    let r = resolver(aws_store(
        "ecs-secrets",
        &moto.endpoint(),
        AwsAuth::Container,
    ));
    let e = read_from(&r, "ecs-secrets").await.unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
    assert!(e.to_string().contains("ecs-secrets"), "{e}");
    for canary in [
        "container-auth-canary",
        "container-secret-canary",
        "container-session-canary",
    ] {
        assert!(!format!("{e:?}").contains(canary));
        assert_not_logged(canary);
    }
}

/// Credentials in their refresh window are served at once while one background fetch gets
/// the next; credentials about to expire are fetched before the request goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn temporary_credentials_refresh_in_background_before_expiry() {
    let _env = ENV.lock().await;
    let moto = Moto::start(None);
    create_secret(&moto);
    let slow = Duration::from_millis(1500);
    let home = tempfile::tempdir().unwrap();

    // 5 minutes left: inside every store's refresh window (15 ± 5 min), above the 1 minute
    // under which a request waits
    let stub = container_stub("t", Duration::from_secs(300), slow).await;
    keyless_env(
        home.path(),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &stub.url()),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "t"),
        ],
    );
    let counted = latch::secrets::credential_stats::of("aws");
    let r = resolver(aws_store("aws", &moto.endpoint(), AwsAuth::Container));
    assert_eq!(read_password(&r).await.unwrap(), "from-imds");
    assert_eq!(stub.requests().len(), 1);
    let start = Instant::now();
    assert_eq!(read_password(&r).await.unwrap(), "from-imds");
    let took = start.elapsed();
    assert!(
        took < slow,
        "the read waited {took:?} for a refresh that could happen in the background"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while stub.requests().len() < 2 {
        assert!(Instant::now() < deadline, "no background refresh happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // one refresh at a time, however many reads come meanwhile
    for _ in 0..3 {
        read_password(&r).await.unwrap();
    }
    tokio::time::sleep(slow * 2).await;
    let after = stub.requests().len();
    assert!(after <= 3, "{after} fetches: refreshes were not coalesced");
    // every fetch, inline or in the background, is counted for /metrics
    let now = latch::secrets::credential_stats::of("aws");
    assert_eq!(now.ok - counted.ok, after as u64);
    assert_eq!(now.failed, counted.failed);

    // 30 seconds left: too little to use, the read waits for new credentials
    let stub = container_stub("t", Duration::from_secs(30), slow).await;
    keyless_env(
        home.path(),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &stub.url()),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "t"),
        ],
    );
    let r = resolver(aws_store("aws", &moto.endpoint(), AwsAuth::Container));
    read_password(&r).await.unwrap();
    assert_eq!(stub.requests().len(), 1);
    let start = Instant::now();
    read_password(&r).await.unwrap();
    let took = start.elapsed();
    assert_eq!(
        stub.requests().len(),
        2,
        "expiring credentials were not re-fetched"
    );
    assert!(
        took >= slow,
        "the read took {took:?}: it did not wait for the fetch of fresh credentials"
    );
}

fn vault_store(name: &str, addr: &str, auth: config::VaultAuth) -> SecretStore {
    SecretStore {
        name: name.to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: config::Location::new("test.yaml", 1, 1),
        backend: StoreBackend::Vault(config::VaultStore {
            address: addr.to_string(),
            namespace: None,
            mount: None,
            kv_version: 2,
            tls: Default::default(),
            auth,
            revoke_on_shutdown: false,
        }),
    }
}

/// Vault's `aws` auth method (IAM type). OpenBao 2.x no longer builds this method in and no
/// Vault binary is installed here, so a stub answers as Vault for the login and the read;
/// what makes the login work is real: the test replays the signed `sts:GetCallerIdentity`
/// exactly as Vault would, to moto's STS with signature checking on, and moto names the
/// agent's IAM principal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_aws_iam_login_is_a_get_caller_identity_sts_accepts() {
    use base64::Engine;
    let _env = ENV.lock().await;
    // 3 setup calls unauthenticated; from then on moto checks every signature
    let moto = Moto::start(Some(3));
    moto.iam(&[("Action", "CreateUser"), ("UserName", "node-1")]);
    let key = moto.iam(&[("Action", "CreateAccessKey"), ("UserName", "node-1")]);
    moto.iam(&[
        ("Action", "PutUserPolicy"),
        ("UserName", "node-1"),
        ("PolicyName", "all"),
        (
            "PolicyDocument",
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#,
        ),
    ]);
    let home = tempfile::tempdir().unwrap();
    keyless_env(
        home.path(),
        &[
            (
                "AWS_ACCESS_KEY_ID",
                &support::moto::xml_text(&key, "AccessKeyId"),
            ),
            (
                "AWS_SECRET_ACCESS_KEY",
                &support::moto::xml_text(&key, "SecretAccessKey"),
            ),
        ],
    );
    let vault = FakeHttp::start(Arc::new(|seen: &Seen| match seen.path.as_str() {
        "/v1/auth/aws/login" => (
            200,
            r#"{"auth":{"client_token":"stub-token","lease_duration":3600,"renewable":false}}"#
                .into(),
        ),
        p if p.starts_with("/v1/secret/data/db") => (
            200,
            r#"{"data":{"data":{"username":"iam-user","password":"iam-pass"},"metadata":{"version":1}}}"#.into(),
        ),
        _ => (404, r#"{"errors":[]}"#.into()),
    }))
    .await;
    let sts = format!("{}/", moto.endpoint());
    let r = resolver(vault_store(
        "vm-vault",
        &vault.url(),
        config::VaultAuth::Aws {
            role: "node".into(),
            mount: "aws".into(),
            region: "us-east-1".into(),
            sts_endpoint: sts.clone(),
            server_id: Some("vault.test".into()),
        },
    ));
    let c = r
        .credentials(&static_policy("db", "vm-vault", "secret/db", None))
        .await
        .unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), "iam-pass");

    let login = vault
        .requests()
        .into_iter()
        .find(|s| s.path == "/v1/auth/aws/login")
        .expect("no login");
    let v: serde_json::Value = serde_json::from_slice(&login.body).unwrap();
    let b64 = |k: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(v[k].as_str().unwrap())
            .unwrap()
    };
    assert_eq!(v["role"], "node");
    assert_eq!(v["iam_http_request_method"], "POST");
    assert_eq!(String::from_utf8(b64("iam_request_url")).unwrap(), sts);
    let body = String::from_utf8(b64("iam_request_body")).unwrap();
    let headers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&b64("iam_request_headers")).unwrap();
    assert_eq!(headers["x-vault-aws-iam-server-id"][0], "vault.test");

    // what Vault does with it: send it to STS
    use std::io::{Read, Write};
    let mut raw = format!(
        "POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, values) in &headers {
        for value in values.as_array().unwrap() {
            raw.push_str(&format!("{name}: {}\r\n", value.as_str().unwrap()));
        }
    }
    raw.push_str("\r\n");
    raw.push_str(&body);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", moto.port)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "STS refused the signed request:\n{answer}"
    );
    assert!(
        answer.contains("<Arn>arn:aws:iam::123456789012:user/node-1</Arn>"),
        "{answer}"
    );

    // tampering with the signed request is caught by STS: the signature covers the server ID
    let forged = raw.replace("vault.test", "vault.evil");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", moto.port)).unwrap();
    s.write_all(forged.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// AWS refusing a signature for its time (the machine's clock is off): Secrets Manager's
/// `InvalidSignatureException: Signature expired`, and STS's `SignatureDoesNotMatch` passed on
/// by Vault's `aws` method, each one error naming the store and the clock. The services are
/// stubs answering as AWS does (moto checks no request times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_is_named_with_the_store_and_the_clock() {
    let _env = ENV.lock().await;
    let home = tempfile::tempdir().unwrap();
    keyless_env(
        home.path(),
        &[
            ("AWS_ACCESS_KEY_ID", "AKIASKEWED"),
            ("AWS_SECRET_ACCESS_KEY", "skew-secret-canary"),
        ],
    );
    let sm = FakeHttp::start(Arc::new(|_: &Seen| {
        (
            400,
            r#"{"__type":"InvalidSignatureException","message":"Signature expired: 20261203T100000Z is now earlier than 20261203T101500Z (20261203T103000Z - 15 min.)"}"#.into(),
        )
    }))
    .await;
    let r = resolver(aws_store("skewed-aws", &sm.url(), AwsAuth::Env));
    let e = read_from(&r, "skewed-aws").await.unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("skewed-aws") && text.contains("Signature expired") && text.contains("clock"),
        "{text}"
    );

    let vault = FakeHttp::start(Arc::new(|_: &Seen| {
        (
            400,
            r#"{"errors":["error making upstream request: received error code 403 from STS: <ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>Signature expired: 20261203T100000Z is now earlier than 20261203T101500Z</Message></Error></ErrorResponse>"]}"#.into(),
        )
    }))
    .await;
    let r = resolver(vault_store(
        "skewed-vault",
        &vault.url(),
        config::VaultAuth::Aws {
            role: "node".into(),
            mount: "aws".into(),
            region: "us-east-1".into(),
            sts_endpoint: "https://sts.amazonaws.com/".into(),
            server_id: None,
        },
    ));
    let e = r
        .credentials(&static_policy("db", "skewed-vault", "secret/db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("skewed-vault") && text.contains("auth/aws/login") && text.contains("clock"),
        "{text}"
    );
    assert!(!format!("{e:?}").contains("skew-secret-canary"));
}
