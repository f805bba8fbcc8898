//! Keeps a [`PodCache`] in step with the API server: kube-runtime's watcher lists the pods of
//! this node (field selector `spec.nodeName=<node>`), then watches from the list's
//! resourceVersion with bookmarks (a watch that times out is resumed from its last
//! resourceVersion). Any failure — a 410 Gone (expired resourceVersion), a lost connection,
//! an API server restart — marks the cache not in sync, and after [`Backoff`] it lists again.
//!
//! The client is configured the way kubectl finds its cluster (`kube::Config::infer`):
//! `KUBECONFIG` or `~/.kube/config` if present, else in-cluster (`KUBERNETES_SERVICE_HOST`,
//! the service account's token and CA). TLS is rustls with ring.
use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, runtime::watcher};
use tokio_util::sync::CancellationToken;

use super::{PodCache, PodMeta};

/// Why the pod watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("finding the Kubernetes API server (kubeconfig or in-cluster): {0}")]
    Config(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("the node name is empty (set --node-name or NODE_NAME)")]
    NoNode,
}

/// Retry delays after watch errors: 250 ms doubling to 8 s, back to the start once the watch
/// delivers again. Shorter than client-go's 800 ms..30 s: one agent per node watches its own
/// pods only, and a pod unknown for long is a pod whose connections are refused.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(250);
    pub const MAX: Duration = Duration::from_secs(8);
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Starts watching the pods of `node` into `cache` until `stop` is cancelled. Errors only
/// when no client can be built; once running, failures are retried (and logged).
pub async fn start(
    node: &str,
    cache: PodCache,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, WatchError> {
    if node.is_empty() {
        return Err(WatchError::NoNode);
    }
    let config = kube::Config::infer().await.map_err(WatchError::Config)?;
    tracing::info!(api = %config.cluster_url, node, "watching this node's pods");
    let client = Client::try_from(config).map_err(WatchError::Client)?;
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    Ok(tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = run(api, wc, &cache) => {}
        }
    }))
}

/// Lists and watches until an error, then waits ([`Backoff`]) and starts again with a list.
///
/// kube-runtime's watcher could resume a failed watch from its last resourceVersion by
/// itself, but it consumes bookmarks: after a failure on a quiet node nothing would say
/// that the watch works again, and `/readyz` would stay "not in sync". A list after every
/// failure (one node's pods) says it, and replaces the cache with what is true now. A 410
/// Gone is such a failure too.
async fn run(api: Api<Pod>, wc: watcher::Config, cache: &PodCache) {
    use kube::runtime::utils::Backoff as _;
    let mut backoff = Backoff::default();
    loop {
        if follow(watcher(api.clone(), wc.clone()), cache).await {
            backoff.reset();
        }
        let wait = backoff.next().unwrap_or(Backoff::MAX);
        tracing::debug!(?wait, "pod watch: listing again after");
        tokio::time::sleep(wait).await;
    }
}

/// Applies the watcher's events to `cache` until the first error (returned after marking
/// the cache not in sync): a list (Init, InitApply..., InitDone) replaces the cache at its
/// end; Apply and Delete change one pod. Returns whether a list completed.
async fn follow<S>(stream: S, cache: &PodCache) -> bool
where
    S: futures_util::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<HashMap<String, Arc<PodMeta>>> = None;
    let mut listed = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                if let (Some(list), Some((uid, meta))) = (listing.as_mut(), meta_of(&pod))
                    && list.len() < super::MAX_PODS
                {
                    list.insert(uid, Arc::new(meta));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let list = listing.take().unwrap_or_default();
                tracing::info!(pods = list.len(), "pod list complete; pod cache in sync");
                cache.replace(list);
                listed = true;
            }
            Ok(watcher::Event::Apply(pod)) => {
                if let Some((uid, meta)) = meta_of(&pod) {
                    tracing::debug!(
                        uid,
                        namespace = meta.namespace,
                        name = meta.name,
                        "pod applied"
                    );
                    cache.apply(uid, meta);
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    tracing::debug!(uid, "pod deleted");
                    cache.delete(uid);
                }
            }
            Err(err) => {
                cache.set_synced(false);
                tracing::warn!(%err, "pod watch failed; listing again (pod cache not in sync)");
                return listed;
            }
        }
    }
    listed
}

/// The UID and policy-relevant metadata of a pod; `None` without a UID or namespace.
fn meta_of(pod: &Pod) -> Option<(String, PodMeta)> {
    let uid = pod.metadata.uid.clone()?;
    let namespace = pod.metadata.namespace.clone()?;
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    Some((
        uid,
        PodMeta {
            namespace,
            name: pod.metadata.name.clone().unwrap_or_default(),
            service_account,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let mut b = Backoff::default();
        let first: Vec<Duration> = b.by_ref().take(7).collect();
        assert_eq!(first[0], Backoff::FIRST);
        assert_eq!(first[1], Backoff::FIRST * 2);
        assert_eq!(*first.last().unwrap(), Backoff::MAX);
        b.reset();
        assert_eq!(b.next(), Some(Backoff::FIRST));
    }

    #[test]
    fn pod_metadata_from_an_api_object() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "orders-1", "namespace": "shop", "uid": "0b1f6f2a-6a59-4b47-9f4e-2f0a3c1d2e3f",
                         "labels": {"app": "orders"}},
            "spec": {"serviceAccountName": "orders", "nodeName": "n1", "containers": [{"name": "c"}]}
        }))
        .unwrap();
        let (uid, meta) = meta_of(&pod).unwrap();
        assert_eq!(uid, "0b1f6f2a-6a59-4b47-9f4e-2f0a3c1d2e3f");
        assert_eq!(meta.namespace, "shop");
        assert_eq!(meta.service_account, "orders");
        assert_eq!(meta.labels["app"], "orders");
    }
}
