//! Issue 19's "done means": a PostgreSQL session through latch on a "VM" whose agent holds no
//! store credential in any file or environment variable; the store's credential comes from the
//! machine's identity. psql runs in the intercepted cgroup with no password; the agent runs
//! with an environment of `PATH` and the service locations only, checked in
//! `/proc/PID/environ`.
//!
//! - AWS Secrets Manager with the instance role's credentials from moto's instance metadata
//!   service (IMDSv2);
//! - Vault/OpenBao with a token from the `aws` auth method: the instance role's credentials
//!   sign an `sts:GetCallerIdentity` that moto's STS verifies (see `aws_iam_vault.rs` for why a
//!   stand-in does the method's part in front of the real OpenBao);
//! - OpenBao's `jwt` auth method with an OIDC token file; the Vault token lasts 6 s and is
//!   renewed before it expires;
//! - OpenBao's `cert` auth method with the node's own key and certificate.
use std::{path::Path, process::Command, time::Duration};

use latch_tests::{
    Agent, TempDir, TestCgroup,
    aws_iam_vault::{AwsAuthFront, AwsRole, Imds},
    certs::TestCa,
    moto::{Moto, xml_text},
    openbao::{OpenBao, ROOT_TOKEN},
    pg_setup::{MD5_PW, PLAIN_PW, SCRAM_PW},
    postgres::{APP_DB, PgCluster, SCRAM_USER},
};

const READ_POLICY: &str = r#"path "secret/data/*" { capabilities = ["read"] }"#;

/// A PostgreSQL server on 127.0.0.2 and a cgroup whose connections latch intercepts.
struct Vm {
    pg: PgCluster,
    cg: TestCgroup,
}

impl Vm {
    fn new() -> Vm {
        Vm {
            pg: PgCluster::start("127.0.0.2", SCRAM_PW, MD5_PW, PLAIN_PW),
            cg: TestCgroup::new(),
        }
    }

    /// A store `vm-store` with `store_spec` (YAML under `spec:`, indented by 2) and policy
    /// `orders-db` reading `username`/`password` of `path` in it; the agent's environment is
    /// `PATH` and `envs` only.
    fn agent(&self, store_spec: &str, path: &str, envs: &[(&str, &str)]) -> Agent {
        let yaml = store_and_policy("vm-store", store_spec, "orders-db", &self.pg, path);
        start_agent(&yaml, &self.cg, envs)
    }

    /// psql in the cgroup with no password: the user the session runs as.
    fn psql_user(&self) -> String {
        let out = latch_tests::run_ok(
            self.pg
                .psql_in(
                    &self.cg,
                    "app_without_password",
                    APP_DB,
                    "select current_user",
                )
                .env("PGCONNECT_TIMEOUT", "20"),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// A `SecretStore` `store` with `store_spec` (YAML under `spec:`, indented by 2) and a
/// postgres `Policy` `policy` for `pg` reading `username`/`password` of `path` in it.
fn store_and_policy(
    store: &str,
    store_spec: &str,
    policy: &str,
    pg: &PgCluster,
    path: &str,
) -> String {
    format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: {store}}}\n\
         spec:\n{store_spec}---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: {policy}}}\nspec:\n  \
         destination: {{address: \"{}\", port: {}}}\n  protocol: postgres\n  \
         tls: {{mode: disable}}\n  workloads: all\n  credentials:\n    store: {store}\n    \
         username: {{path: {path}, field: username}}\n    \
         password: {{path: {path}, field: password}}\n",
        pg.addr.ip(),
        pg.addr.port()
    )
}

/// The agent with `yaml`, an environment of `PATH` and `envs` only (checked).
fn start_agent(yaml: &str, cg: &TestCgroup, envs: &[(&str, &str)]) -> Agent {
    let agent = Agent::start_clean_env(yaml, cg, &[], envs);
    assert_no_store_credential(&agent);
    agent
}

