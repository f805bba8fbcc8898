//! cgroup v2: finding the hierarchy, creating and removing latch's own child cgroups,
//! and cleaning up what a crashed latch left behind.
use std::{
    fs,
    io::{self, Write as _},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

/// Prefix of the cgroups `latch run` creates: `latch-run-<pid>`.
pub const RUN_PREFIX: &str = "latch-run-";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/mounts)")]
    NotMounted,
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io {
        action,
        path,
        source,
    }
}

/// Mount point of the cgroup v2 hierarchy, read from /proc/mounts (it is
/// /sys/fs/cgroup on unified hosts and e.g. /sys/fs/cgroup/unified on hybrid ones).
pub fn v2_mount() -> Result<PathBuf, CgroupError> {
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(io_err("reading", Path::new("/proc/mounts")))?;
    parse_v2_mount(&mounts).ok_or(CgroupError::NotMounted)
}

fn parse_v2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup v2 path of process `pid`, relative to the hierarchy root (e.g. "/user.slice/x").
pub fn of_pid(pid: u32) -> io::Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other("no cgroup v2 entry"))
}

/// A cgroup latch created; removed (with any process left in it killed) on drop.
#[derive(Debug)]
pub struct OwnedCgroup {
    path: PathBuf,
}

impl OwnedCgroup {
    /// Creates `parent/name`. Fails if it exists: it belongs to someone else.
    pub fn create(parent: &Path, name: &str) -> Result<Self, CgroupError> {
        let path = parent.join(name);
        fs::create_dir(&path).map_err(io_err("creating cgroup", &path))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An open handle on `cgroup.procs`, to move a process in with [`enter_from_child`]
    /// between fork and exec.
    pub fn procs_handle(&self) -> Result<OwnedFd, CgroupError> {
        let procs = self.path.join("cgroup.procs");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(io_err("opening", &procs))?;
        Ok(file.into())
    }

    /// Kills whatever still runs inside and removes the directory.
    pub fn remove(self) -> Result<(), CgroupError> {
        let path = self.path.clone();
        std::mem::forget(self);
        remove_dir(&path)
    }
}

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        if let Err(err) = remove_dir(&self.path) {
            tracing::warn!(%err, "could not remove cgroup");
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is open as `procs`.
/// Only async-signal-safe calls: meant for `CommandExt::pre_exec`.
pub fn enter_from_child(procs: &OwnedFd) -> io::Result<()> {
    // Writing "0" moves the writer itself.
    // SAFETY: write(2) of a static one-byte buffer to a descriptor the caller keeps open.
    let n = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes a cgroup directory latch owns: kills its processes (cgroup.kill, falling back to
/// SIGKILL per pid) and retries rmdir while they exit.
fn remove_dir(path: &Path) -> Result<(), CgroupError> {
    for attempt in 0..100 {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if attempt == 0 {
                    kill_all(path);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_err("removing cgroup", path)(e)),
        }
    }
    fs::remove_dir(path).map_err(io_err("removing cgroup", path))
}

fn kill_all(path: &Path) {
    let kill = path.join("cgroup.kill");
    if fs::OpenOptions::new()
        .write(true)
        .open(&kill)
        .and_then(|mut f| f.write_all(b"1"))
        .is_ok()
    {
        return;
    }
    if let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) has no memory effects; the pids are this cgroup's own processes.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes `latch-run-<pid>` cgroups under `root` whose `latch run` process is gone (it was
/// killed before it could clean up). Returns the paths removed.
pub fn remove_stale_runs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(RUN_PREFIX)) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        match remove_dir(&path) {
            Ok(()) => removed.push(path),
            Err(err) => tracing::warn!(%err, "could not remove a stale latch cgroup"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v2_mount_on_hybrid_host() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            parse_v2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_v2_mount() {
        assert_eq!(parse_v2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }
}
