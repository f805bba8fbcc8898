use super::*;
use serde_json::json;

fn key(kind: Kind, ns: Option<&str>, name: &str) -> Key {
    Key {
        kind,
        namespace: ns.map(str::to_owned),
        name: name.into(),
    }
}

fn obj(spec: serde_json::Value) -> Object {
    Object {
        spec,
        accepted: None,
        observed_generation: None,
        generation: Some(1),
        resource_version: Some("1".into()),
    }
}

fn pg_policy(store: &str, path: &str, workloads: serde_json::Value) -> serde_json::Value {
    json!({
        "destination": {"address": "10.0.0.1", "port": 5432},
        "protocol": "postgres",
        "tls": {"mode": "disable"},
        "credentials": {"store": store, "username": {"path": path, "field": "username"},
                        "password": {"path": path, "field": "password"}},
        "workloads": workloads,
    })
}

fn files() -> Config {
    config::load_str(
        "files.yaml",
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: local}\nspec:\n  file: {path: /etc/latch/s.yaml}\n---\napiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: api}\nspec:\n  kubernetes: {apiServer: 'https://127.0.0.1:6443', tokenFile: /etc/latch/token}\n",
    )
    .unwrap()
}

#[test]
fn a_namespaced_policy_admits_only_its_namespace_and_uses_its_namespaces_stores() {
    let mut objects = BTreeMap::new();
    objects.insert(
        key(Kind::SecretStore, Some("shop"), "secrets"),
        obj(json!({"kubernetes": {}})),
    );
    objects.insert(
        key(Kind::Policy, Some("shop"), "db"),
        obj(pg_policy(
            "secrets",
            "db",
            json!([{"serviceAccount": "orders"}]),
        )),
    );
    let m = merge(files(), &objects, Some("api"));
    assert!(
        m.conditions.values().all(|c| c.accepted),
        "{:?}",
        m.conditions
    );
    let p = m.config.policy("shop/db").unwrap();
    assert_eq!(p.workloads[0].namespace.as_deref(), Some("shop"));
    let s = m.config.store("shop/secrets").unwrap();
    let StoreBackend::Kubernetes(k) = &s.backend else {
        panic!()
    };
    assert_eq!(k.namespace.as_deref(), Some("shop"));
    assert_eq!(k.api_server.as_deref(), Some("https://127.0.0.1:6443"));
    assert!(
        matches!(&p.credentials, Some(config::Credentials::Static { store, .. }) if store == "shop/secrets")
    );
}

#[test]
fn what_a_namespaced_policy_may_not_do_is_invalid_with_a_reason() {
    let cases = [
        (
            pg_policy("secrets", "db", json!([{"namespace": "bank"}])),
            "admits pods of its own namespace only",
        ),
        (
            pg_policy("local", "db", json!("all")),
            "is not a valid SecretStore of namespace \"shop\"",
        ),
        (
            pg_policy("secrets", "bank/db", json!("all")),
            "reads Secrets of its own namespace",
        ),
        (
            json!({"destination": {"address": "10.0.0.1", "port": 5432}, "protocl": "postgres"}),
            "Policy shop/db:",
        ),
    ];
    for (spec, want) in cases {
        let mut objects = BTreeMap::new();
        objects.insert(
            key(Kind::SecretStore, Some("shop"), "secrets"),
            obj(json!({"kubernetes": {}})),
        );
        objects.insert(key(Kind::Policy, Some("shop"), "db"), obj(spec));
        let m = merge(files(), &objects, None);
        let c = &m.conditions[&key(Kind::Policy, Some("shop"), "db")];
        assert!(!c.accepted);
        assert_eq!(c.reason, "Invalid");
        assert!(c.message.contains(want), "{want:?} not in {:?}", c.message);
        assert!(m.config.policy("shop/db").is_none());
    }
}

#[test]
fn workloads_all_of_a_namespaced_policy_is_its_namespace() {
    let mut objects = BTreeMap::new();
    objects.insert(
        key(Kind::SecretStore, Some("shop"), "secrets"),
        obj(json!({"kubernetes": {}})),
    );
    objects.insert(
        key(Kind::Policy, Some("shop"), "db"),
        obj(pg_policy("secrets", "db", json!("all"))),
    );
    let m = merge(files(), &objects, None);
    let p = m.config.policy("shop/db").unwrap();
    assert!(!p.admit_all);
    assert_eq!(p.workloads.len(), 1);
    assert_eq!(p.workloads[0].namespace.as_deref(), Some("shop"));
}

