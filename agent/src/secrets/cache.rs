//! The per-policy credentials cache (`credentials.cache.ttl`).
//!
//! An entry is keyed by policy name and remembers the credentials block it was resolved for, so
//! a policy reloaded with other references never gets the old values. An entry never outlives
//! a dynamic lease's end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::value::Credentials;
use crate::config;

#[derive(Default)]
pub struct CredentialsCache {
    map: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    spec: config::Credentials,
    creds: Arc<Credentials>,
    expires: Instant,
}

impl CredentialsCache {
    pub fn get(
        &self,
        policy: &str,
        spec: &config::Credentials,
        now: Instant,
    ) -> Option<Arc<Credentials>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(policy)
            .filter(|e| now < e.expires && &e.spec == spec)
            .map(|e| e.creds.clone())
    }

    pub fn put(
        &self,
        policy: &str,
        spec: &config::Credentials,
        creds: Arc<Credentials>,
        ttl: Duration,
        now: Instant,
    ) {
        let mut expires = now + ttl;
        if let Some(end) = creds.expires_at {
            expires = expires.min(end);
        }
        if expires <= now {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, e| e.expires > now);
        map.insert(
            policy.to_string(),
            Entry {
                spec: spec.clone(),
                creds,
                expires,
            },
        );
    }

    pub fn remove(&self, policy: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(policy);
    }

    pub fn clear(&self) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
