//! The compressed protocol (CLIENT_COMPRESS). A frame is a 7-byte header (compressed length,
//! frame sequence id, uncompressed length, 0 when stored as is) and a zlib stream or the bytes
//! themselves; packets may span frames ([`latch_mysql::compress`]).
//!
//! The relay passes frames on as they come ([`super::commands`]): the server makes a packet's
//! sequence id follow the frame it starts in, and clients check that (mysql_async: "Packets
//! out of sync"), so a frame boundary or number latch moved would break the session. What
//! latch needs to see it decodes beside: [`Packets`] finds the commands in the application's
//! frames.
//!
//! Where latch speaks for itself on the server's compressed leg (its own COM_CHANGE_USER
//! exchange), [`Compressed`] makes the leg a stream of ordinary packets, latch the client.
//! Its frame numbers: the id after the server's last frame, 0 for a command's first frame (a
//! packet of sequence id 0 that does not continue a 255 just written), and a command behind
//! one that has no reply starts its own frame. Written bytes are framed when flushed or once [`WRITE_BATCH`] are held; frames read
//! are decoded [`PLAIN_ROOM`] at a time as their bytes arrive, so a frame that declares 16 MiB
//! costs no more than that room.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use latch_mysql::compress::{Compression, FrameReader, encode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
/// Bytes written and held before they are framed without a flush.
const WRITE_BATCH: usize = 64 * 1024;
/// Plain bytes decoded ahead of the reader: a frame is inflated this much at a time, whatever
/// length it declares.
const PLAIN_ROOM: usize = 64 * 1024;

/// The server's leg in the compressed protocol, latch the client.
pub struct Compressed<S> {
    inner: S,
    /// Sequence id of the next frame written.
    seq: u8,
    reader: FrameReader,
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
    pub fn new(inner: S) -> Self {
        Compressed {
            inner,
            seq: 0,
            reader: FrameReader::default(),
            raw: BytesMut::new(),
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
        while !self.pending.is_empty() {
            if self.starts_command(0) {
                self.seq = 0;
            }
            // A command that starts inside the held bytes (sent right behind one that has no
            // reply, such as COM_STMT_SEND_LONG_DATA) starts its own frame.
            let cut = self.track();
            let chunk = self.pending.split_to(cut);
            self.read_since_write = false;
            self.seq = encode(self.seq, Compression::default(), &chunk, &mut self.out);
        }
        Ok(())
    }

    /// Whether the held bytes at `at`, a packet boundary, start a command: a packet of
    /// sequence id 0 that does not continue a 255 written just before.
    fn starts_command(&self, at: usize) -> bool {
        self.packet_left == 0
            && self.header_len == 0
            && self.pending.len() >= at + 4
            && self.pending[at + 3] == 0
            && ((at == 0 && self.read_since_write) || self.last_seq != Some(255))
    }

    /// Follows the packet headers in the held bytes up to where a second command starts or to
    /// their end; returns that length.
    fn track(&mut self) -> usize {
        let mut at = 0;
        while at < self.pending.len() {
            if self.packet_left > 0 {
                let n = self.packet_left.min(self.pending.len() - at);
                self.packet_left -= n;
                at += n;
                continue;
            }
            if at > 0 && self.starts_command(at) {
                return at;
            }
            let n = (4 - self.header_len).min(self.pending.len() - at);
            self.header[self.header_len..self.header_len + n]
                .copy_from_slice(&self.pending[at..at + n]);
            self.header_len += n;
            at += n;
            if self.header_len == 4 {
                let h = self.header;
                self.packet_left =
                    usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
                self.last_seq = Some(h[3]);
                self.header_len = 0;
            }
        }
        at
    }
}

/// A read half and a write half as one stream (a leg's halves for one exchange).
pub struct Joined<'a, R, W> {
    pub r: &'a mut R,
    pub w: &'a mut W,
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Joined<'_, R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().r).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Joined<'_, R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().w).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().w).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().w).poll_shutdown(cx)
    }
}

/// The length of the first whole frame in `raw` (header included), if one is there.
pub fn whole_frame(raw: &[u8]) -> Option<usize> {
    let header = raw.get(..7)?;
    let len =
        7 + (usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16);
    (raw.len() >= len).then_some(len)
}

/// A command found in a frame's packets: where its packet starts in the frame's plain bytes,
/// and its command byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandAt {
    pub offset: usize,
    pub command: u8,
}

