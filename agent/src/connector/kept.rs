//! Idle target connections kept after the application connection they served ended, for the
//! next application connection that would make the same connection (clients that open a
//! connection per request then cost the target no new connection, handshake or login).
//! HTTP/1.1 ([`super::http::pool`]) and MySQL ([`super::mysql::pool`]) keep theirs here.
//!
//! A connection is only ever handed to a session with the same [`Key`]: the same policy,
//! target address, network namespace (target sockets are dialled in the application's),
//! workload (cgroup) and TLS client configuration (its fingerprint covers the `tls` block, the
//! CA file and the mTLS certificate and key). What else must match, and when a connection is
//! fit to keep, is the protocol's ([`Keep`]). Bounds: [`MAX_PER_KEY`] idle per key (the
//! oldest goes), [`MAX_PER_WORKLOAD`] per workload and [`MAX_TOTAL`] in all (past them a
//! connection is closed, not kept), each kept at most [`IDLE_TIMEOUT`] (dropped when taken or
//! by a sweep every [`SWEEP_EVERY`] while anything is kept).
//!
//! Which one: the newest that lives on the taking connection thread ([`Keep::home`]), else the
//! newest, moved to the taker's thread where it can be (MySQL's by [`Keep::rehome`]; HTTP's
//! by the session that takes it, which has to wait for the old thread to let go of it:
//! `http::target::Target::here`). A session using a connection that lives on another thread
//! is woken through that thread for every event (an event there, then an eventfd write
//! across), and so is every later session on it: with MySQL sessions kept for
//! connect-per-query clients, moving them took sysbench from 4 250 to 4 478 connections a
//! second (means of four alternating runs, 2 CPUs); with HTTP, wrk through an http policy
//! with one connection per request from about 11 000 to 12 300 requests a second.
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    broker::workers,
    connector::{Context, target_tls},
    identity::exe::{ExeId, ExeRecord},
    origin::Origin,
};

/// The most idle connections kept for one key.
pub const MAX_PER_KEY: usize = 32;
/// The most idle connections kept in all (per protocol).
pub const MAX_TOTAL: usize = 1024;
/// The most idle connections kept for one workload (cgroup), whatever its keys: a workload
/// that makes many keys (programs, policies, targets) cannot take the whole pool from the
/// others.
pub const MAX_PER_WORKLOAD: usize = 128;
/// How long an idle connection is kept: shorter than common servers' idle timeouts (nginx's
/// keep-alive 75 s, MySQL's `wait_timeout` 8 h; Apache's 5 s is the exception: a connection
/// it closed is dropped when taken).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often expired connections are closed while any are kept.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A kept connection: whether it can still serve a session (not closed by the target, nothing
/// unread on it), and which connection thread it lives on.
pub trait Keep: Send + 'static {
    fn usable(&self) -> bool;

    /// The connection thread ([`workers::current`]) whose reactor has its socket (and that
    /// runs its tasks, if it has any). A session on another thread is woken through that one
    /// for every event: an event there, then a wake-up across.
    fn home(&self) -> Option<u64>;

    /// Whether [`Keep::rehome`] moves it.
    const MOVABLE: bool = false;

    /// Moves the connection to the caller's connection thread (its socket to this thread's
    /// reactor), where it is [`Keep::MOVABLE`].
    fn rehome(&mut self) {}
}

/// What must be equal for a kept connection to be reused.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub(crate) policy: String,
    pub(crate) addr: SocketAddr,
    /// The application's network namespace (its cookie; whether latch dials in it).
    pub(crate) netns: (u64, bool),
    /// The workload's cgroup.
    pub(crate) cgroup: u64,
    /// The executable that connected, where the protocol keys by it ([`Key::by_executable`]).
    pub(crate) exe: Option<ExeId>,
    /// The TLS client configuration's fingerprint (`None`: plain TCP).
    pub(crate) tls: Option<[u8; 32]>,
}

impl Key {
    /// The key of the connection a session of `cx` makes to `addr`; `None` when the TLS
    /// configuration cannot be resolved now (then nothing is pooled).
    pub async fn of(cx: &Context<'_>, addr: SocketAddr) -> Option<Key> {
        let tls = if cx.policy.tls.mode == crate::config::TlsMode::Disable {
            None
        } else {
            Some(
                target_tls::client_fingerprint(cx.policy, cx.env)
                    .await
                    .ok()?,
            )
        };
        Some(Key {
            policy: cx.policy.name.clone(),
            addr,
            netns: (cx.origin.netns_cookie, cx.origin.netns.is_some()),
            cgroup: cx.origin.cgroup_id,
            exe: None,
            tls,
        })
    }

