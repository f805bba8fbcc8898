//! The compressed protocol (CLIENT_COMPRESS) on one leg, as a stream of ordinary packets: what
//! is read comes out of the leg's frames decompressed, what is written goes into frames. A
//! frame is a 7-byte header (compressed length, frame sequence id, uncompressed length, 0 when
//! stored as is) and a zlib stream or the bytes themselves; packets may span frames. The
//! framing itself is `mysql_common`'s ([`latch_mysql::compress`]).
//!
//! Frame sequence ids are counted apart from the packets': a command starts at 0 and each
//! frame either side sends takes the next id. As the server ([`Side::Server`]) latch answers
//! with the id after the application's last frame. As the client ([`Side::Client`]) it starts
//! a command's first frame at 0: a frame that begins a packet of sequence id 0, unless that 0
//! continues a 255 latch itself just wrote (LOAD DATA LOCAL INFILE wraps).
//!
//! Written bytes are framed when flushed (the relay flushes after each burst) or once
//! [`WRITE_BATCH`] are held; a frame read is held whole until decoded, so a leg holds at most
//! one frame's 16 MiB each way.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use latch_mysql::compress::{ChunkInfo, CompDecoder, Compression, MAX_FRAME, encode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
/// Bytes written and held before they are framed without a flush.
const WRITE_BATCH: usize = 64 * 1024;

/// Which end of the leg latch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Toward the server.
    Client,
    /// Toward the application.
    Server,
}

/// A leg speaking the compressed protocol.
pub struct Compressed<S> {
    inner: S,
    side: Side,
    level: Compression,
    /// Sequence id of the next frame written.
    seq: u8,
    decoder: CompDecoder,
    /// Read from the leg, not yet decoded.
    raw: BytesMut,
    /// Decoded, not yet read.
    plain: BytesMut,
    eof: bool,
    /// Written, not yet framed.
    pending: BytesMut,
    /// Framed, not yet written to the leg.
    out: BytesMut,
    /// Where the written packet stream is: bytes left of the current packet, or the part of
    /// a header seen so far.
    packet_left: usize,
    header: [u8; 4],
    header_len: usize,
    /// Sequence id of the last packet written, and whether a frame was read since.
    last_seq: Option<u8>,
    read_since_write: bool,
}

impl<S> Compressed<S> {
    /// `early`: bytes already read from the leg (frames after the handshake's last packet).
    pub fn new(inner: S, side: Side, early: BytesMut) -> Self {
        Compressed {
            inner,
            side,
            // The application's leg is local: the cheapest level; the server's may not be.
            level: match side {
                Side::Server => Compression::fast(),
                Side::Client => Compression::default(),
            },
            seq: 0,
            decoder: CompDecoder::Idle,
            raw: early,
            plain: BytesMut::new(),
            eof: false,
            pending: BytesMut::new(),
            out: BytesMut::new(),
            packet_left: 0,
            header: [0; 4],
            header_len: 0,
            last_seq: None,
            read_since_write: false,
        }
    }

    /// Moves the held bytes into a frame (nothing when none are held).
    fn frame(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.side == Side::Client && self.starts_command() {
            self.seq = 0;
        }
        self.track();
        self.read_since_write = false;
        self.seq = encode(self.seq, self.level, &self.pending, &mut self.out);
        self.pending.clear();
        Ok(())
    }

    fn starts_command(&self) -> bool {
        self.packet_left == 0
            && self.header_len == 0
            && self.pending.len() >= 4
            && self.pending[3] == 0
            && (self.read_since_write || self.last_seq != Some(255))
    }

