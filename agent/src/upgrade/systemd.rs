//! systemd: readiness for `Type=notify` units, and the hand-off a reload (`ExecReload=latch
//! upgrade --pid $MAINPID`) makes: the agent it starts reports `MAINPID=` itself once ready,
//! and tells the `latch upgrade` that started it through an inherited pipe.
use std::{
    io::{self, Write as _},
    os::{
        fd::{FromRawFd as _, OwnedFd},
        linux::net::SocketAddrExt as _,
        unix::{ffi::OsStrExt as _, net::UnixDatagram},
    },
};

/// The variable naming the pipe a `latch upgrade` waits on.
pub const READY_FD_ENV: &str = "LATCH_UPGRADE_READY_FD";

/// Sends `state` to the service manager (`$NOTIFY_SOCKET`); `Ok(false)` when not run by one.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// Keeps the pipe of [`READY_FD_ENV`] out of the processes this agent starts (exec stores),
/// so its failure is seen at once. Call first thing.
pub fn keep_ready_fd_private() {
    if let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: F_SETFD on a descriptor number changes no memory; a wrong number fails.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Tells the service manager this process serves now (and is the service's main process),
/// and the `latch upgrade` that started it, if any.
pub fn ready() {
    let state = format!("READY=1\nMAINPID={}\n", std::process::id());
    if let Err(err) = notify(&state) {
        tracing::warn!(%err, "cannot notify the service manager");
    }
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: `latch upgrade` made this descriptor (the write end of a pipe) for us alone and
    // named it in the environment; nothing else in this process uses it.
    let mut pipe = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let _ = pipe.write_all(b"r");
}