/// `latch doctor --policy` on the agent's policy file, with the agent's environment (`PATH`
/// and `envs`): (whether it passed, the line of `store`).
fn doctor(agent: &Agent, envs: &[(&str, &str)], store: &str) -> (bool, String) {
    let out = Command::new(latch_tests::bins::latch())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(envs.iter().copied())
        .args(["doctor", "--policy"])
        .arg(agent.dir.path().join("policy.yaml"))
        .output()
        .expect("run latch doctor");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text
        .find(&format!("store {store} "))
        .unwrap_or_else(|| panic!("no line for store {store}:\n{text}"));
    let line = text[start - 6..]
        .lines()
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("latch doctor: {line}");
    (out.status.success(), line)
}

/// `latch status`: the row of `store` in its STORE table.
fn status_row(agent: &Agent, store: &str) -> String {
    let out = latch_tests::run_ok(
        Command::new(latch_tests::bins::latch())
            .args(["status", "--admin"])
            .arg(agent.admin.to_string()),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("latch status:\n{text}");
    text.lines()
        .find(|l| l.starts_with(&format!("{store} ")))
        .unwrap_or_else(|| panic!("no row for {store}:\n{text}"))
        .to_owned()
}

/// No AWS keys, session token, profile, Vault/OpenBao token or AppRole secret in the agent's
/// environment, and no home directory where a shared AWS profile could be.
fn assert_no_store_credential(agent: &Agent) {
    for (name, _) in agent.environment() {
        let upper = name.to_ascii_uppercase();
        let credential = ["TOKEN", "SECRET", "ACCESS_KEY", "PASSWORD", "PROFILE"]
            .iter()
            .any(|w| upper.contains(w))
            || ["HOME", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"].contains(&upper.as_str());
        assert!(!credential, "the agent's environment has {name}");
    }
}

/// Nothing in the agent's log that is a credential.
fn assert_log_clean(agent: &Agent, secrets: &[&str]) {
    let log = agent.log();
    for s in [SCRAM_PW, ROOT_TOKEN].iter().chain(secrets) {
        assert!(
            !log.contains(s),
            "a credential appears in the agent log:\n{log}"
        );
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn bao_with_secret(bao: &OpenBao) {
    bao.cli(&[
        "kv",
        "put",
        "secret/db",
        &format!("username={SCRAM_USER}"),
        &format!("password={SCRAM_PW}"),
    ]);
    let policy = bao.dir().join("reader.hcl");
    write_private(&policy, READ_POLICY);
    bao.cli(&["policy", "write", "reader", policy.to_str().unwrap()]);
}

/// `latch_store_credential_refreshes{store="vm-store",result}`.
fn refreshes(agent: &Agent, result: &str) -> u64 {
    let needle =
        format!("latch_store_credential_refreshes{{store=\"vm-store\",result=\"{result}\"}} ");
    agent
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn secrets_manager_with_the_instance_roles_credentials_from_imdsv2() {
    let moto = Moto::start();
    let secret = serde_json::json!({"username": SCRAM_USER, "password": SCRAM_PW}).to_string();
    moto.secretsmanager(
        "CreateSecret",
        &serde_json::json!({"Name": "orders-db", "SecretString": secret}),
    );
    let vm = Vm::new();
    // no `auth`: the SDKs' chain, which finds nothing before the metadata service
    let store = format!(
        "  aws:\n    region: us-east-1\n    endpoint: {}\n    insecure: true\n",
        moto.endpoint()
    );
    let agent = vm.agent(
        &store,
        "orders-db",
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", &moto.endpoint())],
    );
    assert_eq!(vm.psql_user(), SCRAM_USER);
    assert_eq!(
        moto.requests("PUT", "/latest/api/token"),
        1,
        "{}",
        moto.log()
    );
    assert_eq!(
        moto.requests(
            "GET",
            "/latest/meta-data/iam/security-credentials/default-role"
        ),
        1
    );
    // the role's credentials are kept for the next session
    assert_eq!(vm.psql_user(), SCRAM_USER);
    assert_eq!(moto.requests("PUT", "/latest/api/token"), 1);
    assert_eq!(refreshes(&agent, "ok"), 1);
    // who the agent is to the store, and until when
    let imds_env = [("AWS_EC2_METADATA_SERVICE_ENDPOINT", moto.endpoint())];
    let imds_env: Vec<(&str, &str)> = imds_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (ok, line) = doctor(&agent, &imds_env, "vm-store");
    assert!(ok, "{line}");
    assert!(
        line.starts_with("ok    store vm-store")
            && line.contains("aws: arn:aws:sts::123456789012:")
            && line.contains("; credential expires "),
        "{line}"
    );
    let row = status_row(&agent, "vm-store");
    assert!(
        row.contains(" aws ") && row.contains(" yes ") && row.contains("expires "),
        "{row}"
    );
    // moto's metadata service hands out these fixed credentials
    assert_log_clean(&agent, &["test-secret-key", "test-session-token"]);
    assert!(agent.stop().success());
}

const ACCOUNT: &str = "123456789012";

/// The instance role `vm-node` in moto, and its temporary credentials (AssumeRole) as the
/// metadata service answers them.
fn instance_role(moto: &Moto) -> serde_json::Value {
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
    let allow = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"sts:GetCallerIdentity","Resource":"*"}]}"#;
    moto.query(
        "iam",
        "2010-05-08",
        &[
            ("Action", "CreateRole"),
            ("RoleName", "vm-node"),
            ("AssumeRolePolicyDocument", trust),
        ],
    );
    moto.query(
        "iam",
        "2010-05-08",
        &[
            ("Action", "PutRolePolicy"),
            ("RoleName", "vm-node"),
            ("PolicyName", "whoami"),
            ("PolicyDocument", allow),
        ],
    );
    let assumed = moto.query(
        "sts",
        "2011-06-15",
        &[
            ("Action", "AssumeRole"),
            ("RoleArn", &format!("arn:aws:iam::{ACCOUNT}:role/vm-node")),
            ("RoleSessionName", "i-0123456789abcdef0"),
        ],
    );
    serde_json::json!({
        "Code": "Success",
        "Type": "AWS-HMAC",
        "AccessKeyId": xml_text(&assumed, "AccessKeyId"),
        "SecretAccessKey": xml_text(&assumed, "SecretAccessKey"),
        "Token": xml_text(&assumed, "SessionToken"),
        "Expiration": xml_text(&assumed, "Expiration"),
    })
}

#[test]
fn vault_token_from_aws_iam_auth_signed_with_the_instance_role() {
    let moto = Moto::start();
    let creds = instance_role(&moto);
    moto.check_signatures();
    // from now on STS answers only correctly signed requests
    let (status, _) = moto.raw(
        "POST",
        "/",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            (
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20240101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=0",
            ),
        ],
        "Action=GetCallerIdentity&Version=2011-06-15",
    );
    assert_ne!(status, 200, "moto must check signatures");

    let bao = OpenBao::start_local();
    bao_with_secret(&bao);
    let sts: std::net::SocketAddr = format!("127.0.0.1:{}", moto.port).parse().unwrap();
    let front = AwsAuthFront::start(
        bao.addr,
        ROOT_TOKEN,
        sts,
        AwsRole {
            name: "vm-node".into(),
            bound_iam_principal_arn: format!("arn:aws:iam::{ACCOUNT}:role/vm-node"),
            server_id: "bao.test".into(),
            policy: "reader".into(),
        },
    );
    let imds = Imds::start("vm-node", creds.to_string());
    let vm = Vm::new();
    let store = format!(
        "  vault:\n    address: {}\n    insecure: true\n    auth:\n      aws:\n        \
         role: vm-node\n        serverId: bao.test\n        stsEndpoint: \"{}/\"\n",
        front.url(),
        moto.endpoint()
    );
    let agent = vm.agent(
        &store,
        "secret/db",
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.url())],
    );
    assert_eq!(vm.psql_user(), SCRAM_USER);
    assert_eq!(
        front.logins(),
        vec![format!(
            "accepted arn:aws:sts::{ACCOUNT}:assumed-role/vm-node/i-0123456789abcdef0"
        )]
    );
    let seen = imds.seen();
    assert_eq!(seen[0], "PUT /latest/api/token 200", "{seen:?}");
    assert!(
        seen.iter()
            .any(|s| s == "GET /latest/meta-data/iam/security-credentials/vm-node 200"),
        "{seen:?}"
    );
    assert_eq!(vm.psql_user(), SCRAM_USER);
    assert_eq!(front.logins().len(), 1, "the token was not kept");
    let (ok, line) = doctor(
        &agent,
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.url())],
        "vm-store",
    );
    assert!(ok, "{line}");
    assert!(
        line.contains("vault: token token-aws-vm-node")
            && line.contains("policies default, reader")
            && line.contains("credential expires "),
        "{line}"
    );
    assert_eq!(front.logins().len(), 2, "doctor logs in as the agent would");
    let row = status_row(&agent, "vm-store");
    assert!(row.contains(" vault ") && row.contains("expires "), "{row}");
    assert_log_clean(
        &agent,
        &[
            creds["SecretAccessKey"].as_str().unwrap(),
            creds["Token"].as_str().unwrap(),
        ],
    );
    assert!(agent.stop().success());
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = latch_tests::run_ok(
        Command::new(latch_tests::bins::tool("openssl", "openssl"))
            .current_dir(dir)
            .args(args),
    );
    out.stdout
}

