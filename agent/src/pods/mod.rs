//! Pod metadata from the Kubernetes API: the pods of this node, by UID, as the `namespace`,
//! `serviceAccount` and `labels` workload selectors need them. [`watch`] keeps the cache in
//! step with the API server; admission only reads it ([`PodCache::lookup`]), never waits.
//!
//! The cgroup path gives a connection's pod UID (trusted only below a container runtime's
//! cgroup root, see [`crate::identity::Cgroups`]); this cache maps that UID to what the API
//! says about the pod.
pub mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
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
}
