//! Framing of regular messages: a one-byte tag, a big-endian `i32` length that counts itself,
//! then the body. Used for everything after the startup packet, in both directions.
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

use super::PgError;

/// One message: its tag and body (without tag and length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// Writes the message back out (tag, length, body).
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.put_u8(self.tag);
        out.put_i32((self.body.len() + 4) as i32);
        out.put_slice(&self.body);
    }

    /// The total size on the wire.
    pub fn wire_len(&self) -> usize {
        5 + self.body.len()
    }
}

/// Takes one complete message off the front of `buf`. `Ok(None)`: more bytes are needed (room
/// for the rest is reserved). A length below 4 or above `max_len` (body included) is an error,
/// checked before any body byte is buffered, so memory stays bounded by `max_len`.
pub fn parse(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, PgError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(PgError::BadLength(len.into()));
    }
    let len = len as usize;
    if len > max_len {
        return Err(PgError::TooLarge { len, max: max_len });
    }
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    Ok(Some(Frame { tag, body }))
}

/// A cursor over a message body with the few readers the protocol needs.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn i32(&mut self) -> Result<i32, PgError> {
        if self.buf.len() < 4 {
            return Err(PgError::malformed(self.what, "truncated integer"));
        }
        let v = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        self.buf = &self.buf[4..];
        Ok(v)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, PgError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| PgError::malformed(self.what, "truncated"))?;
        self.buf = rest;
        Ok(b)
    }

    /// A NUL-terminated string (bytes without the NUL).
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], PgError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| PgError::malformed(self.what, "string without terminator"))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A NUL-terminated UTF-8 string.
    pub(crate) fn str(&mut self) -> Result<&'a str, PgError> {
        std::str::from_utf8(self.cstr()?)
            .map_err(|_| PgError::malformed(self.what, "string is not UTF-8"))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(&self) -> Result<(), PgError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(PgError::malformed(self.what, "trailing bytes"))
        }
    }
}

/// Appends a NUL-terminated string; NUL bytes inside `s` are dropped (they cannot be sent).
pub(crate) fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend(s.bytes().filter(|&b| b != 0));
    out.put_u8(0);
}

/// Writes a message whose body `body` fills in; the length is patched afterwards.
pub(crate) fn write_msg(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}
