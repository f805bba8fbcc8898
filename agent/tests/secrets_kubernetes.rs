//! The Kubernetes store. No cluster runs here: a tiny local HTTPS server (certificate from a
//! throw-away CA made with `openssl`) plays the API server, answering with recorded API
//! responses (a `Secret`, and the `Status` objects the API server sends for 401, 403 and 404).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use latch::config::{self, KubernetesStore, SecretStore, StoreBackend};
use latch::secrets::{Resolver, ResolverOptions, SecretError};
use support::fake_http::{FakeHttp, Seen, test_tls};
use support::*;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bGF0Y2gtc3lzdGVtOmxhdGNoIn0.c2ln";

/// `GET /api/v1/namespaces/prod/secrets/orders-db`, as recorded.
const SECRET: &str = r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"orders-db","namespace":"prod","uid":"3f6c2a8e-1b4d-4c7e-9a0f-5d2e8b7c6a1f","resourceVersion":"48213","creationTimestamp":"2024-05-02T09:14:51Z","managedFields":[{"manager":"kubectl-create","operation":"Update","apiVersion":"v1","time":"2024-05-02T09:14:51Z","fieldsType":"FieldsV1","fieldsV1":{"f:data":{".":{},"f:password":{},"f:username":{}},"f:type":{}}}]},"data":{"password":"azhzLXMzY3JldA==","username":"b3JkZXJzLWFwcA=="},"type":"Opaque"}"#;
const NOT_FOUND: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"secrets \"missing\" not found","reason":"NotFound","details":{"name":"missing","kind":"secrets"},"code":404}"#;
const FORBIDDEN: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"secrets \"orders-db\" is forbidden: User \"system:serviceaccount:latch-system:latch\" cannot get resource \"secrets\" in API group \"\" in the namespace \"kube-system\"","reason":"Forbidden","details":{"name":"orders-db","kind":"secrets"},"code":403}"#;
const UNAUTHORIZED: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;

fn api_server(req: &Seen) -> (u16, String) {
    if req.authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return (401, UNAUTHORIZED.to_string());
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/api/v1/namespaces/prod/secrets/orders-db") => (200, SECRET.to_string()),
        ("GET", p) if p.starts_with("/api/v1/namespaces/kube-system/") => {
            (403, FORBIDDEN.to_string())
        }
        _ => (404, NOT_FOUND.to_string()),
    }
}

fn k8s_store(
    api: &str,
    namespace: Option<&str>,
    token_file: &Path,
    ca_file: Option<PathBuf>,
) -> SecretStore {
    SecretStore {
        name: "k8s".to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: config::Location::new("test.yaml", 1, 1),
        backend: StoreBackend::Kubernetes(KubernetesStore {
            namespace: namespace.map(str::to_string),
            api_server: Some(api.to_string()),
            token_file: Some(token_file.to_path_buf()),
            ca_file,
        }),
    }
}

fn write_token(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, token).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_a_secret_over_https_with_the_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = test_tls();
    let api = FakeHttp::start_with(Arc::new(api_server), Some(tls)).await;
    let token = write_token(dir.path(), TOKEN);
    let r = Resolver::new(
        &[k8s_store(&api.url(), Some("prod"), &token, Some(ca.ca()))],
        ResolverOptions::default(),
    )
    .unwrap();

    // name only: the store's namespace
    let c = r
        .credentials(&static_policy("db", "k8s", "orders-db", None))
        .await
        .unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "orders-app");
    assert_eq!(c.password.as_ref().unwrap().expose(), "k8s-s3cret");
    // namespace/name, and one request for both fields
    let c = r
        .credentials(&static_policy("db2", "k8s", "prod/orders-db", None))
        .await
        .unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), "k8s-s3cret");
    let seen: Vec<_> = api
        .requests()
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(api.requests().iter().all(|s| s.method == "GET"));

    let e = r
        .credentials(&static_policy("x", "k8s", "missing", None))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::NotFound { ref path, .. } if path == "prod/missing"),
        "{e:?}"
    );
    let e = r
        .credentials(&static_policy("x", "k8s", "kube-system/orders-db", None))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::Permission { .. }) && e.to_string().contains("forbidden"),
        "{e}"
    );
    let p = refs_policy(
        "x",
        "k8s",
        None,
        Some(secret_ref("k8s", "orders-db", Some("nope"))),
    );
    assert!(matches!(
        r.credentials(&p).await,
        Err(SecretError::FieldMissing { .. })
    ));

    // a rotated (here: wrong) token file is read again for the next request
    write_token(dir.path(), "CANARY-stale-token");
    let e = r
        .credentials(&static_policy("db", "k8s", "orders-db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains("CANARY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_server_certificate_not_signed_by_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, tls) = test_tls();
    let api = FakeHttp::start_with(Arc::new(api_server), Some(tls)).await;
    let token = write_token(dir.path(), TOKEN);
    // the system roots do not know the throw-away CA
    let r = Resolver::new(
        &[k8s_store(&api.url(), Some("prod"), &token, None)],
        ResolverOptions::default(),
    )
    .unwrap();
    let e = r
        .credentials(&static_policy("db", "k8s", "orders-db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert!(api.requests().is_empty());
}

#[tokio::test]
async fn outside_a_cluster_without_api_server_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path(), TOKEN);
    let store = SecretStore {
        name: "k8s".to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: config::Location::new("test.yaml", 1, 1),
        backend: StoreBackend::Kubernetes(KubernetesStore {
            namespace: Some("prod".into()),
            api_server: None,
            token_file: Some(token),
            ca_file: None,
        }),
    };
    let r = Resolver::new(&[store], ResolverOptions::default()).unwrap();
    let e = r
        .credentials(&static_policy("db", "k8s", "orders-db", None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("KUBERNETES_SERVICE_HOST"), "{e}");
}
