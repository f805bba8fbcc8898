//! Byte relay between the application's connection and the target's, once any handshake is
//! done. Plain TCP to TCP uses splice(2) through a pipe per direction: the payload never
//! enters user space and no buffer is allocated per chunk.
use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    sys::socket::{Shutdown, shutdown},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

/// Pipe capacity asked for per direction; the kernel may grant less.
const PIPE_SIZE: usize = 1 << 20;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub to_target: u64,
    pub to_app: u64,
}

/// Live byte counters a relay updates as it goes (for metrics and status).
#[derive(Debug, Default)]
pub struct Progress {
    pub to_target: AtomicU64,
    pub to_app: AtomicU64,
}

/// Relays until both directions have seen end-of-stream (half-closes are passed on) or either
/// fails. Returns the totals; on error the totals so far are in `progress`.
pub async fn splice_both(
    app: &TcpStream,
    target: &TcpStream,
    progress: &Progress,
) -> io::Result<Transferred> {
    let (to_target, to_app) = tokio::try_join!(
        pump(app, target, &progress.to_target),
        pump(target, app, &progress.to_app),
    )?;
    Ok(Transferred { to_target, to_app })
}

/// One direction: socket → pipe → socket until `src` reaches end-of-stream, then half-close
/// `dst` for writing.
async fn pump(src: &TcpStream, dst: &TcpStream, counter: &AtomicU64) -> io::Result<u64> {
    let (pipe_r, pipe_w) = pipe()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // The pipe is empty here (drained below), so EAGAIN can only mean "no data yet".
        let n = src
            .async_io(Interest::READABLE, || {
                splice(src.as_fd(), None, pipe_w.as_fd(), None, PIPE_SIZE, flags)
                    .map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            match shutdown(dst_fd(dst), Shutdown::Write) {
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            let m = dst
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_r.as_fd(), None, dst.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await?;
            left -= m;
        }
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn dst_fd(dst: &TcpStream) -> std::os::fd::RawFd {
    use std::os::fd::AsRawFd as _;
    dst.as_raw_fd()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A larger pipe means fewer splice calls per megabyte; not fatal if refused.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
    Ok((r, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn relays_both_ways_and_passes_half_close() {
        // app_client <-> [app_side | relay | target_side] <-> target_server
        let (mut app_client, app_side) = pair().await;
        let (target_side, mut target_server) = pair().await;
        let progress = Progress::default();
        let relay = async { splice_both(&app_side, &target_side, &progress).await };
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let peers = async {
            let (mut r, mut w) = target_server.split();
            let echo = async {
                let mut buf = Vec::new();
                r.read_to_end(&mut buf).await.unwrap();
                w.write_all(&buf).await.unwrap();
                w.shutdown().await.unwrap();
                buf.len()
            };
            let (mut cr, mut cw) = app_client.split();
            let send = async {
                cw.write_all(&payload).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let recv = async {
                let mut back = Vec::new();
                cr.read_to_end(&mut back).await.unwrap();
                back
            };
            let (n, (), back) = tokio::join!(echo, send, recv);
            (n, back)
        };
        let (res, (n, back)) = tokio::join!(relay, peers);
        let t = res.unwrap();
        assert_eq!(n, payload.len());
        assert!(back == payload, "echoed bytes differ");
        assert_eq!(t.to_target, payload.len() as u64);
        assert_eq!(t.to_app, payload.len() as u64);
        assert_eq!(
            progress.to_app.load(Ordering::Relaxed),
            payload.len() as u64
        );
    }
}
