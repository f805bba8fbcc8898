//! Cancellation keys. The application gets latch's own random BackendKeyData; a CancelRequest
//! naming it (a redirected connection to the same destination) is forwarded to the real server
//! with the real key. Entries live as long as their session.
use std::{collections::HashMap, fmt, net::SocketAddr, sync::Mutex};

/// Where and how to cancel one session's running query.
#[derive(Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    /// The policy the session was brokered under; a CancelRequest must arrive under it too.
    pub policy: String,
}

impl fmt::Debug for CancelTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelTarget")
            .field("addr", &self.addr)
            .field("pid", &self.pid)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// latch's keys → the real servers' keys, for every open PostgreSQL session.
#[derive(Default)]
pub struct CancelMap {
    inner: Mutex<HashMap<(i32, i32), CancelTarget>>,
}

impl fmt::Debug for CancelMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelMap")
            .field("sessions", &self.len())
            .finish()
    }
}

impl CancelMap {
    /// Hands out a fresh random key for `target`; it is removed when the guard drops.
    pub fn register(&self, target: CancelTarget) -> CancelGuard<'_> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw).expect("operating system random source");
            // A positive process id, as PostgreSQL's are (some clients assume it).
            let pid = (i32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) & 0x7fff_ffff).max(1);
            let secret = i32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry((pid, secret)) {
                v.insert(target);
                return CancelGuard {
                    map: self,
                    key: (pid, secret),
                };
            }
        }
    }

    /// The session a CancelRequest names, if it is still open.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, secret))
            .cloned()
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// latch's key of one session; dropping it forgets the session.
pub struct CancelGuard<'a> {
    map: &'a CancelMap,
    key: (i32, i32),
}

impl CancelGuard<'_> {
    /// The (pid, secret) the application is given.
    pub fn key(&self) -> (i32, i32) {
        self.key
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.map
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_targets_until_the_guard_drops() {
        let map = CancelMap::default();
        let target = CancelTarget {
            addr: "127.0.0.2:5432".parse().unwrap(),
            pid: 4242,
            secret: 7,
            policy: "db".into(),
        };
        let guard = map.register(target.clone());
        let (pid, secret) = guard.key();
        assert!(pid > 0);
        assert_eq!(map.lookup(pid, secret), Some(target));
        assert_eq!(map.lookup(pid, secret.wrapping_add(1)), None);
        drop(guard);
        assert_eq!(map.lookup(pid, secret), None);
        assert!(map.is_empty());
        assert!(!format!("{:?}", map.lookup(1, 1)).contains("secret"));
    }
}
