//! caching_sha2_password against the exchanges MySQL's documentation specifies ("Caching SHA-2
//! Pluggable Authentication" and the protocol's "caching_sha2_password information"). MariaDB
//! 10.11 has no server side for this plugin, so these are not captures from a real server:
//! the server's side is played here from the documentation, including its verification of the
//! fast-path scramble and its RSA decryption. Replays of a real MySQL 9.7 are in `mysql97.rs`.
use bytes::BytesMut;
use rsa::pkcs8::{EncodePublicKey as _, LineEnding};
use rsa::{Oaep, PrivateKey};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use crate::client_auth::{AuthStep, ClientAuth, ClientAuthOptions, Sha2Path, Transport};
use crate::constants::{
    CACHING_SHA2_PASSWORD, CapabilityFlags, MYSQL_NATIVE_PASSWORD, StatusFlags,
};
use crate::error::AuthError;
use crate::frame::{self, Packet};
use crate::greeting::Greeting;
use crate::ok_err::OkPacket;
use crate::response::{AuthResponse, HandshakeResponse};

const PW: &[u8] = b"sha2-test-pw";
const SCRAMBLE: &[u8; 20] = b"abcdefghij0123456789";

fn caps() -> CapabilityFlags {
    CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_PLUGIN_AUTH
        | CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CapabilityFlags::CLIENT_LONG_PASSWORD
}

fn greeting(plugin: &str) -> Greeting {
    Greeting {
        server_version: b"8.0.36".to_vec(),
        connection_id: 7,
        scramble: SCRAMBLE.to_vec(),
        capabilities: caps(),
        mariadb_capabilities: crate::MariadbCapabilities::empty(),
        charset: 255,
        status: StatusFlags::SERVER_STATUS_AUTOCOMMIT,
        auth_plugin: Some(plugin.as_bytes().to_vec()),
    }
}

fn response() -> HandshakeResponse {
    HandshakeResponse {
        capabilities: caps(),
        max_packet_size: 1 << 24,
        charset: 255,
        mariadb_capabilities: crate::MariadbCapabilities::empty(),
        username: b"app".to_vec(),
        auth_response: AuthResponse::default(),
        database: None,
        auth_plugin: None,
        connect_attrs: None,
        zstd_level: None,
    }
}

fn pkt(seq: u8, payload: &[u8]) -> Packet {
    Packet {
        seq,
        payload: payload.to_vec().into(),
    }
}

fn ok() -> Vec<u8> {
    let mut out = BytesMut::new();
    OkPacket::new(StatusFlags::SERVER_STATUS_AUTOCOMMIT).encode(caps(), &mut out);
    out.to_vec()
}

/// The one packet in `out`.
fn sent(out: &BytesMut) -> Packet {
    let mut b = out.clone();
    let p = frame::parse(&mut b, 1 << 20).unwrap().unwrap();
    assert!(b.is_empty());
    p
}

fn start(transport: Transport, options: ClientAuthOptions) -> (ClientAuth, HandshakeResponse) {
    let mut auth = ClientAuth::new(&greeting(CACHING_SHA2_PASSWORD), PW, options);
    let mut r = response();
    let mut out = BytesMut::new();
    auth.start(&mut r, transport, &mut out).unwrap();
    assert_eq!(sent(&out).seq, 1);
    (auth, r)
}

/// What the server does on the fast path: it keeps SHA256(SHA256(password)), XORs the
/// response with SHA256(that + scramble) to get SHA256(password), and compares its hash.
fn server_fast_path_accepts(response: &[u8], scramble: &[u8], password: &[u8]) -> bool {
    let stored = Sha256::digest(Sha256::digest(password));
    let mask = Sha256::new()
        .chain_update(stored)
        .chain_update(scramble)
        .finalize();
    let candidate: Vec<u8> = response
        .iter()
        .zip(mask.iter())
        .map(|(a, b)| a ^ b)
        .collect();
    response.len() == 32 && Sha256::digest(&candidate) == stored
}

#[test]
fn first_response_is_the_documented_sha256_scramble() {
    let (_, r) = start(Transport::Plain, ClientAuthOptions::default());
    assert_eq!(
        r.auth_plugin.as_deref(),
        Some(CACHING_SHA2_PASSWORD.as_bytes())
    );
    assert!(server_fast_path_accepts(
        r.auth_response.expose(),
        SCRAMBLE,
        PW
    ));
    assert!(!server_fast_path_accepts(
        r.auth_response.expose(),
        SCRAMBLE,
        b"other"
    ));
}

