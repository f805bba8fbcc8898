//! The one error type of secret resolution. Its texts name stores, paths, fields, files and
//! modes — never a secret value.

use std::time::Duration;

/// Why a secret could not be resolved. `Clone` because one store fetch may answer many waiting
/// connections.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The store did not answer: connection refused, DNS, TLS handshake, 5xx, a sealed Vault.
    #[error("secret store {store:?} ({kind}) is unreachable: {reason}")]
    Unreachable {
        store: String,
        kind: &'static str,
        reason: String,
    },
    /// The agent could not authenticate to the store (bad or expired token, failed login).
    #[error("authentication to secret store {store:?} ({kind}) failed: {reason}")]
    StoreAuth {
        store: String,
        kind: &'static str,
        reason: String,
    },
    /// The secret does not exist (or the agent is not told whether it does).
    #[error("secret {path:?} not found in store {store:?}")]
    NotFound { store: String, path: String },
    /// The secret exists but has no such field.
    #[error("secret {path:?} in store {store:?} has no field {field:?}")]
    FieldMissing {
        store: String,
        path: String,
        field: String,
    },
    /// A permission problem: a secrets file readable by others, a store denying access.
    #[error("permission problem with secret store {store:?}: {reason}")]
    Permission { store: String, reason: String },
    /// The store took longer than allowed.
    #[error("secret store {store:?} did not answer within {after:?}")]
    Timeout { store: String, after: Duration },
    /// The store answered something the agent cannot use (bad JSON, not UTF-8, wrong shape).
    #[error("secret store {store:?} gave an unusable answer for {path:?}: {reason}")]
    Invalid {
        store: String,
        path: String,
        reason: String,
    },
    /// The store's configuration cannot be used (e.g. a literal store without the development
    /// switch, an unreadable CA file).
    #[error("secret store {store:?} cannot be used: {reason}")]
    Config { store: String, reason: String },
    /// A reference names a store the resolver does not know.
    #[error("unknown secret store {0:?}")]
    UnknownStore(String),
    /// The store cannot do what was asked (e.g. dynamic credentials from a file store).
    #[error("secret store {store:?} ({kind}) does not support {what}")]
    Unsupported {
        store: String,
        kind: &'static str,
        what: &'static str,
    },
    /// The policy has no `credentials` block.
    #[error("policy {0:?} names no credentials")]
    NoCredentials(String),
}

impl SecretError {
    /// A short stable name for metrics labels and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            SecretError::Unreachable { .. } => "store_unreachable",
            SecretError::StoreAuth { .. } => "store_auth_failed",
            SecretError::NotFound { .. } => "not_found",
            SecretError::FieldMissing { .. } => "field_missing",
            SecretError::Permission { .. } => "permission",
            SecretError::Timeout { .. } => "timeout",
            SecretError::Invalid { .. } => "invalid_response",
            SecretError::Config { .. } => "config",
            SecretError::UnknownStore(_) => "unknown_store",
            SecretError::Unsupported { .. } => "unsupported",
            SecretError::NoCredentials(_) => "no_credentials",
        }
    }

    /// Whether trying again later may help (the store was down or slow), as opposed to a
    /// problem that needs a person (missing secret, denied access, bad configuration).
    /// What an application may be told: the kind of failure, without the store's name, address,
    /// paths or its own words (those go to the log and the audit trail).
    pub fn class(&self) -> &'static str {
        match self {
            SecretError::Unreachable { .. } | SecretError::Timeout { .. } => {
                "the secret store is unreachable"
            }
            SecretError::StoreAuth { .. } | SecretError::Permission { .. } => {
                "the agent is not allowed to read the secret store"
            }
            SecretError::NotFound { .. } | SecretError::FieldMissing { .. } => {
                "the secret is not in the store"
            }
            SecretError::Invalid { .. } => "the secret store gave an unusable answer",
            SecretError::Config { .. }
            | SecretError::UnknownStore(_)
            | SecretError::Unsupported { .. }
            | SecretError::NoCredentials(_) => "the policy's secret store is misconfigured",
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SecretError::Unreachable { .. } | SecretError::Timeout { .. }
        )
    }
}
