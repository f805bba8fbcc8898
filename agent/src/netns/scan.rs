//! Which network namespaces the broker must serve: every named one (`/run/netns`: `ip netns`,
//! CNI plugins and container runtimes pin pod and container namespaces there before any of
//! their processes start) and that of every process in the intercepted cgroups.
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Where named network namespaces are pinned (`/var/run` is usually a link to `/run`).
pub const NAMED_DIRS: &[&str] = &["/run/netns", "/var/run/netns"];

/// Namespaces in use: nsfs inode → a path that opens it.
pub fn in_use(cgroup: &Path) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    let Some(nsfs) = nsfs_dev() else {
        return found;
    };
    named(nsfs, &mut found);
    processes(cgroup, nsfs, &mut found);
    found
}

/// The device number of nsfs, which every namespace file stats to.
fn nsfs_dev() -> Option<u64> {
    fs::metadata("/proc/self/ns/net").ok().map(|m| m.dev())
}

/// Named namespaces. An entry that is not (yet) a namespace — `ip netns add` creates the file
/// before it bind-mounts the namespace on it — is skipped.
pub fn named(nsfs: u64, found: &mut HashMap<u64, PathBuf>) {
    let mut seen_dirs = Vec::new();
    for dir in NAMED_DIRS {
        let Ok(real) = fs::canonicalize(dir) else {
            continue;
        };
        if seen_dirs.contains(&real) {
            continue;
        }
        let Ok(entries) = fs::read_dir(&real) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(m) = fs::metadata(&path)
                && m.dev() == nsfs
            {
                found.entry(m.ino()).or_insert(path);
            }
        }
        seen_dirs.push(real);
    }
}

/// Namespaces of the processes in `cgroup` and below.
fn processes(cgroup: &Path, nsfs: u64, found: &mut HashMap<u64, PathBuf>) {
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines() {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Ok(m) = fs::metadata(&path)
                && m.dev() == nsfs
            {
                found.entry(m.ino()).or_insert(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_namespace_is_found_through_its_cgroup() {
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 membership");
        let root = crate::cgroup::v2_mount().expect("a cgroup v2 mount");
        let own = fs::metadata("/proc/self/ns/net").unwrap().ino();
        let found = in_use(&root.join(rel.trim_start_matches('/')));
        assert!(found.contains_key(&own), "{found:?}");
    }
}