#[test]
fn fast_path_success_then_ok() {
    let (mut auth, _) = start(Transport::Plain, ClientAuthOptions::default());
    let mut out = BytesMut::new();
    assert_eq!(
        auth.on_packet(&pkt(2, b"\x01\x03"), &mut out).unwrap(),
        AuthStep::Continue
    );
    assert!(out.is_empty(), "nothing to send after fast auth success");
    let AuthStep::Done(ok) = auth.on_packet(&pkt(3, &ok()), &mut out).unwrap() else {
        panic!("OK expected")
    };
    assert_eq!(auth.caching_sha2_path(), Some(Sha2Path::Fast));
    assert_eq!(ok.status, StatusFlags::SERVER_STATUS_AUTOCOMMIT);
}

#[test]
fn full_authentication_over_unverified_tls_is_refused_rather_than_send_the_password() {
    let (mut auth, _) = start(Transport::Tls, ClientAuthOptions::default());
    let mut out = BytesMut::new();
    let err = auth.on_packet(&pkt(2, b"\x01\x04"), &mut out).unwrap_err();
    assert!(matches!(err, AuthError::ClearTextRefused { .. }), "{err}");
    assert!(out.is_empty(), "nothing is sent");
    assert_eq!(auth.caching_sha2_path(), None);
}

#[test]
fn full_authentication_over_verified_tls_sends_the_password() {
    let (mut auth, _) = start(Transport::TlsVerified, ClientAuthOptions::default());
    let mut out = BytesMut::new();
    auth.on_packet(&pkt(2, b"\x01\x04"), &mut out).unwrap();
    let p = sent(&out);
    assert_eq!(p.seq, 3);
    assert_eq!(&p.payload[..], b"sha2-test-pw\0");
    out.clear();
    assert!(matches!(
        auth.on_packet(&pkt(4, &ok()), &mut out).unwrap(),
        AuthStep::Done(_)
    ));
    assert_eq!(auth.caching_sha2_path(), Some(Sha2Path::FullTls));
}

fn key_pair() -> (PrivateKey, String) {
    let private = PrivateKey::new(&mut getrandom::SysRng, 1024).unwrap();
    let pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    (private, pem)
}

/// The server's side of the RSA step: decrypt (OAEP, SHA-1), XOR with the scramble, drop the
/// terminating NUL.
fn server_decrypts(private: &PrivateKey, cipher: &[u8], scramble: &[u8]) -> Vec<u8> {
    let plain = private.decrypt(Oaep::<Sha1>::new(), cipher).unwrap();
    let mut pw: Vec<u8> = plain
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ scramble[i % scramble.len()])
        .collect();
    assert_eq!(pw.pop(), Some(0), "password is sent NUL-terminated");
    pw
}

#[test]
fn full_authentication_without_tls_asks_for_the_key_and_encrypts_when_allowed() {
    let (private, pem) = key_pair();
    let asking = ClientAuthOptions {
        request_public_key: true,
        ..ClientAuthOptions::default()
    };
    let (mut auth, _) = start(Transport::Plain, asking);
    let mut out = BytesMut::new();
    auth.on_packet(&pkt(2, b"\x01\x04"), &mut out).unwrap();
    let p = sent(&out);
    assert_eq!(
        (p.seq, &p.payload[..]),
        (3, &b"\x02"[..]),
        "public key request"
    );
    out.clear();
    let mut key_packet = vec![0x01];
    key_packet.extend_from_slice(pem.as_bytes());
    auth.on_packet(&pkt(4, &key_packet), &mut out).unwrap();
    let p = sent(&out);
    assert_eq!(p.seq, 5);
    assert_eq!(p.payload.len(), 128, "one RSA-1024 block");
    assert_eq!(server_decrypts(&private, &p.payload, SCRAMBLE), PW);
    out.clear();
    assert!(matches!(
        auth.on_packet(&pkt(6, &ok()), &mut out).unwrap(),
        AuthStep::Done(_)
    ));
    assert_eq!(auth.caching_sha2_path(), Some(Sha2Path::FullRsaAsked));
}

#[test]
fn pinned_key_skips_the_request() {
    let (private, pem) = key_pair();
    let options = ClientAuthOptions {
        server_public_key: Some(pem.into_bytes()),
        request_public_key: false,
        ..ClientAuthOptions::default()
    };
    let (mut auth, _) = start(Transport::Plain, options);
    let mut out = BytesMut::new();
    auth.on_packet(&pkt(2, b"\x01\x04"), &mut out).unwrap();
    let p = sent(&out);
    assert_eq!(p.seq, 3);
    assert_eq!(server_decrypts(&private, &p.payload, SCRAMBLE), PW);
    assert_eq!(auth.caching_sha2_path(), Some(Sha2Path::FullRsaPinned));
}

