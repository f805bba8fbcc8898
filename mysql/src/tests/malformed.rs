//! Malformed input: every parser, fed truncations, garbage in each field and random bytes,
//! returns a typed error (never panics, never reserves what a length claims); the client
//! state machine refuses what it must.
use bytes::BytesMut;

use super::capture;
use crate::auth_packets::{AuthMoreData, AuthSwitchRequest};
use crate::client_auth::{AuthStep, ClientAuth, ClientAuthOptions, Transport};
use crate::command::{ChangeUser, Command};
use crate::constants::CapabilityFlags;
use crate::error::{AuthError, FrameError, ParseError};
use crate::frame::{self, Packet};
use crate::greeting::Greeting;
use crate::ok_err::{ErrPacket, OkPacket};
use crate::response::{ClientHello, HandshakeResponse, SslRequest};

fn all_caps() -> CapabilityFlags {
    CapabilityFlags::from_bits_retain(u32::MAX)
}

/// Runs every parser over `bytes`; only errors or values may come out.
fn parse_everything(bytes: &[u8]) {
    let _ = Greeting::parse(bytes);
    let _ = HandshakeResponse::parse(bytes);
    let _ = SslRequest::parse(bytes);
    let _ = ClientHello::parse(bytes);
    let _ = AuthSwitchRequest::parse(bytes);
    let _ = AuthMoreData::parse(bytes);
    let _ = ErrPacket::parse(bytes);
    for caps in [
        all_caps(),
        CapabilityFlags::empty(),
        CapabilityFlags::CLIENT_PROTOCOL_41,
    ] {
        let _ = OkPacket::parse(bytes, caps);
        let _ = ChangeUser::parse(bytes, caps);
        let _ = Command::parse(bytes, caps);
    }
    let _ = crate::scramble::parse_public_key(bytes);
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(_)) = frame::parse(&mut buf, 1 << 16) {}
}

#[test]
fn every_truncation_of_captured_packets_is_an_error() {
    let cap = capture("change_user.txt");
    let greeting = cap[0].payload();
    let response = cap[1].payload();
    let caps = HandshakeResponse::parse(&response).unwrap().capabilities;
    let change_user = cap[3].payload();
    for n in 0..greeting.len() {
        // The plugin name may end at the end of the packet, so the last byte is optional.
        if n < greeting.len() - 22 {
            assert!(
                Greeting::parse(&greeting[..n]).is_err(),
                "greeting prefix {n}"
            );
        }
    }
    for n in 0..response.len() {
        // Cut inside the user name or the authentication data: always an error (later cuts
        // can land on an optional field boundary).
        if n < 32 + b"native_user\0".len() + 21 {
            assert!(
                HandshakeResponse::parse(&response[..n]).is_err(),
                "response prefix {n}"
            );
        }
        parse_everything(&response[..n]);
    }
    for n in 0..change_user.len() {
        if n < 1 + b"ed_user\0".len() + 21 + b"shop\0".len() {
            assert!(
                ChangeUser::parse(&change_user[..n], caps).is_err(),
                "COM_CHANGE_USER prefix {n}"
            );
        }
        parse_everything(&change_user[..n]);
    }
    let err = capture("native_denied.txt")[2].payload();
    for n in 0..3 {
        assert!(ErrPacket::parse(&err[..n]).is_err());
    }
}

/// A valid response to mutate: caps with everything the layout has.
fn response_payload() -> Vec<u8> {
    capture("native_ok.txt")[1].payload()
}

