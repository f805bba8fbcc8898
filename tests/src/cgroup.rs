//! A cgroup the test creates and removes, and commands that start inside it.
use std::{
    fs,
    io::Write as _,
    os::{
        fd::AsRawFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
};

/// The cgroup v2 mount point, from /proc/mounts.
pub fn v2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup v2 hierarchy mounted")
}

/// `<cgroup v2 root>/latch-test-<pid>-<n>`; everything in it is killed and the directory
/// removed on drop, also when the test panics.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        crate::require_root();
        let root = v2_root();
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            for dir in sweep_stale(&root) {
                eprintln!(
                    "removed {}, left by a test process that was killed",
                    dir.display()
                );
            }
        });
        let path = root.join(format!(
            "latch-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id the kernel reports (the directory's inode number).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path).expect("stat cgroup").ino()
    }

    /// A command that moves itself into this cgroup between fork and exec.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let mut cmd = Command::new(program);
        // SAFETY: only write(2) on an fd opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                let n = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if n == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        cmd
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    /// Kills everything in the cgroup and its descendants, then removes the directories
    /// depth-first (children such as a pod's `kubepods.slice` first).
    fn drop(&mut self) {
        let _ = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.kill"))
            .and_then(|mut f| f.write_all(b"1"));
        if !remove_tree(&self.path) {
            eprintln!("warning: could not remove {}", self.path.display());
        }
    }
}

/// Removes the test cgroups of test processes that are gone (killed before the cgroups'
/// `Drop` ran: a timeout, Ctrl-C): `latch-test-<pid>-<n>` under `root` whose `<pid>` no longer
/// exists. What is still in one was started by that test, and is killed first. Returns the
/// cgroups removed.
fn sweep_stale(root: &Path) -> Vec<PathBuf> {
    let mut swept = Vec::new();
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(owner) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        let _ = fs::write(dir.join("cgroup.kill"), "1");
        if remove_tree(&dir) {
            swept.push(dir);
        }
    }
    swept
}

/// The test process that a cgroup named `latch-test-<pid>-<n>` belongs to.
fn owner(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix("latch-test-")?.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Removes the cgroup directory `dir` and every cgroup below it, deepest first, each retried
/// while its killed processes exit. True when `dir` is gone.
fn remove_tree(dir: &Path) -> bool {
    let children: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    let mut ok = true;
    for child in children {
        ok &= remove_tree(&child);
    }
    ok && crate::pod::remove_cgroup_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cgroups_named_for_a_test_process_are_read_as_such() {
        assert_eq!(owner("latch-test-7403-0"), Some(7403));
        assert_eq!(owner("latch-test-7403-12"), Some(7403));
        for other in [
            "latch-run-7403",
            "latch-test-pod",
            "latch-test-7403",
            "x-latch-test-1-2",
        ] {
            assert_eq!(owner(other), None, "{other}");
        }
    }

    #[test]
    fn the_cgroups_of_a_test_process_that_is_gone_are_removed_and_a_live_ones_kept() {
        // First, as the first test cgroup of the process sweeps once.
        let live = TestCgroup::new();
        let root = v2_root();
        // A process that has exited (and been reaped): its id names no process now.
        let mut child = Command::new("true").spawn().expect("spawn true");
        let gone = child.id();
        child.wait().expect("wait for true");
        let stale = root.join(format!("latch-test-{gone}-0"));
        fs::create_dir(&stale).expect("create a stale test cgroup");
        fs::create_dir(stale.join("kubepods.slice")).expect("and one below it");
        let swept = sweep_stale(&root);
        assert!(swept.contains(&stale), "{swept:?}");
        assert!(!stale.exists());
        assert!(live.path().exists());
        assert!(!swept.iter().any(|d| d == live.path()));
    }
}
