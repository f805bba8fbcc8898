//! Watching policy files for changes (inotify), so the agent reloads without a signal.
//!
//! Directories are watched for files appearing, changing, moving or vanishing; for a file the
//! directory holding it is watched, so editors that write a new file and rename it over the
//! old one, and Kubernetes ConfigMap symlink swaps, are seen too.
use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
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
    let dirs: BTreeSet<PathBuf> = paths.iter().map(|p| watched_dir(p)).collect();
    for dir in &dirs {
        inotify.add_watch(dir.as_path(), flags)?;
    }
    // SAFETY: the AsyncFd owns the Inotify, and so its fd, for as long as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(Watcher(inotify), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            if wait_events(&fd).await.is_err() {
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

fn watched_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_owned()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }
}

async fn wait_events(fd: &AsyncFd<Watcher>) -> io::Result<()> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| inner.get_ref().0.read_events().map_err(io::Error::from)) {
            Ok(Ok(events)) if !events.is_empty() => return Ok(()),
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
}
