//! latch's custom resources (`Policy`, `ClusterPolicy`, `SecretStore` in `latch.dev/v1alpha1`)
//! merged with the file configuration. [`watch`] follows them on the API server; [`merge`]
//! decodes each one's `spec` with the file format's decoder and says, per resource, whether
//! it was accepted ([`Condition`], written back as `.status.conditions`).
//!
//! Each resource is decoded on its own: an invalid one is left out (its condition says why)
//! and the rest apply. Names in the running configuration: a `ClusterPolicy` keeps its name;
//! namespaced resources are `<namespace>/<name>` (no file resource can be named so).
//!
//! The namespace rule: a namespaced `Policy` admits pods of its own namespace only (each of
//! its workload selectors is pinned to it: a selector naming another namespace is invalid,
//! `workloads: all` means every pod of the namespace), and uses `SecretStore`s of its own
//! namespace only. A namespaced `SecretStore` is a `kubernetes` store reading Secrets of its
//! own namespace with the agent's credentials: the other kinds read the agent's files,
//! environment, commands or cloud identity, which belong to the node's operator (they are
//! defined in files/ConfigMaps).
pub mod crd;
pub mod watch;

use std::collections::BTreeMap;

use crate::config::{self, Config, SecretStore, StoreBackend};

/// The kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Policy,
    ClusterPolicy,
    SecretStore,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Policy, Kind::ClusterPolicy, Kind::SecretStore];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Policy => "Policy",
            Kind::ClusterPolicy => "ClusterPolicy",
            Kind::SecretStore => "SecretStore",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Policy => "policies",
            Kind::ClusterPolicy => "clusterpolicies",
            Kind::SecretStore => "secretstores",
        }
    }

    pub fn namespaced(self) -> bool {
        self != Kind::ClusterPolicy
    }
}

/// Which resource: kind, namespace (`None` for cluster-scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl Key {
    /// How errors name the resource: `Policy shop/orders-db`, `ClusterPolicy audit-db`.
    pub fn source(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind.name(), self.name),
            None => format!("{} {}", self.kind.name(), self.name),
        }
    }

    /// The name in the running configuration.
    pub fn config_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// A resource as [`merge`] needs it: its `spec` (JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub spec: serde_json::Value,
    /// The `Accepted` condition the object carries now (to write only changes).
    pub accepted: Option<Condition>,
    /// The generation that condition judged.
    pub observed_generation: Option<i64>,
    pub generation: Option<i64>,
    pub resource_version: Option<String>,
}

/// The `Accepted` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub accepted: bool,
    /// `Valid` or `Invalid`.
    pub reason: String,
    pub message: String,
}

impl Condition {
    fn valid() -> Self {
        Condition {
            accepted: true,
            reason: "Valid".into(),
            message: "accepted".into(),
        }
    }

    fn invalid(message: String) -> Self {
        Condition {
            accepted: false,
            reason: "Invalid".into(),
            message,
        }
    }
}

/// The files' configuration with the valid resources added, and every resource's condition.
pub struct Merged {
    pub config: Config,
    pub conditions: BTreeMap<Key, Condition>,
}

/// Adds the valid resources of `objects` to `files` (already valid).
///
/// `api_store` names a `kubernetes` store of the files whose `apiServer`, `tokenFile` and
/// `caFile` the namespaced `SecretStore`s use (`None`: in-cluster, the agent's service
/// account); a namespaced `SecretStore` cannot set them itself.
pub fn merge(
    mut files: Config,
    objects: &BTreeMap<Key, Object>,
    api_store: Option<&str>,
) -> Merged {
    let mut conditions = BTreeMap::new();
    let template = api_store.and_then(|name| match files.store(name).map(|s| &s.backend) {
        Some(StoreBackend::Kubernetes(k)) => Some(k.clone()),
        _ => None,
    });
    // Stores first: policies of their namespace refer to them.
    let mut ns_stores: BTreeMap<String, Vec<SecretStore>> = BTreeMap::new();
    for (key, obj) in objects.iter().filter(|(k, _)| k.kind == Kind::SecretStore) {
        let ns = key.namespace.clone().unwrap_or_default();
        match store(key, &ns, obj, template.as_ref()) {
            Ok(s) => {
                ns_stores.entry(ns).or_default().push(s);
                conditions.insert(key.clone(), Condition::valid());
            }
            Err(msg) => {
                conditions.insert(key.clone(), Condition::invalid(msg));
            }
        }
    }
    let mut added = Vec::new();
    for (key, obj) in objects.iter().filter(|(k, _)| k.kind != Kind::SecretStore) {
        let result = match &key.namespace {
            Some(ns) => namespaced_policy(
                key,
                ns,
                obj,
                ns_stores.get(ns).map(Vec::as_slice).unwrap_or_default(),
            ),
            None => cluster_policy(key, obj, &files),
        };
        match result {
            Ok(p) => {
                added.push(p);
                conditions.insert(key.clone(), Condition::valid());
            }
            Err(msg) => {
                conditions.insert(key.clone(), Condition::invalid(msg));
            }
        }
    }
    files.policies.extend(added);
    files.stores.extend(ns_stores.into_values().flatten());
    Merged {
        config: files,
        conditions,
    }
}

/// The document the file decoder reads: the envelope, and the spec as JSON (which is YAML),
/// one field a line.
fn document(kind: &str, name: &str, spec: &serde_json::Value) -> String {
    let spec = serde_json::to_string_pretty(spec).unwrap_or_else(|_| "null".into());
    let mut text = format!(
        "apiVersion: {}\nkind: {kind}\nmetadata:\n  name: {}\nspec:\n",
        config::API_VERSION,
        serde_json::Value::String(name.to_owned())
    );
    for line in spec.lines() {
        text.push_str("  ");
        text.push_str(line);
        text.push('\n');
    }
    text
}

