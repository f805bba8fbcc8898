//! What the broker remembers between connections about the processes and cgroups it has
//! seen, so that a connection from a process or cgroup seen before costs no /proc reads.
//!
//! - A process is named by its pid and its start time as the kernel recorded them at
//!   connect time (a pid alone is reused); its executable's path (for display) is read once,
//!   from /proc, after checking that /proc shows that very process (same start time).
//! - A cgroup is named by its id, which the kernel never reuses while it runs; its path and
//!   owner are read once (/proc/<pid>/cgroup, then a `stat` of the directory that checks it has
//!   that id) and kept while inotify reports no owner change; cgroup v2 refuses renames
//!   ([`super::cgroup_paths`]).
//!
//! - A workload's identity, once built for a connection, is shared with every live
//!   connection whose identity is equal ([`Seen::share`]): a pool's hundred idle connections
//!   hold one copy of it for their audit records, not a hundred. Each connection's identity
//!   is still built afresh and compared whole, so nothing is ever stale.
//!
//! Each map holds at most [`MAX`] entries and is emptied when full: a bound, not an LRU (a
//! node's processes and cgroups that connect through latch are far fewer).
use std::{
    collections::HashMap,
    fs,
    hash::{BuildHasher as _, RandomState},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
};

use super::Workload;
use super::cgroup_paths::{Cached, CgroupPaths, owner_if_id};

/// Entries per map.
pub const MAX: usize = 4096;

#[derive(Debug, Default)]
pub struct Seen {
    /// (pid, start ns) → executable path.
    exes: Mutex<HashMap<(u32, u64), PathBuf>>,
    /// cgroup id → path from the hierarchy's root and owner.
    cgroups: Mutex<CgroupPaths>,
    /// Hash of a workload's identity → the live copy connections share.
    workloads: Mutex<HashMap<u64, Weak<Workload>>>,
    hasher: RandomState,
}

impl Seen {
    /// The executable path of process `pid` that started at `start_ns` (CLOCK_BOOTTIME), if
    /// it still runs (or was seen before).
    pub fn exe(&self, pid: u32, start_ns: u64) -> Option<PathBuf> {
        if let Some(p) = lock(&self.exes).get(&(pid, start_ns)) {
            return Some(p.clone());
        }
        // Read, then check that the process /proc showed is the one that connected: a
        // successor with the same pid has another start time.
        let path = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        if start_ticks(pid)? != start_ns / tick_ns() {
            return None;
        }
        insert(&self.exes, (pid, start_ns), path.clone());
        Some(path)
    }

    /// The path of cgroup `id` and the owner of its directory, `pid` being a process that
    /// was in it when it connected.
    pub fn cgroup(&self, pid: u32, id: u64, root: &Path) -> Option<(String, u32)> {
        let cached = lock(&self.cgroups).get(id);
        match cached {
            Cached::Hit(path, owner) => return Some((path, owner)),
            Cached::Check(path) => {
                if let Some(owner) = owner_if_id(root, &path, id) {
                    return Some((path, owner));
                }
                lock(&self.cgroups).remove(id);
            }
            Cached::Miss => {}
        }
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
        let owner = lock(&self.cgroups).check_and_keep(root, path.clone(), id)?;
        Some((path, owner))
    }
}

impl Seen {
    /// `workload`, or an equal one that live connections already hold.
    pub fn share(&self, workload: Workload) -> Arc<Workload> {
        let key = self.hasher.hash_one((
            workload.pid,
            workload.uid,
            workload.gid,
            &workload.comm,
            &workload.cgroup,
        ));
        let mut map = lock(&self.workloads);
        if let Some(live) = map.get(&key).and_then(Weak::upgrade)
            && *live == workload
        {
            return live;
        }
        if map.len() >= MAX {
            map.retain(|_, w| w.strong_count() > 0);
            if map.len() >= MAX {
                map.clear();
            }
        }
        let shared = Arc::new(workload);
        map.insert(key, Arc::downgrade(&shared));
        shared
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn insert<K: std::hash::Hash + Eq, V>(m: &Mutex<HashMap<K, V>>, k: K, v: V) {
    let mut m = lock(m);
    if m.len() >= MAX {
        m.clear();
    }
    m.insert(k, v);
}

/// Nanoseconds per clock tick of /proc/<pid>/stat.
pub fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    1_000_000_000 / hz
}

/// Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // It comes after the parenthesised comm, which may itself contain spaces and parentheses.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_identities_share_one_copy_and_a_different_one_gets_its_own() {
        let seen = Seen::default();
        let w = |comm: &str| Workload {
            pid: 7,
            comm: comm.into(),
            cgroup: Some("/pool.slice/app".into()),
            ..Default::default()
        };
        let a = seen.share(w("app"));
        let b = seen.share(w("app"));
        assert!(Arc::ptr_eq(&a, &b), "equal identities share");
        let other = seen.share(w("other"));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(other.comm, "other");
        // Equal in the hashed fields, different elsewhere: never taken for the live one.
        let mut uid = w("app");
        uid.exe = Some("/usr/bin/other".into());
        let c = seen.share(uid);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.exe.as_deref(), Some(Path::new("/usr/bin/other")));
        // Once no connection holds it, the next gets a new copy.
        drop((a, b, c));
        let d = seen.share(w("app"));
        assert_eq!(Arc::strong_count(&d), 1);
    }

    fn my_start_ns() -> u64 {
        start_ticks(std::process::id()).unwrap() * tick_ns()
    }

    #[test]
    fn a_process_is_known_by_pid_and_start_time_and_read_once() {
        let seen = Seen::default();
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(seen.exe(me, my_start_ns()), Some(exe.clone()));
        assert_eq!(lock(&seen.exes).len(), 1);
        // Same pid, another start time: another process, which /proc does not show.
        assert_eq!(seen.exe(me, my_start_ns() + 10 * tick_ns()), None);
        // The cached answer comes without /proc (a pid that does not exist).
        insert(&seen.exes, (u32::MAX, 7), exe.clone());
        assert_eq!(seen.exe(u32::MAX, 7), Some(exe));
        assert_eq!(seen.exe(u32::MAX, 8), None);
    }

    #[test]
    fn a_cgroup_path_is_cached_by_id_and_checked_against_the_directory() {
        let root = crate::cgroup::v2_mount().expect("cgroup v2 mounted");
        let seen = Seen::default();
        let me = std::process::id();
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let dir = root.join(path.trim_start_matches('/'));
        let id = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&dir).unwrap());
        let (got, _) = seen.cgroup(me, id, &root).expect("own cgroup");
        assert_eq!(got, path);
        // From the cache, for a pid that does not exist.
        assert_eq!(
            seen.cgroup(u32::MAX, id, &root).map(|c| c.0),
            Some(path.to_owned())
        );
        // A wrong id is never given the path.
        assert_eq!(seen.cgroup(me, id + 1, &root), None);
    }
}
