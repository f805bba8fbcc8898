//! Reading whole packets off either leg during the handshake.
use bytes::BytesMut;
use latch_mysql::{FrameError, Packet, frame};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Reads exactly one packet into `buf` (cleared first) and nothing after it: after an
/// SSLRequest the client starts its TLS handshake at once, and those bytes must stay in the
/// socket for the TLS acceptor.
/// A packet whose sequence id is not `expect` is refused on its header, before its length is
/// looked at, as MariaDB does ("Got packets out of order").
pub async fn read_one_packet(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    expect: u8,
) -> Result<Packet, ReadError> {
    let eof = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ReadError::Closed,
        _ => ReadError::Io(e),
    };
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await.map_err(eof)?;
    if header[3] != expect {
        return Err(ReadError::OutOfOrder {
            got: header[3],
            expected: expect,
        });
    }
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if len > MAX_HANDSHAKE_PACKET {
        return Err(ReadError::Io(std::io::Error::other(format!(
            "handshake packet of {len} bytes, more than {MAX_HANDSHAKE_PACKET}"
        ))));
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(4 + len, 0);
    stream.read_exact(&mut buf[4..]).await.map_err(eof)?;
    match frame::parse(buf, MAX_HANDSHAKE_PACKET).map_err(ReadError::Frame)? {
        Some(p) => Ok(p),
        None => Err(ReadError::Io(std::io::Error::other("incomplete packet"))),
    }
}

/// Largest handshake packet latch reads from either side (a greeting, a response with connect
/// attributes, an RSA key): far above what real peers send, small enough to bound memory.
pub const MAX_HANDSHAKE_PACKET: usize = 64 * 1024;

#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    Closed,
    Frame(FrameError),
    /// A packet with another sequence id than the one expected.
    OutOfOrder {
        got: u8,
        expected: u8,
    },
}

/// Reads the next whole packet into `buf` (bytes after it stay there).
pub async fn read_packet(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<Packet, ReadError> {
    loop {
        if let Some(p) = frame::parse(buf, MAX_HANDSHAKE_PACKET).map_err(ReadError::Frame)? {
            return Ok(p);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_packet_is_read_and_the_tls_hello_behind_it_stays_in_the_stream() {
        // A 32-byte SSLRequest (sequence id 1), then the first bytes of a TLS ClientHello.
        let mut wire = vec![32, 0, 0, 1];
        wire.extend_from_slice(&[0xAB; 32]);
        wire.extend_from_slice(&[0x16, 0x03, 0x01]);
        let mut stream = &wire[..];
        let mut buf = BytesMut::new();
        let p = read_one_packet(&mut stream, &mut buf, 1).await.unwrap();
        assert_eq!((p.seq, p.payload.len()), (1, 32));
        assert_eq!(stream, &[0x16, 0x03, 0x01]);
        assert!(buf.is_empty());
        // Cut short: closed; oversized: refused before reading it.
        let mut short = &[32u8, 0, 0, 1, 0xAB][..];
        assert!(matches!(
            read_one_packet(&mut short, &mut buf, 1).await,
            Err(ReadError::Closed)
        ));
        let mut huge = &[0xFFu8, 0xFF, 0xFF, 1][..];
        assert!(matches!(
            read_one_packet(&mut huge, &mut buf, 1).await,
            Err(ReadError::Io(_))
        ));
        // Another sequence id: refused on the header, whatever the length says.
        let mut garbage = &b"GET / HTTP/1.1\r\n"[..];
        assert!(matches!(
            read_one_packet(&mut garbage, &mut buf, 1).await,
            Err(ReadError::OutOfOrder {
                got: b' ',
                expected: 1
            })
        ));
    }
}