#[test]
fn garbage_in_each_field_is_a_typed_error() {
    let greeting = capture("native_ok.txt")[0].payload();
    let resp = response_payload();
    let ulen = b"native_user".len();
    let at_auth = 32 + ulen + 1;
    let mutate = |base: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = base.to_vec();
        f(&mut v);
        v
    };
    let cases: Vec<(&str, Result<(), ParseError>, &str)> = vec![
        (
            "greeting: protocol version 9",
            Greeting::parse(&mutate(&greeting, &|v| v[0] = 9)).map(drop),
            "protocol version is not 10",
        ),
        (
            "greeting: server version without NUL",
            Greeting::parse(&greeting[..20]).map(drop),
            "server version without terminator",
        ),
        (
            "greeting: empty",
            Greeting::parse(b"").map(drop),
            "empty packet",
        ),
        (
            "response: no CLIENT_PROTOCOL_41",
            HandshakeResponse::parse(&mutate(&resp, &|v| v[1] &= !0x02)).map(drop),
            "client without CLIENT_PROTOCOL_41",
        ),
        (
            "response: user name without NUL",
            HandshakeResponse::parse(&resp[..32 + ulen]).map(drop),
            "user name without terminator",
        ),
        (
            "response: auth data length beyond the packet",
            HandshakeResponse::parse(&mutate(&resp, &|v| {
                v.truncate(at_auth + 5);
                v[at_auth] = 200;
            }))
            .map(drop),
            "authentication data longer than the packet",
        ),
        (
            "response: lenenc auth data 0xFB",
            HandshakeResponse::parse(&mutate(&resp, &|v| v[at_auth] = 0xFB)).map(drop),
            "invalid length-encoded integer",
        ),
        (
            "response: lenenc auth data claiming 2^64-1 bytes",
            HandshakeResponse::parse(&mutate(&resp, &|v| {
                v.truncate(at_auth);
                v.extend_from_slice(&[0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
            }))
            .map(drop),
            "authentication data longer than the packet",
        ),
        (
            "response: connect attributes longer than the packet",
            HandshakeResponse::parse(&mutate(&resp, &|v| {
                // Replace the attribute block by a length-prefix that claims 0xFFFF bytes.
                let pos = v.windows(5).position(|w| w == b"shop\0").unwrap()
                    + 5
                    + b"mysql_native_password\0".len();
                v.truncate(pos);
                v.extend_from_slice(&[0xFC, 0xFF, 0xFF, 1, 2]);
            }))
            .map(drop),
            "connect attributes longer than the packet",
        ),
        (
            "response: trailing bytes",
            HandshakeResponse::parse(&mutate(&resp, &|v| {
                // Clear CLIENT_CONNECT_ATTRS: the attribute block becomes trailing garbage.
                v[2] &= !0x10;
            }))
            .map(drop),
            "trailing bytes",
        ),
        (
            "SSLRequest without CLIENT_SSL",
            SslRequest::parse(&resp[..32]).map(drop),
            "CLIENT_SSL is not set",
        ),
        (
            "SSLRequest of the wrong length",
            SslRequest::parse(&resp[..31]).map(drop),
            "length is not 32",
        ),
        (
            "OK with a bad header",
            OkPacket::parse(b"\x01\x00\x00", all_caps()).map(drop),
            "header is not 0x00",
        ),
        (
            "OK with info longer than the packet",
            OkPacket::parse(b"\x00\x00\x00\x02\x00\x00\x00\x09ab", all_caps()).map(drop),
            "info longer than the packet",
        ),
        (
            "ERR cut in its code",
            ErrPacket::parse(b"\xff\x15").map(drop),
            "truncated error code",
        ),
        (
            "AuthSwitchRequest plugin without NUL",
            AuthSwitchRequest::parse(b"\xfeclient_ed25519").map(drop),
            "plugin name without terminator",
        ),
        (
            "AuthMoreData with the wrong header",
            AuthMoreData::parse(b"\x02abc").map(drop),
            "header is not 0x01",
        ),
        (
            "COM_CHANGE_USER with another command byte",
            ChangeUser::parse(b"\x03SELECT", all_caps()).map(drop),
            "command byte is not 0x11",
        ),
        (
            "empty command",
            Command::parse(b"", all_caps()).map(drop),
            "empty packet",
        ),
    ];
    for (name, got, why) in cases {
        match got {
            Err(e) => assert_eq!(e.why, why, "{name}: {e}"),
            Ok(()) => panic!("{name}: accepted"),
        }
    }
}

/// A small deterministic generator for the random-input sweep.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = XorShift(0x1a7c_0001);
    let seeds: Vec<Vec<u8>> = ["native_ok.txt", "ed25519_ok.txt", "change_user.txt"]
        .iter()
        .flat_map(|n| capture(n).into_iter().map(|c| c.payload()))
        .collect();
    for i in 0..20_000 {
        let mut v = if i % 2 == 0 {
            seeds[(rng.next() as usize) % seeds.len()].clone()
        } else {
            (0..rng.next() % 80).map(|_| rng.next() as u8).collect()
        };
        for _ in 0..(rng.next() % 4) {
            if v.is_empty() {
                break;
            }
            let at = (rng.next() as usize) % v.len();
            v[at] = rng.next() as u8;
        }
        parse_everything(&v);
        feed_client(&v);
    }
}