/// Follows the packets of one direction across frames, to find where commands start.
#[derive(Debug, Default)]
pub struct Packets {
    left: usize,
    header: [u8; 4],
    got: usize,
    last_seq: Option<u8>,
    /// A command's header was read; its first byte is next (at this plain offset).
    command_at: Option<usize>,
}

impl Packets {
    /// Follows `plain`, which starts at `offset` of its frame's plain bytes; reports each
    /// command's start.
    pub fn feed(&mut self, plain: &[u8], offset: usize, found: &mut impl FnMut(CommandAt)) {
        let mut at = 0;
        while at < plain.len() {
            if let Some(start) = self.command_at.take() {
                found(CommandAt {
                    offset: start,
                    command: plain[at],
                });
            }
            if self.left > 0 {
                let n = self.left.min(plain.len() - at);
                self.left -= n;
                at += n;
                continue;
            }
            let n = (4 - self.got).min(plain.len() - at);
            self.header[self.got..self.got + n].copy_from_slice(&plain[at..at + n]);
            self.got += n;
            at += n;
            if self.got == 4 {
                let h = self.header;
                self.left = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
                let command = h[3] == 0 && self.last_seq != Some(255);
                self.last_seq = Some(h[3]);
                self.got = 0;
                if command && self.left > 0 {
                    // The packet started 4 bytes back (perhaps in an earlier piece).
                    self.command_at = Some((offset + at).saturating_sub(4));
                }
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
            // Decode what has arrived, at most PLAIN_ROOM at a time.
            loop {
                let before = this.plain.len();
                let room = PLAIN_ROOM - before;
                let read = this
                    .reader
                    .read(&this.raw, &mut this.plain, room)
                    .map_err(invalid)?;
                this.raw.advance(read.used);
                if let Some(seq) = read.frame {
                    this.seq = seq.wrapping_add(1);
                    this.read_since_write = true;
                }
                if read.used == 0 && this.plain.len() == before {
                    break;
                }
            }
            if !this.plain.is_empty() {
                continue;
            }
            if this.eof {
                return match this.raw.is_empty() && this.reader.between_frames() {
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
    use latch_mysql::compress::{ChunkInfo, CompDecoder, MAX_FRAME};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_frame_that_inflates_to_16_mib_is_read_a_bounded_piece_at_a_time() {
        let mut frame = BytesMut::new();
        encode(0, Compression::best(), &vec![0u8; MAX_FRAME], &mut frame);
        assert!(frame.len() < 64 * 1024, "{} bytes", frame.len());
        let (ours, mut app) = tokio::io::duplex(1 << 20);
        let mut leg = Compressed::new(ours);
        app.write_all(&frame).await.unwrap();
        let mut buf = vec![1u8; 8192];
        let mut total = 0;
        while total < MAX_FRAME {
            let n = leg.read(&mut buf).await.unwrap();
            assert!(n > 0 && buf[..n].iter().all(|&b| b == 0));
            total += n;
            assert!(
                leg.plain.capacity() <= 2 * PLAIN_ROOM && leg.raw.capacity() <= 128 * 1024,
                "held {} plain, {} raw",
                leg.plain.capacity(),
                leg.raw.capacity()
            );
        }
        assert_eq!(total, MAX_FRAME);
        // The next frame's header: frame 0 was read, so an answer goes out as frame 1.
        leg.write_all(&[1, 0, 0, 1, 0]).await.unwrap();
        leg.flush().await.unwrap();
        let mut head = [0u8; 4];
        app.read_exact(&mut head).await.unwrap();
        assert_eq!(head[3], 1);
    }

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
        let mut leg = Compressed::new(ours);
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
        let mut leg = Compressed::new(ours);
        leg.write_all(&packet(0, b"\x03LOAD")).await.unwrap();
        leg.flush().await.unwrap();
        leg.write_all(&packet(255, b"row")).await.unwrap();
        leg.flush().await.unwrap();
        leg.write_all(&packet(0, b"")).await.unwrap();
        leg.flush().await.unwrap();
        let all = read_frames(&mut server, 3).await;
        let seqs: Vec<u8> = frames(&all).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [0, 1, 2]);
    }

    #[tokio::test]
    async fn a_command_behind_one_without_a_reply_starts_its_own_frame_and_a_wrap_does_not() {
        let (ours, mut server) = tokio::io::duplex(1 << 20);
        let mut leg = Compressed::new(ours);
        // COM_STMT_SEND_LONG_DATA (no reply) and COM_STMT_EXECUTE, in one flush.
        let long_data = packet(0, b"\x18\x01\x00\x00\x00\x00\x00data");
        let execute = packet(0, b"\x17\x01\x00\x00\x00");
        leg.write_all(&[long_data.clone(), execute.clone()].concat())
            .await
            .unwrap();
        leg.flush().await.unwrap();
        // Then the server's reply (frame 1), and LOAD DATA's wrap: 255 then 0, one flush.
        let mut reply = BytesMut::new();
        encode(1, Compression::none(), &packet(1, b"\xfbfile"), &mut reply);
        server.write_all(&reply).await.unwrap();
        let mut got = vec![0u8; 9];
        leg.read_exact(&mut got).await.unwrap();
        let wrap = [packet(255, b"row"), packet(0, b"")].concat();
        leg.write_all(&wrap).await.unwrap();
        leg.flush().await.unwrap();
        let all = read_frames(&mut server, 3).await;
        assert_eq!(frames(&all), vec![(0, long_data), (0, execute), (2, wrap)]);
    }

    #[test]
    fn commands_are_found_where_they_start_across_pieces_and_a_wrap_is_not_one() {
        let mut packets = Packets::default();
        let mut found = Vec::new();
        // A query, then (behind it, in the same frame) a COM_CHANGE_USER: fed in pieces that
        // cut a header and the command byte apart.
        let bytes = [packet(0, b"\x03SELECT 1"), packet(0, b"\x11user\0")].concat();
        let (a, b) = bytes.split_at(16);
        packets.feed(a, 0, &mut |c| found.push(c));
        packets.feed(b, 16, &mut |c| found.push(c));
        assert_eq!(
            found,
            [
                CommandAt {
                    offset: 0,
                    command: 0x03
                },
                CommandAt {
                    offset: 13,
                    command: 0x11
                }
            ]
        );
        // LOAD DATA's packets: a 0 after a 255 continues the command.
        found.clear();
        let wrap = [packet(255, b"row"), packet(0, b"more")].concat();
        packets.feed(&wrap, 0, &mut |c| found.push(c));
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(whole_frame(&[3, 0, 0, 0, 0, 0, 0, 1, 2]), None);
        assert_eq!(whole_frame(&[2, 0, 0, 0, 0, 0, 0, 1, 2, 9]), Some(9));
    }

    /// Reads from `peer` until `n` whole frames have come; returns their bytes.
    async fn read_frames(peer: &mut tokio::io::DuplexStream, n: usize) -> Vec<u8> {
        let mut raw = vec![0u8; 4096];
        let mut all = Vec::new();
        while frames_complete(&all) < n {
            let got = peer.read(&mut raw).await.unwrap();
            all.extend_from_slice(&raw[..got]);
        }
        all
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
    async fn what_follows_a_frame_read_takes_the_next_frame_ids() {
        let (ours, mut app) = tokio::io::duplex(1 << 20);
        // The peer's frame 0.
        let mut first = BytesMut::new();
        encode(
            0,
            Compression::none(),
            &packet(0, b"\x03SELECT 1"),
            &mut first,
        );
        app.write_all(&first).await.unwrap();
        let mut leg = Compressed::new(ours);
        let mut got = vec![0u8; 13];
        leg.read_exact(&mut got).await.unwrap();
        assert_eq!(got, packet(0, b"\x03SELECT 1"));
        // The answer, in two flushes: frames 1 and 2, whatever the packets' own ids.
        leg.write_all(&packet(1, b"one")).await.unwrap();
        leg.flush().await.unwrap();
        leg.write_all(&packet(2, b"two")).await.unwrap();
        leg.flush().await.unwrap();
        let all = read_frames(&mut app, 2).await;
        assert_eq!(
            frames(&all),
            vec![(1, packet(1, b"one")), (2, packet(2, b"two"))]
        );
    }

    #[tokio::test]
    async fn a_malformed_frame_is_an_error_and_a_cut_one_is_unexpected_eof() {
        let (ours, mut app) = tokio::io::duplex(1 << 20);
        let mut leg = Compressed::new(ours);
        // Claims 5 bytes that inflate to 100, but they are not zlib.
        app.write_all(&[5, 0, 0, 0, 100, 0, 0, 1, 2, 3, 4, 5])
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(leg.read(&mut buf).await.is_err());
        let (ours, mut app) = tokio::io::duplex(1 << 20);
        let mut leg = Compressed::new(ours);
        app.write_all(&[9, 0, 0, 0, 0, 0, 0, 1, 2]).await.unwrap();
        drop(app);
        // A stored payload is passed on as it arrives; the end of the stream inside it is not
        // a clean end.
        assert_eq!(leg.read(&mut buf).await.unwrap(), 2);
        let err = leg.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
