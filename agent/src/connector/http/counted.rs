//! A stream that counts the bytes written to it (for the session's byte counts: hyper owns
//! the streams, and after an upgrade they live on inside hyper's `Upgraded`).
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Counted<S> {
    inner: S,
    written: Arc<AtomicU64>,
    /// While set, a shutdown only flushes: the owner closes the stream itself (to answer after
    /// hyper gave up on a request head) — cleared once the connection is upgraded, so a
    /// half-close passes on.
    hold_shutdown: Option<Arc<AtomicBool>>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, written: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            written,
            hold_shutdown: None,
        }
    }

    /// The count of bytes written.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    /// The stream, to move it to another connection thread's reactor.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// As [`Counted::new`], with shutdowns held while `hold` is set.
    pub fn holding_shutdown(inner: S, written: Arc<AtomicU64>, hold: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            written,
            hold_shutdown: Some(hold),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            me.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            me.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me
            .hold_shutdown
            .as_ref()
            .is_some_and(|h| h.load(Ordering::Relaxed))
        {
            return Pin::new(&mut me.inner).poll_flush(cx);
        }
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}
