//! The upgrade socket: a Unix `SOCK_SEQPACKET` socket at `<state dir>/upgrade/<instance>.sock`
//! (directory 0700, socket 0600, both root's), over which a running agent hands its listening
//! sockets and kernel state to the next one. Each message is one JSON body with at most
//! [`MAX_FDS`] descriptors attached (`SCM_RIGHTS`); either side refuses a peer that is not root
//! (`SO_PEERCRED`).
use std::{
    fs,
    io::{self, IoSlice, IoSliceMut},
    os::{
        fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::socket::{
        self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
        SockType, UnixAddr, sockopt,
    },
};

/// Most descriptors one message carries (the kernel's limit, `SCM_MAX_FD`, is 253).
pub const MAX_FDS: usize = 200;

/// Largest message body accepted.
const MAX_MESSAGE: usize = 256 << 10;

/// Where agent instance `instance` listens for its successor.
pub fn path(state_dir: &Path, instance: &str) -> PathBuf {
    state_dir.join("upgrade").join(format!("{instance}.sock"))
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Connects to the agent listening at `path`; `None` when none does (no socket, a stale one a
/// stopped agent left, or a state directory path that is not a directory: then no agent can
/// listen there either, and what the state directory is for fails later with its own error).
pub fn connect(path: &Path) -> io::Result<Option<OwnedFd>> {
    let fd = seqpacket()?;
    match socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => {}
        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    require_root_peer(&fd)?;
    Ok(Some(fd))
}

/// Fails unless the process at the other end of `fd` runs as root.
pub fn require_root_peer(fd: &impl AsFd) -> io::Result<()> {
    let cred = socket::getsockopt(fd, sockopt::PeerCredentials)?;
    if cred.uid() == 0 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "peer pid {} runs as uid {}, not root",
                cred.pid(),
                cred.uid()
            ),
        ))
    }
}

/// Listens at `path`, replacing whatever socket is there. The directory is made (or made
/// again) 0700 and must belong to this process's user; the socket is 0600.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("the upgrade socket path has no directory"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}", dir.display(), meta.uid()),
        ));
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let fd = seqpacket()?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    socket::listen(&fd, Backlog::new(4)?)?;
    Ok(fd)
}

/// The next connection to `listener` (blocking).
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    let fd = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one message with `fds` attached (at most [`MAX_FDS`]).
pub fn send(conn: &OwnedFd, body: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(body)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message and its descriptors (blocking); `None` at end of stream.
pub fn recv(conn: &OwnedFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut fds = Vec::new();
    let (bytes, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel installed these descriptors in this process for us.
                fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        (
            msg.bytes,
            msg.flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
        )
    };
    if truncated {
        return Err(io::Error::other("upgrade message truncated"));
    }
    if bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(bytes);
    Ok(Some((buf, fds)))
}

/// Bounds how long [`send`] waits on `conn` for room (a peer that stopped reading).
pub fn set_send_timeout(conn: &OwnedFd, timeout: std::time::Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    socket::setsockopt(conn, sockopt::SendTimeout, &tv)?;
    Ok(())
}

/// Bounds how long [`recv`] waits on `conn`.
pub fn set_timeout(conn: &OwnedFd, timeout: std::time::Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    socket::setsockopt(conn, sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn a_message_carries_its_descriptors_and_keeps_its_bounds() {
        let (a, b) = pair();
        let file = tempfile_fd();
        send(&a, b"first", std::slice::from_ref(&file)).unwrap();
        send(&a, b"second", &[]).unwrap();
        let (body, fds) = recv(&b).unwrap().unwrap();
        assert_eq!(body, b"first");
        assert_eq!(fds.len(), 1);
        let (body, fds) = recv(&b).unwrap().unwrap();
        assert_eq!(body, b"second");
        assert!(fds.is_empty());
        drop(a);
        assert!(recv(&b).unwrap().is_none());
    }

    #[test]
    fn a_peer_that_is_not_root_is_refused() {
        let (a, _b) = pair();
        if !nix::unistd::geteuid().is_root() {
            // Unprivileged run: this process is the peer, and it is not root.
            let err = require_root_peer(&a).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
            return;
        }
        require_root_peer(&a).expect("a root peer is accepted");
        // A child that drops to nobody before it connects is refused. The socket is open to
        // everyone here so the connect itself succeeds; only the peer check stands.
        let dir = std::env::temp_dir().join(format!("latch-upgrade-peer-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.join("s.sock");
        let listener = seqpacket().unwrap();
        let addr = UnixAddr::new(&path).unwrap();
        socket::bind(listener.as_raw_fd(), &addr).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
        socket::listen(&listener, Backlog::new(1).unwrap()).unwrap();
        let nobody = nix::unistd::Uid::from_raw(65534);
        // SAFETY: the child only makes system calls and exits; it touches no lock or allocator.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = nix::unistd::setuid(nobody).is_ok()
                    && socket::socket(
                        AddressFamily::Unix,
                        SockType::SeqPacket,
                        SockFlag::empty(),
                        None,
                    )
                    .is_ok_and(|fd| {
                        socket::connect(fd.as_raw_fd(), &addr).is_ok()
                            && nix::unistd::read(&fd, &mut [0u8; 1]).is_ok()
                    });
                // SAFETY: ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                // A child that failed before it connected fails the test, not hangs it.
                set_timeout(&listener, std::time::Duration::from_secs(10)).unwrap();
                let served = accept(&listener).expect("the child connects");
                let err = require_root_peer(&served).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
                assert!(err.to_string().contains("uid 65534"), "{err}");
                drop(served);
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
                fs::remove_dir_all(&dir).unwrap();
            }
        }
    }

    fn tempfile_fd() -> OwnedFd {
        fs::File::open("/proc/self/stat").unwrap().into()
    }

    #[test]
    fn the_socket_and_its_directory_are_the_owners_alone() {
        let dir = std::env::temp_dir().join(format!("latch-upgrade-{}", std::process::id()));
        let path = path(&dir, "t");
        let listener = listen(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        let conn = connect(&path).unwrap().expect("an agent listens");
        let served = accept(&listener).unwrap();
        send(&conn, b"hi", &[]).unwrap();
        assert_eq!(recv(&served).unwrap().unwrap().0, b"hi");
        drop((listener, served, conn));
        // A stopped agent's socket is no agent.
        assert!(connect(&path).unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
