//! Checks across documents: unique names, policy → store references, overlapping destinations,
//! and the warnings of a valid set.

use std::collections::HashMap;

use super::diagnostic::{Diagnostic, Location};
use super::load::{LoadedDoc, Resource};
use super::net::Cidr;
use super::policy::{Credentials, Policy, SecretRef, Target};
use super::store::{LiteralSecret, SecretStore, StoreBackend};
use super::suggest;

pub fn check(
    docs: &[LoadedDoc],
    known_stores: &[SecretStore],
    errors: &mut Vec<Diagnostic>,
    warnings: &mut Vec<Diagnostic>,
) {
    let mut stores = unique_names(docs, errors);
    // Stores defined elsewhere (Kubernetes resources checked against the files' stores).
    for s in known_stores {
        stores.entry(s.name.as_str()).or_insert(s);
    }
    let policies: Vec<(&LoadedDoc, &Policy)> = docs
        .iter()
        .filter_map(|d| match &d.resource {
            Resource::Policy(p) => Some((d, p.as_ref())),
            Resource::Store(_) => None,
        })
        .collect();
    for (doc, policy) in &policies {
        check_references(doc, policy, &stores, errors);
        if policy.workloads.is_empty() && !policy.admit_all {
            warnings.push(Diagnostic::new(
                &doc.key_location(&["spec"]),
                format!(
                    "Policy {:?} names no workloads: the agent refuses it (latch run, whose cgroup holds only its command, admits every process there); list the workloads it admits, or say `workloads: all`",
                    policy.name
                ),
            ));
        }
    }
    check_overlaps(&policies, errors);
    for doc in docs {
        if let Resource::Store(s) = &doc.resource
            && let StoreBackend::Literal(_) = s.backend
        {
            warnings.push(Diagnostic::new(
                &doc.key_location(&["spec", "literal"]),
                format!(
                    "SecretStore {:?} is a literal store: its secrets are written in the configuration; use it for development only",
                    s.name
                ),
            ));
        }
    }
}

/// Reports names used twice within a kind; returns the stores by name (first definition wins).
fn unique_names<'a>(
    docs: &'a [LoadedDoc],
    errors: &mut Vec<Diagnostic>,
) -> HashMap<&'a str, &'a SecretStore> {
    let mut seen: HashMap<(&str, &str), &LoadedDoc> = HashMap::new();
    let mut stores = HashMap::new();
    for doc in docs {
        let (kind, name) = match &doc.resource {
            Resource::Policy(p) => ("Policy", p.name.as_str()),
            Resource::Store(s) => ("SecretStore", s.name.as_str()),
        };
        match seen.get(&(kind, name)) {
            Some(first) => errors.push(Diagnostic::new(
                &doc.location(&["metadata", "name"]),
                format!(
                    "duplicate {kind} {name:?}: already defined at {}",
                    first.location(&["metadata", "name"])
                ),
            )),
            None => {
                seen.insert((kind, name), doc);
                if let Resource::Store(s) = &doc.resource {
                    stores.insert(name, s.as_ref());
                }
            }
        }
    }
    stores
}

fn check_references(
    doc: &LoadedDoc,
    policy: &Policy,
    stores: &HashMap<&str, &SecretStore>,
    errors: &mut Vec<Diagnostic>,
) {
    let lookup = |name: &str, at: Location, errors: &mut Vec<Diagnostic>| -> Option<&SecretStore> {
        let found = stores.get(name).copied();
        if found.is_none() {
            let hint = suggest::hint(name, stores.keys().copied());
            errors.push(Diagnostic::new(
                &at,
                format!("no SecretStore named {name:?}{hint}"),
            ));
        }
        found
    };
    // Each credentials block with the path to it: `spec.credentials`, or each role's.
    let mut blocks: Vec<(Vec<&str>, &Credentials)> = Vec::new();
    if let Some(c) = &policy.credentials {
        blocks.push((vec!["spec", "credentials"], c));
    }
    for role in &policy.roles {
        blocks.push((
            vec![
                "spec",
                policy.protocol.as_str(),
                "roles",
                role.user.as_str(),
            ],
            &role.credentials,
        ));
    }
    let mut refs: Vec<(Vec<&str>, &SecretRef, Option<&str>)> = Vec::new();
    for (base, block) in &blocks {
        let at = |field: &[&str]| {
            let mut p = base.clone();
            p.extend_from_slice(field);
            doc.location(&p)
        };
        match block {
            Credentials::Dynamic { store, .. } => {
                let at = at(&["dynamic", "store"]);
                if let Some(s) = lookup(store, at.clone(), errors)
                    && !matches!(s.backend, StoreBackend::Vault(_))
                {
                    errors.push(Diagnostic::new(
                        &at,
                        format!(
                            "credentials.dynamic store {store:?} is {} {} store; dynamic credentials need a vault store",
                            article(s.backend.kind()),
                            s.backend.kind()
                        ),
                    ));
                }
            }
            Credentials::Static {
                store,
                username,
                password,
            } => {
                lookup(store, at(&["store"]), errors);
                for (field, r) in [("username", username), ("password", password)] {
                    if let Some(r) = r {
                        let mut p = base.clone();
                        p.push(field);
                        refs.push((p, r, Some(store.as_str())));
                    }
                }
            }
        }
    }
    // TLS client certificates default to `credentials.store`.
    let default_store = match &policy.credentials {
        Some(Credentials::Static { store, .. }) => Some(store.as_str()),
        _ => None,
    };
    if let Some(r) = &policy.tls.client_cert {
        refs.push((vec!["spec", "tls", "clientCert"], r, default_store));
    }
    if let Some(r) = &policy.tls.client_key {
        refs.push((vec!["spec", "tls", "clientKey"], r, default_store));
    }
    for (path, r, default_store) in refs {
        let at = |field: &str| {
            let mut p = path.clone();
            p.push(field);
            doc.location(&p)
        };
        let store = if default_store == Some(r.store.as_str())
            && doc.root.entry("spec").is_some()
            && !has_key(doc, &path, "store")
        {
            // Inherited from its block's store, which was checked (and reported) above.
            stores.get(r.store.as_str()).copied()
        } else {
            lookup(&r.store, at("store"), errors)
        };
        if let Some(store) = store {
            check_ref_against_store(r, store, &at, errors);
        }
    }
}

