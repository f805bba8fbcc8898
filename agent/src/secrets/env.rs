//! The `env` store: one environment variable per path and field, named by
//! [`crate::config::EnvStore::variable_name`].

use super::error::SecretError;
use super::store::{BoxFuture, Lookup, Store};
use super::value::Secret;
use crate::config::{self, SecretString};

pub struct EnvStore {
    name: String,
    spec: config::EnvStore,
}

impl EnvStore {
    pub fn new(name: String, spec: config::EnvStore) -> EnvStore {
        EnvStore { name, spec }
    }
}

impl Store for EnvStore {
    fn kind(&self) -> &'static str {
        "env"
    }

    fn per_field(&self) -> bool {
        true
    }

    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
        Box::pin(async move {
            let var = self.spec.variable_name(lookup.path, lookup.field);
            match std::env::var_os(&var) {
                Some(v) => match v.into_string() {
                    Ok(s) => Ok(Secret::Value(SecretString::new(s))),
                    Err(_) => Err(SecretError::Invalid {
                        store: self.name.clone(),
                        path: var,
                        reason: "the variable is not valid UTF-8".to_string(),
                    }),
                },
                None => Err(SecretError::NotFound {
                    store: self.name.clone(),
                    path: format!("{} (environment variable {var})", lookup.path),
                }),
            }
        })
    }
}
