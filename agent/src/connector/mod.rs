//! Protocol connectors: given an accepted, authorized connection and its policy, reach the
//! target and carry the application's traffic. `tcp` relays bytes; the protocol-aware
//! connectors (PostgreSQL, MySQL, HTTP, SSH) authenticate to the target first.
pub mod postgres;
pub mod refuse;
pub mod tcp;

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Why a connection could not be brokered. Messages name what failed, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to target {addr}: {source}")]
    Target {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to target {addr}: timed out after {timeout:?}")]
    TargetTimeout { addr: SocketAddr, timeout: Duration },
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("protocol {0} is not supported by this build of latch yet")]
    Unsupported(&'static str),
    #[error("relay: {0}")]
    Relay(#[source] io::Error),
    #[error("postgres: {0}")]
    Postgres(#[source] Box<postgres::Failure>),
}

/// Tells the application that its workload may not use `policy`, in the application's own
/// protocol where latch speaks it; plain TCP can only be reset.
pub async fn deny(
    app: TcpStream,
    origin: &crate::broker::Origin,
    policy: &crate::config::Policy,
    shared: &crate::broker::Shared,
) {
    match policy.protocol {
        crate::config::Protocol::Postgres => postgres::deny(app, origin, policy, shared).await,
        _ => {
            let _ = socket2::SockRef::from(&app).set_linger(Some(Duration::ZERO));
            drop(app);
        }
    }
}

/// Opens a connection to `addr` from a socket carrying `mark`, so latch's own connect hooks
/// leave it alone (no redirect loop even when the broker runs inside an intercepted cgroup).
/// The socket is created in `netns` (the application's namespace) when one is given.
pub async fn connect_marked(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
    netns: Option<&crate::netns::Netns>,
) -> Result<TcpStream, ConnectError> {
    let err = |source| ConnectError::Target { addr, source };
    let new = || Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP));
    let socket = match netns {
        Some(ns) => ns.run(new),
        None => new(),
    }
    .map_err(err)?;
    socket.set_mark(mark).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.set_tcp_nodelay(true).map_err(err)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(res) => res.map_err(err),
        Err(_) => Err(ConnectError::TargetTimeout { addr, timeout }),
    }
}
