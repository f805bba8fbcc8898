//! Accepting a connection without registering it with the accept thread's reactor: the
//! socket comes out of `accept4` non-blocking and close-on-exec, and is registered once, by
//! the connection thread that serves it (tokio's own `accept` registers it with the accept
//! thread, and moving it to another thread then costs two more `epoll_ctl` calls).
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _},
    sync::Arc,
};

use tokio::io::{Interest, unix::AsyncFd};

pub struct Acceptor(AsyncFd<Arc<std::net::TcpListener>>);

impl Acceptor {
    /// Accepts on `listener` (non-blocking) from the current runtime. The namespace table
    /// holds another reference, to hand the listener to the next agent on an upgrade.
    pub fn new(listener: Arc<std::net::TcpListener>) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        // SAFETY: the listener's descriptor stays open while any reference to it lives, and
        // the AsyncFd holds one; nothing replaces or closes it meanwhile.
        Ok(Self(unsafe {
            AsyncFd::register_with_interest(listener, Interest::READABLE)?
        }))
    }

    /// The next connection and its peer.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            if let Ok(result) = ready.try_io(|l| accept4(l.get_ref())) {
                return result;
            }
        }
    }
}

fn accept4(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: accept4 writes at most `len` bytes of address into the storage try_init gives
    // it and sets `len`; the descriptor it returns is new and ours alone.
    let (fd, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                listener.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })?
    };
    // SAFETY: `fd` is a connected TCP socket just returned by accept4, owned by nobody else.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a peer that is not an IP socket"))?;
    Ok((stream, peer))
}