/// An RS256 JWT for `sub`/`aud`, valid ten minutes, signed with `dir/issuer.key`.
fn sign_jwt(dir: &Path, sub: &str, aud: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://issuer.test", "sub": sub, "aud": aud,
        "iat": now, "nbf": now - 5, "exp": now + 600,
    });
    let signed = format!(
        "{}.{}",
        b64url(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    );
    std::fs::write(dir.join("jwt-input"), &signed).unwrap();
    let sig = openssl(
        dir,
        &["dgst", "-sha256", "-sign", "issuer.key", "jwt-input"],
    );
    format!("{signed}.{}", b64url(&sig))
}

/// An OIDC issuer's signing key, and OpenBao's `jwt` method trusting it.
fn jwt_issuer(bao: &OpenBao) -> TempDir {
    let issuer = TempDir::new("oidc-issuer");
    openssl(
        issuer.path(),
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "issuer.key",
        ],
    );
    openssl(
        issuer.path(),
        &["pkey", "-in", "issuer.key", "-pubout", "-out", "issuer.pem"],
    );
    bao.cli(&["auth", "enable", "jwt"]);
    bao.cli(&[
        "write",
        "auth/jwt/config",
        &format!(
            "jwt_validation_pubkeys=@{}",
            issuer.path().join("issuer.pem").display()
        ),
    ]);
    issuer
}

