//! `latch-probe pgpre TARGET`: the paths before a PostgreSQL StartupMessage, one connection
//! each, toward TARGET (`host:port`, or the path of a Unix socket). For each case, prints
//! `case=<name> closed=<yes|no> bytes=<hex of everything received>`; a connection still open
//! after 2 s counts as not closed. The same cases are the table of `pg::pre_startup`'s tests.
use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpStream, UnixStream},
};

const SSL: u32 = 80_877_103;
const GSS: u32 = 80_877_104;
const CANCEL: u32 = 80_877_102;
const V3: u32 = 3 << 16;

fn packet(len: i32, code: u32, body: &[u8]) -> Vec<u8> {
    let mut p = len.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(body);
    p
}

fn pkt(code: u32, body: &[u8]) -> Vec<u8> {
    packet(8 + body.len() as i32, code, body)
}

/// (name, writes, half-close after them)
fn cases() -> Vec<(&'static str, Vec<Vec<u8>>, bool)> {
    let x = b"X\0\0\0\x04".to_vec();
    let user = b"user\0x\0\0";
    vec![
        ("close-at-once", vec![], true),
        ("terminate-first", vec![x.clone()], true),
        ("terminate-first-open", vec![x.clone()], false),
        ("partial-length", vec![b"\0\0".to_vec()], true),
        ("length-4", vec![packet(4, 0, b"")], true),
        ("length-7", vec![packet(7, 0, b"")], true),
        ("length-negative", vec![packet(-1, 0, b"")], true),
        ("length-10005", vec![packet(10005, V3, user)], true),
        (
            "length-1mb",
            vec![packet(1_000_000, V3, &[b'a'; 20_000])],
            false,
        ),
        ("truncated-body", vec![packet(100, V3, b"user\0")], true),
        ("unknown-code", vec![pkt(0x1234_5678, b"")], false),
        ("protocol-2.0", vec![pkt(0x0002_0000, user)], false),
        ("protocol-4.0", vec![pkt(0x0004_0000, user)], false),
        ("ssl-then-close", vec![pkt(SSL, b"")], true),
        ("ssl-then-terminate", vec![pkt(SSL, b""), x.clone()], false),
        ("ssl-length-12", vec![packet(12, SSL, b"\0\0\0\0")], true),
        ("ssl-twice", vec![pkt(SSL, b""), pkt(SSL, b"")], false),
        (
            "ssl-with-data",
            vec![[pkt(SSL, b""), pkt(V3, user)].concat()],
            false,
        ),
        ("gss-then-close", vec![pkt(GSS, b"")], true),
        ("gss-twice", vec![pkt(GSS, b""), pkt(GSS, b"")], false),
        (
            "gss-with-data",
            vec![[pkt(GSS, b""), pkt(V3, user)].concat()],
            false,
        ),
        ("ssl-gss-close", vec![pkt(SSL, b""), pkt(GSS, b"")], true),
        ("gss-ssl-close", vec![pkt(GSS, b""), pkt(SSL, b"")], true),
        (
            "ssl-gss-ssl",
            vec![pkt(SSL, b""), pkt(GSS, b""), pkt(SSL, b"")],
            false,
        ),
        (
            "cancel-unknown-key",
            vec![pkt(CANCEL, &[0, 0, 0, 1, 0, 0, 0, 2])],
            false,
        ),
        ("cancel-length-12", vec![pkt(CANCEL, &[0, 0, 0, 1])], false),
        ("cancel-length-20", vec![pkt(CANCEL, &[0; 12])], false),
        ("startup-no-user", vec![pkt(V3, b"database\0x\0\0")], false),
        ("startup-empty", vec![pkt(V3, b"\0")], false),
        ("startup-no-terminator", vec![pkt(V3, b"user\0x\0")], false),
        ("startup-name-only", vec![pkt(V3, b"user\0")], false),
        ("startup-version-only", vec![pkt(V3, b"")], false),
    ]
}

pub async fn run(target: &str) -> Result<(), String> {
    for (name, writes, half_close) in cases() {
        let (closed, bytes) = if target.starts_with('/') {
            let s = UnixStream::connect(target)
                .await
                .map_err(|e| format!("connect {target}: {e}"))?;
            exchange(s, &writes, half_close).await
        } else {
            let s = TcpStream::connect(target)
                .await
                .map_err(|e| format!("connect {target}: {e}"))?;
            exchange(s, &writes, half_close).await
        };
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        println!(
            "case={name} closed={} bytes={hex}",
            if closed { "yes" } else { "no" }
        );
    }
    Ok(())
}

/// Sends each write (so that each is read on its own: after the one-byte answer to an SSL or
/// GSS request, else after a pause), half-closes if asked, reads until the end of the stream,
/// a reset, or 2 s of silence.
///
/// Waiting for the answer rather than pausing: a server slow to start its backend (a loaded
/// machine) would otherwise find the next request already behind the first and answer
/// "received unencrypted data after SSL request" instead.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    writes: &[Vec<u8>],
    half_close: bool,
) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    for w in writes {
        // The server may close before reading everything; that is an answer too.
        let _ = s.write_all(w).await;
        if *w == pkt(SSL, b"") || *w == pkt(GSS, b"") {
            let mut answer = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (true, got),
                Ok(Ok(_)) => got.push(answer[0]),
                Err(_) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (false, got),
        }
    }
}
