//! The AWS Secrets Manager store against `moto_server` (PyPI `moto[server]`), started by each
//! test on a free loopback port. The first test makes moto enforce IAM authentication after
//! its setup calls, so moto checks our SigV4 signatures. A missing `moto_server` fails the
//! tests with a message naming the package.

mod support;

use std::path::Path;
use std::sync::Arc;

use latch::config::{self, AwsAuth, AwsStore, SecretStore, StoreBackend};
use latch::secrets::{Resolver, ResolverOptions, SecretError};
use support::moto::{Moto, xml_text};
use support::*;

const ALLOW_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;

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

fn set_env(vars: &[(&str, Option<&str>)]) {
    for (k, v) in vars {
        // SAFETY: only this test touches these variables (the other tests of this binary do
        // not read the environment).
        unsafe {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Environment and profile credentials, with moto checking signatures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_get_secret_value_with_env_and_profile_credentials() {
    // 7 setup calls below run unauthenticated; from then on moto checks every request
    let moto = Moto::start(Some(7));
    moto.iam(&[("Action", "CreateUser"), ("UserName", "latch")]);
    let key = moto.iam(&[("Action", "CreateAccessKey"), ("UserName", "latch")]);
    let (key_id, secret_key) = (
        xml_text(&key, "AccessKeyId"),
        xml_text(&key, "SecretAccessKey"),
    );
    moto.iam(&[
        ("Action", "PutUserPolicy"),
        ("UserName", "latch"),
        ("PolicyName", "all"),
        ("PolicyDocument", ALLOW_ALL),
    ]);
    moto.secretsmanager(
        "CreateSecret",
        &serde_json::json!({"Name": "orders-db", "SecretString": r#"{"username":"aws-app","password":"aws-first"}"#}),
    );
    let v2 = moto.secretsmanager(
        "PutSecretValue",
        &serde_json::json!({"SecretId": "orders-db", "SecretString": r#"{"username":"aws-app","password":"aws-second"}"#}),
    );
    moto.secretsmanager(
        "CreateSecret",
        &serde_json::json!({"Name": "api-token", "SecretString": "plain-token"}),
    );
    moto.secretsmanager(
        "CreateSecret",
        &serde_json::json!({"Name": "binary", "SecretBinary": "YmluLXZhbHVl"}),
    );

    set_env(&[
        ("AWS_ACCESS_KEY_ID", Some(&key_id)),
        ("AWS_SECRET_ACCESS_KEY", Some(&secret_key)),
        ("AWS_SESSION_TOKEN", None),
    ]);
    let r = resolver(aws_store("aws", &moto.endpoint(), AwsAuth::Env));
    let c = r
        .credentials(&static_policy("db", "aws", "orders-db", None))
        .await
        .unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "aws-app");
    assert_eq!(c.password.as_ref().unwrap().expose(), "aws-second");

    // the whole string, a pinned stage and a pinned version id
    let whole = refs_policy("t", "aws", None, Some(secret_ref("aws", "api-token", None)));
    assert_eq!(
        r.credentials(&whole)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "plain-token"
    );
    let mut previous = secret_ref("aws", "orders-db", Some("password"));
    previous.version = Some("AWSPREVIOUS".into());
    let p = refs_policy("prev", "aws", None, Some(previous.clone()));
    assert_eq!(
        r.credentials(&p)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "aws-first"
    );
    previous.version = Some(v2["VersionId"].as_str().unwrap().to_string());
    let p = refs_policy("pinned", "aws", None, Some(previous));
    assert_eq!(
        r.credentials(&p)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "aws-second"
    );
    let bin = refs_policy("b", "aws", None, Some(secret_ref("aws", "binary", None)));
    assert_eq!(
        r.credentials(&bin)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "bin-value"
    );

    // typed errors
    let e = r
        .credentials(&static_policy("x", "aws", "nope", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::NotFound { .. }), "{e:?}");
    let e = r
        .credentials(&static_policy("x", "aws", "api-token", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::FieldMissing { .. }), "{e:?}");

    // a wrong secret key: moto rejects the signature
    set_env(&[("AWS_SECRET_ACCESS_KEY", Some("CANARY-wrong-secret-key"))]);
    let e = r
        .credentials(&static_policy("db", "aws", "orders-db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
    assert!(!e.to_string().contains("CANARY"), "{e}");
    set_env(&[("AWS_ACCESS_KEY_ID", None), ("AWS_SECRET_ACCESS_KEY", None)]);
    let e = r
        .credentials(&static_policy("db", "aws", "orders-db", None))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::StoreAuth { .. }) && e.to_string().contains("AWS_ACCESS_KEY_ID"),
        "{e}"
    );

    // a shared credentials profile
    let creds = moto.dir.path().join("credentials");
    write_private(
        &creds,
        &format!(
            "[default]\naws_access_key_id = AKIAWRONG\naws_secret_access_key = wrong\n\n[latch]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret_key}\n"
        ),
    );
    set_env(&[
        ("AWS_SHARED_CREDENTIALS_FILE", Some(creds.to_str().unwrap())),
        (
            "AWS_CONFIG_FILE",
            Some(moto.dir.path().join("none").to_str().unwrap()),
        ),
    ]);
    let r = resolver(aws_store(
        "aws",
        &moto.endpoint(),
        AwsAuth::Profile("latch".into()),
    ));
    let c = r
        .credentials(&static_policy("db", "aws", "orders-db", None))
        .await
        .unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), "aws-second");
    let r = resolver(aws_store(
        "aws",
        &moto.endpoint(),
        AwsAuth::Profile("missing".into()),
    ));
    let e = r
        .credentials(&static_policy("db", "aws", "orders-db", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::StoreAuth { .. }), "{e:?}");
}

/// Web identity: the token file is exchanged at STS (moto, same endpoint) for temporary
/// credentials, which then sign GetSecretValue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_credentials_from_sts() {
    let moto = Moto::start(None);
    moto.secretsmanager(
        "CreateSecret",
        &serde_json::json!({"Name": "orders-db", "SecretString": r#"{"username":"wi-app","password":"wi-pass"}"#}),
    );
    let token_file = moto.dir.path().join("token");
    write_private(
        &token_file,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJsYXRjaCJ9.c2ln",
    );
    let auth = AwsAuth::WebIdentity {
        role_arn: "arn:aws:iam::123456789012:role/latch".into(),
        token_file: token_file.clone(),
    };
    let r = resolver(aws_store("aws", &moto.endpoint(), auth));
    let c = r
        .credentials(&static_policy("db", "aws", "orders-db", None))
        .await
        .unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), "wi-pass");

    let auth = AwsAuth::WebIdentity {
        role_arn: "arn:aws:iam::123456789012:role/latch".into(),
        token_file: moto.dir.path().join("absent"),
    };
    let r = resolver(aws_store("aws", &moto.endpoint(), auth));
    let e = r
        .credentials(&static_policy("db", "aws", "orders-db", None))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::StoreAuth { .. }) && e.to_string().contains("absent"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_canaries_stay_out_of_debug_errors_and_logs_and_unreachable_is_typed() {
    let _logs = captured_logs();
    let moto = Moto::start(None);
    moto.secretsmanager(
        "CreateSecret",
        &serde_json::json!({"Name": "canary", "SecretString": r#"{"username":"CANARY-au-1","password":"CANARY-ap-2"}"#}),
    );
    let token_file = moto.dir.path().join("token");
    write_private(&token_file, "CANARY-web-identity-token");
    let auth = AwsAuth::WebIdentity {
        role_arn: "arn:aws:iam::123456789012:role/latch".into(),
        token_file,
    };
    let r = resolver(aws_store("aws", &moto.endpoint(), auth.clone()));
    let c = r
        .credentials(&static_policy("c", "aws", "canary", None))
        .await
        .unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), "CANARY-ap-2");
    let e = r
        .credentials(&refs_policy(
            "c",
            "aws",
            None,
            Some(secret_ref("aws", "canary", Some("nope"))),
        ))
        .await
        .unwrap_err();
    assert!(!format!("{c:?} {e} {e:?} {r:?}").contains("CANARY"));

    let dead = format!("http://127.0.0.1:{}", free_port());
    let r = Arc::new(resolver(aws_store("aws", &dead, auth)));
    let e = r
        .credentials(&static_policy("c", "aws", "canary", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::Unreachable { .. }), "{e:?}");
    assert_not_logged("CANARY");
}
