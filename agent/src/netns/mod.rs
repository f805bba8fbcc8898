//! Network namespaces: the broker listens in every namespace whose applications it serves,
//! and opens each connection's target socket in the application's own namespace.
//!
//! A redirected connect is rewritten to the broker's loopback address *in the application's
//! namespace* (the connect hook cannot move it to another one), so a pod or a container is
//! served only if the broker listens there too. One agent process holds sockets in many
//! namespaces (the shape of Istio's ztunnel): for each prepared namespace, listeners at the
//! broker's address and port, created by entering the namespace with `setns(2)` on the calling
//! thread and coming back. The target socket of a connection is created the same way, so the
//! target sees the connection come from the pod's own address, as it would without latch.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | a namespace ([`Netns`]), entering one, the agent's own namespace |
//! | [`table`] | the prepared namespaces, `LATCH_NETNS`, preparing and releasing |
//! | [`scan`] | which namespaces are in use: named ones (`/run/netns`) and those of processes in the intercepted cgroups |
//! | [`watch`] | what prepares and releases them while the agent runs: inotify on `/run/netns`, the kernel's reports of unprepared connects, a periodic sweep |
pub mod scan;
pub mod table;
pub mod watch;

use std::{
    fmt, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::{Arc, OnceLock},
};

use nix::sched::{CloneFlags, setns};
use tokio_util::sync::CancellationToken;

pub use table::Namespaces;

/// A network namespace the broker serves.
pub struct Netns {
    /// The kernel's cookie for it (what the eBPF programs record).
    pub cookie: u64,
    /// Its nsfs inode number (what `/proc/<pid>/ns/net` and `/run/netns/*` stat to).
    pub inode: u64,
    /// An nsfs file of the namespace, kept open to enter it.
    fd: OwnedFd,
    /// Whether this is the agent's own namespace (nothing to enter).
    own: bool,
    /// Ends this namespace's accept loops when it is released.
    pub(crate) stop: CancellationToken,
}

/// A shared reference to a prepared namespace.
pub type Handle = Arc<Netns>;

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netns")
            .field("cookie", &self.cookie)
            .field("inode", &self.inode)
            .field("own", &self.own)
            .finish()
    }
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.cookie == other.cookie
    }
}

impl Eq for Netns {}

impl Netns {
    /// Whether this is the agent's own namespace.
    pub fn is_own(&self) -> bool {
        self.own
    }

    /// Runs `f` (which should only create sockets) with the calling thread in this namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        if self.own {
            return f();
        }
        enter(self.fd.as_fd(), f)
    }
}

/// The agent's own network namespace, recorded once at start.
struct Own {
    fd: OwnedFd,
    inode: u64,
    cookie: u64,
}

static OWN: OnceLock<Own> = OnceLock::new();

/// Records the calling thread's network namespace as the agent's own. Call at start, before
/// any thread enters another namespace.
pub fn init_own() -> io::Result<()> {
    own(CancellationToken::new()).map(drop)
}

/// The agent's own namespace as a served one, whose accept loops end with `stop`.
pub(crate) fn own(stop: CancellationToken) -> io::Result<Handle> {
    let file = std::fs::File::open("/proc/thread-self/ns/net")?;
    let inode = inode_of(&file)?;
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let cookie = cookie_of(probe.as_fd())?;
    let fd = OwnedFd::from(file);
    let own = OWN.get_or_init(|| Own {
        fd: fd.try_clone().expect("duplicate a namespace descriptor"),
        inode,
        cookie,
    });
    Ok(Arc::new(Netns {
        cookie: own.cookie,
        inode: own.inode,
        fd,
        own: true,
        stop,
    }))
}

/// The agent's own namespace's inode, once [`init_own`] ran.
pub fn own_inode() -> Option<u64> {
    OWN.get().map(|o| o.inode)
}

/// The agent's own namespace's cookie, once [`init_own`] ran.
pub fn own_cookie() -> Option<u64> {
    OWN.get().map(|o| o.cookie)
}

/// Runs `f` with the calling thread in the namespace `ns`, then returns it to the agent's own.
///
/// Sockets belong to the namespace they were created in for life, so `f` may create sockets
/// and the caller may use them from any thread afterwards. If the thread cannot come back (the
/// kernel refusing `setns` into a namespace the agent holds open), the process aborts: a
/// thread left in an application's namespace would create later sockets there.
fn enter<T>(ns: BorrowedFd<'_>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let own = OWN
        .get()
        .ok_or_else(|| io::Error::other("the agent's own network namespace is not recorded"))?;
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let result = f();
    if let Err(err) = setns(own.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
        tracing::error!(%err, "cannot return to the agent's own network namespace; aborting");
        std::process::abort();
    }
    result
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the cookie of the namespace a socket lives in.
pub fn cookie_of(socket: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The nsfs inode of an open namespace file (an error if it is not a namespace).
fn inode_of(file: &std::fs::File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let st = nix::sys::statfs::fstatfs(file).map_err(io::Error::from)?;
    if st.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a namespace file",
        ));
    }
    Ok(file.metadata()?.ino())
}

/// Opens a network namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`) and returns it
/// with its inode.
pub fn open(path: &Path) -> io::Result<(OwnedFd, u64)> {
    let file = std::fs::File::open(path)?;
    let inode = inode_of(&file)?;
    Ok((OwnedFd::from(file), inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_file_is_not_a_namespace() {
        let err = open(Path::new("/proc/self/status")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_own_namespace_has_a_cookie_and_an_inode() {
        init_own().unwrap();
        let own = own(CancellationToken::new()).unwrap();
        assert!(own.cookie != 0);
        let (_, inode) = open(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(own.inode, inode);
        // Entering the own namespace is a plain call.
        assert_eq!(own.run(|| Ok(7)).unwrap(), 7);
    }
}
