//! Replays of caching_sha2_password exchanges captured from a real MySQL 9.7 (Debian
//! unstable's 9.7.4-2, the server `cargo xtask setup` unpacks; see testdata/README.md): what
//! the server sent parses, and latch's client, given the same server packets and the test
//! password, writes what the real `mariadb` client wrote (the RSA step, randomised, is checked
//! by decrypting it with the captured server's private key).
use bytes::BytesMut;
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::{Oaep, PrivateKey};
use sha1::Sha1;

use super::{Dir, capture};
use crate::client_auth::{AuthStep, ClientAuth, ClientAuthOptions, Sha2Path, Transport};
use crate::constants::{CACHING_SHA2_PASSWORD, CapabilityFlags};
use crate::frame::{self, Packet};
use crate::greeting::Greeting;
use crate::response::{ClientHello, HandshakeResponse};

const PW: &[u8] = b"sha2-test-pw";

fn app_response(payload: &[u8]) -> HandshakeResponse {
    match ClientHello::parse(payload).expect("captured response parses") {
        ClientHello::Response(r) => r,
        ClientHello::SslRequest(_) => panic!("expected a full response"),
    }
}

/// The one packet in `out`.
fn sent(out: &BytesMut) -> Packet {
    let mut b = out.clone();
    let p = frame::parse(&mut b, 1 << 20).unwrap().unwrap();
    assert!(b.is_empty());
    p
}

/// latch's client over the captured greeting, its first response built from the captured
/// client's (same capabilities, user, database, attributes); returns it and what it wrote.
fn start(
    greeting: &Greeting,
    app: &HandshakeResponse,
    options: ClientAuthOptions,
) -> (ClientAuth, Packet) {
    let mut auth = ClientAuth::new(greeting, PW, options);
    let mut r = app.clone();
    let mut out = BytesMut::new();
    auth.start(&mut r, Transport::Plain, &mut out).unwrap();
    (auth, sent(&out))
}

#[test]
fn mysql_9_7_greeting_parses_and_round_trips() {
    let cap = capture("mysql97_sha2_fast.txt");
    assert_eq!(cap[0].dir, Dir::Server);
    let g = Greeting::parse(&cap[0].payload()).unwrap();
    assert_eq!(g.server_version, b"9.7.4-2");
    assert!(!g.is_mariadb());
    assert_eq!(
        g.connection_id, 12,
        "the id `SELECT CONNECTION_ID()` printed"
    );
    assert_eq!(
        g.auth_plugin.as_deref(),
        Some(CACHING_SHA2_PASSWORD.as_bytes())
    );
    assert_eq!(g.scramble.len(), 20);
    assert!(g.capabilities.contains(CapabilityFlags::CLIENT_SSL));
    let mut out = BytesMut::new();
    g.encode(&mut out).unwrap();
    assert_eq!(&out[..], &cap[0].payload()[..], "re-encodes byte for byte");
}

#[test]
fn mysql_9_7_fast_path_replays() {
    let cap = capture("mysql97_sha2_fast.txt");
    let g = Greeting::parse(&cap[0].payload()).unwrap();
    let app = app_response(&cap[1].payload());
    assert_eq!(app.username, b"sha2_user");
    let (mut auth, first) = start(&g, &app, ClientAuthOptions::default());
    assert_eq!(
        first.payload,
        cap[1].packet().payload,
        "latch's response is the mariadb client's, byte for byte"
    );
    // AuthMoreData 0x03, then the OK.
    assert_eq!(&cap[2].payload()[..], b"\x01\x03");
    let mut out = BytesMut::new();
    assert_eq!(
        auth.on_packet(&cap[2].packet(), &mut out).unwrap(),
        AuthStep::Continue
    );
    assert!(out.is_empty());
    assert!(matches!(
        auth.on_packet(&cap[3].packet(), &mut out).unwrap(),
        AuthStep::Done(_)
    ));
    assert_eq!(auth.caching_sha2_path(), Some(Sha2Path::Fast));
}

#[test]
fn mysql_9_7_full_authentication_with_the_key_asked_for_replays() {
    let cap = capture("mysql97_sha2_full_rsa.txt");
    let g = Greeting::parse(&cap[0].payload()).unwrap();
    let app = app_response(&cap[1].payload());
    let asking = ClientAuthOptions {
        request_public_key: true,
        ..ClientAuthOptions::default()
    };
    let (mut auth, first) = start(&g, &app, asking);
    assert_eq!(first.payload, cap[1].packet().payload);
    // The server has not cached the account: AuthMoreData 0x04; latch asks for the key (0x02)
    // as the mariadb client did.
    assert_eq!(&cap[2].payload()[..], b"\x01\x04");
    let mut out = BytesMut::new();
    auth.on_packet(&cap[2].packet(), &mut out).unwrap();
    assert_eq!(sent(&out).payload, cap[3].packet().payload);
    assert_eq!(sent(&out).seq, 3);
    // The key: AuthMoreData with a PEM SubjectPublicKeyInfo (2048 bits).
    let key = cap[4].payload();
    assert!(key.starts_with(b"\x01-----BEGIN PUBLIC KEY-----\n"));
    out.clear();
    auth.on_packet(&cap[4].packet(), &mut out).unwrap();
    let mine = sent(&out);
    let theirs = cap[5].packet();
    assert_eq!((mine.seq, mine.payload.len()), (theirs.seq, 256));
    // Both decrypt, with the server's private key, to the password (NUL-terminated) XOR the
    // greeting's scramble; OAEP is randomised, so the ciphertexts differ.
    let pem = std::fs::read_to_string(format!(
        "{}/testdata/mysql97_private_key.pem",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    // MySQL writes its key files with a NUL after the PEM (its public_key.pem too, which
    // `scramble::parse_public_key` therefore trims).
    let private = PrivateKey::from_pkcs8_pem(pem.trim_end_matches('\0')).unwrap();
    let plain = |cipher: &[u8]| -> Vec<u8> {
        private
            .decrypt(Oaep::<Sha1>::new(), cipher)
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ g.scramble[i % g.scramble.len()])
            .collect()
    };
    let expected = [PW, b"\0"].concat();
    assert_eq!(plain(&theirs.payload), expected);
    assert_eq!(plain(&mine.payload), expected);
    assert_ne!(mine.payload, theirs.payload);
    out.clear();
    assert!(matches!(
        auth.on_packet(&cap[6].packet(), &mut out).unwrap(),
        AuthStep::Done(_)
    ));
    assert_eq!(auth.caching_sha2_path(), Some(Sha2Path::FullRsaAsked));
}