    /// The key, narrowed to the executable that connected (as the kernel recorded it), for
    /// protocols whose sessions are shaped by the client program's library and options.
    pub fn by_executable(mut self, origin: &Origin) -> Key {
        self.exe = match origin.exe {
            ExeRecord::Recorded(id) => Some(id),
            ExeRecord::Unrecorded(_) => None,
        };
        self
    }
}

/// The kept connections (shared by one connector's sessions; clones share them).
pub struct Pool<T> {
    inner: Arc<Mutex<State<T>>>,
    /// [`MAX_TOTAL`] (smaller in tests).
    max_total: usize,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            max_total: self.max_total,
        }
    }
}

impl<T: Keep> Default for Pool<T> {
    fn default() -> Self {
        Self::with_bound(MAX_TOTAL)
    }
}

struct State<T> {
    idle: HashMap<Key, VecDeque<Idle<T>>>,
    total: usize,
    /// How many are kept per workload (cgroup id); no zero entries.
    workloads: HashMap<u64, usize>,
    /// A sweep task is running.
    sweeping: bool,
}

struct Idle<T> {
    conn: T,
    since: Instant,
}

impl<T: Keep> Idle<T> {
    fn usable(&self, now: Instant) -> bool {
        now.duration_since(self.since) < IDLE_TIMEOUT && self.conn.usable()
    }
}

impl<T: Keep> State<T> {
    /// How many connections are kept for workload `cgroup`.
    fn workload(&self, cgroup: u64) -> usize {
        self.workloads.get(&cgroup).copied().unwrap_or(0)
    }

    /// Counts `n` connections of workload `cgroup` gone.
    fn gone(&mut self, cgroup: u64, n: usize) {
        self.total -= n;
        if let Some(c) = self.workloads.get_mut(&cgroup) {
            *c -= n;
            if *c == 0 {
                self.workloads.remove(&cgroup);
            }
        }
    }

    /// Takes out every expired or closed connection, for the caller to drop once the lock
    /// is released (closing one writes to its socket: a MySQL session says COM_QUIT).
    #[must_use = "the connections taken out are closed when dropped, after the lock"]
    fn sweep(&mut self, now: Instant) -> Vec<Idle<T>> {
        let (mut total, mut workloads, mut gone) = (0, HashMap::new(), Vec::new());
        self.idle.retain(|k, q| {
            let (live, dead): (VecDeque<_>, VecDeque<_>) =
                std::mem::take(q).into_iter().partition(|i| i.usable(now));
            *q = live;
            gone.extend(dead);
            total += q.len();
            if !q.is_empty() {
                *workloads.entry(k.cgroup).or_default() += q.len();
            }
            !q.is_empty()
        });
        self.total = total;
        self.workloads = workloads;
        gone
    }
}

impl<T: Keep> Pool<T> {
    /// A pool keeping at most `max_total` connections.
    pub fn with_bound(max_total: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                idle: HashMap::new(),
                total: 0,
                workloads: HashMap::new(),
                sweeping: false,
            })),
            max_total,
        }
    }

    /// The most recently kept usable connection for `key` that lives on this connection
    /// thread, else the most recent one (moved here if it can be, [`Keep::MOVABLE`]).
    /// Expired or closed ones met on the way are dropped.
    pub fn take(&self, key: &Key) -> Option<T> {
        self.take_at(key, Instant::now())
    }

    /// [`Pool::take`] as at `now`.
    pub(crate) fn take_at(&self, key: &Key, now: Instant) -> Option<T> {
        let here = workers::current();
        let mut dropped = Vec::new();
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        let q = state.idle.get_mut(key)?;
        let mut found = None;
        loop {
            let next = match q.iter().rposition(|i| i.conn.home() == here) {
                Some(at) => q.remove(at),
                None => q.pop_back(),
            };
            let Some(i) = next else { break };
            if i.usable(now) {
                found = Some(i.conn);
                break;
            }
            dropped.push(i);
        }
        let (taken, empty) = (dropped.len() + usize::from(found.is_some()), q.is_empty());
        if empty {
            state.idle.remove(key);
        }
        state.gone(key.cgroup, taken);
        drop(guard);
        drop(dropped);
        let mut found = found?;
        if T::MOVABLE && found.home() != here {
            found.rehome();
        }
        Some(found)
    }

    /// Keeps `conn` for `key` if it is usable and the bounds allow (else it is dropped).
    pub fn put(&self, key: Key, conn: T) {
        if !conn.usable() {
            return;
        }
        let now = Instant::now();
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Full for it: it would be one more (not in place of its key's oldest) past the total
        // or its workload's bound.
        let full = |s: &State<T>| {
            let replaces = s.idle.get(&key).is_some_and(|q| q.len() >= MAX_PER_KEY);
            !replaces && (s.total >= self.max_total || s.workload(key.cgroup) >= MAX_PER_WORKLOAD)
        };
        let mut swept = Vec::new();
        if full(&state) {
            swept = state.sweep(now);
            if full(&state) {
                drop(state);
                drop((conn, swept));
                return;
            }
        }
        let cgroup = key.cgroup;
        let q = state.idle.entry(key).or_default();
        let oldest = (q.len() >= MAX_PER_KEY).then(|| q.pop_front()).flatten();
        q.push_back(Idle { conn, since: now });
        if oldest.is_none() {
            state.total += 1;
            *state.workloads.entry(cgroup).or_default() += 1;
        }
        if !state.sweeping {
            state.sweeping = true;
            tokio::spawn(sweeper(Arc::downgrade(&self.inner)));
        }
        drop(state);
        drop((oldest, swept));
    }

    /// Closes every kept connection.
    pub fn clear(&self) {
        self.clear_policies(&|_| true);
    }

    /// Closes the kept connections made under the policies `changed` names.
    pub fn clear_policies(&self, changed: &dyn Fn(&str) -> bool) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        let keys: Vec<Key> = (state.idle.keys())
            .filter(|k| changed(&k.policy))
            .cloned()
            .collect();
        let mut gone = Vec::new();
        for k in &keys {
            if let Some(q) = state.idle.remove(k) {
                state.gone(k.cgroup, q.len());
                gone.push(q);
            }
        }
        drop(guard);
        drop(gone);
    }

    /// How many connections are kept.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes expired connections every [`SWEEP_EVERY`] until none are kept (or the pool goes).
