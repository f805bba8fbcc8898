//! Follows latch's custom resources on the API server (kube-runtime's watcher over
//! `DynamicObject`s, every namespace), and writes their `Accepted` condition back with a
//! merge patch of the `status` subresource when it changes.
//!
//! The client is found as the pod watch finds it (kubeconfig, else in-cluster). Every change
//! (a list completing, an object applied or deleted) pokes the channel [`start`] returns; the
//! agent then reloads: files and resources, merged by [`super::merge`].
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use futures_util::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::watcher,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Condition, Key, Kind, Object};
use crate::pods::watch::{Backoff, WatchError};

/// Most resources of one kind kept (bounds memory against a flood of objects).
pub const MAX_OBJECTS: usize = 5_000;

type Objects = Arc<Mutex<BTreeMap<Key, Object>>>;
/// A condition written, with the resourceVersion of the object it was written against.
type Stamp = (Condition, Option<String>);

/// The watched resources, and what writes their conditions.
#[derive(Clone)]
pub struct Resources {
    client: Client,
    objects: Objects,
    /// The condition last written per resource, with the resourceVersion it was written
    /// against: not written again until the object changes.
    written: Arc<Mutex<HashMap<Key, Stamp>>>,
}

fn api_resource(kind: Kind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("latch.dev", "v1alpha1", kind.name()),
        kind.plural(),
    )
}

/// Starts watching the three kinds until `stop`; a message arrives on the returned channel
/// after changes (bursts coalesce).
pub async fn start(stop: CancellationToken) -> Result<(Resources, mpsc::Receiver<()>), WatchError> {
    let config = kube::Config::infer().await.map_err(WatchError::Config)?;
    tracing::info!(api = %config.cluster_url, "watching latch's custom resources");
    let client = Client::try_from(config).map_err(WatchError::Client)?;
    let objects: Objects = Arc::default();
    let (tx, rx) = mpsc::channel(1);
    for kind in Kind::ALL {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(kind));
        let (objects, tx, stop) = (objects.clone(), tx.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = run(kind, api, &objects, &tx) => {}
            }
        });
    }
    Ok((
        Resources {
            client,
            objects,
            written: Arc::default(),
        },
        rx,
    ))
}

impl Resources {
    /// The resources as last seen.
    pub fn snapshot(&self) -> BTreeMap<Key, Object> {
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes each condition of `conditions` that differs from what its object (in
    /// `snapshot`) carries, unless written already for this version of the object.
    pub fn write_conditions(
        &self,
        conditions: &BTreeMap<Key, Condition>,
        snapshot: &BTreeMap<Key, Object>,
    ) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.retain(|k, _| snapshot.contains_key(k));
        for (key, cond) in conditions {
            let Some(obj) = snapshot.get(key) else {
                continue;
            };
            if obj.accepted.as_ref() == Some(cond) && obj.observed_generation == obj.generation {
                continue;
            }
            let stamp: Stamp = (cond.clone(), obj.resource_version.clone());
            if written.get(key) == Some(&stamp) {
                continue;
            }
            written.insert(key.clone(), stamp);
            let ar = api_resource(key.kind);
            let api: Api<DynamicObject> = match &key.namespace {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
                None => Api::all_with(self.client.clone(), &ar),
            };
            let body = status_patch(cond, obj.generation, SystemTime::now());
            let (key, cond) = (key.clone(), cond.clone());
            tokio::spawn(async move {
                match api
                    .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&body))
                    .await
                {
                    Ok(_) => tracing::info!(
                        resource = key.source(),
                        accepted = cond.accepted,
                        reason = cond.reason,
                        "status written"
                    ),
                    Err(err) => {
                        tracing::warn!(resource = key.source(), %err, "could not write the status")
                    }
                }
            });
        }
    }
}

/// The merge patch of `.status.conditions` (latch owns the list: one `Accepted` condition).
pub fn status_patch(
    cond: &Condition,
    generation: Option<i64>,
    now: SystemTime,
) -> serde_json::Value {
    let mut c = serde_json::json!({
        "type": "Accepted",
        "status": if cond.accepted { "True" } else { "False" },
        "reason": cond.reason,
        "message": cond.message,
        "lastTransitionTime": rfc3339(now),
    });
    if let Some(g) = generation {
        c["observedGeneration"] = g.into();
    }
    serde_json::json!({"status": {"conditions": [c]}})
}

