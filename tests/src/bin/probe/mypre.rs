//! `latch-probe mypre HOST:PORT [CASE]`: the paths before a MySQL handshake completes, one
//! connection each (or only CASE). The client reads the server's greeting, then sends the
//! case's bytes (a pause between writes), half-closes if the case says so, and reads until
//! the end of the stream, a reset, or `wait` of silence. For each case prints
//! `case=<name> greeting=<yes|no> answer=<what came after the greeting> closed=<yes|no>`, the
//! answer being `ERR <code> <SQLSTATE> seq=<n>` per ERR packet, `bytes=<n>` for anything else,
//! or `none`, then ` raw=<hex of every byte received, greeting included>`. The same cases are
//! the table of `tests/tests/mysql_pre_handshake.rs`.
use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// A packet: 3-byte length, sequence id, payload.
fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut p = len.to_le_bytes()[..3].to_vec();
    p.push(seq);
    p.extend_from_slice(payload);
    p
}

/// CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH.
const CAPS: u32 = 0x0000_0200 | 0x0000_8000 | 0x0008_0000;
const CLIENT_SSL: u32 = 0x0000_0800;

/// The fixed part of HandshakeResponse41 / SSLRequest: capabilities, max packet, charset,
/// 23 filler bytes.
fn fixed(caps: u32) -> Vec<u8> {
    let mut p = caps.to_le_bytes().to_vec();
    p.extend_from_slice(&(16u32 << 20).to_le_bytes());
    p.push(45);
    p.extend_from_slice(&[0; 23]);
    p
}

/// A well-formed HandshakeResponse41 for user `x` with no authentication data.
fn response() -> Vec<u8> {
    let mut p = fixed(CAPS);
    p.extend_from_slice(b"x\0");
    p.push(0);
    p.extend_from_slice(b"mysql_native_password\0");
    p
}

/// A response for user `x` made for the cleartext plugin (a client set to
/// `mysql_clear_password`), with an empty password.
fn clear_password_response() -> Vec<u8> {
    let mut p = fixed(CAPS);
    p.extend_from_slice(b"x\0");
    p.push(1);
    p.push(0);
    p.extend_from_slice(b"mysql_clear_password\0");
    p
}

/// (name, writes, half-close after them, seconds of silence that end the read)
pub fn cases() -> Vec<(&'static str, Vec<Vec<u8>>, bool, u64)> {
    let resp = response();
    vec![
        ("close-at-once", vec![], true, 3),
        (
            "garbage-http",
            vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()],
            true,
            3,
        ),
        ("empty-packet", vec![packet(1, b"")], false, 3),
        (
            "short-response",
            vec![packet(1, &[0x0f, 0xa2, 0, 0])],
            false,
            3,
        ),
        (
            "truncated-response",
            vec![packet(1, &resp)[..20].to_vec()],
            true,
            3,
        ),
        (
            "response-without-user",
            vec![packet(1, &fixed(CAPS))],
            false,
            3,
        ),
        (
            "pre-41-client",
            vec![packet(1, b"\x05\x80\0\0\0x\0")],
            false,
            3,
        ),
        ("wrong-seq-0", vec![packet(0, &resp)], false, 3),
        ("wrong-seq-5", vec![packet(5, &resp)], false, 3),
        (
            "length-16m",
            vec![[&[0xff, 0xff, 0xff, 1][..], &[b'a'; 4096]].concat()],
            false,
            3,
        ),
        ("valid-response", vec![packet(1, &response())], false, 3),
        (
            "clear-password-response",
            vec![packet(1, &clear_password_response())],
            false,
            3,
        ),
        (
            "ssl-request-then-plain",
            vec![packet(1, &fixed(CAPS | CLIENT_SSL)), packet(2, &resp)],
            false,
            3,
        ),
        ("stall", vec![], false, 15),
    ]
}

pub async fn run(target: &str, only: Option<&str>) -> Result<(), String> {
    for (name, writes, half_close, wait) in cases() {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let s = TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect {target}: {e}"))?;
        let (greeted, answer, closed, raw) = exchange(s, &writes, half_close, wait).await;
        let raw: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        println!(
            "case={name} greeting={} answer={answer} closed={} raw={raw}",
            if greeted { "yes" } else { "no" },
            if closed { "yes" } else { "no" }
        );
    }
    Ok(())
}

async fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, want: usize, wait: u64) -> bool {
    let mut buf = [0u8; 4096];
    while got.len() < want {
        match tokio::time::timeout(Duration::from_secs(wait), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return false,
        }
    }
    false
}

async fn exchange(
    mut s: TcpStream,
    writes: &[Vec<u8>],
    half_close: bool,
    wait: u64,
) -> (bool, String, bool, Vec<u8>) {
    // The greeting: one whole packet.
    let mut got = Vec::new();
    let mut closed = read_until(&mut s, &mut got, 4, 5).await;
    let len = if got.len() >= 4 {
        usize::from(got[0]) | usize::from(got[1]) << 8 | usize::from(got[2]) << 16
    } else {
        0
    };
    if !closed {
        closed = read_until(&mut s, &mut got, 4 + len, 5).await;
    }
    let greeted = got.len() >= 5 && got[4] == 0x0a;
    let mut rest = if greeted {
        got.split_off((4 + len).min(got.len()))
    } else {
        std::mem::take(&mut got)
    };
    if !closed {
        for w in writes {
            // The server may close before reading everything; that is an answer too.
            let _ = s.write_all(w).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        if half_close {
            let _ = s.shutdown().await;
        }
        closed = read_until(&mut s, &mut rest, usize::MAX, wait).await;
    }
    let answer = describe(&rest);
    got.extend_from_slice(&rest);
    (greeted, answer, closed, got)
}

fn describe(mut bytes: &[u8]) -> String {
    let mut said = Vec::new();
    while bytes.len() >= 5 {
        let len = usize::from(bytes[0]) | usize::from(bytes[1]) << 8 | usize::from(bytes[2]) << 16;
        let (seq, payload) = (bytes[3], &bytes[4..(4 + len).min(bytes.len())]);
        if payload.first() == Some(&0xff) && payload.len() >= 3 {
            let code = u16::from_le_bytes([payload[1], payload[2]]);
            let state = if payload.get(3) == Some(&b'#') && payload.len() >= 9 {
                String::from_utf8_lossy(&payload[4..9]).into_owned()
            } else {
                "-".to_owned()
            };
            said.push(format!("ERR {code} {state} seq={seq}"));
        } else if payload.first() == Some(&0xfe) && payload.len() > 1 {
            // AuthSwitchRequest: the plugin asked for and how long its data is.
            let name = payload[1..].split(|b| *b == 0).next().unwrap_or_default();
            let data = payload.len() - 2 - name.len();
            said.push(format!(
                "SWITCH {} data={data} seq={seq}",
                String::from_utf8_lossy(name)
            ));
        } else {
            said.push(format!("bytes={}", payload.len() + 4));
        }
        bytes = &bytes[(4 + len).min(bytes.len())..];
    }
    if !bytes.is_empty() {
        said.push(format!("bytes={}", bytes.len()));
    }
    if said.is_empty() {
        "none".to_owned()
    } else {
        said.join(",")
    }
}
