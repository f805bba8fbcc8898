//! The `SecretStore` resource: where credentials come from and how the agent authenticates to it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::diagnostic::Location;
use super::secret::SecretString;

/// A validated `kind: SecretStore` document.
#[derive(Debug, Clone)]
pub struct SecretStore {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Where the document starts.
    pub source: Location,
    pub backend: StoreBackend,
}

/// Exactly one backend per store.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    File(FileStore),
    Env(EnvStore),
    Exec(ExecStore),
    /// Development only: the secrets sit in the configuration itself (the loader warns).
    Literal(LiteralStore),
    Vault(VaultStore),
    Aws(AwsStore),
    Kubernetes(KubernetesStore),
}

impl StoreBackend {
    /// The spec key naming this backend (`file`, `vault`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreBackend::File(_) => "file",
            StoreBackend::Env(_) => "env",
            StoreBackend::Exec(_) => "exec",
            StoreBackend::Literal(_) => "literal",
            StoreBackend::Vault(_) => "vault",
            StoreBackend::Aws(_) => "aws",
            StoreBackend::Kubernetes(_) => "kubernetes",
        }
    }

    /// Every backend key, in documentation order.
    pub const KINDS: [&'static str; 7] = [
        "file",
        "env",
        "exec",
        "literal",
        "vault",
        "aws",
        "kubernetes",
    ];
}

/// A local YAML file mapping secret paths to a value or to a mapping of fields, e.g.
/// `orders-db: {username: app, password: s3cret}`. The agent refuses it when group or world
/// readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStore {
    /// Absolute.
    pub path: PathBuf,
}

/// Secrets from the agent's environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvStore {
    /// Prepended to every variable name; may be empty.
    pub prefix: String,
}

impl EnvStore {
    /// The variable holding `path` (and `field`): the prefix, then path and field joined by `_`,
    /// uppercased, every character other than `A-Z`, `0-9` and `_` turned into `_`.
    /// `prefix: LATCH_`, `{path: orders-db, field: password}` → `LATCH_ORDERS_DB_PASSWORD`.
    pub fn variable_name(&self, path: &str, field: Option<&str>) -> String {
        let mut name = self.prefix.clone();
        let tail = match field {
            Some(f) => format!("{path}_{f}"),
            None => path.to_string(),
        };
        name.extend(tail.chars().map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        }));
        name
    }
}

/// A command run for each lookup, given the path (and field) as its last arguments; it prints
/// the value on standard output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecStore {
    /// argv; the first element is an absolute path.
    pub command: Vec<String>,
    /// Default 5s.
    pub timeout: Duration,
}

impl ExecStore {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
}

/// Secrets written in the configuration. Development only.
#[derive(Clone, Default)]
pub struct LiteralStore {
    pub values: BTreeMap<String, LiteralSecret>,
}

impl fmt::Debug for LiteralStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiteralStore")
            .field("values", &self.values)
            .finish()
    }
}

/// One path of a literal store: a single value, or fields (`{username: app, password: x}`).
/// `Debug` shows names only (the values are [`SecretString`]s).
#[derive(Debug, Clone)]
pub enum LiteralSecret {
    Value(SecretString),
    Fields(BTreeMap<String, SecretString>),
}

/// HashiCorp Vault or OpenBao.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultStore {
    /// `http://` or `https://` URL.
    pub address: String,
    /// Vault Enterprise / OpenBao namespace.
    pub namespace: Option<String>,
    /// The KV mount. When `None`, the first segment of a secret's path is the mount
    /// (`secret/orders-db`).
    pub mount: Option<String>,
    /// 1 or 2 (default 2).
    pub kv_version: u8,
    pub tls: VaultTls,
    pub auth: VaultAuth,
    /// Revoke the dynamic leases this agent obtained when it stops (`revokeOnShutdown`).
    pub revoke_on_shutdown: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VaultTls {
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// How the agent logs in to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// A token read from a file or an environment variable.
    Token(CredentialSource),
    AppRole {
        role_id: RoleIdSource,
        secret_id: CredentialSource,
        /// Default `approle`.
        mount: String,
    },
    Kubernetes {
        role: String,
        /// Default [`VaultAuth::DEFAULT_K8S_TOKEN_FILE`].
        token_file: PathBuf,
        /// Default `kubernetes`.
        mount: String,
    },
    /// The JWT/OIDC method: a token file (a projected, audience-bound service account token
    /// or any OIDC token) read again at each login.
    Jwt {
        role: String,
        token_file: PathBuf,
        /// Default `jwt`.
        mount: String,
    },
    /// TLS certificate auth: the node's own certificate and key, presented on the TLS
    /// connection (the store's address must be https).
    Cert {
        cert_file: PathBuf,
        key_file: PathBuf,
        /// The certificate role (`name`) to log in against; `None`: any role the certificate
        /// matches.
        role: Option<String>,
        /// Default `cert`.
        mount: String,
    },
    /// The `aws` method, IAM type: a signed `sts:GetCallerIdentity` made with the machine's
    /// AWS credentials (the SDKs' chain: environment, web identity, profile, container,
    /// instance metadata).
    Aws {
        role: String,
        /// Default `aws`.
        mount: String,
        /// The region the request is signed for; default `us-east-1`.
        region: String,
        /// The STS URL signed (Vault sends the request to its own `sts_endpoint`); default
        /// `https://sts.amazonaws.com/`.
        sts_endpoint: String,
        /// The `X-Vault-AWS-IAM-Server-ID` header, when the mount requires it.
        server_id: Option<String>,
    },
}

impl VaultAuth {
    pub const DEFAULT_K8S_TOKEN_FILE: &'static str =
        "/var/run/secrets/kubernetes.io/serviceaccount/token";
}

/// Where a secret the agent itself needs is read: a file or an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    File(PathBuf),
    Env(String),
}

/// An AppRole role id, which is not secret and may be written inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleIdSource {
    File(PathBuf),
    Env(String),
    Value(String),
}

/// AWS Secrets Manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsStore {
    pub region: String,
    /// Another endpoint URL (tests, local emulators).
    pub endpoint: Option<String>,
    pub auth: AwsAuth,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AwsAuth {
    /// The providers in the order the AWS SDKs try them (the default): environment, web
    /// identity (`AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`), shared profile, ECS container
    /// credentials, EC2 instance metadata (IMDSv2).
    #[default]
    Chain,
    /// `AWS_ACCESS_KEY_ID` etc. from the agent's environment.
    Env,
    /// The EC2 instance metadata service's role credentials (IMDSv2).
    Instance,
    /// The ECS/EKS container credentials endpoint (`AWS_CONTAINER_CREDENTIALS_*_URI`).
    Container,
    /// A named profile of the shared config files.
    Profile(String),
    WebIdentity {
        role_arn: String,
        token_file: PathBuf,
    },
}

/// Kubernetes Secrets read through the API server. A reference's path is `name` or
/// `namespace/name`, its field a key of the Secret's data. `None` fields: in-cluster defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubernetesStore {
    pub namespace: Option<String>,
    pub api_server: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}