async fn sweeper<T: Keep>(pool: Weak<Mutex<State<T>>>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut state = pool.lock().unwrap_or_else(|p| p.into_inner());
        let swept = state.sweep(Instant::now());
        let done = state.total == 0;
        if done {
            state.sweeping = false;
        }
        drop(state);
        drop(swept);
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::workers::Workers;

    /// A kept connection that only says where it lives (`moved`: by [`Keep::rehome`]).
    struct Conn {
        id: u32,
        home: Option<u64>,
        moved: bool,
    }

    impl Keep for Conn {
        fn usable(&self) -> bool {
            true
        }

        fn home(&self) -> Option<u64> {
            self.home
        }
    }

    /// The same, movable.
    struct Movable(Conn);

    impl Keep for Movable {
        fn usable(&self) -> bool {
            true
        }

        fn home(&self) -> Option<u64> {
            self.0.home
        }

        const MOVABLE: bool = true;

        fn rehome(&mut self) {
            self.0.home = workers::current();
            self.0.moved = true;
        }
    }

    fn key() -> Key {
        Key {
            policy: "p".into(),
            addr: "127.0.0.1:80".parse().unwrap(),
            netns: (1, false),
            cgroup: 7,
            exe: None,
            tls: None,
        }
    }

    /// `f`'s result, run on connection thread `i`.
    fn on<R: Send + 'static>(w: &Workers, i: usize, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        w.handle(i).spawn(async move {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn a_connection_thread_takes_the_kept_connections_that_live_on_it_first() {
        let w = Workers::start(2).unwrap();
        let threads = [on(&w, 0, workers::current), on(&w, 1, workers::current)];
        assert!(threads[0].is_some() && threads[0] != threads[1]);
        let pool = Pool::<Conn>::default();
        // Kept in this order: 1 lives on thread 0, 2 on thread 1 (the newest).
        for (id, home) in [(1, threads[0]), (2, threads[1])] {
            let p = pool.clone();
            on(&w, 0, move || {
                let moved = false;
                p.put(key(), Conn { id, home, moved })
            });
        }
        let take = |i| {
            let p = pool.clone();
            on(&w, i, move || p.take(&key()).map(|c| (c.id, c.moved)))
        };
        assert_eq!(take(0), Some((1, false)), "thread 0 took another thread's");
        // Only thread 1's is left: thread 0 has it where it lives (not movable), then none.
        assert_eq!(take(0), Some((2, false)));
        assert_eq!(take(0), None);
    }

    #[test]
    fn a_movable_kept_connection_of_another_thread_is_moved_to_the_one_that_takes_it() {
        let w = Workers::start(2).unwrap();
        let there = on(&w, 1, workers::current);
        let pool = Pool::<Movable>::default();
        let p = pool.clone();
        on(&w, 1, move || {
            let (id, home, moved) = (1, there, false);
            p.put(key(), Movable(Conn { id, home, moved }))
        });
        let p = pool.clone();
        let (moved, home, here) = on(&w, 0, move || {
            let c = p.take(&key()).unwrap();
            (c.0.moved, c.0.home, workers::current())
        });
        assert!(
            moved && home == here,
            "not moved to the thread that took it"
        );
        // One that lives where it is taken is not moved.
        let p = pool.clone();
        let moved = on(&w, 1, move || {
            let (id, home, moved) = (2, workers::current(), false);
            p.put(key(), Movable(Conn { id, home, moved }));
            p.take(&key()).unwrap().0.moved
        });
        assert!(!moved);
    }

    #[test]
    fn clearing_policies_closes_only_what_was_kept_under_them() {
        let w = Workers::start(1).unwrap();
        let pool = Pool::<Conn>::default();
        let p = pool.clone();
        let left = on(&w, 0, move || {
            for (id, policy) in [(1, "a"), (2, "b"), (3, "a")] {
                let mut k = key();
                k.policy = policy.into();
                let (home, moved) = (workers::current(), false);
                p.put(k, Conn { id, home, moved });
            }
            p.clear_policies(&|policy| policy == "a");
            let mut b = key();
            b.policy = "b".into();
            let mut a = key();
            a.policy = "a".into();
            (p.len(), p.take(&a).map(|c| c.id), p.take(&b).map(|c| c.id))
        });
        assert_eq!(left, (1, None, Some(2)));
    }

    #[test]
    fn a_workload_with_many_keys_keeps_at_most_its_share_and_others_still_keep() {
        let w = Workers::start(1).unwrap();
        let pool = Pool::<Conn>::default();
        let p = pool.clone();
        let (kept, other) = on(&w, 0, move || {
            // One workload, five programs: 5 × 32 connections.
            for i in 0..5 * MAX_PER_KEY {
                let mut k = key();
                k.exe = Some(ExeId {
                    dev: 1,
                    ino: (i / MAX_PER_KEY) as u64,
                });
                let (id, home, moved) = (i as u32, workers::current(), false);
                p.put(k, Conn { id, home, moved });
            }
            let kept = p.len();
            // One taken makes room for one more of its workload.
            let mut full = key();
            full.exe = Some(ExeId { dev: 1, ino: 0 });
            let one = p.take(&full).unwrap();
            let mut fifth = key();
            fifth.exe = Some(ExeId { dev: 1, ino: 4 });
            p.put(fifth.clone(), one);
            assert_eq!(p.len(), MAX_PER_WORKLOAD);
            assert!(p.take(&fifth).is_some(), "no room made by the one taken");
            let mut k = key();
            k.cgroup = 8;
            let (home, moved) = (workers::current(), false);
            p.put(k.clone(), Conn { id: 9, home, moved });
            (kept, p.take(&k).map(|c| c.id))
        });
        assert_eq!(kept, MAX_PER_WORKLOAD);
        assert_eq!(other, Some(9), "another workload could not keep one");
    }

    /// A kept connection that can be closed from outside, and that notes on its drop whether
    /// the pool's lock was free (closing a MySQL session writes to its socket).
    struct Closing {
        open: Arc<std::sync::atomic::AtomicBool>,
        pool: Weak<Mutex<State<Closing>>>,
        dropped_unlocked: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Keep for Closing {
        fn usable(&self) -> bool {
            self.open.load(std::sync::atomic::Ordering::Relaxed)
        }

        fn home(&self) -> Option<u64> {
            None
        }
    }

    impl Drop for Closing {
        fn drop(&mut self) {
            if let Some(pool) = self.pool.upgrade()
                && pool.try_lock().is_ok()
            {
                self.dropped_unlocked
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn a_sweep_closes_what_it_takes_out_after_letting_the_pool_go() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let w = Workers::start(1).unwrap();
        let pool = Pool::<Closing>::with_bound(1);
        let unlocked = Arc::new(AtomicUsize::new(0));
        let first = Arc::new(AtomicBool::new(true));
        let conn = |open: &Arc<AtomicBool>| Closing {
            open: open.clone(),
            pool: Arc::downgrade(&pool.inner),
            dropped_unlocked: unlocked.clone(),
        };
        let (a, b) = (conn(&first), conn(&Arc::new(AtomicBool::new(true))));
        let p = pool.clone();
        on(&w, 0, move || {
            p.put(key(), a);
            // The first one closes; the pool is full, so keeping the second sweeps it out.
            first.store(false, Ordering::Relaxed);
            let mut other = key();
            other.cgroup = 8;
            p.put(other, b);
        });
        assert_eq!(pool.len(), 1);
        assert_eq!(
            unlocked.load(Ordering::Relaxed),
            1,
            "the swept connection was closed with the pool locked"
        );
    }
}