fn has_key(doc: &LoadedDoc, path: &[&str], key: &str) -> bool {
    let mut node = &doc.root;
    for seg in path {
        match node.entry(seg) {
            Some(e) => node = &e.value,
            None => return false,
        }
    }
    node.entry(key).is_some()
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// What a reference may ask of its store: versions, and for a literal store, paths and fields
/// that exist.
fn check_ref_against_store(
    r: &SecretRef,
    store: &SecretStore,
    at: &dyn Fn(&str) -> Location,
    errors: &mut Vec<Diagnostic>,
) {
    if r.from_pod && !matches!(store.backend, StoreBackend::Kubernetes(_)) {
        let kind = store.backend.kind();
        errors.push(Diagnostic::new(
            &at("namespace"),
            format!(
                "namespace: fromPod reads a Secret of the connecting pod's namespace, which only \
                 a kubernetes store has; store {:?} is {} {kind} store",
                store.name,
                article(kind)
            ),
        ));
    }
    if let Some(version) = &r.version {
        let problem = match &store.backend {
            StoreBackend::Vault(v) if v.kv_version == 1 => Some(format!(
                "store {:?} uses Vault KV version 1, which keeps no versions",
                store.name
            )),
            StoreBackend::Vault(_) => match version.parse::<u64>() {
                Ok(n) if n >= 1 => None,
                _ => Some(format!(
                    "invalid version {version:?}: Vault KV v2 versions are positive integers"
                )),
            },
            StoreBackend::Aws(_) => None,
            other => Some(format!(
                "store {:?} is {} {} store, which has no versions (only vault KV v2 and aws stores do)",
                store.name,
                article(other.kind()),
                other.kind()
            )),
        };
        if let Some(p) = problem {
            errors.push(Diagnostic::new(&at("version"), p));
        }
    }
    if let StoreBackend::Literal(lit) = &store.backend {
        match lit.values.get(&r.path) {
            None => {
                let hint = suggest::hint(&r.path, lit.values.keys().map(String::as_str));
                errors.push(Diagnostic::new(
                    &at("path"),
                    format!(
                        "literal store {:?} has no secret {:?}{hint}",
                        store.name, r.path
                    ),
                ));
            }
            Some(LiteralSecret::Value(_)) if r.field.is_some() => errors.push(Diagnostic::new(
                &at("field"),
                format!(
                    "secret {:?} in literal store {:?} is a single value: remove field",
                    r.path, store.name
                ),
            )),
            Some(LiteralSecret::Fields(fields)) => match &r.field {
                None => errors.push(Diagnostic::new(
                    &at("path"),
                    format!(
                        "secret {:?} in literal store {:?} has fields ({}): name one with field",
                        r.path,
                        store.name,
                        fields.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )),
                Some(f) if !fields.contains_key(f) => {
                    let hint = suggest::hint(f, fields.keys().map(String::as_str));
                    errors.push(Diagnostic::new(
                        &at("field"),
                        format!(
                            "secret {:?} in literal store {:?} has no field {f:?}{hint}",
                            r.path, store.name
                        ),
                    ));
                }
                Some(_) => {}
            },
            Some(LiteralSecret::Value(_)) => {}
        }
    }
}

/// The identity of a target for overlap checks: an address is its single-address network.
#[derive(PartialEq, Eq, Hash)]
enum TargetKey<'a> {
    Host(&'a str),
    Net(Cidr),
}

fn target_key(target: &Target) -> TargetKey<'_> {
    match target {
        Target::Host(h) => TargetKey::Host(h),
        Target::Address(a) => TargetKey::Net(Cidr::host(*a)),
        Target::Cidr(c) => TargetKey::Net(*c),
    }
}

/// Rejects two policies on the same target with overlapping ports. Nested cidrs are fine (the
/// longest prefix wins at lookup).
fn check_overlaps(policies: &[(&LoadedDoc, &Policy)], errors: &mut Vec<Diagnostic>) {
    let mut by_target: HashMap<TargetKey<'_>, Vec<(&LoadedDoc, &Policy)>> = HashMap::new();
    for (doc, policy) in policies {
        let earlier = by_target
            .entry(target_key(&policy.destination.target))
            .or_default();
        for (first_doc, first) in earlier.iter() {
            if first.name == policy.name {
                continue; // a duplicate name, already reported
            }
            if first.destination.ports.overlaps(&policy.destination.ports) {
                errors.push(Diagnostic::new(
                    &doc.key_location(&["spec", "destination"]),
                    format!(
                        "destination {} port {} overlaps Policy {:?} ({} port {}) at {}: one destination is served by one policy",
                        policy.destination.target,
                        policy.destination.ports,
                        first.name,
                        first.destination.target,
                        first.destination.ports,
                        first_doc.key_location(&["spec", "destination"])
                    ),
                ));
                break;
            }
        }
        earlier.push((doc, policy));
    }
}
