//! Idle HTTP/1.1 target connections, kept in a [`kept::Pool`] (its rules: same policy,
//! target, namespace, workload and TLS configuration). A connection is kept only when hyper
//! says it is ready for another request (the last response read to its end, not closed, no
//! upgrade) and the session ended without an error. One kept by another connection thread is
//! moved to the taker's by the session that takes it ([`Target::here`]).
use crate::connector::kept;

use super::target::Target;

pub use kept::Key;

/// The HTTP connector's kept connections.
pub type Pool = kept::Pool<Target>;

impl kept::Keep for Target {
    fn usable(&self) -> bool {
        !self.send.is_closed() && self.send.is_ready()
    }

    fn home(&self) -> Option<u64> {
        self.home
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::kept::{IDLE_TIMEOUT, MAX_PER_KEY};
    use crate::connector::stream::MaybeTls;
    use std::time::Duration;
    use tokio::io::AsyncReadExt as _;
    use tokio::time::Instant;

    fn key(policy: &str) -> Key {
        Key {
            policy: policy.into(),
            addr: "127.0.0.1:80".parse().unwrap(),
            netns: (1, false),
            cgroup: 7,
            exe: None,
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
        let pool = Pool::with_bound(4);
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
