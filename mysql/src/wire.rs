//! Readers and writers of the protocol's basic types: fixed little-endian integers,
//! length-encoded integers and strings, NUL-terminated strings. Reading never allocates and
//! never trusts a length beyond the bytes actually present.
use bytes::{BufMut as _, BytesMut};

use crate::error::{EncodeError, ParseError};

/// A cursor over one packet payload.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn err(&self, why: &'static str) -> ParseError {
        ParseError::new(self.what, why)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    pub(crate) fn take(&mut self, n: usize, why: &'static str) -> Result<&'a [u8], ParseError> {
        if self.buf.len() < n {
            return Err(self.err(why));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, why: &'static str) -> Result<u8, ParseError> {
        Ok(self.take(1, why)?[0])
    }

    pub(crate) fn u16(&mut self, why: &'static str) -> Result<u16, ParseError> {
        let b = self.take(2, why)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, why: &'static str) -> Result<u32, ParseError> {
        let b = self.take(4, why)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-encoded integer. 0xFB (NULL) and 0xFF are not integers here.
    pub(crate) fn lenenc(&mut self, why: &'static str) -> Result<u64, ParseError> {
        let first = self.u8(why)?;
        Ok(match first {
            0..=0xFA => first.into(),
            0xFC => {
                let b = self.take(2, why)?;
                u16::from_le_bytes([b[0], b[1]]).into()
            }
            0xFD => {
                let b = self.take(3, why)?;
                u32::from_le_bytes([b[0], b[1], b[2], 0]).into()
            }
            0xFE => {
                let b = self.take(8, why)?;
                u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }
            0xFB | 0xFF => return Err(self.err("invalid length-encoded integer")),
        })
    }

    /// A length-encoded string; its length must fit in what is left.
    pub(crate) fn lenenc_bytes(&mut self, why: &'static str) -> Result<&'a [u8], ParseError> {
        let len = self.lenenc(why)?;
        let len = usize::try_from(len).map_err(|_| self.err(why))?;
        self.take(len, why)
    }

    /// A NUL-terminated string (without the NUL).
    pub(crate) fn nul_bytes(&mut self, why: &'static str) -> Result<&'a [u8], ParseError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err(why))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A string that ends at a NUL or at the end of the packet, whichever comes first (some
    /// servers omit the terminator of the last field).
    pub(crate) fn nul_or_eof_bytes(&mut self) -> &'a [u8] {
        match self.buf.iter().position(|&b| b == 0) {
            Some(end) => {
                let s = &self.buf[..end];
                self.buf = &self.buf[end + 1..];
                s
            }
            None => self.rest(),
        }
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Appends a length-encoded integer.
pub(crate) fn put_lenenc(out: &mut BytesMut, v: u64) {
    match v {
        0..=0xFA => out.put_u8(v as u8),
        0xFB..=0xFFFF => {
            out.put_u8(0xFC);
            out.put_u16_le(v as u16);
        }
        0x1_0000..=0xFF_FFFF => {
            out.put_u8(0xFD);
            out.put_slice(&(v as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.put_u8(0xFE);
            out.put_u64_le(v);
        }
    }
}

/// Appends a length-encoded string.
pub(crate) fn put_lenenc_bytes(out: &mut BytesMut, s: &[u8]) {
    put_lenenc(out, s.len() as u64);
    out.put_slice(s);
}

/// Appends a NUL-terminated string; a NUL inside it cannot be represented.
pub(crate) fn put_nul_bytes(
    out: &mut BytesMut,
    s: &[u8],
    what: &'static str,
) -> Result<(), EncodeError> {
    if s.contains(&0) {
        return Err(EncodeError {
            what,
            why: "NUL byte inside a NUL-terminated string",
        });
    }
    out.put_slice(s);
    out.put_u8(0);
    Ok(())
}
