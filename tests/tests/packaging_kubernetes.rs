//! deploy/kubernetes/ is valid against the real upstream schemas, offline.
//!
//! `kubernetes-validate` (PyPI) carries the OpenAPI schemas of each Kubernetes release; every
//! `*.yaml` below deploy/kubernetes is checked with `--strict` (unknown fields are errors)
//! against [`KUBERNETES_VERSION`]. It only warns about kinds it has no schema for: the
//! Kustomization and our custom resources. The custom resources are checked here instead:
//! against the CustomResourceDefinitions in crds.yaml when that file exists, and always as
//! file-format documents by `latch policy check` (their `spec` is the file format's).
//!
//! No cluster runs here: that the DaemonSet really runs is tested with podman in
//! packaging_container.rs, with the namespaces, mounts and capabilities read from it.
use std::{path::Path, process::Command};

use latch_tests::{
    TempDir, bins,
    manifests::{self, kubernetes_dir, load_yaml, yaml_files},
    run_ok,
};
use serde_json::Value;

/// The Kubernetes release the manifests are validated against (and need: the DaemonSet's
/// `appArmorProfile` field exists since 1.30).
const KUBERNETES_VERSION: &str = "1.33.0";

/// Kinds kubernetes-validate has no schema for, and who checks them instead.
const OWN_KINDS: &[&str] = &["Kustomization", "Policy", "ClusterPolicy", "SecretStore"];

fn kubernetes_validate(files: &[&Path]) -> std::process::Output {
    Command::new(bins::tool(
        "kubernetes-validate",
        "the PyPI package kubernetes-validate",
    ))
    .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
    .args(files)
    .output()
    .expect("run kubernetes-validate")
}

#[test]
fn every_manifest_passes_kubernetes_validate_strict() {
    let files = yaml_files(&kubernetes_dir());
    for want in [
        "namespace.yaml",
        "serviceaccount.yaml",
        "configmap.yaml",
        "daemonset.yaml",
        "kustomization.yaml",
        "examples/demo.yaml",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(want)),
            "deploy/kubernetes/{want} is missing"
        );
    }
    let refs: Vec<&Path> = files.iter().map(|f| f.as_path()).collect();
    let out = kubernetes_validate(&refs);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    // Each document with a known kind says "passed"; the only warnings are our own kinds.
    let mut documents = 0;
    for f in &files {
        for doc in load_yaml(f) {
            documents += 1;
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a document without kind", f.display()));
            if OWN_KINDS.contains(&kind) {
                continue;
            }
            let name = doc["metadata"]["name"].as_str().unwrap();
            let line = format!("passed for resource {}/{name}", kind.to_lowercase());
            assert!(text.contains(&line), "no `{line}` in:\n{text}");
        }
    }
    for warning in text.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            OWN_KINDS
                .iter()
                .any(|k| warning.contains(&format!("schema for kind {k} "))),
            "unexpected warning: {warning}"
        );
    }
    eprintln!(
        "{} files, {documents} documents valid for Kubernetes {KUBERNETES_VERSION}",
        files.len()
    );
}

#[test]
fn kubernetes_validate_rejects_a_daemonset_with_a_misspelt_field() {
    // The check above can fail: the same DaemonSet with `hostPid` for `hostPID`.
    let dir = TempDir::new("k8s-bad");
    let text = std::fs::read_to_string(kubernetes_dir().join("daemonset.yaml")).unwrap();
    assert!(text.contains("hostPID: true"));
    let bad = dir.write("daemonset.yaml", &text.replace("hostPID:", "hostPid:"));
    let out = kubernetes_validate(&[&bad]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a misspelt field passed:\n{text}");
    assert!(text.contains("hostPid"), "{text}");
}

#[test]
fn the_kustomization_applies_every_top_level_manifest() {
    let docs = load_yaml(&kubernetes_dir().join("kustomization.yaml"));
    let resources: Vec<&str> = docs[0]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for f in std::fs::read_dir(kubernetes_dir()).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                resources.contains(&name.as_str()),
                "kustomization.yaml does not list {name}"
            );
        }
    }
    for r in &resources {
        let exists = kubernetes_dir().join(r).is_file();
        assert!(exists, "kustomization.yaml lists {r}, which does not exist");
    }
}

/// Policy and SecretStore documents of a file: the custom resources.
fn custom_resources(docs: Vec<Value>) -> Vec<Value> {
    docs.into_iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("latch.dev/"))
        })
        .collect()
}

