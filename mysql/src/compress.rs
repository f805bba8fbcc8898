//! Compressed-protocol frames (CLIENT_COMPRESS): a 7-byte header (compressed length, frame
//! sequence id, uncompressed length, 0 when the payload is stored as is) around a zlib stream
//! or the bytes themselves. [`encode`] makes frames (storing what zlib would not make
//! smaller, as MariaDB does); [`FrameReader`] reads them a bounded piece at a time, so that a
//! small frame that claims to inflate to 16 MiB costs its reader no more than the room it
//! offers. `mysql_common`'s [`CompDecoder`] (whole frames) is the reference the tests check
//! against.
use std::io::Write as _;

use bytes::{BufMut as _, BytesMut};
pub use flate2::Compression;
use flate2::{Decompress, FlushDecompress, Status, write::ZlibEncoder};
pub use mysql_common::proto::codec::{ChunkInfo, CompDecoder};

/// Largest frame payload, compressed or not (a frame's lengths are 3 bytes).
pub const MAX_FRAME: usize = 0xFF_FFFF;
/// Shorter payloads are stored, not compressed (MariaDB's MIN_COMPRESS_LENGTH).
pub const MIN_COMPRESS: usize = 50;

/// Appends `data` to `out` as frames of at most [`MAX_FRAME`] bytes, the first with sequence
/// id `seq`; returns the id of the frame after them. A payload is compressed when it is at
/// least [`MIN_COMPRESS`] bytes and zlib makes it smaller; else it is stored.
pub fn encode(mut seq: u8, level: Compression, data: &[u8], out: &mut BytesMut) -> u8 {
    for chunk in data.chunks(MAX_FRAME) {
        let packed = (chunk.len() >= MIN_COMPRESS)
            .then(|| zlib(level, chunk))
            .filter(|p| p.len() < chunk.len());
        let (len, plain_len, payload) = match &packed {
            Some(p) => (p.len(), chunk.len(), &p[..]),
            None => (chunk.len(), 0, chunk),
        };
        out.reserve(7 + payload.len());
        out.put_uint_le(len as u64, 3);
        out.put_u8(seq);
        out.put_uint_le(plain_len as u64, 3);
        out.put_slice(payload);
        seq = seq.wrapping_add(1);
    }
    seq
}

/// A frame that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame declares {0} uncompressed bytes but no compressed ones")]
    Empty(usize),
    #[error("a frame's zlib stream is corrupt")]
    Corrupt,
    #[error("a frame's zlib stream ends before its declared length")]
    Short,
}

/// Reads compressed-protocol frames incrementally.
#[derive(Debug)]
pub struct FrameReader {
    state: State,
    inflate: Decompress,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// `got` bytes of a 7-byte header seen.
    Header { header: [u8; 7], got: usize },
    /// A stored payload: `left` bytes of it to come.
    Stored { left: usize },
    /// A zlib payload: `input` compressed bytes to come, `output` plain bytes to produce.
    Deflated { input: usize, output: usize },
}

/// What one [`FrameReader::read`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Bytes of the input used.
    pub used: usize,
    /// The sequence id of a frame whose header was read.
    pub frame: Option<u8>,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            state: State::Header {
                header: [0; 7],
                got: 0,
            },
            inflate: Decompress::new(true),
        }
    }
}

impl FrameReader {
    /// Reads from `input`, appending at most `room` plain bytes to `out`: a header, or part of
    /// a payload. Call again while it uses input or produces output.
    pub fn read(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
        room: usize,
    ) -> Result<Read, FrameError> {
        let mut read = Read::default();
        match &mut self.state {
            State::Header { header, got } => {
                let n = (7 - *got).min(input.len());
                header[*got..*got + n].copy_from_slice(&input[..n]);
                *got += n;
                read.used = n;
                if *got == 7 {
                    let len = |b: &[u8]| {
                        usize::from(b[0]) | usize::from(b[1]) << 8 | usize::from(b[2]) << 16
                    };
                    let (input, output) = (len(&header[..3]), len(&header[4..]));
                    read.frame = Some(header[3]);
                    self.state = match (input, output) {
                        (0, 0) => State::Header {
                            header: [0; 7],
                            got: 0,
                        },
                        (0, n) => return Err(FrameError::Empty(n)),
                        (n, 0) => State::Stored { left: n },
                        (input, output) => {
                            self.inflate.reset(true);
                            State::Deflated { input, output }
                        }
                    };
                }
            }
            State::Stored { left } => {
                let n = (*left).min(input.len()).min(room);
                out.extend_from_slice(&input[..n]);
                *left -= n;
                read.used = n;
                if *left == 0 {
                    self.state = State::Header {
                        header: [0; 7],
                        got: 0,
                    };
                }
            }
            State::Deflated {
                input: left_in,
                output: left_out,
            } => {
                if *left_out == 0 {
                    // Everything declared is out: what is left of the stream (its checksum)
                    // is skipped, as servers do.
                    let n = (*left_in).min(input.len());
                    *left_in -= n;
                    read.used = n;
                } else {
                    let feed = &input[..(*left_in).min(input.len())];
                    let room = room.min(*left_out);
                    let start = out.len();
                    out.resize(start + room, 0);
                    let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
                    let status = self
                        .inflate
                        .decompress(feed, &mut out[start..], FlushDecompress::None)
                        .map_err(|_| FrameError::Corrupt)?;
                    let used = (self.inflate.total_in() - in0) as usize;
                    let made = (self.inflate.total_out() - out0) as usize;
                    out.truncate(start + made);
                    *left_in -= used;
                    *left_out -= made;
                    read.used = used;
                    let stuck = used == 0 && made == 0 && room > 0 && feed.len() == *left_in;
                    if *left_out > 0 && (status == Status::StreamEnd || (*left_in == 0 && stuck)) {
                        return Err(FrameError::Short);
                    }
                }
                if *left_in == 0 && *left_out == 0 {
                    self.state = State::Header {
                        header: [0; 7],
                        got: 0,
                    };
                }
            }
        }
        Ok(read)
    }

