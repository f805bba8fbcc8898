//! Cancellation keys of relayed sessions. The application gets the server's own BackendKeyData
//! (so `pg_backend_pid()`, `pg_terminate_backend`, NOTIFY sender pids and `pg_stat_activity`
//! agree with what it holds); a CancelRequest arriving at latch is passed on only when it
//! names an open session by the namespace it comes from, the destination it was sent to and
//! the full key — so two servers that use the same pid, or the same address in two network
//! namespaces, never receive each other's cancels. Entries live as long as their session; the
//! map holds at most [`MAX_ENTRIES`]. Keys are secrets of their session: never in `Debug` or
//! logs.
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Sessions whose cancel requests latch passes on at once (beyond it, a session still runs,
/// but a cancel sent through latch for it is ignored, and counted).
pub const MAX_ENTRIES: usize = 65_536;

/// What names one session: the application's network namespace, where it connected, the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub netns: u64,
    pub dst: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

impl fmt::Debug for CancelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelKey")
            .field("netns", &self.netns)
            .field("dst", &self.dst)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The policy the session was brokered under; a CancelRequest must arrive under it too.
    policy: String,
    /// Tells a session from a later one with the same key.
    generation: u64,
}

/// The open relayed sessions, by [`CancelKey`].
#[derive(Default)]
pub struct CancelMap {
    inner: Mutex<HashMap<CancelKey, Entry>>,
    next: AtomicU64,
    /// Sessions not registered because the map was full.
    overflowed: AtomicU64,
}

impl fmt::Debug for CancelMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelMap")
            .field("sessions", &self.len())
            .field("overflowed", &self.overflowed())
            .finish()
    }
}

impl CancelMap {
    /// Records an open session; it is forgotten when the guard drops. `None` when the map is
    /// full.
    pub fn register(&self, key: CancelKey, policy: &str) -> Option<CancelGuard<'_>> {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // The same key again means the server reused it: the older session is over.
        map.insert(
            key,
            Entry {
                policy: policy.to_owned(),
                generation,
            },
        );
        Some(CancelGuard {
            map: self,
            key,
            generation,
        })
    }

    /// The policy of the open session `key` names, if any.
    pub fn lookup(&self, key: &CancelKey) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|e| e.policy.clone())
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions not registered because the map was full, since start.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

/// One open session in the map; dropping it forgets the session.
pub struct CancelGuard<'a> {
    map: &'a CancelMap,
    key: CancelKey,
    generation: u64,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.map.inner.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|e| e.generation == self.generation)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(netns: u64, dst: &str, pid: i32, secret: i32) -> CancelKey {
        CancelKey {
            netns,
            dst: dst.parse().unwrap(),
            pid,
            secret,
        }
    }

    #[test]
    fn a_cancel_names_its_session_by_namespace_destination_and_whole_key() {
        let map = CancelMap::default();
        let a = key(1, "127.0.0.2:5432", 4242, 7);
        let guard = map.register(a, "db").unwrap();
        assert_eq!(map.lookup(&a).as_deref(), Some("db"));
        // Another server with the same pid, the same address in another namespace, another
        // secret: none of them is this session.
        for other in [
            key(1, "127.0.0.3:5432", 4242, 7),
            key(2, "127.0.0.2:5432", 4242, 7),
            key(1, "127.0.0.2:5432", 4242, 8),
        ] {
            assert_eq!(map.lookup(&other), None, "{other:?}");
        }
        let b = key(1, "127.0.0.3:5432", 4242, 9);
        let other = map.register(b, "db2").unwrap();
        assert_eq!(map.lookup(&b).as_deref(), Some("db2"));
        drop(guard);
        assert_eq!(map.lookup(&a), None);
        assert_eq!(map.lookup(&b).as_deref(), Some("db2"));
        drop(other);
        assert!(map.is_empty());
        let shown = format!("{a:?} {map:?}");
        assert!(
            !shown.contains("4242") && !shown.contains("secret"),
            "{shown}"
        );
    }

    #[test]
    fn a_reused_key_outlives_the_older_guard_and_a_full_map_counts_what_it_drops() {
        let map = CancelMap::default();
        let a = key(1, "127.0.0.2:5432", 1, 1);
        let old = map.register(a, "db").unwrap();
        let new = map.register(a, "db").unwrap();
        drop(old);
        assert!(map.lookup(&a).is_some());
        drop(new);
        assert!(map.is_empty());

        let guards: Vec<_> = (0..MAX_ENTRIES as i32)
            .map(|i| map.register(key(1, "127.0.0.2:5432", i, 0), "db").unwrap())
            .collect();
        assert!(
            map.register(key(1, "127.0.0.2:5432", -1, 0), "db")
                .is_none()
        );
        assert_eq!(map.overflowed(), 1);
        drop(guards);
        assert!(map.is_empty());
    }
}