#[test]
fn the_example_resources_load_as_latch_configuration() {
    let examples = custom_resources(load_yaml(&kubernetes_dir().join("examples/demo.yaml")));
    let kinds: Vec<&str> = examples
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"Policy") && kinds.contains(&"SecretStore"),
        "examples/demo.yaml needs a Policy and a SecretStore: {kinds:?}"
    );
    for d in &examples {
        assert_eq!(d["apiVersion"], "latch.dev/v1alpha1", "{d}");
    }
    // The file format has no metadata.namespace (a namespaced resource's scope is the
    // Kubernetes side's business); the spec is checked as the agent's loader reads it.
    let dir = TempDir::new("k8s-examples");
    let file_format: Vec<Value> = examples
        .iter()
        .cloned()
        .map(|mut d| {
            d["metadata"].as_object_mut().unwrap().remove("namespace");
            d
        })
        .collect();
    manifests::write_yaml(&dir.path().join("demo.yaml"), &file_format);
    let out = run_ok(
        Command::new(bins::latch())
            .args(["policy", "check"])
            .arg(dir.path()),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("1 policies, 1 secret stores"), "{said}");

    // The ConfigMap's files are what the agent loads from /etc/latch/.
    let cm = load_yaml(&kubernetes_dir().join("configmap.yaml"));
    let data = cm[0]["data"].as_object().expect("ConfigMap data");
    let etc = TempDir::new("k8s-configmap");
    for (name, text) in data {
        assert!(name.ends_with(".yaml"), "{name}: the agent loads *.yaml");
        etc.write(name, text.as_str().unwrap());
    }
    run_ok(
        Command::new(bins::latch())
            .args(["policy", "check"])
            .arg(etc.path()),
    );
}

/// The `openAPIV3Schema` of `kind` (group/version from `api_version`) in crds.yaml.
fn crd_schema(api_version: &str, kind: &str) -> Value {
    let crds = load_yaml(&kubernetes_dir().join("crds.yaml"));
    let (group, version) = api_version.split_once('/').unwrap();
    let crd = crds
        .iter()
        .find(|c| c["spec"]["group"] == group && c["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("crds.yaml has no CRD for {group} {kind}"));
    let v = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version)
        .unwrap_or_else(|| panic!("the {kind} CRD has no version {version}"));
    let schema = v["schema"]["openAPIV3Schema"].clone();
    assert!(schema.is_object(), "the {kind} CRD has no openAPIV3Schema");
    schema
}

/// Validates `doc` against a CRD schema with the `jsonschema` package, as the API server with
/// strict field validation (kubectl's default) does: a field the schema does not declare is an
/// error, except where the schema keeps fields (x-kubernetes-preserve-unknown-fields) and in
/// `metadata` (the API server's own). OpenAPI's x-kubernetes-* keywords are annotations to
/// jsonschema. `Err` holds jsonschema's message.
fn validate_cr(schema: &Value, doc: &Value) -> Result<(), String> {
    let dir = TempDir::new("k8s-crd");
    let pair = dir.path().join("pair.json");
    std::fs::write(&pair, serde_json::to_vec(&(schema, doc)).unwrap()).unwrap();
    let out = Command::new(bins::tool("python3", "python3"))
        .args([
            "-c",
            "import sys, json, jsonschema\n\
             def strict(s):\n\
             \x20   if isinstance(s, list):\n\
             \x20       for v in s: strict(v)\n\
             \x20   if not isinstance(s, dict): return\n\
             \x20   if s.get('type') == 'object' and not s.get('x-kubernetes-preserve-unknown-fields'):\n\
             \x20       s.setdefault('additionalProperties', False)\n\
             \x20   for k, v in s.items():\n\
             \x20       if k != 'enum': strict(v)\n\
             schema, doc = json.load(open(sys.argv[1]))\n\
             meta = schema['properties'].pop('metadata')\n\
             strict(schema)\n\
             schema['properties']['metadata'] = meta\n\
             jsonschema.validate(doc, schema)",
        ])
        .arg(&pair)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() || stderr.contains("jsonschema.exceptions.ValidationError"),
        "the validator itself failed:\n{stderr}"
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(stderr)
    }
}

fn example(kind: &str) -> Value {
    custom_resources(load_yaml(&kubernetes_dir().join("examples/demo.yaml")))
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("examples/demo.yaml has no {kind}"))
}

#[test]
fn the_example_resources_match_the_crd_schemas() {
    let examples = custom_resources(load_yaml(&kubernetes_dir().join("examples/demo.yaml")));
    for cr in examples {
        let kind = cr["kind"].as_str().unwrap();
        let schema = crd_schema(cr["apiVersion"].as_str().unwrap(), kind);
        if let Err(e) = validate_cr(&schema, &cr) {
            panic!("example {kind} does not match crds.yaml:\n{e}");
        }
    }
}