    /// Whether the reader is between frames (nothing of a frame read).
    pub fn between_frames(&self) -> bool {
        matches!(self.state, State::Header { got: 0, .. })
    }
}

fn zlib(level: Compression, data: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::with_capacity(data.len() / 2 + 16), level);
    // Writing to a Vec cannot fail.
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
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
        assert!(src.is_empty());
        got
    }

    #[test]
    fn short_and_incompressible_payloads_are_stored_and_the_rest_compressed() {
        let text = b"SELECT @@max_allowed_packet,@@wait_timeout,@@socket".to_vec();
        let repeated = vec![b'x'; 1000];
        // xorshift64: bytes zlib cannot shrink.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for (data, stored) in [(&b"ping"[..], true), (&repeated, false), (&noise, true)] {
            let mut out = BytesMut::new();
            assert_eq!(encode(7, Compression::default(), data, &mut out), 8);
            let plain_len = u32::from_le_bytes([out[4], out[5], out[6], 0]);
            assert_eq!(plain_len == 0, stored, "{} bytes", data.len());
            assert_eq!(decode(&out), vec![(7, data.to_vec())]);
        }
        // A payload zlib cannot shrink below its length at this size is stored, whole.
        let mut out = BytesMut::new();
        encode(0, Compression::fast(), &text, &mut out);
        assert_eq!(decode(&out), vec![(0, text)]);
    }

    /// Everything `reader` reads from `bytes` fed `step` bytes at a time with `room` plain
    /// bytes per call: (frame ids, plain bytes).
    fn read_all(bytes: &[u8], step: usize, room: usize) -> Result<(Vec<u8>, Vec<u8>), FrameError> {
        let mut reader = FrameReader::default();
        let (mut ids, mut plain) = (Vec::new(), BytesMut::new());
        let (mut held, mut at, mut rest) = (Vec::new(), 0, bytes);
        loop {
            let before = plain.len();
            let r = reader.read(&held[at..], &mut plain, room)?;
            at += r.used;
            ids.extend(r.frame);
            if r.used == 0 && plain.len() == before {
                if rest.is_empty() {
                    break;
                }
                // More input: the next step of the rest after what is still held.
                let n = step.min(rest.len());
                held.drain(..at);
                at = 0;
                held.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
        }
        assert!(
            at == held.len() && reader.between_frames(),
            "a frame was cut"
        );
        Ok((ids, plain.to_vec()))
    }

    #[test]
    fn the_frame_reader_reads_what_the_reference_decoder_reads_in_any_pieces() {
        let mut frames = BytesMut::new();
        let text: Vec<u8> = (0..200_000u32)
            .map(|i| b"abcdefgh"[(i % 7) as usize])
            .collect();
        let mut seq = encode(3, Compression::default(), &text, &mut frames);
        seq = encode(seq, Compression::default(), b"short", &mut frames);
        frames.extend_from_slice(&[0, 0, 0, seq, 0, 0, 0]);
        let reference = decode(&frames);
        let want: Vec<u8> = reference.iter().flat_map(|(_, p)| p.clone()).collect();
        let ids: Vec<u8> = reference.iter().map(|(s, _)| *s).collect();
        assert_eq!(ids, [3, 4, 5]);
        for (step, room) in [(1, 1), (7, 3), (1000, 4096), (1 << 20, 1 << 20)] {
            assert_eq!(
                read_all(&frames, step, room).unwrap(),
                (ids.clone(), want.clone()),
                "step {step}, room {room}"
            );
        }
    }

    #[test]
    fn broken_frames_are_errors() {
        // Declares 100 plain bytes from 5 that are not zlib.
        let corrupt = [5, 0, 0, 0, 100, 0, 0, 1, 2, 3, 4, 5];
        assert_eq!(read_all(&corrupt, 64, 64), Err(FrameError::Corrupt));
        // A valid stream of 3 bytes that claims 10.
        let packed = zlib(Compression::default(), b"abc");
        let mut short = vec![packed.len() as u8, 0, 0, 0, 10, 0, 0];
        short.extend_from_slice(&packed);
        assert_eq!(read_all(&short, 64, 64), Err(FrameError::Short));
        assert_eq!(
            read_all(&[0, 0, 0, 0, 9, 0, 0], 64, 64),
            Err(FrameError::Empty(9))
        );
    }

    #[test]
    fn a_payload_over_16_mib_takes_two_frames() {
        let data = vec![b'a'; MAX_FRAME + 10];
        let mut out = BytesMut::new();
        assert_eq!(encode(255, Compression::fast(), &data, &mut out), 1);
        let frames = decode(&out);
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].0, frames[1].0), (255, 0));
        assert_eq!(frames[0].1.len() + frames[1].1.len(), data.len());
    }
}
