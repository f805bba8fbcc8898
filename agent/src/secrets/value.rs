//! What stores return and what the resolver hands to connectors.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use crate::config::SecretString;

/// One secret as a store holds it: a single value, or named fields (`username`, `password`, …).
/// `Debug` shows field names only.
#[derive(Clone)]
pub enum Secret {
    Value(SecretString),
    Fields(BTreeMap<String, SecretString>),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("Secret::Value(<redacted>)"),
            Secret::Fields(m) => f
                .debug_tuple("Secret::Fields")
                .field(&m.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// The credentials a connector authenticates with. `Debug` prints `<redacted>` for the values.
#[derive(Clone, Default)]
pub struct Credentials {
    /// `None` when the policy names no username: the connector keeps the one the application
    /// sent.
    pub username: Option<SecretString>,
    pub password: Option<SecretString>,
    /// When these stop being valid (a dynamic lease's end), if known.
    pub expires_at: Option<Instant>,
}

impl Credentials {
    pub fn new(username: Option<SecretString>, password: Option<SecretString>) -> Credentials {
        Credentials {
            username,
            password,
            expires_at: None,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |v: &Option<SecretString>| if v.is_some() { "<redacted>" } else { "<none>" };
        f.debug_struct("Credentials")
            .field("username", &shown(&self.username))
            .field("password", &shown(&self.password))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Credentials minted by a dynamic-secrets engine, with the lease's end.
#[derive(Clone, Debug)]
pub struct DynamicCredentials {
    pub username: SecretString,
    pub password: SecretString,
    pub expires_at: Option<Instant>,
}