#[test]
fn the_crd_schemas_reject_unknown_fields_wrong_enums_and_two_backends() {
    let policy = example("Policy");
    let store = example("SecretStore");
    let policy_schema = crd_schema("latch.dev/v1alpha1", "Policy");
    let store_schema = crd_schema("latch.dev/v1alpha1", "SecretStore");
    let cluster_schema = crd_schema("latch.dev/v1alpha1", "ClusterPolicy");
    let mut cases: Vec<(&str, &Value, Value, &str)> = Vec::new();
    let mut p = policy.clone();
    p["spec"]["destination"]["hots"] = "db.example".into();
    cases.push(("a misspelt destination field", &policy_schema, p, "hots"));
    let mut p = policy.clone();
    p["spec"]["protocol"] = "postgress".into();
    cases.push(("an unknown protocol", &policy_schema, p, "postgress"));
    let mut p = policy.clone();
    p["spec"]["tls"]["mode"] = "verify-everything".into();
    cases.push((
        "an unknown tls mode",
        &cluster_schema,
        p,
        "verify-everything",
    ));
    let mut p = policy.clone();
    p["spec"]["destination"]["port"] = 70000.into();
    cases.push(("a port out of range", &policy_schema, p, "70000"));
    let mut p = policy.clone();
    p["spec"]["credentials"]["password"]["feild"] = "password".into();
    cases.push((
        "a misspelt secret reference field",
        &policy_schema,
        p,
        "feild",
    ));
    let mut p = policy.clone();
    p["spec"]["destination"]["address"] = "10.0.0.1".into();
    cases.push(("two targets", &policy_schema, p, "valid under each of"));
    // `namespace: fromPod` is for ClusterPolicies: a namespaced Policy reads its own
    // namespace's Secrets, and its schema leaves the option out.
    let mut from_pod = policy.clone();
    from_pod["spec"]["credentials"]["password"]["namespace"] = "fromPod".into();
    cases.push((
        "namespace: fromPod in a namespaced Policy",
        &policy_schema,
        from_pod.clone(),
        "namespace",
    ));
    let mut c = from_pod.clone();
    c["spec"]["credentials"]["password"]["namespace"] = "fromNode".into();
    cases.push((
        "an unknown secret namespace in a ClusterPolicy",
        &cluster_schema,
        c,
        "fromNode",
    ));
    let mut s = store.clone();
    s["spec"]["kubernetes"]["namespase"] = "x".into();
    cases.push(("a misspelt store field", &store_schema, s, "namespase"));
    let mut s = store.clone();
    s["spec"]["env"] = serde_json::json!({});
    cases.push(("two backends", &store_schema, s, "valid under each of"));
    let mut s = store.clone();
    s["spec"] = serde_json::json!({"vautl": {"address": "https://vault"}});
    cases.push(("a misspelt backend", &store_schema, s, "vautl"));
    for (what, schema, doc, needle) in &cases {
        match validate_cr(schema, doc) {
            Ok(()) => panic!("{what} passed the CRD schema: {doc}"),
            Err(e) => assert!(e.contains(needle), "{what}: no {needle:?} in:\n{e}"),
        }
    }
    // And the same documents, unmodified, pass.
    validate_cr(&policy_schema, &policy).unwrap();
    validate_cr(&cluster_schema, &policy).unwrap();
    validate_cr(&cluster_schema, &from_pod).unwrap();
    validate_cr(&store_schema, &store).unwrap();
    eprintln!(
        "{} invalid resources rejected by the generated schemas",
        cases.len()
    );
}

#[test]
fn the_daemonset_grants_the_capabilities_of_the_systemd_unit() {
    // One list of what the agent needs, said twice (unit and DaemonSet): they must agree.
    let unit = std::fs::read_to_string(manifests::deploy_dir().join("latch.service")).unwrap();
    let bounding: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .collect();
    let mut ds = manifests::daemonset_capabilities();
    ds.sort();
    let mut unit_caps: Vec<String> = bounding.iter().map(|s| s.to_string()).collect();
    unit_caps.sort();
    assert_eq!(ds, unit_caps);
    let (pod, c) = manifests::daemonset();
    assert_eq!(pod["hostPID"], true);
    assert_eq!(c["securityContext"]["privileged"], false);
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for need in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/run/netns",
        "/var/lib/latch",
        "/etc/latch",
    ] {
        assert!(mounts.contains(&need), "no mount at {need}: {mounts:?}");
    }
}