/// The client state machine after a native first response, fed `bytes` as server packets.
fn feed_client(bytes: &[u8]) {
    let cap = capture("native_ok.txt");
    let greeting = Greeting::parse(&cap[0].payload()).unwrap();
    let mut auth = ClientAuth::new(&greeting, b"pw", ClientAuthOptions::default());
    let mut resp = HandshakeResponse::parse(&cap[1].payload()).unwrap();
    let mut out = BytesMut::new();
    auth.start(&mut resp, Transport::Tls, &mut out).unwrap();
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(p)) = frame::parse(&mut buf, 1 << 16) {
        out.clear();
        if auth.on_packet(&p, &mut out).is_err() {
            break;
        }
    }
}

fn started(transport: Transport) -> ClientAuth {
    let cap = capture("native_ok.txt");
    let greeting = Greeting::parse(&cap[0].payload()).unwrap();
    let mut auth = ClientAuth::new(&greeting, b"s3cret-pw", ClientAuthOptions::default());
    let mut resp = HandshakeResponse::parse(&cap[1].payload()).unwrap();
    let mut out = BytesMut::new();
    auth.start(&mut resp, transport, &mut out).unwrap();
    auth
}

fn pkt(seq: u8, payload: &[u8]) -> Packet {
    Packet {
        seq,
        payload: payload.to_vec().into(),
    }
}