#[test]
fn namespaced_stores_are_kubernetes_stores_of_their_namespace() {
    for (spec, want) in [
        (
            json!({"file": {"path": "/etc/shadow"}}),
            "must be a `kubernetes` store",
        ),
        (
            json!({"kubernetes": {"namespace": "bank"}}),
            "own namespace \"shop\" only",
        ),
        (
            json!({"kubernetes": {"tokenFile": "/etc/t"}}),
            "agent's own API credentials",
        ),
    ] {
        let mut objects = BTreeMap::new();
        objects.insert(key(Kind::SecretStore, Some("shop"), "s"), obj(spec));
        let m = merge(files(), &objects, None);
        let c = &m.conditions[&key(Kind::SecretStore, Some("shop"), "s")];
        assert!(!c.accepted && c.message.contains(want), "{want:?}: {c:?}");
        assert!(m.config.store("shop/s").is_none());
    }
}

#[test]
fn a_cluster_policy_uses_the_files_stores_and_any_namespace() {
    let mut objects = BTreeMap::new();
    objects.insert(
        key(Kind::ClusterPolicy, None, "db"),
        obj(pg_policy("local", "db", json!([{"namespace": "bank"}]))),
    );
    let m = merge(files(), &objects, None);
    assert!(
        m.conditions.values().all(|c| c.accepted),
        "{:?}",
        m.conditions
    );
    assert_eq!(
        m.config.policy("db").unwrap().workloads[0]
            .namespace
            .as_deref(),
        Some("bank")
    );
}

/// `namespace: fromPod`: a ClusterPolicy (or a file policy) may read the Secret of the
/// connecting pod's namespace; a namespaced Policy may not say it (its own namespace's stores
/// are all it reads).
#[test]
fn from_pod_is_for_cluster_policies_and_pins_each_connection_to_its_pods_namespace() {
    let mut spec = pg_policy(
        "api",
        "db-creds",
        json!([{"namespace": "shop"}, {"namespace": "bank"}]),
    );
    spec["credentials"]["username"]["namespace"] = "fromPod".into();
    spec["credentials"]["password"]["namespace"] = "fromPod".into();
    let mut objects = BTreeMap::new();
    objects.insert(key(Kind::ClusterPolicy, None, "per-ns"), obj(spec.clone()));
    objects.insert(
        key(Kind::SecretStore, Some("shop"), "secrets"),
        obj(json!({"kubernetes": {}})),
    );
    let mut own = pg_policy("secrets", "db-creds", json!("all"));
    own["credentials"]["password"]["namespace"] = "fromPod".into();
    objects.insert(key(Kind::Policy, Some("shop"), "own"), obj(own));
    let m = merge(files(), &objects, Some("api"));
    let c = &m.conditions[&key(Kind::ClusterPolicy, None, "per-ns")];
    assert!(c.accepted, "{c:?}");
    let c = &m.conditions[&key(Kind::Policy, Some("shop"), "own")];
    assert!(!c.accepted, "{c:?}");
    assert!(
        c.message
            .contains("namespace: fromPod is for ClusterPolicies"),
        "{c:?}"
    );

    let p = m.config.policy("per-ns").unwrap();
    assert!(p.reads_pod_namespace());
    let shop = p.in_pod_namespace("shop");
    let bank = p.in_pod_namespace("bank");
    let paths = |p: &config::Policy| p.secret_refs().map(|r| r.path.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&shop), ["shop/db-creds", "shop/db-creds"]);
    assert_eq!(paths(&bank), ["bank/db-creds", "bank/db-creds"]);
    assert!(!shop.reads_pod_namespace());
    assert_eq!(shop.pod_namespace.as_deref(), Some("shop"));
    // Without fromPod the references stay as written, whatever pod connects.
    let mut objects = BTreeMap::new();
    objects.insert(
        key(Kind::ClusterPolicy, None, "plain"),
        obj(pg_policy("api", "db-creds", json!([{"namespace": "shop"}]))),
    );
    let m = merge(files(), &objects, Some("api"));
    let plain = m.config.policy("plain").unwrap();
    assert!(!plain.reads_pod_namespace());
    assert_eq!(
        paths(&plain.in_pod_namespace("shop")),
        ["db-creds", "db-creds"]
    );

    // Only a kubernetes store has namespaces, and the path names the Secret alone.
    spec["credentials"]["store"] = "local".into();
    let mut objects = BTreeMap::new();
    objects.insert(
        key(Kind::ClusterPolicy, None, "file-store"),
        obj(spec.clone()),
    );
    spec["credentials"]["store"] = "api".into();
    spec["credentials"]["password"]["path"] = "shop/db-creds".into();
    objects.insert(key(Kind::ClusterPolicy, None, "ns-path"), obj(spec));
    let m = merge(files(), &objects, Some("api"));
    let c = &m.conditions[&key(Kind::ClusterPolicy, None, "file-store")];
    assert!(
        c.message
            .contains("only a kubernetes store has; store \"local\" is a file store"),
        "{c:?}"
    );
    let c = &m.conditions[&key(Kind::ClusterPolicy, None, "ns-path")];
    assert!(
        c.message
            .contains("names a namespace, and namespace: fromPod"),
        "{c:?}"
    );
}
