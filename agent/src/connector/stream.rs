//! Either leg of a session: plain TCP or TLS over it — toward the target latch is the TLS
//! client ([`TargetStream`]), toward the application the TLS server ([`AppStream`]).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Copies what waits on `sock` into `buf` without taking it or waiting: the bytes copied, 0 at
/// the end of the stream, `EAGAIN` when nothing waits.
pub fn peek_now(sock: &TcpStream, buf: &mut [u8]) -> nix::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd as _;
    recv(
        sock.as_raw_fd(),
        buf,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    )
}

/// Plain TCP, or TLS (`T`) over it.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// The connection to the target.
pub type TargetStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;
/// The connection from the application.
pub type AppStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl TargetStream {
    /// The TCP connection under any TLS.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_ref().0,
        }
    }

    /// Registers the socket with the reactor of the runtime this runs on (a duplicate of its
    /// descriptor takes its place; the old one leaves its reactor and closes). TLS state is
    /// untouched.
    pub fn rehome(&mut self) -> io::Result<()> {
        let tcp = match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_mut().0,
        };
        let fd = std::os::fd::AsFd::as_fd(&*tcp).try_clone_to_owned()?;
        let here = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        drop(std::mem::replace(tcp, here));
        Ok(())
    }
}

impl AppStream {
    /// The TCP connection under any TLS.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_ref().0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use tokio::io::AsyncReadExt as _;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_rehomed_target_stream_reads_on_its_new_runtime_after_the_old_one_is_gone() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let old = runtime();
        let mut stream: TargetStream =
            MaybeTls::Plain(old.block_on(TcpStream::connect(addr)).unwrap());
        let (mut server, _) = listener.accept().unwrap();
        // Its reactor goes: a stream still registered there can no longer wait for data.
        drop(old);
        runtime().block_on(async {
            stream.rehome().unwrap();
            server.write_all(b"ping").unwrap();
            let mut got = [0u8; 4];
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read_exact(&mut got),
            );
            read.await.expect("woken").expect("read");
            assert_eq!(&got, b"ping");
        });
    }
}
