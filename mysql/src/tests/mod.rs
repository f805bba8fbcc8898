//! Tests: replays of exchanges captured from a real MariaDB 10.11 and MySQL 9.7
//! (`testdata/`), the caching_sha2_password exchanges as MySQL's documentation specifies them,
//! framing, and malformed input.
use bytes::BytesMut;

use crate::frame::{self, Packet};

mod caching_sha2;
mod captures;
mod framing;
mod malformed;
mod mysql97;
mod reset;

/// Direction of a captured packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Server,
    Client,
}

/// One captured packet: who sent it and its wire bytes (header included).
pub(crate) struct Captured {
    pub dir: Dir,
    pub wire: Vec<u8>,
}

impl Captured {
    pub fn packet(&self) -> Packet {
        let mut buf = BytesMut::from(&self.wire[..]);
        let p = frame::parse(&mut buf, 1 << 20)
            .expect("captured packet frames")
            .expect("captured packet is complete");
        assert!(buf.is_empty(), "one packet per captured line");
        p
    }

    pub fn payload(&self) -> Vec<u8> {
        self.packet().payload.to_vec()
    }
}

pub(crate) fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// Loads `testdata/<name>`.
pub(crate) fn capture(name: &str) -> Vec<Captured> {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (dir, h) = l.split_once(' ').expect("`S|C hex` line");
            Captured {
                dir: match dir {
                    "S" => Dir::Server,
                    "C" => Dir::Client,
                    other => panic!("bad direction {other:?} in {name}"),
                },
                wire: hex(h),
            }
        })
        .collect()
}
