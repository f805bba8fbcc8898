//! Idle HTTP/1.1 target connections kept after the application connection they served ended,
//! for the next application connection that would make the same connection (clients that
//! open a connection per request then cost no TCP and TLS handshake to the target each).
//!
//! A connection is only ever handed to a session with the same [`Key`]: the same policy,
//! target address, network namespace (target sockets are dialled in the application's),
//! workload (cgroup) and TLS client configuration (its fingerprint covers the `tls` block, the
//! CA file and the mTLS certificate and key). It is kept only when hyper says it is ready
//! for another request (the last response read to its end, not closed, no upgrade) and the
//! session ended without an error. Bounds: [`MAX_PER_KEY`] idle per key (the oldest goes),
//! [`MAX_TOTAL`] in all, each kept at most [`IDLE_TIMEOUT`] (dropped when taken or by a sweep
//! every [`SWEEP_EVERY`] while anything is kept).
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::time::Instant;

use super::target::Target;
use crate::connector::{Context, target_tls};

/// The most idle connections kept for one key.
pub const MAX_PER_KEY: usize = 32;
/// The most idle connections kept in all.
pub const MAX_TOTAL: usize = 1024;
/// How long an idle connection is kept: shorter than common servers' keep-alive timeouts
/// (nginx 75 s, Apache 5 s is the exception: a connection it closed is dropped when taken).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often expired connections are closed while any are kept.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What must be equal for a kept connection to be reused.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    policy: String,
    addr: SocketAddr,
    /// The application's network namespace (its cookie; whether latch dials in it).
    netns: (u64, bool),
    /// The workload's cgroup.
    cgroup: u64,
    /// The TLS client configuration's fingerprint (`None`: plain TCP).
    tls: Option<[u8; 32]>,
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
            tls,
        })
    }
}

/// The kept connections (shared by the HTTP connector's sessions; clones share them).
#[derive(Default, Clone)]
pub struct Pool {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    idle: HashMap<Key, VecDeque<Idle>>,
    total: usize,
    /// A sweep task is running.
    sweeping: bool,
}

struct Idle {
    target: Target,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        now.duration_since(self.since) < IDLE_TIMEOUT
            && !self.target.send.is_closed()
            && self.target.send.is_ready()
    }
}

impl State {
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

impl Pool {
    /// The most recently kept usable connection for `key`, if any (expired or closed ones met
    /// on the way are dropped).
    pub fn take(&self, key: &Key) -> Option<Target> {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        let q = state.idle.get_mut(key)?;
        let mut found = None;
        while let Some(i) = q.pop_back() {
            state.total -= 1;
            if i.usable(now) {
                found = Some(i.target);
                break;
            }
            dropped.push(i);
        }
        if q.is_empty() {
            state.idle.remove(key);
        }
        found
    }

    /// Keeps `target` for `key` if it is ready for another request and the bounds allow.
    pub fn put(&self, key: Key, target: Target) {
        if target.send.is_closed() || !target.send.is_ready() {
            return;
        }
        let now = Instant::now();
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if state.total >= MAX_TOTAL {
            state.sweep(now);
            if state.total >= MAX_TOTAL {
                return;
            }
        }
        let q = state.idle.entry(key).or_default();
        let oldest = (q.len() >= MAX_PER_KEY).then(|| q.pop_front()).flatten();
        q.push_back(Idle { target, since: now });
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

    /// How many connections are kept (tests).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes expired connections every [`SWEEP_EVERY`] until none are kept (or the pool goes).
async fn sweeper(pool: Weak<Mutex<State>>) {
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