/// `2026-12-03T16:27:17Z` (UTC, whole seconds, as Kubernetes writes times).
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn run(kind: Kind, api: Api<DynamicObject>, objects: &Objects, tx: &mpsc::Sender<()>) {
    use kube::runtime::utils::Backoff as _;
    let mut backoff = Backoff::default();
    loop {
        if follow(
            kind,
            watcher(api.clone(), watcher::Config::default()),
            objects,
            tx,
        )
        .await
        {
            backoff.reset();
        }
        let wait = backoff.next().unwrap_or(Backoff::MAX);
        tokio::time::sleep(wait).await;
    }
}

/// Applies the watcher's events for `kind` until the first error. Returns whether a list
/// completed.
async fn follow<S>(kind: Kind, stream: S, objects: &Objects, tx: &mpsc::Sender<()>) -> bool
where
    S: futures_util::Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<BTreeMap<Key, Object>> = None;
    let mut listed = false;
    let poke = || {
        let _ = tx.try_send(());
    };
    while let Some(item) = stream.next().await {
        let all = || objects.lock().unwrap_or_else(|e| e.into_inner());
        match item {
            Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(obj)) => {
                if let (Some(list), Some((key, o))) = (listing.as_mut(), object_of(kind, &obj))
                    && list.len() < MAX_OBJECTS
                {
                    list.insert(key, o);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let list = listing.take().unwrap_or_default();
                tracing::info!(
                    kind = kind.name(),
                    count = list.len(),
                    "resource list complete"
                );
                let mut all = all();
                all.retain(|k, _| k.kind != kind);
                all.extend(list);
                listed = true;
                drop(all);
                poke();
            }
            Ok(watcher::Event::Apply(obj)) => {
                if let Some((key, o)) = object_of(kind, &obj) {
                    let mut all = all();
                    let count = all.keys().filter(|k| k.kind == kind).count();
                    if all.get(&key) == Some(&o) {
                        continue;
                    }
                    if count >= MAX_OBJECTS && !all.contains_key(&key) {
                        crate::warn_throttled!(
                            max = MAX_OBJECTS,
                            "too many resources; ignoring one"
                        );
                        continue;
                    }
                    tracing::debug!(resource = key.source(), "resource applied");
                    all.insert(key, o);
                    drop(all);
                    poke();
                }
            }
            Ok(watcher::Event::Delete(obj)) => {
                if let Some((key, _)) = object_of(kind, &obj) {
                    tracing::debug!(resource = key.source(), "resource deleted");
                    all().remove(&key);
                    poke();
                }
            }
            Err(err) => {
                tracing::warn!(kind = kind.name(), %err, "resource watch failed; listing again");
                return listed;
            }
        }
    }
    listed
}

/// The key and what [`super::merge`] needs of an object; `None` without a name (or, for a
/// namespaced kind, a namespace).
fn object_of(kind: Kind, obj: &DynamicObject) -> Option<(Key, Object)> {
    let name = obj.metadata.name.clone()?;
    let namespace = if kind.namespaced() {
        Some(obj.metadata.namespace.clone()?)
    } else {
        None
    };
    let condition = obj.data["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Accepted"));
    let observed_generation = condition.and_then(|c| c["observedGeneration"].as_i64());
    let accepted = condition.map(|c| Condition {
        accepted: c["status"] == "True",
        reason: c["reason"].as_str().unwrap_or_default().to_owned(),
        message: c["message"].as_str().unwrap_or_default().to_owned(),
    });
    Some((
        Key {
            kind,
            namespace,
            name,
        },
        Object {
            spec: obj
                .data
                .get("spec")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
            accepted,
            observed_generation,
            generation: obj.metadata.generation,
            resource_version: obj.metadata.resource_version.clone(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_utc_seconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_315_237);
        assert_eq!(rfc3339(t), "2026-12-03T16:27:17Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn an_object_and_its_accepted_condition() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "latch.dev/v1alpha1", "kind": "Policy",
            "metadata": {"name": "db", "namespace": "shop", "generation": 3, "resourceVersion": "7"},
            "spec": {"protocol": "postgres"},
            "status": {"conditions": [{"type": "Accepted", "status": "False", "reason": "Invalid", "message": "m"}]}
        }))
        .unwrap();
        let (key, o) = object_of(Kind::Policy, &obj).unwrap();
        assert_eq!(key.source(), "Policy shop/db");
        assert_eq!(o.spec["protocol"], "postgres");
        assert_eq!(o.generation, Some(3));
        let c = o.accepted.unwrap();
        assert!(!c.accepted);
        assert_eq!((c.reason.as_str(), c.message.as_str()), ("Invalid", "m"));
        let patch = status_patch(&c, Some(3), SystemTime::UNIX_EPOCH);
        assert_eq!(patch["status"]["conditions"][0]["status"], "False");
        assert_eq!(patch["status"]["conditions"][0]["observedGeneration"], 3);
    }
}
