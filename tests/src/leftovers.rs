//! Checks that latch left nothing behind: cgroups, pinned objects, attached links.
use std::path::Path;

/// Panics if any bpf link is still attached to the cgroup with id `cgroup_id`, if
/// `cgroup_dir` (when given) still exists, or if a pinned `latch*` object exists.
pub fn assert_none(cgroup_id: u64, cgroup_dir: Option<&Path>) {
    let bpftool = crate::bins::tool("bpftool", "the Debian package bpftool");
    let out = std::process::Command::new(bpftool)
        .args(["-j", "link", "show"])
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool link show failed");
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Array(vec![]));
    let attached: Vec<&serde_json::Value> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["cgroup_id"].as_u64() == Some(cgroup_id))
        .collect();
    assert!(
        attached.is_empty(),
        "links still attached to cgroup {cgroup_id}: {attached:?}"
    );
    if let Some(dir) = cgroup_dir {
        assert!(!dir.exists(), "cgroup {} was not removed", dir.display());
    }
    // Pins outside latch's instance directory, and instance directories no test owns, are
    // leftovers. (Instances named `test-*` belong to tests that may be running in parallel;
    // each of those checks its own.)
    let mut pins: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("latch") && name != "latch"
        })
        .map(|e| e.path())
        .collect();
    pins.extend(
        std::fs::read_dir("/sys/fs/bpf/latch")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with("test-"))
            .map(|e| e.path()),
    );
    assert!(pins.is_empty(), "pinned latch objects left: {pins:?}");
}