    /// Follows the packet headers in the held bytes.
    fn track(&mut self) {
        let mut data = &self.pending[..];
        while !data.is_empty() {
            if self.packet_left > 0 {
                let n = self.packet_left.min(data.len());
                self.packet_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (4 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 4 {
                let h = self.header;
                self.packet_left =
                    usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
                self.last_seq = Some(h[3]);
                self.header_len = 0;
            }
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("compressed protocol: {e}"),
    )
}

impl<S: AsyncWrite + Unpin> Compressed<S> {
    /// Writes every framed byte to the leg.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Compressed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                return Poll::Ready(Ok(()));
            }
            let decoded = this
                .decoder
                .decode(&mut this.raw, &mut this.plain, MAX_FRAME)
                .map_err(invalid)?;
            if let Some(ChunkInfo::Last(seq) | ChunkInfo::Middle(seq)) = decoded {
                this.seq = seq.wrapping_add(1);
                this.read_since_write = true;
                continue;
            }
            if this.eof {
                return match this.raw.is_empty() {
                    true => Poll::Ready(Ok(())),
                    false => Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                };
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            match read.filled() {
                [] => this.eof = true,
                got => this.raw.extend_from_slice(got),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Compressed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.len() >= WRITE_BATCH {
            this.frame()?;
        }
        ready!(this.poll_out(cx))?;
        let n = buf.len().min(WRITE_BATCH);
        this.pending.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.frame()?;
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.frame()?;
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A packet: header (length, `seq`) and payload.
    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut p = len.to_le_bytes()[..3].to_vec();
        p.push(seq);
        p.extend_from_slice(payload);
        p
    }

    /// The frames in `bytes`: (sequence id, decompressed payload).
    fn frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut src = BytesMut::from(bytes);
        let mut decoder = CompDecoder::Idle;
        let mut got = Vec::new();
        loop {
            let mut dst = BytesMut::new();
            match decoder.decode(&mut src, &mut dst, MAX_FRAME).unwrap() {
                Some(ChunkInfo::Last(seq) | ChunkInfo::Middle(seq)) => {
                    got.push((seq, dst.to_vec()))
                }
                None => break,
            }
        }
        assert!(src.is_empty(), "a partial frame is left");
        got
    }

    #[tokio::test]
    async fn a_client_starts_each_command_at_frame_zero_and_follows_the_servers_frames() {
        let (ours, mut server) = tokio::io::duplex(1 << 20);
        let mut leg = Compressed::new(ours, Side::Client, BytesMut::new());
        // A command, large enough to be compressed.
        let query = packet(0, &[b'x'; 500]);
        leg.write_all(&query).await.unwrap();
        leg.flush().await.unwrap();
        let mut raw = vec![0u8; 4096];
        let n = server.read(&mut raw).await.unwrap();
        let sent = frames(&raw[..n]);
        assert_eq!(sent, vec![(0, query.clone())]);
        assert!(
            n < query.len(),
            "500 equal bytes should have been compressed"
        );
        // The server answers in frames 1 and 2; a frame the client writes next within this
        // command (a LOAD DATA reply, packet 3) is frame 3.
        let mut reply = BytesMut::new();
        encode(1, Compression::none(), &packet(1, b"ok"), &mut reply);
        encode(2, Compression::none(), &packet(2, b"more"), &mut reply);
        server.write_all(&reply).await.unwrap();
        let mut got = vec![0u8; 6 + 8];
        leg.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [packet(1, b"ok"), packet(2, b"more")].concat());
        leg.write_all(&packet(3, b"data")).await.unwrap();
        leg.flush().await.unwrap();
        let n = server.read(&mut raw).await.unwrap();
        assert_eq!(frames(&raw[..n]), vec![(3, packet(3, b"data"))]);
        // The next command starts at frame 0 again.
        leg.write_all(&packet(0, b"\x0eping")).await.unwrap();
        leg.flush().await.unwrap();
        let n = server.read(&mut raw).await.unwrap();
        assert_eq!(frames(&raw[..n]), vec![(0, packet(0, b"\x0eping"))]);
    }

    #[tokio::test]
    async fn a_zero_that_continues_a_255_is_not_a_new_command() {
        let (ours, mut server) = tokio::io::duplex(1 << 20);
        let mut leg = Compressed::new(ours, Side::Client, BytesMut::new());
        leg.write_all(&packet(0, b"\x03LOAD")).await.unwrap();
        leg.flush().await.unwrap();
        leg.write_all(&packet(255, b"row")).await.unwrap();
        leg.flush().await.unwrap();
        leg.write_all(&packet(0, b"")).await.unwrap();
        leg.flush().await.unwrap();
        let mut raw = vec![0u8; 4096];
        let mut all = Vec::new();
        while frames_complete(&all) < 3 {
            let n = server.read(&mut raw).await.unwrap();
            all.extend_from_slice(&raw[..n]);
        }
        let seqs: Vec<u8> = frames(&all).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [0, 1, 2]);
    }

    fn frames_complete(bytes: &[u8]) -> usize {
        let mut src = BytesMut::from(bytes);
        let mut decoder = CompDecoder::Idle;
        let mut n = 0;
        while let Ok(Some(_)) = decoder.decode(&mut src, &mut BytesMut::new(), MAX_FRAME) {
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn a_server_answers_after_the_applications_frame_and_reads_its_early_frames() {
        let (ours, mut app) = tokio::io::duplex(1 << 20);
        // The application's first command arrived with its handshake response: frame 0.
        let mut early = BytesMut::new();
        encode(
            0,
            Compression::none(),
            &packet(0, b"\x03SELECT 1"),
            &mut early,
        );
        let mut leg = Compressed::new(ours, Side::Server, early);
        let mut got = vec![0u8; 13];
        leg.read_exact(&mut got).await.unwrap();
        assert_eq!(got, packet(0, b"\x03SELECT 1"));
        // The answer, in two flushes: frames 1 and 2, whatever the packets' own ids.
        leg.write_all(&packet(1, b"one")).await.unwrap();
        leg.flush().await.unwrap();
        leg.write_all(&packet(2, b"two")).await.unwrap();
        leg.flush().await.unwrap();
        let mut raw = vec![0u8; 4096];
        let mut all = Vec::new();
        while frames_complete(&all) < 2 {
            let n = app.read(&mut raw).await.unwrap();
            all.extend_from_slice(&raw[..n]);
        }
        assert_eq!(
            frames(&all),
            vec![(1, packet(1, b"one")), (2, packet(2, b"two"))]
        );
    }

    #[tokio::test]
    async fn a_malformed_frame_is_an_error_and_a_cut_one_is_unexpected_eof() {
        let (ours, mut app) = tokio::io::duplex(1 << 20);
        let mut leg = Compressed::new(ours, Side::Server, BytesMut::new());
        // Claims 5 bytes that inflate to 100, but they are not zlib.
        app.write_all(&[5, 0, 0, 0, 100, 0, 0, 1, 2, 3, 4, 5])
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(leg.read(&mut buf).await.is_err());
        let (ours, mut app) = tokio::io::duplex(1 << 20);
        let mut leg = Compressed::new(ours, Side::Server, BytesMut::new());
        app.write_all(&[9, 0, 0, 0, 0, 0, 0, 1, 2]).await.unwrap();
        drop(app);
        let err = leg.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