#[test]
fn client_refuses_what_it_must() {
    let mut out = BytesMut::new();
    let shown = |e: &AuthError| format!("{e} {e:?}");
    let cases: Vec<(&str, Transport, Vec<Packet>, AuthError)> = vec![
        (
            "clear text without TLS",
            Transport::Plain,
            vec![pkt(2, b"\xfemysql_clear_password\0")],
            AuthError::ClearTextRefused {
                plugin: "mysql_clear_password",
            },
        ),
        (
            "clear text over unverified TLS",
            Transport::Tls,
            vec![pkt(2, b"\xfemysql_clear_password\0")],
            AuthError::ClearTextRefused {
                plugin: "mysql_clear_password",
            },
        ),
        (
            "unknown plugin",
            Transport::Plain,
            vec![pkt(2, b"\xfeauth_gssapi_client\0x")],
            AuthError::UnsupportedPlugin("auth_gssapi_client".into()),
        ),
        (
            "old password switch",
            Transport::Plain,
            vec![pkt(2, b"\xfe")],
            AuthError::UnsupportedPlugin("mysql_old_password".into()),
        ),
        (
            "wrong sequence id",
            Transport::Plain,
            vec![pkt(3, b"\x00\x00\x00\x02\x00\x00\x00")],
            AuthError::Frame(FrameError::Sequence {
                expected: 2,
                got: 3,
            }),
        ),
        (
            "ed25519 nonce of 31 bytes",
            Transport::Plain,
            vec![pkt(2, &[&b"\xfeclient_ed25519\0"[..], &[7; 31]].concat())],
            AuthError::BadScramble {
                plugin: "client_ed25519",
                len: 31,
                expected: 32,
            },
        ),
        (
            "native switch with a short scramble",
            Transport::Plain,
            vec![pkt(2, b"\xfemysql_native_password\0abc\0")],
            AuthError::BadScramble {
                plugin: "mysql_native_password",
                len: 3,
                expected: 20,
            },
        ),
        (
            "AuthMoreData for native",
            Transport::Plain,
            vec![pkt(2, b"\x01\x03")],
            AuthError::Unexpected {
                state: "waiting for the server's answer to the authentication data",
                first_byte: 1,
            },
        ),
        (
            "switch after the final response",
            Transport::Plain,
            vec![
                pkt(2, b"\xfeclient_ed25519\0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
                pkt(4, b"\xfeclient_ed25519\0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ],
            AuthError::Unexpected {
                state: "waiting for OK or ERR",
                first_byte: 0xFE,
            },
        ),
        (
            "empty packet",
            Transport::Plain,
            vec![pkt(2, b"")],
            AuthError::Unexpected {
                state: "reading the server's answer (empty packet)",
                first_byte: 0,
            },
        ),
        (
            "caching_sha2 loop",
            Transport::Plain,
            (0..5)
                .map(|i| {
                    pkt(
                        2 + 2 * i,
                        b"\xfecaching_sha2_password\0abcdefghij0123456789\0",
                    )
                })
                .collect(),
            AuthError::TooManyRounds(4),
        ),
    ];
    for (name, transport, packets, want) in cases {
        let mut auth = started(transport);
        if matches!(want, AuthError::TooManyRounds(_)) {
            auth = {
                let cap = capture("native_ok.txt");
                let greeting = Greeting::parse(&cap[0].payload()).unwrap();
                let mut a = ClientAuth::new(
                    &greeting,
                    b"s3cret-pw",
                    ClientAuthOptions {
                        max_rounds: 4,
                        ..ClientAuthOptions::default()
                    },
                );
                let mut resp = HandshakeResponse::parse(&cap[1].payload()).unwrap();
                a.start(&mut resp, transport, &mut out).unwrap();
                a
            };
        }
        let mut got = None;
        for p in &packets {
            out.clear();
            if let Err(e) = auth.on_packet(p, &mut out) {
                got = Some(e);
                break;
            }
        }
        let got = got.unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(got, want, "{name}");
        assert!(!shown(&got).contains("s3cret"), "{name}: {}", shown(&got));
    }
    assert!(!format!("{:?}", started(Transport::Plain)).contains("s3cret"));
}

#[test]
fn clear_password_over_verified_tls_and_the_end_of_the_exchange() {
    let mut auth = started(Transport::TlsVerified);
    let mut out = BytesMut::new();
    auth.on_packet(&pkt(2, b"\xfemysql_clear_password\0"), &mut out)
        .unwrap();
    assert_eq!(&out[..], b"\x0a\x00\x00\x03s3cret-pw\0");
    assert_eq!(auth.plugin(), Some("mysql_clear_password"));
    out.clear();
    let step = auth
        .on_packet(&pkt(4, b"\x00\x00\x00\x02\x00\x00\x00"), &mut out)
        .unwrap();
    assert!(matches!(step, AuthStep::Done(_)));
    assert_eq!(
        auth.on_packet(&pkt(5, b"\x00\x00\x00\x02\x00\x00\x00"), &mut out)
            .unwrap_err(),
        AuthError::Finished
    );
}

#[test]
fn err_before_the_greeting_is_read_without_sqlstate() {
    // What a server at max_connections sends in place of the greeting.
    let e = ErrPacket::parse(b"\xff\x10\x04Too many connections").unwrap();
    assert_eq!((e.code, e.sql_state), (1040, None));
    assert_eq!(e.to_server_error().sql_state_str(), "HY000");
    assert!(Greeting::parse(b"\xff\x10\x04Too many connections").is_err());
}
