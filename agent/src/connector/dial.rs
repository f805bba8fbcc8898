//! Opening the broker's connections to targets.
use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

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
    if started(&socket, addr).map_err(err)? == Started::Connected {
        // Established before a timer or a wake-up was needed (any local target).
        return TcpStream::from_std(socket.into()).map_err(err);
    }
    let stream = TcpStream::from_std(socket.into()).map_err(err)?;
    let connected = async {
        stream.writable().await?;
        match stream.take_error()? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, connected).await {
        Ok(res) => res.map(|()| stream).map_err(err),
        Err(_) => Err(DialError::Timeout { addr, timeout }),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Started {
    Connected,
    InProgress,
}

/// Starts a non-blocking connect and asks once more at once whether it is done. A target on
/// this host (loopback, a pod's address on the node) answers the SYN within the first call, so
/// the second finds the connection established: the caller then needs no timer (whose first
/// insertion wakes the connection thread through its eventfd), no reactor round and no
/// `SO_ERROR` lookup for it. Errors the second call reports (`ECONNREFUSED`, …) are the
/// connect's own.
fn started(socket: &Socket, addr: SocketAddr) -> io::Result<Started> {
    let addr = socket2::SockAddr::from(addr);
    match socket.connect(&addr) {
        Ok(()) => return Ok(Started::Connected),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    match socket.connect(&addr) {
        Ok(()) => Ok(Started::Connected),
        Err(e) if e.raw_os_error() == Some(libc::EISCONN) => Ok(Started::Connected),
        Err(e) if e.raw_os_error() == Some(libc::EALREADY) => Ok(Started::InProgress),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> Socket {
        Socket::new(
            Domain::IPV4,
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )
        .unwrap()
    }

    /// A listener whose accept queue is full: the kernel drops the next SYN, so a connect to
    /// it stays in progress (the client retries after a second).
    fn deaf_listener() -> (Socket, Vec<std::net::TcpStream>, SocketAddr) {
        let listener = socket();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        // A backlog of 0 admits one connection; more are held in SYN_RECV or dropped.
        let filled = (0..2)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
            })
            .collect();
        (listener, filled, addr)
    }

    #[test]
    fn a_local_target_is_established_within_the_connect_call() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(started(&socket(), addr).unwrap(), Started::Connected);
    }

    #[test]
    fn a_target_that_does_not_answer_is_in_progress() {
        let (_listener, _filled, addr) = deaf_listener();
        assert_eq!(started(&socket(), addr).unwrap(), Started::InProgress);
    }

    #[tokio::test]
    async fn a_refused_connect_reports_the_refusal() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        match connect_marked(addr, 0, Duration::from_secs(5), None).await {
            Err(DialError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_target_that_does_not_answer_times_out() {
        let (_listener, _filled, addr) = deaf_listener();
        let timeout = Duration::from_millis(300);
        let begun = std::time::Instant::now();
        match connect_marked(addr, 0, timeout, None).await {
            Err(DialError::Timeout { timeout: t, .. }) => assert_eq!(t, timeout),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(begun.elapsed() >= timeout);
    }

    #[tokio::test]
    async fn a_local_target_is_reached_and_carries_bytes() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut stream = connect_marked(addr, 0, Duration::from_secs(5), None)
            .await
            .unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert!(stream.nodelay().unwrap());
    }
}
