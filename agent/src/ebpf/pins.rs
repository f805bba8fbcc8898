//! Pinned links: keeping interception in place across agent restarts (and crashes).
//!
//! An agent started with a pin directory pins each program's link there. Links outlive the
//! process that made them only while pinned, so after a stop or crash the programs keep
//! redirecting to the (now closed) broker port: connections fail instead of bypassing latch.
//! The next agent takes the old pins over (unpins them into file descriptors it holds), attaches
//! and pins its own links, then drops the old ones — a hand-over of microseconds in which a
//! connection may be refused, never let through unbrokered.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};

/// Where the links of agent instance `instance` are pinned.
pub fn pin_dir(bpffs: &Path, instance: &str) -> PathBuf {
    bpffs.join("latch").join(instance)
}

/// The bpffs mount point, from /proc/mounts.
pub fn bpffs() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == "bpf").then(|| PathBuf::from(dir))
    })
}

/// Unpins every link pinned in `dir`, returning them as descriptors: the links stay attached
/// until the returned values are dropped.
pub fn take_over(dir: &Path) -> io::Result<Vec<FdLink>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut links = Vec::new();
    for entry in entries {
        let path = entry?.path();
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => links.push(pinned.unpin()?),
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "not a pinned link; removing");
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(links)
}

/// Detaches and removes everything pinned for an instance; returns how many links it held.
pub fn remove(dir: &Path) -> io::Result<usize> {
    let n = take_over(dir)?.len();
    remove_empty(dir);
    Ok(n)
}

/// Removes `dir` and then its parent if they are empty (best effort).
pub fn remove_empty(dir: &Path) {
    if fs::remove_dir(dir).is_ok()
        && let Some(parent) = dir.parent()
    {
        let _ = fs::remove_dir(parent);
    }
}

/// Pins `link` at `dir/name`.
pub fn pin(link: FdLink, dir: &Path, name: &str) -> io::Result<PinnedLink> {
    fs::create_dir_all(dir)?;
    link.pin(dir.join(name)).map_err(io::Error::other)
}
