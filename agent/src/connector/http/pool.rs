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
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Mutex<State>>,
    /// [`MAX_TOTAL`] (smaller in tests).
    max_total: usize,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            inner: Default::default(),
            max_total: MAX_TOTAL,
        }
    }
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
        self.take_at(key, Instant::now())
    }

    /// [`Pool::take`] as at `now`.
    fn take_at(&self, key: &Key, now: Instant) -> Option<Target> {
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
        if state.total >= self.max_total {
            state.sweep(now);
            if state.total >= self.max_total {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::stream::MaybeTls;
    use tokio::io::AsyncReadExt as _;

    fn key(policy: &str) -> Key {
        Key {
            policy: policy.into(),
            addr: "127.0.0.1:80".parse().unwrap(),
            netns: (1, false),
            cgroup: 7,
            tls: None,
        }
    }

    /// `n` HTTP/1.1 client connections to a listener that only holds them, and the server
    /// ends in the order they were made.
    async fn targets(n: usize) -> (Vec<Target>, Vec<tokio::net::TcpStream>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (mut made, mut held) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            held.push(l.accept().await.unwrap().0);
            let mut t = super::super::target::http1_over(MaybeTls::Plain(tcp), Default::default())
                .await
                .unwrap();
            // Ready for a request, as a connection a session gives back is.
            t.send.ready().await.unwrap();
            made.push(t);
        }
        (made, held)
    }

    /// Whether the peer of `s` closed it (EOF within a second).
    async fn closed(s: &mut tokio::net::TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await,
            Ok(Ok(0))
        )
    }

    #[tokio::test]
    async fn a_kept_connection_goes_only_to_its_own_key_and_each_key_keeps_the_newest_32() {
        let pool = Pool::default();
        let (made, mut held) = targets(MAX_PER_KEY + 1).await;
        for t in made {
            pool.put(key("a"), t);
        }
        assert_eq!(pool.len(), MAX_PER_KEY);
        // The oldest was let go (its connection closed); the newest is still open.
        assert!(closed(&mut held[0]).await, "the oldest connection was kept");
        assert!(!closed(&mut held[MAX_PER_KEY]).await);
        // Another policy, workload or namespace gets none of them.
        assert!(pool.take(&key("b")).is_none());
        let mut other = key("a");
        other.cgroup = 8;
        assert!(pool.take(&other).is_none());
        let mut other = key("a");
        other.netns = (2, false);
        assert!(pool.take(&other).is_none());
        assert!(pool.take(&key("a")).is_some());
        assert_eq!(pool.len(), MAX_PER_KEY - 1);
    }

    #[tokio::test]
    async fn past_the_total_bound_a_connection_is_closed_not_kept() {
        let pool = Pool {
            max_total: 4,
            ..Pool::default()
        };
        let (made, mut held) = targets(6).await;
        for (i, t) in made.into_iter().enumerate() {
            pool.put(key(&format!("p{i}")), t);
        }
        assert_eq!(pool.len(), 4);
        // The first four are kept; the two past the bound were let go (closed).
        assert!(!closed(&mut held[3]).await);
        assert!(closed(&mut held[4]).await, "kept past the bound");
        assert!(closed(&mut held[5]).await, "kept past the bound");
        // Taking one makes room again.
        assert!(pool.take(&key("p0")).is_some());
        let (more, _held) = targets(1).await;
        pool.put(key("p9"), more.into_iter().next().unwrap());
        assert_eq!(pool.len(), 4);
        assert!(pool.take(&key("p9")).is_some());
    }

    #[tokio::test]
    async fn a_connection_the_target_closed_or_kept_too_long_is_not_handed_out() {
        let pool = Pool::default();
        let (mut made, mut held) = targets(2).await;
        let second = made.pop().unwrap();
        pool.put(key("a"), made.pop().unwrap());
        // The target closes it, and hyper's connection task reads the close.
        drop(held.remove(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            pool.take(&key("a")).is_none(),
            "a connection the target closed was handed out"
        );
        // One kept past the idle timeout is not handed out either.
        pool.put(key("a"), second);
        assert_eq!(pool.len(), 1);
        let later = Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1);
        assert!(pool.take_at(&key("a"), later).is_none());
        assert_eq!(pool.len(), 0);
    }
}
