//! Whether the secrets file may have changed since it was last checked, from inotify, so that
//! a lookup of an unchanged file costs one `read` that finds nothing instead of a `stat` (a
//! path walk: about 3% of latch's CPU on one-request HTTP connections).
//!
//! What is watched, set up before the `stat` it vouches for:
//! - the file's directory, for its entry: written, closed after writing, attributes (mode,
//!   owner), created, removed, renamed to or from (atomic replacement);
//! - every directory above, for being renamed or removed itself (a path component that now
//!   names another directory).
//!
//! That covers every way a path without symlinks can come to name other content, except a
//! file system mounted over a component after the watch was set (inotify does not report
//! mounts). So the answer is also "may have changed" once [`RECHECK`] has passed since the last
//! check, and always for a path with a symlink in it (what a symlink points to can change in
//! directories not watched here: Kubernetes' secret volumes swap a `..data` link), where each
//! lookup checks the file as before.
//!
//! A lookup reads the watch at most [`MAX_READS`] times, and what it leaves unread counts as
//! a change: events that keep coming cannot hold it (found with `strace` writing its log beside
//! the secrets file: each read latch made was logged, and each log write queued one more event).
use std::{
    ffi::OsString,
    path::Path,
    time::{Duration, Instant},
};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};

/// The longest an unchanged answer is trusted without a `stat` (bounds what a mount over the
/// file's directory can hide).
pub const RECHECK: Duration = Duration::from_secs(1);

/// The watch over one file path.
#[derive(Debug)]
pub struct FileWatch {
    /// `None`: not watched (a symlink in the path, or no inotify): every lookup checks.
    watched: Option<Watched>,
    checked: Instant,
}

#[derive(Debug)]
struct Watched {
    inotify: Inotify,
    /// The directory that holds the file, and the file's name in it.
    dir: WatchDescriptor,
    name: OsString,
}

impl FileWatch {
    /// Watches `path` (absolute, symlink-free: else it is not watched).
    pub fn new(path: &Path) -> FileWatch {
        FileWatch {
            watched: watch(path),
            checked: Instant::now(),
        }
    }

    /// Whether what `path` names may have changed since this watch was made or last said so.
    /// A `true` answer is for the caller to check the file (and, if it changed, to make a new
    /// watch before that check).
    pub fn may_have_changed(&mut self) -> bool {
        let now = Instant::now();
        let Some(w) = &self.watched else {
            return true;
        };
        let changed = w.drain() || now.duration_since(self.checked) >= RECHECK;
        if changed {
            self.checked = now;
        }
        changed
    }

    /// Whether inotify watches the path.
    pub fn is_watched(&self) -> bool {
        self.watched.is_some()
    }
}

/// Reads of the watch per lookup, at most: events that keep coming (a log written beside the
/// file, `strace` writing beside it what latch reads) cannot hold a lookup.
pub const MAX_READS: usize = 2;

impl Watched {
    /// Reads what is queued (at most [`MAX_READS`] times); whether any of it concerns the
    /// path, could not be read, or is still left unread.
    fn drain(&self) -> bool {
        let mut concerns = false;
        for _ in 0..MAX_READS {
            match self.inotify.read_events() {
                Err(Errno::EAGAIN) => return concerns,
                Ok(events) => concerns |= events.iter().any(|e| self.concerns(e)),
                Err(_) => return true,
            }
        }
        true
    }

    /// An event about the file's entry, about a directory on the path itself, or lost events.
    fn concerns(&self, e: &InotifyEvent) -> bool {
        e.wd != self.dir || e.name.is_none() || e.name.as_deref() == Some(self.name.as_os_str())
    }
}

