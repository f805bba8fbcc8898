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
//! oldest goes), [`MAX_TOTAL`] in all, each kept at most [`IDLE_TIMEOUT`] (dropped when taken
//! or by a sweep every [`SWEEP_EVERY`] while anything is kept).
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    connector::{Context, target_tls},
    identity::exe::{ExeId, ExeRecord},
    origin::Origin,
};

/// The most idle connections kept for one key.
pub const MAX_PER_KEY: usize = 32;
/// The most idle connections kept in all (per protocol).
pub const MAX_TOTAL: usize = 1024;
/// How long an idle connection is kept: shorter than common servers' idle timeouts (nginx's
/// keep-alive 75 s, MySQL's `wait_timeout` 8 h; Apache's 5 s is the exception: a connection
/// it closed is dropped when taken).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often expired connections are closed while any are kept.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A kept connection: whether it can still serve a session (not closed by the target, nothing
/// unread on it).
pub trait Keep: Send + 'static {
    fn usable(&self) -> bool;
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
    /// Drops every expired or closed connection.
    fn sweep(&mut self, now: Instant) {
        let mut total = 0;
        self.idle.retain(|_, q| {
            q.retain(|i| i.usable(now));
            total += q.len();
            !q.is_empty()
        });
        self.total = total;
    }
}

impl<T: Keep> Pool<T> {
    /// A pool keeping at most `max_total` connections.
    pub fn with_bound(max_total: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                idle: HashMap::new(),
                total: 0,
                sweeping: false,
            })),
            max_total,
        }
    }

    /// The most recently kept usable connection for `key`, if any (expired or closed ones met
    /// on the way are dropped).
    pub fn take(&self, key: &Key) -> Option<T> {
        self.take_at(key, Instant::now())
    }

    /// [`Pool::take`] as at `now`.
    pub(crate) fn take_at(&self, key: &Key, now: Instant) -> Option<T> {
        let mut dropped = Vec::new();
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        let q = state.idle.get_mut(key)?;
        let mut found = None;
        while let Some(i) = q.pop_back() {
            state.total -= 1;
            if i.usable(now) {
                found = Some(i.conn);
                break;
            }
            dropped.push(i);
        }
        if q.is_empty() {
            state.idle.remove(key);
        }
        // `dropped` goes after the lock (declared before it).
        found
    }

    /// Keeps `conn` for `key` if it is usable and the bounds allow (else it is dropped).
    pub fn put(&self, key: Key, conn: T) {
        if !conn.usable() {
            return;
        }
        let now = Instant::now();
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if state.total >= self.max_total {
            state.sweep(now);
            if state.total >= self.max_total {
                drop(state);
                drop(conn);
                return;
            }
        }
        let q = state.idle.entry(key).or_default();
        let oldest = (q.len() >= MAX_PER_KEY).then(|| q.pop_front()).flatten();
        q.push_back(Idle { conn, since: now });
        if oldest.is_none() {
            state.total += 1;
        }
        if !state.sweeping {
            state.sweeping = true;
            tokio::spawn(sweeper(Arc::downgrade(&self.inner)));
        }
        drop(state);
        drop(oldest);
    }

    /// Closes every kept connection.
    pub fn clear(&self) {
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let idle = std::mem::take(&mut state.idle);
        state.total = 0;
        drop(state);
        drop(idle);
    }

    /// How many connections are kept (tests).
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
        state.sweep(Instant::now());
        if state.total == 0 {
            state.sweeping = false;
            return;
        }
    }
}
