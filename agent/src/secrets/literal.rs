//! The `literal` store: values written in the configuration. Only built behind the development
//! switch ([`super::ResolverOptions::allow_literal`]).

use super::error::SecretError;
use super::store::{BoxFuture, Lookup, Store};
use super::value::Secret;
use crate::config::{self, LiteralSecret};

pub struct LiteralStore {
    name: String,
    spec: config::LiteralStore,
}

impl LiteralStore {
    pub fn new(name: String, spec: config::LiteralStore) -> LiteralStore {
        LiteralStore { name, spec }
    }
}

impl Store for LiteralStore {
    fn kind(&self) -> &'static str {
        "literal"
    }

    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
        Box::pin(async move {
            match self.spec.values.get(lookup.path) {
                Some(LiteralSecret::Value(v)) => Ok(Secret::Value(v.clone())),
                Some(LiteralSecret::Fields(f)) => Ok(Secret::Fields(f.clone())),
                None => Err(SecretError::NotFound {
                    store: self.name.clone(),
                    path: lookup.path.to_string(),
                }),
            }
        })
    }
}
