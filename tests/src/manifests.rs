//! The deployment files under `deploy/`, read as data: YAML documents as JSON values (through
//! PyYAML, which `kubernetes-validate` brings along), and paths.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{bins, run_ok};

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `deploy/kubernetes/`.
pub fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// Every `*.yaml` below `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file (empty ones left out), as JSON values.
pub fn load_yaml(path: &Path) -> Vec<serde_json::Value> {
    let python = bins::tool(
        "python3",
        "python3 with PyYAML (`cargo xtask setup` installs kubernetes-validate, which brings it)",
    );
    let out = run_ok(
        Command::new(python)
            .args([
                "-c",
                "import sys, json, yaml\n\
                 docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                 json.dump(docs, sys.stdout)",
            ])
            .arg(path),
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}: not YAML documents: {e}", path.display()))
}

/// Writes `docs` to `path` as one YAML stream.
pub fn write_yaml(path: &Path, docs: &[serde_json::Value]) {
    let python = bins::tool("python3", "python3 with PyYAML");
    let json = path.with_extension("json");
    std::fs::write(&json, serde_json::to_vec(docs).unwrap()).expect("write json");
    run_ok(
        Command::new(python)
            .args([
                "-c",
                "import sys, json, yaml\n\
                 docs = json.load(open(sys.argv[1]))\n\
                 open(sys.argv[2], 'w').write(yaml.safe_dump_all(docs, sort_keys=False))",
            ])
            .arg(&json)
            .arg(path),
    );
    let _ = std::fs::remove_file(json);
}

/// The `deploy/kubernetes/daemonset.yaml` DaemonSet's pod spec and its one container.
pub fn daemonset() -> (serde_json::Value, serde_json::Value) {
    let docs = load_yaml(&kubernetes_dir().join("daemonset.yaml"));
    assert_eq!(docs.len(), 1, "daemonset.yaml holds one document");
    assert_eq!(docs[0]["kind"], "DaemonSet");
    let pod = docs[0]["spec"]["template"]["spec"].clone();
    let containers = pod["containers"].as_array().expect("containers").clone();
    assert_eq!(containers.len(), 1, "one container: latch");
    (pod, containers[0].clone())
}

/// The capabilities the DaemonSet's container adds, as `CAP_…` names.
pub fn daemonset_capabilities() -> Vec<String> {
    let (_, c) = daemonset();
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]), "drop ALL first");
    caps["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect()
}
