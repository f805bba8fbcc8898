//! Packets: a 3-byte little-endian payload length, a 1-byte sequence id, the payload. A
//! payload of 0xFFFFFF bytes or more is cut into chunks of exactly 0xFFFFFF bytes, each with
//! the next sequence id, ended by a shorter chunk (possibly empty); [`parse`] joins them back
//! into one [`Packet`] and [`encode`] cuts them.
//!
//! Sequence ids start at 0 with each command (and with the server's greeting) and go up by one
//! per packet in either direction, wrapping at 255. [`Seq`] keeps that count for one leg.
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

use crate::constants::MAX_CHUNK;
use crate::error::FrameError;

/// A whole logical packet: the sequence id of its first chunk and its joined payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub seq: u8,
    pub payload: Bytes,
}

impl Packet {
    /// How many chunks the payload takes on the wire (a payload that is an exact multiple of
    /// 0xFFFFFF, including the empty one, ends with an empty chunk).
    pub fn chunks(&self) -> usize {
        self.payload.len() / MAX_CHUNK + 1
    }

    /// The sequence id the packet after this one carries.
    pub fn next_seq(&self) -> u8 {
        self.seq.wrapping_add(self.chunks() as u8)
    }

    /// The first payload byte (the packet type in most places), if any.
    pub fn first_byte(&self) -> Option<u8> {
        self.payload.first().copied()
    }

    /// Writes the packet out, cut into chunks.
    pub fn encode(&self, out: &mut BytesMut) {
        encode(&self.payload, self.seq, out);
    }
}

/// Takes one complete packet (all its chunks) off the front of `buf`. `Ok(None)`: more bytes
/// are needed; room for the chunk being read is reserved, never more than `max_payload`
/// allows. A payload longer than `max_payload` is refused as soon as a chunk header announces
/// it, before its bytes are buffered. The chunks of one packet must carry consecutive sequence
/// ids; the first chunk's id is not checked here (see [`Seq::check`]).
pub fn parse(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Packet>, FrameError> {
    let mut at = 0usize;
    let mut total = 0usize;
    let mut chunks = 0usize;
    let mut first_seq = 0u8;
    loop {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let len =
            usize::from(buf[at]) | usize::from(buf[at + 1]) << 8 | usize::from(buf[at + 2]) << 16;
        let seq = buf[at + 3];
        if chunks == 0 {
            first_seq = seq;
        } else {
            let expected = first_seq.wrapping_add(chunks as u8);
            if seq != expected {
                return Err(FrameError::Sequence { expected, got: seq });
            }
        }
        total += len;
        if total > max_payload {
            return Err(FrameError::TooLarge {
                len: total,
                max: max_payload,
            });
        }
        let end = at + 4 + len;
        if buf.len() < end {
            buf.reserve(end - buf.len());
            return Ok(None);
        }
        chunks += 1;
        at = end;
        if len < MAX_CHUNK {
            break;
        }
    }
    let payload = if chunks == 1 {
        buf.advance(4);
        buf.split_to(total).freeze()
    } else {
        let mut joined = BytesMut::with_capacity(total);
        let mut wire = buf.split_to(at);
        while !wire.is_empty() {
            let len = usize::from(wire[0]) | usize::from(wire[1]) << 8 | usize::from(wire[2]) << 16;
            wire.advance(4);
            joined.put_slice(&wire[..len]);
            wire.advance(len);
        }
        joined.freeze()
    };
    Ok(Some(Packet {
        seq: first_seq,
        payload,
    }))
}

/// Writes `payload` as a packet starting with sequence id `seq`, cut into chunks; returns the
/// sequence id of the packet that follows.
pub fn encode(payload: &[u8], seq: u8, out: &mut BytesMut) -> u8 {
    let chunks = payload.len() / MAX_CHUNK + 1;
    out.reserve(payload.len() + 4 * chunks);
    let mut seq = seq;
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_CHUNK);
        out.put_slice(&(n as u32).to_le_bytes()[..3]);
        out.put_u8(seq);
        out.put_slice(&rest[..n]);
        seq = seq.wrapping_add(1);
        rest = &rest[n..];
        if n < MAX_CHUNK {
            return seq;
        }
    }
}

/// The sequence id expected next on one leg. Received packets are checked against it, packets
/// written through it get it; both advance it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seq(u8);

impl Seq {
    /// A leg at the start of the handshake or of a command: the next packet carries 0.
    pub fn new() -> Seq {
        Seq(0)
    }

    /// Starts over at 0: a new command begins.
    pub fn reset(&mut self) {
        self.0 = 0;
    }

    /// The id the next packet (sent or received) carries.
    pub fn next(&self) -> u8 {
        self.0
    }

    /// Checks a received packet's id and moves past it.
    pub fn check(&mut self, packet: &Packet) -> Result<(), FrameError> {
        if packet.seq != self.0 {
            return Err(FrameError::Sequence {
                expected: self.0,
                got: packet.seq,
            });
        }
        self.0 = packet.next_seq();
        Ok(())
    }

    /// Writes `payload` as the next packet.
    pub fn write(&mut self, payload: &[u8], out: &mut BytesMut) {
        self.0 = encode(payload, self.0, out);
    }

    /// Sets the id explicitly (after a packet that was passed on without going through here).
    pub fn set(&mut self, next: u8) {
        self.0 = next;
    }
}
