//! latch's configuration: typed, validated `SecretStore` and `Policy` resources loaded from
//! YAML, with errors that name file, line and column.
//!
//! ```text
//! let config = latch::config::load(&[PathBuf::from("/etc/latch/policies")])?;
//! for w in &config.warnings { eprintln!("warning: {w}"); }
//! ```
//!
//! A load is all or nothing: [`load`] returns every error it found (syntax, unknown or missing
//! fields with "did you mean" hints, bad values, unknown store references, duplicate names,
//! overlapping destinations), or the whole valid set with its warnings.
//!
//! Layout: [`yaml`] is the only module that knows the YAML parser; `decode*` read typed values
//! out of its located tree; `validate` runs the checks across documents; `load` reads files.

pub mod app_tls;
mod decode;
mod decode_http;
mod decode_pg_startup;
mod decode_policy;
mod decode_store;
mod diagnostic;
pub mod duration;
pub mod http;
mod load;
pub mod mlock;
mod net;
pub mod openapi;
mod policy;
pub mod schema;
mod schema_policy;
mod schema_store;
mod secret;
mod store;
mod suggest;
pub mod trust;
mod validate;
pub mod yaml;

#[cfg(test)]
mod http_tests;
#[cfg(test)]
mod pg_startup_tests;
#[cfg(test)]
mod schema_tests;
#[cfg(test)]
mod tests;

pub use app_tls::SslAnswer;
pub use diagnostic::{Diagnostic, LoadErrors, Location};
pub use http::{AppCredentials, AwsSigning, HttpSpec, Injection};
pub use load::{load, load_str, load_str_with};

/// Loads `paths` for the agent or `latch run`, which act on them as root: as [`load`], then
/// the files must be root's alone and every `exec` store's command in `allowed_exec` (see
/// [`trust`]).
pub fn load_trusted(
    paths: &[std::path::PathBuf],
    allowed_exec: &[std::path::PathBuf],
) -> Result<Config, LoadErrors> {
    trust::check_files(paths)?;
    let config = load(paths)?;
    trust::check_exec(&config, allowed_exec)?;
    Ok(config)
}

/// The agent's rule: admitting every workload is something a policy says (`workloads: all`).
/// (`latch run` does not apply it: its cgroup holds only its command.)
pub fn require_named_workloads(config: &Config) -> Result<(), LoadErrors> {
    let errors: Vec<Diagnostic> = config
        .warnings
        .iter()
        .filter(|w| w.message.contains("names no workloads"))
        .cloned()
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LoadErrors(errors))
    }
}
pub use net::{Cidr, PortRange};
pub use policy::{
    AppTlsMode, AuthSpec, ChannelBindingMode, Credentials, Destination, OptionsRule, Policy,
    Protocol, Role, SecretRef, ServerPublicKey, StartupRules, Target, TlsMode, TlsSpec,
    WorkloadSelector,
};
pub use secret::SecretString;
pub use store::{
    AwsAuth, AwsStore, CredentialSource, EnvStore, ExecStore, FileStore, KubernetesStore,
    LiteralSecret, LiteralStore, RoleIdSource, SecretStore, StoreBackend, VaultAuth, VaultStore,
    VaultTls,
};

/// The only `apiVersion` this agent reads.
pub const API_VERSION: &str = "latch.dev/v1alpha1";

/// A valid set of resources.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// In load order (files in the order given, directory entries by name, documents in order).
    pub policies: Vec<Policy>,
    pub stores: Vec<SecretStore>,
    /// Things that are allowed but deserve a look: policies without workloads, literal stores,
    /// plain-http Vault addresses, empty directories.
    pub warnings: Vec<Diagnostic>,
}

impl Config {
    pub fn store(&self, name: &str) -> Option<&SecretStore> {
        self.stores.iter().find(|s| s.name == name)
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }
}
