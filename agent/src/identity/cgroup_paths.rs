//! Cgroup id → path and owner, kept valid by inotify instead of a `stat` per connection.
//!
//! A cached entry can go stale one way: the cgroup's directory changes owner (`chown`, as
//! systemd does when it delegates a cgroup). Paths do not change: the kernel refuses to
//! rename a cgroup of the v2 hierarchy (`EPERM`; the test below checks it), and an id is
//! never reused. So an entry is cached only after inotify watches its directory
//! (`IN_ATTRIB`; also `IN_MOVE_SELF` and `IN_DELETE_SELF`) and after a `stat` that follows
//! the watch has checked it. Every lookup first reads the inotify descriptor (non-blocking:
//! one `read` that finds nothing when nothing changed) and forgets the entries of the
//! directories it reports (all of them if the kernel's queue overflowed). The kernel queues an
//! event inside the system call that made the change, so a lookup that starts after a `chown`
//! has returned sees it. A lookup reads at most [`MAX_READS`] times; if events are still left,
//! it forgets every entry (a workload that `chmod`s its own cgroup's files in a loop cannot hold
//! a lookup).
//!
//! That replaces a path walk per connection (the directory's `stat`: 4–5% of latch's CPU on
//! one-request connections) with that `read`. Where inotify cannot be had (no instance, or
//! [`MAX_WATCHES`] reached), an entry is checked with a `stat` at each lookup, as before.
use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::Path};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};

/// Directories watched at most; past them new entries are checked with a `stat` per lookup.
pub const MAX_WATCHES: usize = 1024;

/// Reads of the watch per lookup, at most.
pub const MAX_READS: usize = 2;

#[derive(Debug)]
struct Entry {
    path: String,
    owner: u32,
    /// Its directory is watched: a lookup needs no `stat`.
    watched: bool,
}

/// The cache (behind the caller's lock).
#[derive(Debug, Default)]
pub struct CgroupPaths {
    entries: HashMap<u64, Entry>,
    inotify: Option<Inotify>,
    /// inotify could not be set up: never tried again.
    no_inotify: bool,
    /// Each watched directory's cgroup id.
    watches: HashMap<WatchDescriptor, u64>,
}

/// What a lookup found.
pub enum Cached {
    /// Path and owner, current.
    Hit(String, u32),
    /// A path that must be checked with a `stat` (not watched).
    Check(String),
    Miss,
}

impl CgroupPaths {
    /// What is cached for `id`, after forgetting the entries whose directories changed.
    pub fn get(&mut self, id: u64) -> Cached {
        self.forget_if_changed();
        match self.entries.get(&id) {
            Some(e) if e.watched => Cached::Hit(e.path.clone(), e.owner),
            Some(e) => Cached::Check(e.path.clone()),
            None => Cached::Miss,
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.entries.remove(&id);
    }

    /// Checks that the directory at `path` (from the hierarchy's `root`) is cgroup `id` and
    /// caches it with its owner, watching its directory first so that a change after the
    /// check is seen. `None`: it is not (any more) that cgroup.
    pub fn check_and_keep(&mut self, root: &Path, path: String, id: u64) -> Option<u32> {
        if self.entries.len() >= super::seen::MAX {
            self.clear();
        }
        let wd = self.watch(root, &path);
        let Some(owner) = owner_if_id(root, &path, id) else {
            // Not that cgroup: its directory's watch (if new) goes, and names no entry.
            if let (Some(wd), Some(inotify)) = (wd, &self.inotify)
                && !self.watches.contains_key(&wd)
            {
                let _ = inotify.rm_watch(wd);
            }
            return None;
        };
        if let Some(wd) = wd {
            self.watches.insert(wd, id);
        }
        let watched = wd.is_some();
        self.entries.insert(
            id,
            Entry {
                path,
                owner,
                watched,
            },
        );
        Some(owner)
    }

    /// Forgets every entry and watch.
    fn clear(&mut self) {
        self.entries.clear();
        self.watches.clear();
        // Closing the instance removes its watches.
        self.inotify = None;
    }

    /// Reads what inotify queued (at most [`MAX_READS`] times: events that keep coming cannot
    /// hold a lookup) and forgets the entries it names; all of them if events were lost, are
    /// still left unread, or the descriptor cannot be read.
    fn forget_if_changed(&mut self) {
        for _ in 0..MAX_READS {
            let Some(inotify) = &self.inotify else {
                return;
            };
            // One read takes what fits its buffer (256 events at most); the rest waits.
            match inotify.read_events() {
                Err(Errno::EAGAIN) => return,
                Ok(events) => self.forget(&events),
                Err(e) => {
                    tracing::debug!(error = %e, "cgroup watch unreadable; starting over");
                    self.clear();
                    return;
                }
            }
        }
        self.entries.clear();
    }

    /// Forgets the entries whose directories `events` name.
    fn forget(&mut self, events: &[InotifyEvent]) {
        for e in events {
            if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                self.entries.clear();
                continue;
            }
            let Some(&id) = self.watches.get(&e.wd) else {
                continue;
            };
            self.entries.remove(&id);
            if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                self.watches.remove(&e.wd);
            }
        }
    }

    /// Watches the directory of `path` (from `root`); its watch, if it could be had.
    fn watch(&mut self, root: &Path, path: &str) -> Option<WatchDescriptor> {
        if self.inotify.is_none() && !self.no_inotify {
            match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
                Ok(i) => self.inotify = Some(i),
                Err(e) => {
                    tracing::info!(error = %e, "no inotify for cgroup paths; each is checked with a stat per connection");
                    self.no_inotify = true;
                }
            }
        }
        let inotify = self.inotify.as_ref()?;
        if self.watches.len() >= MAX_WATCHES {
            return None;
        }
        let flags = AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        let dir = root.join(path.trim_start_matches('/'));
        inotify.add_watch(dir.as_path(), flags).ok()
    }
}

