//! How often each store's own credential was obtained (AWS temporary credentials fetched, Vault
//! logins and token renewals) and how often that failed, since start: read by `/metrics`
//! (`latch_store_credential_refreshes{store,result}`). Bounded: stores are named by the
//! configuration, and at most [`MAX_STORES`] names are kept.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Store names kept at most (names beyond are not counted).
pub const MAX_STORES: usize = 1024;

static COUNTS: Mutex<BTreeMap<String, Counts>> = Mutex::new(BTreeMap::new());

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub failed: u64,
}

/// Counts one attempt of `store` to obtain or renew its credential.
pub fn record(store: &str, ok: bool) {
    let mut counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    if !counts.contains_key(store) && counts.len() >= MAX_STORES {
        return;
    }
    let c = counts.entry(store.to_owned()).or_default();
    if ok {
        c.ok += 1;
    } else {
        c.failed += 1;
    }
}

/// The counts of `store` so far.
pub fn of(store: &str) -> Counts {
    let counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    counts.get(store).copied().unwrap_or_default()
}

/// Every store's counts, by name.
pub fn snapshot() -> Vec<(String, Counts)> {
    let counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_store() {
        let before = of("stats-test");
        record("stats-test", true);
        record("stats-test", false);
        record("stats-test", true);
        let after = of("stats-test");
        assert_eq!(after.ok - before.ok, 2);
        assert_eq!(after.failed - before.failed, 1);
        assert!(snapshot().iter().any(|(n, _)| n == "stats-test"));
    }
}
