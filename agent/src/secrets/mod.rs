//! Secret resolution: a policy's credentials, fetched from its secret store when a connection
//! needs them.
//!
//! - [`Resolver`] is what connectors use: [`Resolver::credentials`] per connection,
//!   [`Resolver::refresh`] once after the target refused cached credentials,
//!   [`Resolver::shutdown`] when the agent stops (revoking dynamic leases if configured).
//! - Concurrent requests for the same secret share one store fetch ([`flight`]); a policy's
//!   `cache_ttl` keeps resolved credentials for that long ([`cache`]).
//! - Stores implement [`Store`]: [`file`] (the embedded default), [`env`], [`exec`],
//!   [`literal`] (development switch only), [`vault`] (Vault/OpenBao), [`aws`] (Secrets
//!   Manager), [`kubernetes`] (Secrets through the API server).
//! - Values are [`SecretString`](crate::config::SecretString)s: wiped on drop, `<redacted>` in
//!   `Debug`; [`SecretError`] texts name stores, paths and fields, never values.

pub mod aws;
pub mod cache;
pub mod child_env;
pub mod credential_stats;
pub mod env;
pub mod error;
pub mod exec;
pub mod file;
mod file_watch;
pub mod flight;
pub mod health;
mod http;
mod in_force;
pub mod kubernetes;
pub mod literal;
pub mod resolver;
pub mod store;
pub mod value;
pub mod vault;

pub use error::SecretError;
pub use in_force::{MIN_REFRESH_INTERVAL, Secrets};
pub use resolver::{Resolver, ResolverOptions};
pub use store::{BoxFuture, Expiry, Identity, LeaseExpiry, Lookup, Store};
pub use value::{Credentials, DynamicCredentials, Secret};