/// The owner of the cgroup directory at `path`, if that directory is cgroup `id` (its inode).
pub fn owner_if_id(root: &Path, path: &str, id: u64) -> Option<u32> {
    let meta = std::fs::metadata(root.join(path.trim_start_matches('/'))).ok()?;
    (meta.ino() == id).then_some(meta.uid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Cgroup directories a test made, removed (deepest first) even when it fails.
    struct Made(Vec<PathBuf>);

    impl Drop for Made {
        fn drop(&mut self) {
            for d in self.0.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }

    /// Makes cgroup `top` under `root` and `children` in it (in that order in the list).
    fn make(root: &Path, top: &str, children: &[&str]) -> Made {
        let mut made = Made(Vec::new());
        for dir in
            std::iter::once(root.join(top)).chain(children.iter().map(|c| root.join(top).join(c)))
        {
            std::fs::create_dir(&dir).unwrap();
            made.0.push(dir);
        }
        made
    }

    /// Bytes queued on `inotify`, not read yet.
    fn queued(inotify: &Inotify) -> i32 {
        use std::os::fd::AsFd as _;
        crate::broker::direct::fionread(&inotify.as_fd()).unwrap()
    }

    fn ino(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().ino()
    }

    fn hit(c: &mut CgroupPaths, id: u64) -> Option<(String, u32)> {
        match c.get(id) {
            Cached::Hit(p, o) => Some((p, o)),
            _ => None,
        }
    }

    /// The cgroup v2 hierarchy's root, for a test that makes cgroups (as root).
    fn cgroup_root() -> std::path::PathBuf {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes cgroups: run it as root"
        );
        crate::cgroup::v2_mount().expect("cgroup v2 mounted")
    }

    #[test]
    fn a_cached_cgroup_is_forgotten_when_its_owner_changes_and_cannot_be_renamed() {
        let root = cgroup_root();
        let top = format!("latch-test-paths-{}", std::process::id());
        let made = make(&root, &top, &["a", "c"]);
        let leaf = format!("/{top}/a");
        let id = ino(&made.0[1]);
        let (other, other_id) = (format!("/{top}/c"), ino(&made.0[2]));
        let mut c = CgroupPaths::default();

        assert_eq!(c.check_and_keep(&root, other.clone(), other_id), Some(0));
        assert_eq!(c.check_and_keep(&root, leaf.clone(), id), Some(0));
        assert_eq!(hit(&mut c, id), Some((leaf.clone(), 0)), "not kept");
        assert_eq!(hit(&mut c, id), Some((leaf.clone(), 0)), "kept once only");
        // Another id is never given the path.
        assert_eq!(c.check_and_keep(&root, leaf.clone(), id + 1), None);

        // Its owner changes: it is forgotten, the other cgroup is not.
        nix::unistd::chown(&made.0[1], Some(4321.into()), None).unwrap();
        assert!(matches!(c.get(id), Cached::Miss), "a chown was missed");
        assert_eq!(
            hit(&mut c, other_id),
            Some((other, 0)),
            "another cgroup forgotten"
        );
        assert_eq!(c.check_and_keep(&root, leaf.clone(), id), Some(4321));
        assert_eq!(hit(&mut c, id), Some((leaf.clone(), 4321)));

        // Why nothing watches for renames: cgroup v2 refuses them, for the cgroup and above.
        for (from, to) in [
            (&made.0[1], made.0[0].join("b")),
            (&made.0[0], root.join(format!("{top}-b"))),
        ] {
            let e = std::fs::rename(from, &to).expect_err("a cgroup v2 directory was renamed");
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        }
        assert_eq!(hit(&mut c, id), Some((leaf, 4321)));
    }

    #[test]
    fn a_change_behind_more_events_than_one_read_takes_is_still_seen() {
        let root = cgroup_root();
        let top = format!("latch-test-many-{}", std::process::id());
        // 300 owner changes queue 300 events of 16 bytes: more than nix's 4 KiB read buffer.
        let mut made = make(&root, &top, &[]);
        let mut c = CgroupPaths::default();
        for i in 0..300 {
            let dir = made.0[0].join(format!("c{i}"));
            std::fs::create_dir(&dir).unwrap();
            let id = ino(&dir);
            made.0.push(dir);
            assert_eq!(c.check_and_keep(&root, format!("/{top}/c{i}"), id), Some(0));
        }
        for dir in &made.0[1..] {
            nix::unistd::chown(dir, Some(4321.into()), None).unwrap();
        }
        let last = ino(made.0.last().unwrap());
        assert!(
            matches!(c.get(last), Cached::Miss),
            "the last cgroup's owner change was missed"
        );
    }

    #[test]
    fn a_lookup_reads_the_watch_a_bounded_number_of_times_however_many_events_wait() {
        let root = cgroup_root();
        let top = format!("latch-test-burst-{}", std::process::id());
        let made = make(&root, &top, &["a", "b"]);
        let mut c = CgroupPaths::default();
        let ids = [ino(&made.0[1]), ino(&made.0[2])];
        for (i, id) in ids.iter().enumerate() {
            let path = format!("/{top}/{}", ["a", "b"][i]);
            assert_eq!(c.check_and_keep(&root, path, *id), Some(0));
        }
        // 1 000 owner changes, alternating between the two so that none merge: 16 KB of
        // events, more than MAX_READS reads of 4 KiB take.
        for i in 0..1000u32 {
            nix::unistd::chown(&made.0[1 + (i % 2) as usize], Some(i.into()), None).unwrap();
        }
        assert!(queued(c.inotify.as_ref().unwrap()) > 8 * 1024);
        // The lookup stops reading; what it left unread may name any entry, so none is kept.
        assert!(matches!(c.get(ids[0]), Cached::Miss));
        assert!(
            queued(c.inotify.as_ref().unwrap()) > 0,
            "one lookup read everything"
        );
        assert!(c.entries.is_empty());
    }

    #[test]
    fn the_cache_is_bounded() {
        let root = crate::cgroup::v2_mount().expect("cgroup v2 mounted");
        let id = ino(&root);
        let mut c = CgroupPaths::default();
        for _ in 0..(super::super::seen::MAX + 10) {
            // Each entry a distinct id: a stand-in for as many cgroups.
            let n = c.entries.len() as u64;
            c.entries.insert(
                n + 1_000_000,
                Entry {
                    path: String::new(),
                    owner: 0,
                    watched: true,
                },
            );
            if c.entries.len() >= super::super::seen::MAX {
                assert_eq!(c.check_and_keep(&root, "/".into(), id), Some(0));
            }
        }
        assert!(c.entries.len() <= super::super::seen::MAX);
    }
}