fn errors_message(errors: &config::LoadErrors) -> String {
    errors
        .0
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn store(
    key: &Key,
    ns: &str,
    obj: &Object,
    template: Option<&config::KubernetesStore>,
) -> Result<SecretStore, String> {
    let text = document("SecretStore", &key.name, &obj.spec);
    let cfg = config::load_str(&key.source(), &text).map_err(|e| errors_message(&e))?;
    let mut s = cfg
        .stores
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: no store decoded", key.source()))?;
    match &mut s.backend {
        StoreBackend::Kubernetes(k) => {
            if k.api_server.is_some() || k.token_file.is_some() || k.ca_file.is_some() {
                return Err(format!(
                    "{}: a namespaced SecretStore uses the agent's own API credentials: \
                     apiServer, tokenFile and caFile belong in a store of the files/ConfigMaps",
                    key.source()
                ));
            }
            if let Some(t) = template {
                k.api_server.clone_from(&t.api_server);
                k.token_file.clone_from(&t.token_file);
                k.ca_file.clone_from(&t.ca_file);
            }
            match k.namespace.as_deref() {
                None => k.namespace = Some(ns.to_owned()),
                Some(n) if n == ns => {}
                Some(other) => {
                    return Err(format!(
                        "{}: a SecretStore reads Secrets of its own namespace {ns:?} only, not {other:?}",
                        key.source()
                    ));
                }
            }
        }
        other => {
            return Err(format!(
                "{}: a namespaced SecretStore must be a `kubernetes` store (Secrets of its own \
                 namespace); a {} store reads what belongs to the node's operator: define it \
                 in the files/ConfigMaps",
                key.source(),
                other.kind()
            ));
        }
    }
    s.name = key.config_name();
    Ok(s)
}

/// Rewrites every `store:` reference of a namespaced policy's spec to the namespaced store's
/// configuration name; a reference to a store not of the namespace is an error.
fn rewrite_store_refs(
    v: &mut serde_json::Value,
    key: &Key,
    ns: &str,
    stores: &[SecretStore],
) -> Result<(), String> {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "store"
                    && let serde_json::Value::String(name) = child
                {
                    let full = format!("{ns}/{name}");
                    if !stores.iter().any(|s| s.name == full) {
                        return Err(format!(
                            "{}: SecretStore {name:?} is not a valid SecretStore of namespace \
                             {ns:?}: a namespaced Policy may use only SecretStores of its own \
                             namespace",
                            key.source()
                        ));
                    }
                    *name = full;
                } else if k == "path"
                    && let serde_json::Value::String(path) = child
                    && path.contains('/')
                {
                    return Err(format!(
                        "{}: secret path {path:?}: a namespaced Policy reads Secrets of its own \
                         namespace, named without a namespace",
                        key.source()
                    ));
                } else {
                    rewrite_store_refs(child, key, ns, stores)?;
                }
            }
            Ok(())
        }
        serde_json::Value::Array(items) => items
            .iter_mut()
            .try_for_each(|i| rewrite_store_refs(i, key, ns, stores)),
        _ => Ok(()),
    }
}

fn namespaced_policy(
    key: &Key,
    ns: &str,
    obj: &Object,
    stores: &[SecretStore],
) -> Result<config::Policy, String> {
    let mut spec = obj.spec.clone();
    rewrite_store_refs(&mut spec, key, ns, stores)?;
    let mut p = decode_policy(key, &spec, stores)?;
    if p.reads_pod_namespace() {
        return Err(format!(
            "{}: namespace: fromPod is for ClusterPolicies and files: a namespaced Policy reads \
             Secrets of its own namespace through its own SecretStores already",
            key.source()
        ));
    }
    if p.admit_all || p.workloads.is_empty() {
        // `workloads: all` of a namespaced Policy: every pod of its namespace.
        p.admit_all = false;
        p.workloads = vec![config::WorkloadSelector::default()];
    }
    for sel in &mut p.workloads {
        match sel.namespace.as_deref() {
            None => sel.namespace = Some(ns.to_owned()),
            Some(n) if n == ns => {}
            Some(other) => {
                return Err(format!(
                    "{}: a Policy of namespace {ns:?} admits pods of its own namespace only, \
                     not of {other:?} (use a ClusterPolicy)",
                    key.source()
                ));
            }
        }
    }
    p.name = key.config_name();
    Ok(p)
}

fn cluster_policy(key: &Key, obj: &Object, files: &Config) -> Result<config::Policy, String> {
    let p = decode_policy(key, &obj.spec, &files.stores)?;
    if files.policy(&p.name).is_some() {
        return Err(format!(
            "{}: a Policy named {:?} is defined in the files",
            key.source(),
            p.name
        ));
    }
    Ok(p)
}

fn decode_policy(
    key: &Key,
    spec: &serde_json::Value,
    stores: &[SecretStore],
) -> Result<config::Policy, String> {
    let text = document("Policy", &key.name, spec);
    let cfg =
        config::load_str_with(&key.source(), &text, stores).map_err(|e| errors_message(&e))?;
    config::require_named_workloads(&cfg).map_err(|e| errors_message(&e))?;
    cfg.policies
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: no policy decoded", key.source()))
}

#[cfg(test)]
mod tests;
