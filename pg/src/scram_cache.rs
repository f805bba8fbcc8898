//! A bounded cache of SCRAM keys, so PBKDF2 (4096 HMAC rounds with PostgreSQL's defaults) runs
//! once per password and salt instead of once per connection.
//!
//! An entry is found only by everything the keys depend on: the scope (target and user), the
//! server's salt and iteration count, and the password — held as an HMAC under a key drawn at
//! random for this process, never as the password. A rotated password or a salt changed on the
//! server (a new `ALTER ROLE ... PASSWORD`) misses and derives afresh. Values are
//! [`ScramKeys`], wiped when evicted or dropped.
use std::{collections::HashMap, sync::Mutex};

use zeroize::Zeroizing;

use super::scram::{ScramKeys, hmac};

/// Entries kept by default: one per (target, user, password, salt) in use.
pub const DEFAULT_CAPACITY: usize = 1024;

#[derive(Hash, PartialEq, Eq)]
struct Key {
    scope: String,
    salt: Vec<u8>,
    iterations: u32,
    /// HMAC-SHA-256 of the (normalized) password under the cache's random key.
    password: [u8; 32],
}

struct Entry {
    keys: ScramKeys,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Entry>,
    clock: u64,
    hits: u64,
    misses: u64,
}

pub struct ScramKeyCache {
    inner: Mutex<Inner>,
    fingerprint_key: Zeroizing<[u8; 32]>,
    capacity: usize,
}

impl std::fmt::Debug for ScramKeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramKeyCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Default for ScramKeyCache {
    fn default() -> Self {
        ScramKeyCache::new(DEFAULT_CAPACITY)
    }
}

impl ScramKeyCache {
    /// A cache of at most `capacity` entries (at least one); the least recently used goes first.
    pub fn new(capacity: usize) -> ScramKeyCache {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut key[..]).expect("operating system random source");
        ScramKeyCache {
            inner: Mutex::new(Inner::default()),
            fingerprint_key: key,
            capacity: capacity.max(1),
        }
    }

    /// The keys for `password` with `salt` and `iterations` under `scope`: cached, or derived
    /// now (outside the lock) and kept.
    pub fn keys(&self, scope: &str, password: &[u8], salt: &[u8], iterations: u32) -> ScramKeys {
        let key = Key {
            scope: scope.to_owned(),
            salt: salt.to_vec(),
            iterations,
            password: hmac(&self.fingerprint_key[..], password),
        };
        {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            if let Some(e) = inner.map.get_mut(&key) {
                e.last_used = now;
                let keys = e.keys.clone();
                inner.hits += 1;
                return keys;
            }
            inner.misses += 1;
        }
        let keys = ScramKeys::derive(password, salt, iterations);
        let mut inner = self.lock();
        if inner.map.len() >= self.capacity && !inner.map.contains_key(&key) {
            let oldest = inner
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| Key {
                    scope: k.scope.clone(),
                    salt: k.salt.clone(),
                    iterations: k.iterations,
                    password: k.password,
                });
            if let Some(k) = oldest {
                inner.map.remove(&k);
            }
        }
        inner.clock += 1;
        let now = inner.clock;
        inner.map.insert(
            key,
            Entry {
                keys: keys.clone(),
                last_used: now,
            },
        );
        keys
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.hits, inner.misses)
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent map; keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: &[u8] = b"0123456789abcdef";

    #[test]
    fn hit_returns_the_derived_keys() {
        let c = ScramKeyCache::new(8);
        let a = c.keys("127.0.0.2:5432/app", b"s3cret", SALT, 4096);
        let b = c.keys("127.0.0.2:5432/app", b"s3cret", SALT, 4096);
        assert!(a.same_as(&b));
        assert!(a.same_as(&ScramKeys::derive(b"s3cret", SALT, 4096)));
        assert_eq!(c.stats(), (1, 1));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn rotated_password_misses() {
        let c = ScramKeyCache::new(8);
        let old = c.keys("t/app", b"old-password", SALT, 4096);
        let new = c.keys("t/app", b"new-password", SALT, 4096);
        assert!(!old.same_as(&new));
        assert!(new.same_as(&ScramKeys::derive(b"new-password", SALT, 4096)));
        assert_eq!(c.stats(), (0, 2));
    }

    #[test]
    fn changed_salt_or_iterations_or_scope_misses() {
        let c = ScramKeyCache::new(8);
        let a = c.keys("t/app", b"pw", SALT, 4096);
        let b = c.keys("t/app", b"pw", b"another-salt-val", 4096);
        assert!(!a.same_as(&b));
        c.keys("t/app", b"pw", SALT, 8192);
        c.keys("t/other", b"pw", SALT, 4096);
        assert_eq!(c.stats(), (0, 4));
    }

    #[test]
    fn bounded_least_recently_used_goes() {
        let c = ScramKeyCache::new(2);
        c.keys("a", b"pw", SALT, 1);
        c.keys("b", b"pw", SALT, 1);
        c.keys("a", b"pw", SALT, 1); // a is now the most recent
        c.keys("c", b"pw", SALT, 1); // evicts b
        assert_eq!(c.len(), 2);
        c.keys("a", b"pw", SALT, 1);
        assert_eq!(c.stats(), (2, 3));
        c.keys("b", b"pw", SALT, 1);
        assert_eq!(c.stats(), (2, 4));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let c = ScramKeyCache::new(2);
        let k = c.keys("a", b"pw", SALT, 1);
        assert_eq!(format!("{k:?}"), "ScramKeys(..)");
        assert!(!format!("{c:?}").contains("fingerprint"));
    }
}
