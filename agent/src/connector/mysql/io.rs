//! Reading whole packets off either leg during the handshake.
use bytes::BytesMut;
use latch_mysql::{FrameError, Packet, frame};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Largest handshake packet latch reads from either side (a greeting, a response with connect
/// attributes, an RSA key): far above what real peers send, small enough to bound memory.
pub const MAX_HANDSHAKE_PACKET: usize = 64 * 1024;

#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    Closed,
    Frame(FrameError),
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
