//! Compressed-protocol frames (CLIENT_COMPRESS): a 7-byte header (compressed length, frame
//! sequence id, uncompressed length, 0 when the payload is stored as is) around a zlib stream
//! or the bytes themselves. Decoding is `mysql_common`'s [`CompDecoder`]; [`encode`] is
//! latch's (it stores a frame that zlib would not make smaller, as MariaDB does).
use std::io::Write as _;

use bytes::{BufMut as _, BytesMut};
pub use flate2::Compression;
use flate2::write::ZlibEncoder;
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