#[test]
fn vault_token_from_jwt_auth_renewed_before_it_expires() {
    let bao = OpenBao::start_local();
    bao_with_secret(&bao);
    let issuer = jwt_issuer(&bao);
    // a Vault token of 6 s, renewable for an hour: renewed two thirds into its TTL
    bao.cli(&[
        "write",
        "auth/jwt/role/vm-node",
        "role_type=jwt",
        "bound_audiences=latch-agent",
        "user_claim=sub",
        "token_policies=reader",
        "token_ttl=6s",
        "token_max_ttl=1h",
    ]);
    // the platform's OIDC token file (an identity document, not a store credential)
    let platform = TempDir::new("platform-token");
    let jwt = sign_jwt(issuer.path(), "vm-node-1", "latch-agent");
    let token_file = platform.write("oidc-token", &jwt);
    let vm = Vm::new();
    let store = format!(
        "  vault:\n    address: {}\n    insecure: true\n    auth:\n      jwt: {{role: vm-node, tokenFile: {}}}\n",
        bao.url(),
        token_file.display()
    );
    let agent = vm.agent(&store, "secret/db", &[]);
    assert_eq!(vm.psql_user(), SCRAM_USER);
    assert_eq!(refreshes(&agent, "ok"), 1, "one login");
    // past two thirds of the 6 s (4 s), before the end: the next session renews the token
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(vm.psql_user(), SCRAM_USER);
    assert_eq!(refreshes(&agent, "ok"), 2);
    assert_eq!(refreshes(&agent, "failed"), 0);
    agent.wait_log("vault token renewed", 1);
    assert!(!agent.log().contains("logging in again"), "{}", agent.log());
    // the 6 s token renewed just now: its expiry is seconds away
    let row = status_row(&agent, "vm-store");
    assert!(row.contains("expires ") && row.contains(" s)"), "{row}");
    let (ok, line) = doctor(&agent, &[], "vm-store");
    assert!(ok, "{line}");
    assert!(
        line.contains("vault: entity ") && line.contains("policies default, reader"),
        "{line}"
    );
    assert_log_clean(&agent, &[&jwt]);
    assert!(agent.stop().success());
}

