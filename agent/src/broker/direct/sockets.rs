//! The application's socket as the broker reaches it: from the application's process
//! (pidfd_getfd), by socket cookie; and how much is queued on it.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, FromRawFd as _, OwnedFd},
};

/// A descriptor of the socket with this cookie among process `pid`'s open files
/// (pidfd_getfd(2): the same socket, not a copy). The application's file flags are shared
/// with it and must not be changed.
pub fn app_socket(pid: u32, cookie: u64) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the returned descriptors are owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open just returned this descriptor; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // The socket was opened just now, so it is most likely the highest descriptor: try them
    // from the top. Only sockets are taken (by their link): closing a duplicate of anything
    // else may run that file's flush (a FUSE daemon the workload runs could hold it), on the
    // thread every startup of this CPU shares.
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable_by(|a, b| b.cmp(a));
    for fd in fds {
        let is_socket = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .is_ok_and(|t| t.as_os_str().as_encoded_bytes().starts_with(b"socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: a plain system call on descriptors this function holds.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if got < 0 {
            continue;
        }
        // SAFETY: pidfd_getfd just returned this new descriptor; nothing else owns it.
        let got = unsafe { OwnedFd::from_raw_fd(got as i32) };
        if socket_cookie(&got).is_ok_and(|c| c == cookie) {
            return Ok(got);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("process {pid} no longer holds the connection's socket"),
    ))
}

fn socket_cookie(fd: &OwnedFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

pub(super) fn socket_cookie_of(s: &std::net::TcpStream) -> io::Result<u64> {
    let fd = s.as_fd().try_clone_to_owned()?;
    socket_cookie(&fd)
}

/// Bytes waiting in a socket's receive queue (for a socket in a sock map: the messages
/// injected into it, not yet read).
pub fn fionread(s: &impl std::os::fd::AsRawFd) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// The CPU thread `tid` of process `pid` last ran on (field 39 of its stat file).
pub fn cpu_of(pid: u32, tid: u32) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(36)?.parse().ok()
}
