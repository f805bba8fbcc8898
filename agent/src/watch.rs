//! Watching policy files for changes (inotify), so the agent reloads without a signal.
//!
//! Directories are watched for files appearing, changing, moving or vanishing; for a file the
//! directory holding it is watched, so editors that write a new file and rename it over the
//! old one, and Kubernetes ConfigMap symlink swaps, are seen too. Only names the loader would
//! read count (a file's own name; `*.yaml` and `*.yml` in a directory) and the `..`-prefixed
//! names of a ConfigMap's swap: an audit log or a temporary file written beside the policies
//! does not reload them.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::{OsStr, OsString},
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

/// Changes closer together than this are reported once.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Starts watching `paths`; a message arrives on the returned channel after each burst of
/// changes. The watch ends when the receiver is dropped.
pub fn watch(paths: &[PathBuf]) -> io::Result<mpsc::Receiver<()>> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    let flags = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    let mut wanted: BTreeMap<PathBuf, Wanted> = BTreeMap::new();
    for path in paths {
        let (dir, name) = watched(path);
        let entry = wanted
            .entry(dir)
            .or_insert_with(|| Wanted::Names(BTreeSet::new()));
        match (name, &mut *entry) {
            (None, _) => *entry = Wanted::PolicyFiles,
            (Some(name), Wanted::Names(names)) => {
                names.insert(name);
            }
            (Some(_), Wanted::PolicyFiles) => {}
        }
    }
    let mut dirs = BTreeMap::new();
    for (dir, want) in wanted {
        dirs.insert(inotify.add_watch(dir.as_path(), flags)?, want);
    }
    // SAFETY: the AsyncFd owns the Inotify, and so its fd, for as long as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(Watcher(inotify), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            if wait_events(&fd, &dirs).await.is_err() {
                return;
            }
            // Let the burst settle (an editor's save is several events), then report once.
            tokio::time::sleep(DEBOUNCE).await;
            let _ = fd.get_ref().0.read_events();
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Gives tokio the raw fd it registers.
struct Watcher(Inotify);

impl std::os::fd::AsRawFd for Watcher {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

/// Which names in a watched directory are policies.
#[derive(Debug)]
enum Wanted {
    /// The directory was named: the files the loader reads from it.
    PolicyFiles,
    /// Files in it were named.
    Names(BTreeSet<OsString>),
}

impl Wanted {
    fn counts(&self, name: &OsStr) -> bool {
        let text = name.to_string_lossy();
        // A ConfigMap volume swaps its `..data` symlink to publish a new version.
        text.starts_with("..")
            || match self {
                Wanted::PolicyFiles => {
                    !text.starts_with('.') && (text.ends_with(".yaml") || text.ends_with(".yml"))
                }
                Wanted::Names(names) => names.contains(name),
            }
    }
}

/// The directory to watch for `path`, and the file name in it if `path` is a file.
fn watched(path: &Path) -> (PathBuf, Option<OsString>) {
    if path.is_dir() {
        return (path.to_owned(), None);
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    (dir, path.file_name().map(OsStr::to_owned))
}

/// Whether an event is about a policy: one without a name (the directory itself, or the queue
/// overflowed) always is.
fn relevant(event: &InotifyEvent, dirs: &BTreeMap<WatchDescriptor, Wanted>) -> bool {
    match (&event.name, dirs.get(&event.wd)) {
        (Some(name), Some(want)) => want.counts(name),
        _ => true,
    }
}

async fn wait_events(
    fd: &AsyncFd<Watcher>,
    dirs: &BTreeMap<WatchDescriptor, Wanted>,
) -> io::Result<()> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| inner.get_ref().0.read_events().map_err(io::Error::from)) {
            Ok(Ok(events)) if events.iter().any(|e| relevant(e, dirs)) => return Ok(()),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rewrite_of_a_watched_file_is_reported_once() {
        let dir = std::env::temp_dir().join(format!("latch-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut rx = watch(std::slice::from_ref(&file)).unwrap();
        // An editor-style save: write a temp file, rename it over the original.
        let tmp = dir.join(".p.yaml.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.unwrap(), Some(()));
        let again = tokio::time::timeout(DEBOUNCE * 3, rx.recv()).await;
        assert!(again.is_err(), "one save was reported twice");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn files_the_loader_would_not_read_do_not_count() {
        let dir = std::env::temp_dir().join(format!("latch-watch-other-{}", std::process::id()));
        let sub = dir.join("policies");
        std::fs::create_dir_all(&sub).unwrap();
        let file = dir.join("p.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut rx = watch(&[file.clone(), sub.clone()]).unwrap();
        // Beside the named file: an audit log, a second YAML file; in the named directory: a
        // hidden file and a non-YAML file.
        std::fs::write(dir.join("audit.log"), "x").unwrap();
        std::fs::write(dir.join("other.yaml"), "x").unwrap();
        std::fs::write(sub.join(".p.yaml.swp"), "x").unwrap();
        std::fs::write(sub.join("notes.txt"), "x").unwrap();
        let quiet = tokio::time::timeout(DEBOUNCE * 3, rx.recv()).await;
        assert!(
            quiet.is_err(),
            "a file latch does not read reloaded the policies"
        );
        // What does count: the named file, a YAML file in the directory, a ConfigMap swap.
        for (at, name) in [(&dir, "p.yaml"), (&sub, "q.yml"), (&dir, "..data")] {
            std::fs::write(at.join(name), "b").unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert_eq!(got.ok().flatten(), Some(()), "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
