//! Pod metadata from the Kubernetes API: the pods of this node, by UID, as the `namespace`,
//! `serviceAccount` and `labels` workload selectors need them. [`watch`] keeps the cache in
//! step with the API server; admission only reads it ([`PodCache::lookup`]), never waits.
//!
//! The cgroup path gives a connection's pod UID (trusted only below a container runtime's
//! cgroup root, see [`crate::identity::Cgroups`]); this cache maps that UID to what the API
//! says about the pod.
//!
//! A pod's containers can connect before the watch has delivered the pod: admission may wait
//! for it a moment ([`PodCache::wait_for`], woken by the cache's changes, never polling).
pub mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Serialize;

/// Most pods a node's cache holds (the kubelet's default is 110 per node; this bounds memory
/// against a misbehaving API server or selector).
pub const MAX_PODS: usize = 10_000;

/// What policies match on of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "serviceAccount")]
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

/// What the cache knows about a pod UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Known(Arc<PodMeta>),
    /// Not (yet) in the cache: the pod's metadata has not arrived, or it is not a pod of
    /// this node.
    Unknown,
}

#[derive(Debug, Default)]
struct Inner {
    pods: RwLock<HashMap<String, Arc<PodMeta>>>,
    /// False from start until the first list is complete, and after a watch error until
    /// the next list is.
    synced: AtomicBool,
    /// A complete list was seen at least once.
    listed: AtomicBool,
    /// Woken at every change of the pods or of the sync state ([`PodCache::wait_for`]).
    changed: tokio::sync::Notify,
}

/// The pods of this node by UID. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct PodCache(Arc<Inner>);

impl PodCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The metadata of pod `uid`.
    pub fn lookup(&self, uid: &str) -> Lookup {
        match self.read().get(uid) {
            Some(meta) => Lookup::Known(meta.clone()),
            None => Lookup::Unknown,
        }
    }

    /// Adds or replaces a pod. Beyond [`MAX_PODS`] new pods are dropped (and logged).
    pub fn apply(&self, uid: String, meta: PodMeta) {
        let mut pods = self.write();
        if pods.len() >= MAX_PODS && !pods.contains_key(&uid) {
            crate::warn_throttled!(max = MAX_PODS, "pod cache full; ignoring a pod");
            return;
        }
        pods.insert(uid, Arc::new(meta));
        drop(pods);
        self.0.changed.notify_waiters();
    }

    /// Removes a deleted pod.
    pub fn delete(&self, uid: &str) {
        self.write().remove(uid);
    }

    /// Replaces everything with a complete list (after a relist: pods deleted while the
    /// watch was down disappear).
    pub fn replace(&self, pods: HashMap<String, Arc<PodMeta>>) {
        *self.write() = pods;
        self.0.listed.store(true, Ordering::Release);
        self.set_synced(true);
    }

    /// The metadata of pod `uid`, waiting up to `bound` for it to arrive (woken by the
    /// watch's changes, not polling). Returns at once when the pod is known, or when the
    /// watch has failed and not listed again since ([`PodCache::failing`]): then nothing is
    /// coming soon. Before the first list it waits (that list is on its way).
    pub async fn wait_for(&self, uid: &str, bound: Duration) -> Lookup {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            // Registered before looking, so a change between the look and the wait wakes it.
            let changed = self.0.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let found = self.lookup(uid);
            if matches!(found, Lookup::Known(_)) || self.failing() {
                return found;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.lookup(uid);
            }
        }
    }

    /// The watch failed after a complete list and has not listed again yet (the API server
    /// is unreachable, or the watch is backing off): no pod is about to arrive.
    pub fn failing(&self) -> bool {
        self.0.listed.load(Ordering::Acquire) && !self.0.synced.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the cache follows the API server now: a complete list arrived, and the watch
    /// has not failed since.
    pub fn synced(&self) -> bool {
        self.0.listed.load(Ordering::Acquire) && self.0.synced.load(Ordering::Acquire)
    }

    pub(crate) fn set_synced(&self, synced: bool) {
        self.0.synced.store(synced, Ordering::Release);
        self.0.changed.notify_waiters();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<PodMeta>>> {
        self.0.pods.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<PodMeta>>> {
        self.0.pods.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ns: &str) -> PodMeta {
        PodMeta {
            namespace: ns.into(),
            name: "p".into(),
            service_account: "default".into(),
            labels: BTreeMap::from([("app".into(), "orders".into())]),
        }
    }

    #[test]
    fn apply_delete_replace_and_sync_state() {
        let cache = PodCache::new();
        assert!(!cache.synced());
        cache.apply("u1".into(), meta("a"));
        assert_eq!(cache.lookup("u1"), Lookup::Known(Arc::new(meta("a"))));
        assert!(!cache.synced(), "no complete list yet");
        cache.replace(HashMap::from([("u2".to_owned(), Arc::new(meta("b")))]));
        assert!(cache.synced());
        assert_eq!(
            cache.lookup("u1"),
            Lookup::Unknown,
            "a relist drops what it lacks"
        );
        cache.set_synced(false);
        assert!(!cache.synced());
        cache.delete("u2");
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_gets_a_pod_that_arrives_within_the_bound_and_gives_up_after_it() {
        let cache = PodCache::new();
        cache.replace(HashMap::new());
        let later = cache.clone();
        let arrives = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            later.apply("u1".into(), meta("a"));
        });
        let start = tokio::time::Instant::now();
        let got = cache.wait_for("u1", Duration::from_secs(1)).await;
        assert_eq!(got, Lookup::Known(Arc::new(meta("a"))));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(900),
            "woken by the change: {took:?}"
        );
        arrives.await.unwrap();

        // Another pod's arrival wakes it, but it waits on for its own, up to the bound.
        let other = cache.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            other.apply("u2".into(), meta("b"));
        });
        let start = tokio::time::Instant::now();
        assert_eq!(
            cache.wait_for("u3", Duration::from_secs(1)).await,
            Lookup::Unknown
        );
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(1), "{took:?}");
    }

    #[tokio::test]
    async fn no_wait_while_the_watch_is_failing_and_a_failure_ends_a_wait() {
        let cache = PodCache::new();
        cache.replace(HashMap::new());
        cache.set_synced(false);
        assert!(cache.failing());
        let start = tokio::time::Instant::now();
        assert_eq!(
            cache.wait_for("u1", Duration::from_secs(1)).await,
            Lookup::Unknown
        );
        assert!(start.elapsed() < Duration::from_millis(100));

        cache.set_synced(true);
        let failing = cache.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            failing.set_synced(false);
        });
        let start = tokio::time::Instant::now();
        assert_eq!(
            cache.wait_for("u1", Duration::from_secs(1)).await,
            Lookup::Unknown
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_millis(900),
            "{took:?}"
        );

        // Before the first list the wait goes on: the list is on its way.
        let fresh = PodCache::new();
        assert!(!fresh.failing());
        let listing = fresh.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            listing.replace(HashMap::from([("u1".to_owned(), Arc::new(meta("a")))]));
        });
        assert!(matches!(
            fresh.wait_for("u1", Duration::from_secs(1)).await,
            Lookup::Known(_)
        ));
    }
}
