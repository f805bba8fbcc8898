//! Opening the broker's connections to targets.
use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to the target could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to target {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to target {addr}: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Opens a connection to `addr` from a socket carrying `mark`, so latch's own connect hooks
/// leave it alone (no redirect loop even when the broker runs inside an intercepted cgroup).
/// The socket is created in `netns` (the application's namespace) when one is given. Mark 0
/// leaves the socket unmarked (setting a mark needs CAP_NET_ADMIN; unit tests run without).
pub async fn connect_marked(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
    netns: Option<&crate::netns::Netns>,
) -> Result<TcpStream, DialError> {
    let err = |source| DialError::Io { addr, source };
    // Non-blocking from the start: no fcntl calls per connection.
    let new = || {
        Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )
    };
    let socket = match netns {
        Some(ns) => ns.run(new),
        None => new(),
    }
    .map_err(err)?;
    if mark != 0 {
        socket.set_mark(mark).map_err(err)?;
    }
    socket.set_tcp_nodelay(true).map_err(err)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(res) => res.map_err(err),
        Err(_) => Err(DialError::Timeout { addr, timeout }),
    }
}
