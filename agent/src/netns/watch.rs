//! Keeping the served namespaces in step with the node while the agent runs.
//!
//! * A namespace pinned in `/run/netns` (by `ip netns`, a CNI plugin, a container runtime) is
//!   prepared as soon as it is mounted there, before the pod's or container's processes start.
//! * A connect the hooks matched in an unprepared namespace (one made with `unshare`, say) is
//!   reported by the kernel: it is audited and counted, and its namespace prepared at once.
//! * A periodic sweep prepares the namespaces of processes that entered the intercepted
//!   cgroups and releases those nothing uses any more; a removal from `/run/netns` sweeps at
//!   once.
use std::{
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use latch_common::ConnMeta;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

use super::{Namespaces, scan};

/// How often the sweep runs without being asked.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// How long a new `/run/netns` entry may take to become a namespace (`ip netns add` creates
/// the file, then mounts the namespace on it).
const MOUNT_WAIT: Duration = Duration::from_secs(1);

/// What the watch needs.
pub struct Watch {
    pub namespaces: Arc<Namespaces>,
    /// The intercepted cgroup (its processes' namespaces are served).
    pub cgroup: PathBuf,
    /// `LATCH_EVENTS`: connects matched in unprepared namespaces.
    pub events: Option<RingBuf<MapData>>,
    /// Audits and counts one such connect.
    pub on_unprepared: Box<dyn Fn(&ConnMeta) + Send + Sync>,
}

/// Prepares the namespaces in use now (call before the programs are attached).
pub fn sweep(namespaces: &Namespaces, cgroup: &Path) {
    namespaces.sync(&scan::in_use(cgroup));
}

/// Runs the watch until `stop` fires.
pub async fn run(watch: Watch, stop: CancellationToken) {
    let Watch {
        namespaces,
        cgroup,
        events,
        on_unprepared,
    } = watch;
    let inotify = named_watch()
        .map_err(|err| tracing::warn!(%err, "cannot watch /run/netns; new named namespaces are prepared by the periodic sweep"))
        .ok();
    let mut events = events.and_then(|rb| {
        // SAFETY: the AsyncFd owns the ring buffer, and with it its fd, while registered.
        unsafe { AsyncFd::register_with_interest(rb, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .map_err(|err| tracing::warn!(%err, "cannot poll LATCH_EVENTS"))
            .ok()
    });
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            names = named_events(inotify.as_ref()) => match names {
                Ok(changes) => {
                    for created in changes.created {
                        tokio::spawn(prepare_named(namespaces.clone(), created));
                    }
                    if changes.removed {
                        sweep_blocking(&namespaces, &cgroup).await;
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "watching /run/netns failed; relying on the sweep");
                    return sweep_forever(namespaces, cgroup, tick, stop).await;
                }
            },
            seen = unprepared_events(events.as_mut(), &*on_unprepared) => {
                for path in seen {
                    prepare_path(&namespaces, &path);
                }
            }
            _ = tick.tick() => sweep_blocking(&namespaces, &cgroup).await,
        }
    }
}

async fn sweep_forever(
    namespaces: Arc<Namespaces>,
    cgroup: PathBuf,
    mut tick: tokio::time::Interval,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => sweep_blocking(&namespaces, &cgroup).await,
        }
    }
}

/// The sweep reads /proc and the cgroup tree: off the async threads.
async fn sweep_blocking(namespaces: &Arc<Namespaces>, cgroup: &Path) {
    let (ns, cg) = (namespaces.clone(), cgroup.to_owned());
    let _ = tokio::task::spawn_blocking(move || sweep(&ns, &cg)).await;
}

/// Prepares the namespace at `path` if it is one (a process may have left in between).
fn prepare_path(namespaces: &Namespaces, path: &Path) {
    let Ok((fd, inode)) = super::open(path) else {
        return;
    };
    if let Err(err) = namespaces.prepare(fd, inode)
        && namespaces.note_failure(inode)
    {
        tracing::warn!(%err, path = %path.display(), "network namespace not prepared");
    }
}

/// Waits until a new `/run/netns` entry is a mounted namespace, then prepares it.
async fn prepare_named(namespaces: Arc<Namespaces>, path: PathBuf) {
    let deadline = tokio::time::Instant::now() + MOUNT_WAIT;
    loop {
        match super::open(&path) {
            Ok((fd, inode)) => {
                if let Err(err) = namespaces.prepare(fd, inode)
                    && namespaces.note_failure(inode)
                {
                    tracing::warn!(%err, path = %path.display(), "network namespace not prepared");
                }
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(_) => return,
        }
    }
}

/// Changes seen in the named-namespace directories.
#[derive(Default)]
struct NamedChanges {
    created: Vec<PathBuf>,
    removed: bool,
}

struct Watched {
    inotify: Inotify,
    dirs: Vec<(nix::sys::inotify::WatchDescriptor, PathBuf)>,
}

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.inotify.as_fd().as_raw_fd()
    }
}

/// Watches the named-namespace directories (creating `/run/netns` as `ip netns` would).
fn named_watch() -> io::Result<AsyncFd<Watched>> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM;
    let _ = std::fs::create_dir_all(scan::NAMED_DIRS[0]);
    let mut dirs: Vec<(nix::sys::inotify::WatchDescriptor, PathBuf)> = Vec::new();
    for dir in scan::NAMED_DIRS {
        let Ok(real) = std::fs::canonicalize(dir) else {
            continue;
        };
        if dirs.iter().any(|(_, d)| *d == real) {
            continue;
        }
        let wd = inotify.add_watch(real.as_path(), flags)?;
        dirs.push((wd, real));
    }
    // SAFETY: the AsyncFd owns the Inotify, and with it its fd, while registered.
    unsafe { AsyncFd::register_with_interest(Watched { inotify, dirs }, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

async fn named_events(fd: Option<&AsyncFd<Watched>>) -> io::Result<NamedChanges> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = fd.readable().await?;
        let read = guard.try_io(|inner| {
            inner
                .get_ref()
                .inotify
                .read_events()
                .map_err(io::Error::from)
        });
        let events = match read {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        };
        let mut changes = NamedChanges::default();
        for ev in events {
            let Some(name) = ev.name else { continue };
            let Some((_, dir)) = fd.get_ref().dirs.iter().find(|(wd, _)| *wd == ev.wd) else {
                continue;
            };
            if ev
                .mask
                .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            {
                changes.created.push(dir.join(name));
            } else {
                changes.removed = true;
            }
        }
        if !changes.created.is_empty() || changes.removed {
            return Ok(changes);
        }
    }
}

/// Drains the kernel's reports; returns the namespace paths of the reporting processes.
async fn unprepared_events(
    fd: Option<&mut AsyncFd<RingBuf<MapData>>>,
    on_unprepared: &(dyn Fn(&ConnMeta) + Send + Sync),
) -> Vec<PathBuf> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return std::future::pending().await;
        };
        let mut paths = Vec::new();
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<ConnMeta>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole ConnMeta (plain integers) into the item.
            let meta: ConnMeta = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            on_unprepared(&meta);
            let path = PathBuf::from(format!("/proc/{}/ns/net", meta.pid));
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        guard.clear_ready();
        if !paths.is_empty() {
            return paths;
        }
    }
}