/// The watches for `path`, or `None` if it is not canonical (a symlink or `..` in it, or
/// relative), or inotify fails.
fn watch(path: &Path) -> Option<Watched> {
    // The canonical form has no symlink and no `..`: a path equal to it has none either.
    if std::fs::canonicalize(path).ok()? != path {
        return None;
    }
    let name = path.file_name()?.to_owned();
    let dir = path.parent()?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
    let entry = AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_ONLYDIR;
    let dir_wd = inotify.add_watch(dir, entry).ok()?;
    let above =
        AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_ONLYDIR;
    for a in dir.ancestors().skip(1) {
        inotify.add_watch(a, above).ok()?;
    }
    Some(Watched {
        inotify,
        dir: dir_wd,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A file `a/b/s.yaml` in a fresh directory; the directory (symlink-free) and the file.
    fn file() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(t.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let f = root.join("a/b/s.yaml");
        std::fs::write(&f, "k: v1\n").unwrap();
        (t, root, f)
    }

    #[test]
    fn an_unchanged_file_needs_no_check_and_a_change_to_it_or_its_path_does() {
        let (_t, root, f) = file();
        let dir = root.join("a/b");
        let mut w = FileWatch::new(&f);
        assert!(w.is_watched());
        assert!(!w.may_have_changed(), "nothing changed");

        // Another file in its directory is not a change.
        std::fs::write(dir.join("other"), "x").unwrap();
        std::fs::rename(dir.join("other"), dir.join("other2")).unwrap();
        assert!(!w.may_have_changed(), "another file counted");

        // Written in place; then once told, quiet again.
        std::fs::write(&f, "k: v2\n").unwrap();
        assert!(w.may_have_changed(), "a write was missed");
        assert!(!w.may_have_changed());

        // Mode changed.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(w.may_have_changed(), "a chmod was missed");

        // Replaced by a rename over it (what editors and secret agents do).
        std::fs::write(dir.join("s.yaml.tmp"), "k: v3\n").unwrap();
        assert!(!w.may_have_changed());
        std::fs::rename(dir.join("s.yaml.tmp"), &f).unwrap();
        assert!(w.may_have_changed(), "a rename over it was missed");

        // A directory above renamed away, another put in its place.
        std::fs::rename(root.join("a"), root.join("a.old")).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(&f, "k: v4\n").unwrap();
        assert!(
            w.may_have_changed(),
            "a directory above was replaced unseen"
        );
    }

    /// Bytes inotify holds for `w`, not read yet.
    fn queued(w: &FileWatch) -> i32 {
        use std::os::fd::AsFd as _;
        let inotify = &w.watched.as_ref().unwrap().inotify;
        crate::broker::direct::fionread(&inotify.as_fd()).unwrap()
    }

    #[test]
    fn a_lookup_reads_the_watch_a_bounded_number_of_times_however_many_events_wait() {
        let (_t, root, f) = file();
        let dir = root.join("a/b");
        let mut w = FileWatch::new(&f);
        // 1 000 writes to two other files, alternating so that none merge: about 32 KiB of
        // events, far more than MAX_READS reads of 4 KiB take.
        for i in 0..1000 {
            std::fs::write(dir.join(if i % 2 == 0 { "x" } else { "y" }), "z").unwrap();
        }
        assert!(queued(&w) > 16 * 1024);
        // Unread events may hide a change: the answer is "check", and the rest waits.
        assert!(
            w.may_have_changed(),
            "events left unread were taken as no change"
        );
        assert!(queued(&w) > 0, "one lookup read everything");
        // Later lookups drain the rest; none of it was about the file.
        let mut lookups = 1;
        while queued(&w) > 0 {
            w.may_have_changed();
            lookups += 1;
        }
        assert!(lookups > 2);
    }

    #[test]
    fn a_path_with_a_symlink_is_checked_at_every_lookup() {
        let (_t, root, f) = file();
        let link = root.join("link.yaml");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let mut w = FileWatch::new(&link);
        assert!(!w.is_watched());
        assert!(w.may_have_changed());
        assert!(w.may_have_changed());
    }

    #[test]
    fn an_unchanged_answer_is_trusted_for_at_most_recheck() {
        let (_t, _root, f) = file();
        let mut w = FileWatch::new(&f);
        assert!(!w.may_have_changed());
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(w.may_have_changed(), "trusted past RECHECK");
        assert!(!w.may_have_changed());
    }
}
