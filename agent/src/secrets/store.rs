//! The interface every secret store implements, and how the built-in ones are built from the
//! configuration.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::error::SecretError;
use super::value::{DynamicCredentials, Secret};
use super::{ResolverOptions, aws, env, exec, file, kubernetes, literal, vault};
use crate::config::{SecretStore, StoreBackend};

/// A boxed, sendable future (stores are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to read: a reference's path, version and (for [`Store::per_field`] stores) field.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    pub path: &'a str,
    /// Only set for stores that read one field at a time.
    pub field: Option<&'a str>,
    pub version: Option<&'a str>,
}

/// Who a store's own credential says the agent is ([`Store::identity`]): an AWS principal's
/// ARN, a Vault token's entity and display name, with the policies it carries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub principal: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// When the credential behind it expires, seconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// When a store's own credential and its dynamic leases stop working ([`Store::expiry`]),
/// seconds since the Unix epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Expiry {
    /// The store's own credential (AWS temporary credentials, a Vault token) held now; `None`
    /// when none is held yet or it does not expire.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_expires_at: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseExpiry>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseExpiry {
    pub path: String,
    pub expires_at: u64,
}

/// Seconds since the Unix epoch of `t`.
pub fn epoch_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Seconds since the Unix epoch of the monotonic instant `t`.
pub fn instant_epoch_secs(t: std::time::Instant) -> u64 {
    let now = std::time::Instant::now();
    let wall = if t >= now {
        std::time::SystemTime::now() + (t - now)
    } else {
        std::time::SystemTime::now() - (now - t)
    };
    epoch_secs(wall)
}

/// A source of secrets. Implementations put the store's name in their errors and never a value.
pub trait Store: Send + Sync + 'static {
    /// The backend name (`file`, `vault`, …).
    fn kind(&self) -> &'static str;

    /// `true` when a lookup reads one field (env, exec); `false` when it returns every field of
    /// a path at once, so a username and a password at the same path cost one fetch.
    fn per_field(&self) -> bool {
        false
    }

    /// Reads one secret.
    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>>;

    /// A username/password pair from a dynamic-secrets engine. `fresh` asks for new credentials
    /// instead of the current lease (after the target refused the current ones).
    fn dynamic<'a>(
        &'a self,
        path: &'a str,
        fresh: bool,
    ) -> BoxFuture<'a, Result<DynamicCredentials, SecretError>> {
        let _ = (path, fresh);
        Box::pin(async move {
            Err(SecretError::Unsupported {
                store: String::new(),
                kind: self.kind(),
                what: "dynamic credentials",
            })
        })
    }

    /// A cheap reachability check for `/readyz` (no secret is read): Vault's `sys/health`, a
    /// TCP connect to an API endpoint, a `stat` of a file. Stores with nothing to reach (env,
    /// exec, literal) are always healthy.
    fn health(&self) -> BoxFuture<'_, Result<(), SecretError>> {
        Box::pin(async { Ok(()) })
    }

    /// Who the store's own credential says the agent is, obtaining the credential if needed
    /// (for `latch doctor`); `None` for stores with no credential of their own (file, env).
    fn identity(&self) -> BoxFuture<'_, Option<Result<Identity, SecretError>>> {
        Box::pin(async { None })
    }

    /// When the credential and leases the store holds now expire (for `/status`); no I/O.
    fn expiry(&self) -> Expiry {
        Expiry::default()
    }

    /// Called once when the agent stops; `revoke` asks to revoke leases this store handed out.
    fn shutdown(&self, revoke: bool) -> BoxFuture<'_, ()> {
        let _ = revoke;
        Box::pin(async {})
    }
}

/// Builds the store a `SecretStore` resource describes. No I/O happens here: stores connect and
/// log in on first use.
pub fn build(spec: &SecretStore, opts: &ResolverOptions) -> Result<Arc<dyn Store>, SecretError> {
    let name = spec.name.clone();
    Ok(match &spec.backend {
        StoreBackend::File(f) => Arc::new(file::FileStore::new(name, f.path.clone())),
        StoreBackend::Env(e) => Arc::new(env::EnvStore::new(name, e.clone())),
        StoreBackend::Exec(e) => Arc::new(exec::ExecStore::new(name, e.clone())),
        StoreBackend::Literal(l) => {
            if !opts.allow_literal {
                return Err(SecretError::Config {
                    store: name,
                    reason: "a literal store keeps secrets in the configuration and is for development only; \
                             enable the development switch to use it"
                        .to_string(),
                });
            }
            tracing::warn!(store = %name, "using a literal secret store: secrets are written in the configuration (development only)");
            Arc::new(literal::LiteralStore::new(name, l.clone()))
        }
        StoreBackend::Vault(v) => Arc::new(vault::VaultStore::new(name, v.clone(), opts)?),
        StoreBackend::Aws(a) => Arc::new(aws::AwsStore::new(name, a.clone(), opts)?),
        StoreBackend::Kubernetes(k) => {
            Arc::new(kubernetes::KubernetesStore::new(name, k.clone(), opts)?)
        }
    })
}
