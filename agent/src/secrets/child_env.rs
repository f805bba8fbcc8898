//! What processes latch starts may see of its environment.
//!
//! The agent's environment can hold store credentials (`VAULT_TOKEN`, AWS keys, variables a
//! store's `auth` names) and the secrets of `env` stores themselves. A child inherits all of it
//! unless told otherwise, so:
//!
//! * an `exec` store's helper gets only a minimal environment ([`HELPER_KEEPS`]);
//! * `latch run`'s command keeps the environment its user gave it, less every variable the
//!   configuration reads secrets or store credentials from ([`Scrub`]).
use std::collections::BTreeSet;

use crate::config::{
    AwsAuth, Config, CredentialSource, Credentials, RoleIdSource, StoreBackend, VaultAuth,
};

/// The variables an `exec` helper keeps (when set): enough to find programs and behave.
pub const HELPER_KEEPS: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// Store credentials the SDKs and CLIs read from the environment whatever the configuration.
const WELL_KNOWN: &[&str] = &[
    "VAULT_TOKEN",
    "BAO_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// Gives `cmd` only the variables of [`HELPER_KEEPS`] that the agent has.
pub fn helper_env(cmd: &mut tokio::process::Command) {
    cmd.env_clear();
    for name in HELPER_KEEPS {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
}

/// The variables a configuration reads secrets or store credentials from.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scrub {
    /// Whole names.
    pub names: BTreeSet<String>,
    /// Prefixes of `env` stores (every variable starting with one is a secret).
    pub prefixes: BTreeSet<String>,
}

impl Scrub {
    pub fn of(config: &Config) -> Self {
        let mut scrub = Scrub {
            names: WELL_KNOWN.iter().map(|n| (*n).to_owned()).collect(),
            prefixes: BTreeSet::new(),
        };
        for store in &config.stores {
            match &store.backend {
                StoreBackend::Env(env) if !env.prefix.is_empty() => {
                    scrub.prefixes.insert(env.prefix.clone());
                }
                StoreBackend::Vault(v) => match &v.auth {
                    VaultAuth::Token(CredentialSource::Env(n)) => {
                        scrub.names.insert(n.clone());
                    }
                    VaultAuth::AppRole {
                        role_id, secret_id, ..
                    } => {
                        if let RoleIdSource::Env(n) = role_id {
                            scrub.names.insert(n.clone());
                        }
                        if let CredentialSource::Env(n) = secret_id {
                            scrub.names.insert(n.clone());
                        }
                    }
                    _ => {}
                },
                StoreBackend::Aws(a) if a.auth == AwsAuth::Env => {}
                _ => {}
            }
        }
        // An env store without a prefix reads any variable: scrub those the policies name.
        for block in config.policies.iter().flat_map(|p| p.credential_blocks()) {
            let Credentials::Static {
                username, password, ..
            } = block
            else {
                continue;
            };
            for r in [username, password].into_iter().flatten() {
                if let Some(StoreBackend::Env(env)) = config.store(&r.store).map(|s| &s.backend) {
                    scrub
                        .names
                        .insert(env.variable_name(&r.path, r.field.as_deref()));
                }
            }
        }
        scrub
    }

    /// Whether the variable `name` must not reach a child.
    pub fn hides(&self, name: &str) -> bool {
        self.names.contains(name) || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Removes every hidden variable the current process has from `cmd`'s environment.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_none_or(|n| self.hides(n)) {
                cmd.env_remove(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_credentials_and_env_store_secrets_are_hidden_and_the_rest_kept() {
        let text = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: pre}\n\
                    spec: {env: {prefix: APP_SECRET_}}\n---\n\
                    apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: bare}\n\
                    spec: {env: {}}\n---\n\
                    apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: v}\n\
                    spec:\n  vault:\n    address: https://vault.internal:8200\n    auth:\n      \
                    appRole: {roleId: {env: MY_ROLE}, secretId: {env: MY_SECRET_ID}}\n---\n\
                    apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {name: db}\nspec:\n  \
                    destination: {address: 10.0.0.1, port: 5432}\n  protocol: postgres\n  \
                    workloads: [{uid: 1}]\n  credentials:\n    store: bare\n    \
                    password: {path: orders-db, field: password}\n";
        let config = crate::config::load_str("s.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let scrub = Scrub::of(&config);
        for hidden in [
            "APP_SECRET_DB_PASSWORD",
            "ORDERS_DB_PASSWORD",
            "MY_ROLE",
            "MY_SECRET_ID",
            "VAULT_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(scrub.hides(hidden), "{hidden} reaches the child");
        }
        for kept in ["PATH", "HOME", "PGHOST", "APP_SECRET"] {
            assert!(!scrub.hides(kept), "{kept} was hidden");
        }
    }
}