#[test]
fn by_default_a_key_is_not_asked_for_on_a_leg_nobody_verified() {
    let (mut auth, _) = start(Transport::Plain, ClientAuthOptions::default());
    let mut out = BytesMut::new();
    assert_eq!(
        auth.on_packet(&pkt(2, b"\x01\x04"), &mut out).unwrap_err(),
        AuthError::PublicKeyRequestRefused
    );
    assert!(out.is_empty());
}

#[test]
fn garbage_instead_of_a_key_is_a_typed_error() {
    let asking = ClientAuthOptions {
        request_public_key: true,
        ..ClientAuthOptions::default()
    };
    let (mut auth, _) = start(Transport::Plain, asking);
    let mut out = BytesMut::new();
    auth.on_packet(&pkt(2, b"\x01\x04"), &mut out).unwrap();
    out.clear();
    assert_eq!(
        auth.on_packet(&pkt(4, b"\x01-----BEGIN PUBLIC KEY-----\nnope\n"), &mut out)
            .unwrap_err(),
        AuthError::BadPublicKey
    );
}

#[test]
fn switch_from_native_to_caching_sha2_uses_the_new_scramble() {
    // A MySQL 8 server whose default is mysql_native_password, for a caching_sha2 account.
    let mut auth = ClientAuth::new(
        &greeting(MYSQL_NATIVE_PASSWORD),
        PW,
        ClientAuthOptions::default(),
    );
    let mut r = response();
    let mut out = BytesMut::new();
    auth.start(&mut r, Transport::Plain, &mut out).unwrap();
    assert_eq!(
        r.auth_plugin.as_deref(),
        Some(MYSQL_NATIVE_PASSWORD.as_bytes())
    );
    let new_scramble = b"ZYXWVUTSRQ9876543210";
    let mut switch = b"\xfecaching_sha2_password\0".to_vec();
    switch.extend_from_slice(new_scramble);
    switch.push(0);
    out.clear();
    auth.on_packet(&pkt(2, &switch), &mut out).unwrap();
    let p = sent(&out);
    assert_eq!(p.seq, 3);
    assert!(server_fast_path_accepts(&p.payload, new_scramble, PW));
    out.clear();
    auth.on_packet(&pkt(4, b"\x01\x03"), &mut out).unwrap();
    assert!(matches!(
        auth.on_packet(&pkt(5, &ok()), &mut out).unwrap(),
        AuthStep::Done(_)
    ));
}

#[test]
fn empty_password_sends_empty_data() {
    let mut auth = ClientAuth::new(
        &greeting(CACHING_SHA2_PASSWORD),
        b"",
        ClientAuthOptions::default(),
    );
    let mut r = response();
    let mut out = BytesMut::new();
    auth.start(&mut r, Transport::Plain, &mut out).unwrap();
    assert!(r.auth_response.is_empty());
}

#[test]
fn change_user_on_a_caching_sha2_server_takes_the_fast_path_then_full_auth_over_verified_tls() {
    // COM_CHANGE_USER (sequence id 0) carries the fast-path scramble over the greeting's
    // scramble; the server answers with sequence ids from 1, as after a handshake response.
    let mut cu = crate::command::ChangeUser {
        username: b"app".to_vec(),
        auth_response: AuthResponse::new(b"the application's, never sent".to_vec()),
        database: b"shop".to_vec(),
        charset: Some(255),
        auth_plugin: None,
        connect_attrs: None,
    };
    let mut auth = ClientAuth::new(
        &greeting(CACHING_SHA2_PASSWORD),
        PW,
        ClientAuthOptions::default(),
    );
    let mut out = BytesMut::new();
    auth.start_change_user(&mut cu, caps(), Transport::TlsVerified, &mut out)
        .unwrap();
    let p = sent(&out);
    assert_eq!(p.seq, 0);
    let parsed = crate::command::ChangeUser::parse(&p.payload, caps()).unwrap();
    assert_eq!(
        parsed.auth_plugin.as_deref(),
        Some(CACHING_SHA2_PASSWORD.as_bytes())
    );
    assert!(server_fast_path_accepts(
        parsed.auth_response.expose(),
        SCRAMBLE,
        PW
    ));
    // An account not in the server's cache: full authentication, the password over the
    // verified TLS leg, then OK.
    out.clear();
    auth.on_packet(&pkt(1, b"\x01\x04"), &mut out).unwrap();
    let p = sent(&out);
    assert_eq!((p.seq, &p.payload[..]), (2, &b"sha2-test-pw\0"[..]));
    out.clear();
    assert!(matches!(
        auth.on_packet(&pkt(3, &ok()), &mut out).unwrap(),
        AuthStep::Done(_)
    ));
}
