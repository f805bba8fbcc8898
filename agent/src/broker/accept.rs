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

pub struct Acceptor {
    listener: AsyncFd<Arc<std::net::TcpListener>>,
    /// The listener's address when it is bound to one (every accepted socket then has it as
    /// its local address, so no `getsockname` per connection is needed).
    bound: Option<SocketAddr>,
}

impl Acceptor {
    /// Accepts on `listener` (non-blocking) from the current runtime. The namespace table
    /// holds another reference, to hand the listener to the next agent on an upgrade.
    ///
    /// `TCP_NODELAY` is set on the listener, so every accepted socket has it from the start
    /// (Linux copies it to the connections a listener accepts): relayed requests and replies
    /// are written whole and must not wait for Nagle's timer.
    pub fn new(listener: Arc<std::net::TcpListener>) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        listener_nodelay(&listener)?;
        let bound = listener.local_addr()?;
        let bound = (!bound.ip().is_unspecified()).then_some(bound);
        // SAFETY: the listener's descriptor stays open while any reference to it lives, and
        // the AsyncFd holds one; nothing replaces or closes it meanwhile.
        let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE)? };
        Ok(Self { listener, bound })
    }

    /// The next connection, its peer and its local address.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr, SocketAddr)> {
        loop {
            let mut ready = self.listener.readable().await?;
            if let Ok(result) = ready.try_io(|l| accept4(l.get_ref())) {
                let (stream, peer) = result?;
                let local = match self.bound {
                    Some(addr) => addr,
                    None => stream.local_addr()?,
                };
                return Ok((stream, peer, local));
            }
        }
    }
}

/// Sets `TCP_NODELAY` on a listening socket (std's `set_nodelay` is only on streams).
fn listener_nodelay(listener: &std::net::TcpListener) -> io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
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
