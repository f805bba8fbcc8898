//! Single flight: concurrent requests for the same key share one fetch.
//!
//! A request marked `fresh` (a refresh after an authentication failure) does not join a fetch
//! that was already under way for an ordinary request — that one may return the value just
//! refused — but it does join another fresh fetch, so many connections failing at once still
//! cause one store request.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use super::error::SecretError;

pub struct Flights<K, V> {
    map: Mutex<HashMap<K, Arc<Flight<V>>>>,
}

struct Flight<V> {
    fresh: bool,
    cell: OnceCell<Result<V, SecretError>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Flights::new()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Flights<K, V> {
    pub fn new() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `fetch` unless a fetch for `key` is under way, in which case its result is shared.
    /// If the caller running the fetch is cancelled, a waiting caller takes over with its own.
    pub async fn run<F, Fut>(&self, key: &K, fresh: bool, fetch: F) -> Result<V, SecretError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, SecretError>>,
    {
        let flight = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(key) {
                Some(f) if f.fresh || !fresh => f.clone(),
                _ => {
                    let f = Arc::new(Flight {
                        fresh,
                        cell: OnceCell::new(),
                    });
                    map.insert(key.clone(), f.clone());
                    f
                }
            }
        };
        let result = flight.cell.get_or_init(fetch).await.clone();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            map.remove(key);
        }
        result
    }

    /// Fetches under way (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_requests_share_one_fetch() {
        let flights = Arc::new(Flights::<String, u32>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (flights, calls) = (flights.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run(&"k".to_string(), false, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(7)
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn fresh_does_not_join_a_stale_fetch() {
        let flights = Arc::new(Flights::<String, u32>::new());
        let f2 = flights.clone();
        let stale = tokio::spawn(async move {
            f2.run(&"k".to_string(), false, || async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(1)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let fresh = flights
            .run(&"k".to_string(), true, || async { Ok(2) })
            .await
            .unwrap();
        assert_eq!(fresh, 2);
        assert_eq!(stale.await.unwrap().unwrap(), 1);
    }

    #[tokio::test]
    async fn cancelled_leader_is_replaced() {
        let flights = Arc::new(Flights::<String, u32>::new());
        let f2 = flights.clone();
        let leader = tokio::spawn(async move {
            f2.run(&"k".to_string(), false, || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(1)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let f3 = flights.clone();
        let follower =
            tokio::spawn(async move { f3.run(&"k".to_string(), false, || async { Ok(2) }).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        assert_eq!(follower.await.unwrap().unwrap(), 2);
    }
}