#[test]
fn vault_token_from_cert_auth_with_the_nodes_own_key() {
    let bao = OpenBao::start_tls_local();
    bao_with_secret(&bao);
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
    let vm = Vm::new();
    let store = format!(
        "  vault:\n    address: {}\n    tls: {{ca: {}}}\n    auth:\n      cert: {{certFile: {}, keyFile: {}, role: nodes}}\n",
        bao.url(),
        bao.ca().display(),
        cert.display(),
        key.display()
    );
    let agent = vm.agent(&store, "secret/db", &[]);
    assert_eq!(vm.psql_user(), SCRAM_USER);
    assert_eq!(refreshes(&agent, "ok"), 1);
    let (ok, line) = doctor(&agent, &[], "vm-store");
    assert!(ok, "{line}");
    assert!(
        line.contains("vault: entity ") && line.contains("policies default, reader"),
        "{line}"
    );
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    assert_log_clean(&agent, &[key_body]);
    assert!(agent.stop().success());
}

/// A Vault role that does not accept the machine's identity: the policy using that store fails
/// with one message naming the store and what to change (in the agent's log and in
/// `latch doctor`), and the policy whose store works keeps being served by the same agent.
#[test]
fn a_role_that_does_not_match_is_named_and_the_other_policies_keep_working() {
    let bao = OpenBao::start_local();
    bao_with_secret(&bao);
    let issuer = jwt_issuer(&bao);
    for (role, audience) in [("vm-node", "latch-agent"), ("billing", "billing-agents")] {
        bao.cli(&[
            "write",
            &format!("auth/jwt/role/{role}"),
            "role_type=jwt",
            &format!("bound_audiences={audience}"),
            "user_claim=sub",
            "token_policies=reader",
        ]);
    }
    let platform = TempDir::new("platform-token");
    let jwt = sign_jwt(issuer.path(), "vm-node-1", "latch-agent");
    let token_file = platform.write("oidc-token", &jwt);
    let vm = Vm::new();
    let billing_pg = PgCluster::start("127.0.0.3", SCRAM_PW, MD5_PW, PLAIN_PW);
    let spec = |role: &str| {
        format!(
            "  vault:\n    address: {}\n    insecure: true\n    auth:\n      jwt: {{role: {role}, tokenFile: {}}}\n",
            bao.url(),
            token_file.display()
        )
    };
    let yaml = format!(
        "{}---\n{}",
        store_and_policy(
            "vm-store",
            &spec("vm-node"),
            "orders-db",
            &vm.pg,
            "secret/db"
        ),
        store_and_policy(
            "billing-store",
            &spec("billing"),
            "billing-db",
            &billing_pg,
            "secret/db"
        ),
    );
    let agent = start_agent(&yaml, &vm.cg, &[]);

    let out = billing_pg
        .psql_in(&vm.cg, "app_without_password", APP_DB, "select 1")
        .env("PGCONNECT_TIMEOUT", "20")
        .output()
        .expect("run psql");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy \"billing-db\""), "{err}");
    let expected = "authentication to secret store \"billing-store\" (vault) failed: auth/jwt/login \
                    answered 400";
    agent.wait_log(expected, 1);
    agent.wait_log(
        "role \"billing\" at auth/jwt does not accept this machine's identity: check its bound \
         audiences",
        1,
    );
    // the other policy, same agent, same token file: served
    assert_eq!(vm.psql_user(), SCRAM_USER);

    let (ok, line) = doctor(&agent, &[], "billing-store");
    assert!(!ok, "doctor passed with a store that refuses the machine");
    assert!(
        line.starts_with("FAIL  store billing-store")
            && line.contains("role \"billing\" at auth/jwt"),
        "{line}"
    );
    assert!(line.contains("fix: "), "{line}");
    let (_, line) = doctor(&agent, &[], "vm-store");
    assert!(line.starts_with("ok    store vm-store"), "{line}");
    assert_log_clean(&agent, &[&jwt]);
    assert!(agent.stop().success());
}
