//! Replays of MariaDB 10.11 exchanges (see testdata/README.md): what the real server sent
//! parses, re-encodes to the same bytes, and latch's client, given the same server packets and
//! the test password, writes byte for byte what the real `mariadb` client wrote.
use bytes::BytesMut;

use super::{Dir, capture};
use crate::client_auth::{AuthStep, ClientAuth, ClientAuthOptions, Transport};
use crate::command::{ChangeUser, Command};
use crate::constants::{CLIENT_ED25519, CapabilityFlags, MYSQL_NATIVE_PASSWORD, StatusFlags, er};
use crate::error::AuthError;
use crate::frame::Seq;
use crate::greeting::Greeting;
use crate::ok_err::{ErrPacket, OkPacket};
use crate::response::{AuthResponse, ClientHello, HandshakeResponse};
use crate::scramble;

const NATIVE_PW: &[u8] = b"native-test-pw";
const ED_PW: &[u8] = b"ed-test-pw";

fn app_response(payload: &[u8]) -> HandshakeResponse {
    match ClientHello::parse(payload).expect("captured response parses") {
        ClientHello::Response(r) => r,
        ClientHello::SslRequest(_) => panic!("expected a full response"),
    }
}

#[test]
fn mariadb_greeting_parses_and_round_trips() {
    let cap = capture("native_ok.txt");
    assert_eq!(cap[0].dir, Dir::Server);
    let p = cap[0].packet();
    assert_eq!(p.seq, 0);
    let g = Greeting::parse(&p.payload).unwrap();
    assert_eq!(g.server_version, b"5.5.5-10.11.19-MariaDB-0+deb12u1");
    assert!(g.is_mariadb());
    assert_eq!(
        g.connection_id, 9,
        "the id `SELECT CONNECTION_ID()` printed"
    );
    assert_eq!(g.scramble.len(), 20);
    assert!(!g.scramble.contains(&0));
    assert_eq!(
        g.auth_plugin.as_deref(),
        Some(MYSQL_NATIVE_PASSWORD.as_bytes())
    );
    assert_eq!(g.charset, 8, "latin1_swedish_ci, the server default");
    assert_eq!(g.status, StatusFlags::SERVER_STATUS_AUTOCOMMIT);
    for f in [
        CapabilityFlags::CLIENT_PROTOCOL_41,
        CapabilityFlags::CLIENT_SECURE_CONNECTION,
        CapabilityFlags::CLIENT_PLUGIN_AUTH,
        CapabilityFlags::CLIENT_CONNECT_ATTRS,
        CapabilityFlags::CLIENT_SESSION_TRACK,
    ] {
        assert!(g.capabilities.contains(f), "{f:?}");
    }
    assert!(
        !g.capabilities.contains(CapabilityFlags::CLIENT_SSL),
        "server ran --skip-ssl"
    );
    assert!(
        !g.capabilities
            .contains(CapabilityFlags::CLIENT_LONG_PASSWORD),
        "MariaDB clears CLIENT_MYSQL to announce extended capabilities"
    );
    assert!(!g.mariadb_capabilities.is_empty());
    let mut out = BytesMut::new();
    g.encode(&mut out).unwrap();
    assert_eq!(
        &out[..],
        &p.payload[..],
        "greeting re-encodes byte for byte"
    );

    // With TLS configured the server adds CLIENT_SSL, nothing else changes in the layout.
    let tls = capture("ssl_request.txt");
    let g2 = Greeting::parse(&tls[0].payload()).unwrap();
    assert!(g2.capabilities.contains(CapabilityFlags::CLIENT_SSL));
    let mut out = BytesMut::new();
    g2.encode(&mut out).unwrap();
    assert_eq!(&out[..], &tls[0].payload()[..]);
}

#[test]
fn mariadb_client_response_parses_and_round_trips() {
    let cap = capture("native_ok.txt");
    let p = cap[1].packet();
    assert_eq!(p.seq, 1);
    let r = app_response(&p.payload);
    assert_eq!(r.username, b"native_user");
    assert_eq!(r.database.as_deref(), Some(&b"shop"[..]));
    assert_eq!(
        r.auth_plugin.as_deref(),
        Some(MYSQL_NATIVE_PASSWORD.as_bytes())
    );
    assert_eq!(r.auth_response.len(), 20);
    assert_eq!(r.charset, 33, "utf8mb3_general_ci, the client's default");
    assert!(r.capabilities.contains(CapabilityFlags::CLIENT_PROTOCOL_41));
    let attrs = r
        .connect_attrs
        .as_ref()
        .expect("the mariadb client sends attributes");
    assert_eq!(attrs.get(b"_client_name"), Some(&b"libmariadb"[..]));
    assert_eq!(
        attrs.get(b"program_name"),
        Some(&b"mysql"[..]),
        "as the client names itself"
    );
    let mut out = BytesMut::new();
    r.encode(&mut out).unwrap();
    assert_eq!(
        &out[..],
        &p.payload[..],
        "response re-encodes byte for byte"
    );

    // The authentication data never shows in Debug output.
    let debug = format!("{r:?}");
    assert!(
        debug.contains("AuthResponse(<20 bytes redacted>)"),
        "{debug}"
    );
    let secret_hex: String = r
        .auth_response
        .expose()
        .iter()
        .map(|b| format!("{b}, "))
        .collect();
    assert!(!debug.contains(secret_hex.trim_end_matches(", ")));
}

#[test]
fn a_response_for_another_plugin_is_asked_to_switch_as_the_server_asks() {
    let cap = capture("native_ok.txt");
    let mut r = app_response(&cap[1].packet().payload);
    let nonce = [b'n'; 20];
    assert_eq!(r.switch_to(MYSQL_NATIVE_PASSWORD, nonce), None);

    r.auth_plugin = Some(b"mysql_clear_password".to_vec());
    let switch = r
        .switch_to(MYSQL_NATIVE_PASSWORD, nonce)
        .expect("a cleartext answer is asked to switch");
    let mut out = BytesMut::new();
    switch.encode(&mut out).unwrap();
    let mut want = b"\xfemysql_native_password\0".to_vec();
    want.extend_from_slice(&nonce);
    want.push(0);
    assert_eq!(&out[..], &want[..], "0xFE, the plugin, the nonce and a NUL");

    // No name, or no CLIENT_PLUGIN_AUTH: the answer was mysql_native_password's.
    r.auth_plugin = Some(Vec::new());
    assert_eq!(r.switch_to(MYSQL_NATIVE_PASSWORD, nonce), None);
    r.auth_plugin = Some(b"mysql_clear_password".to_vec());
    r.capabilities.remove(CapabilityFlags::CLIENT_PLUGIN_AUTH);
    assert_eq!(r.switch_to(MYSQL_NATIVE_PASSWORD, nonce), None);
}

#[test]
fn mariadb_ssl_request_is_recognised() {
    let cap = capture("ssl_request.txt");
    let p = cap[1].packet();
    assert_eq!((p.seq, p.payload.len()), (1, 32));
    let ClientHello::SslRequest(req) = ClientHello::parse(&p.payload).unwrap() else {
        panic!("32 bytes with CLIENT_SSL is an SSLRequest");
    };
    assert!(req.capabilities.contains(CapabilityFlags::CLIENT_SSL));
    let mut out = BytesMut::new();
    req.encode(&mut out);
    assert_eq!(&out[..], &p.payload[..]);
}

/// Runs latch's client over a captured exchange: every client packet after the greeting must
/// be what latch writes, and every server packet is fed back.
fn replay(name: &str, password: &[u8]) -> Result<OkPacket, AuthError> {
    let cap = capture(name);
    let greeting = Greeting::parse(&cap[0].payload()).unwrap();
    let app = app_response(&cap[1].payload());
    let mut auth = ClientAuth::new(&greeting, password, ClientAuthOptions::default());
    let mut resp = HandshakeResponse {
        auth_response: AuthResponse::default(),
        auth_plugin: None,
        ..app
    };
    let mut out = BytesMut::new();
    auth.start(&mut resp, Transport::Plain, &mut out).unwrap();
    assert_eq!(&out[..], &cap[1].wire[..], "{name}: HandshakeResponse41");
    let mut i = 2;
    loop {
        assert_eq!(cap[i].dir, Dir::Server, "{name}: packet {i}");
        out.clear();
        let step = auth.on_packet(&cap[i].packet(), &mut out)?;
        i += 1;
        match step {
            AuthStep::Done(ok) => {
                assert!(out.is_empty());
                return Ok(ok);
            }
            AuthStep::Continue => {
                assert_eq!(cap[i].dir, Dir::Client, "{name}: packet {i}");
                assert_eq!(&out[..], &cap[i].wire[..], "{name}: client packet {i}");
                i += 1;
            }
        }
    }
}

#[test]
fn native_password_response_matches_the_mariadb_client() {
    let ok = replay("native_ok.txt", NATIVE_PW).unwrap();
    assert!(ok.status.contains(StatusFlags::SERVER_STATUS_AUTOCOMMIT));
    // The server reports the schema the connection starts in.
    let state = ok
        .session_state
        .expect("session state with CLIENT_SESSION_TRACK");
    assert!(state.ends_with(b"shop"), "{state:?}");
}

#[test]
fn ed25519_signature_matches_the_mariadb_client() {
    let cap = capture("ed25519_ok.txt");
    // The server switched to client_ed25519 with a 32-byte nonce.
    let switch = crate::AuthSwitchRequest::parse(&cap[2].payload()).unwrap();
    assert_eq!(switch.plugin, CLIENT_ED25519.as_bytes());
    assert_eq!(switch.data.len(), 32);
    let ok = replay("ed25519_ok.txt", ED_PW).unwrap();
    assert_eq!(ok.affected_rows, 0);
    // The signature verifies under the public key MariaDB derives from the password.
    let public =
        ed25519_dalek::VerifyingKey::from_bytes(&scramble::ed25519_public_key(ED_PW)).unwrap();
    let sig = ed25519_dalek::Signature::from_bytes(
        &cap[3].payload()[..].try_into().expect("64-byte signature"),
    );
    public.verify_strict(&switch.data, &sig).unwrap();
}

#[test]
fn wrong_password_ends_in_the_servers_access_denied() {
    for (name, user) in [
        ("native_denied.txt", "native_user"),
        ("ed25519_denied.txt", "ed_user"),
    ] {
        // Replayed with the password the real client used, so the bytes match.
        let err = replay(name, b"wrong-pw").unwrap_err();
        let AuthError::Server(e) = &err else {
            panic!("{name}: {err:?}")
        };
        assert_eq!(
            (e.code, e.sql_state_str()),
            (er::ACCESS_DENIED_ERROR.0, "28000")
        );
        assert_eq!(
            e.message,
            format!("Access denied for user '{user}'@'localhost' (using password: YES)")
        );
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("wrong-pw"), "{shown}");
    }
}

#[test]
fn wrong_password_against_a_capture_diverges_at_the_response() {
    // Fed the right greeting with another password, the response differs from what the server
    // accepted: the replay is not vacuous.
    let cap = capture("native_ok.txt");
    let greeting = Greeting::parse(&cap[0].payload()).unwrap();
    let mut resp = app_response(&cap[1].payload());
    let mut out = BytesMut::new();
    ClientAuth::new(&greeting, b"not-the-password", ClientAuthOptions::default())
        .start(&mut resp, Transport::Plain, &mut out)
        .unwrap();
    assert_ne!(&out[..], &cap[1].wire[..]);
}

#[test]
fn err_and_ok_packets_round_trip() {
    let cap = capture("native_denied.txt");
    let p = cap[2].payload();
    let err = ErrPacket::parse(&p).unwrap();
    assert_eq!(err.code, 1045);
    assert_eq!(err.sql_state, Some(*b"28000"));
    let mut out = BytesMut::new();
    err.encode(CapabilityFlags::CLIENT_PROTOCOL_41, &mut out);
    assert_eq!(&out[..], &p[..]);

    let cap = capture("native_ok.txt");
    let caps = app_response(&cap[1].payload()).capabilities;
    let p = cap[2].payload();
    let ok = OkPacket::parse(&p, caps).unwrap();
    let mut out = BytesMut::new();
    ok.encode(caps, &mut out);
    assert_eq!(&out[..], &p[..]);
}

#[test]
fn change_user_matches_mariadb_test_and_round_trips() {
    let cap = capture("change_user.txt");
    let greeting = Greeting::parse(&cap[0].payload()).unwrap();
    let caps = app_response(&cap[1].payload()).capabilities;
    // Line 3 is the first COM_CHANGE_USER (to ed_user), line 13 the second (to native_user).
    for (at, user, password, db_plugin) in [
        (3, &b"ed_user"[..], ED_PW, CLIENT_ED25519),
        (13, &b"native_user"[..], NATIVE_PW, MYSQL_NATIVE_PASSWORD),
    ] {
        let p = cap[at].packet();
        assert_eq!((cap[at].dir, p.seq), (Dir::Client, 0));
        let Command::ChangeUser(cu) = Command::parse(&p.payload, caps).unwrap() else {
            panic!("COM_CHANGE_USER expected");
        };
        assert_eq!(cu.username, user);
        assert_eq!(cu.database, b"shop");
        assert_eq!(cu.charset, Some(8));
        assert_eq!(
            cu.auth_plugin.as_deref(),
            Some(MYSQL_NATIVE_PASSWORD.as_bytes())
        );
        let mut out = BytesMut::new();
        cu.encode(caps, &mut out).unwrap();
        assert_eq!(&out[..], &p.payload[..], "COM_CHANGE_USER round trip");
        // mysql_async appends an (empty) attribute block whatever the capabilities say;
        // MariaDB ignores what follows, and so does the parser.
        let mut padded = p.payload.to_vec();
        padded.push(0);
        let without_attrs = caps - CapabilityFlags::CLIENT_CONNECT_ATTRS;
        let lenient = ChangeUser::parse(&padded, without_attrs).unwrap();
        assert_eq!(
            (lenient.username, lenient.connect_attrs),
            (cu.username.clone(), None)
        );

        // latch's client re-authenticating with the same password writes the same packets.
        let mut auth = ClientAuth::new(&greeting, password, ClientAuthOptions::default());
        let mut mine = ChangeUser {
            auth_response: AuthResponse::default(),
            ..cu
        };
        let mut out = BytesMut::new();
        auth.start_change_user(&mut mine, caps, Transport::Plain, &mut out)
            .unwrap();
        assert_eq!(&out[..], &cap[at].wire[..]);
        // The server switches (to ed25519, or to native with the greeting's scramble again).
        out.clear();
        assert_eq!(
            auth.on_packet(&cap[at + 1].packet(), &mut out).unwrap(),
            AuthStep::Continue
        );
        assert_eq!(auth.plugin(), Some(db_plugin));
        assert_eq!(&out[..], &cap[at + 2].wire[..]);
        out.clear();
        let AuthStep::Done(_) = auth.on_packet(&cap[at + 3].packet(), &mut out).unwrap() else {
            panic!("OK expected");
        };
    }
}

#[test]
fn seq_tracks_both_legs_of_a_whole_session() {
    // One counter per connection: the handshake runs 0, 1, 2, ...; each command starts at 0.
    for name in ["native_ok.txt", "ed25519_ok.txt", "change_user.txt"] {
        let mut seq = Seq::new();
        for (i, c) in capture(name).iter().enumerate() {
            let p = c.packet();
            if c.dir == Dir::Client && p.seq == 0 {
                seq.reset();
            }
            seq.check(&p)
                .unwrap_or_else(|e| panic!("{name} packet {i}: {e}"));
        }
    }
}

#[test]
fn latch_greeting_copies_the_servers_identity() {
    let cap = capture("native_ok.txt");
    let server = Greeting::parse(&cap[0].payload()).unwrap();
    let mine = Greeting::for_app(&server, crate::greeting::random_scramble().unwrap(), true);
    let mut out = BytesMut::new();
    mine.encode(&mut out).unwrap();
    let back = Greeting::parse(&out).unwrap();
    assert_eq!(back, mine);
    assert_eq!(back.connection_id, server.connection_id);
    assert_eq!(back.server_version, server.server_version);
    assert!(back.capabilities.contains(CapabilityFlags::CLIENT_SSL));
    // zlib compression as the server offers it (the connector frames that leg); never zstd.
    assert_eq!(
        back.capabilities.contains(CapabilityFlags::CLIENT_COMPRESS),
        server
            .capabilities
            .contains(CapabilityFlags::CLIENT_COMPRESS)
    );
    assert!(
        !back
            .capabilities
            .contains(CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM)
    );
    assert_eq!(back.scramble.len(), 20);
    assert_ne!(back.scramble, server.scramble);
    assert_eq!(
        back.auth_plugin.as_deref(),
        Some(MYSQL_NATIVE_PASSWORD.as_bytes())
    );
    assert_eq!((back.charset, back.status), (server.charset, server.status));
    let plain = Greeting::for_app(&server, [b'a'; 20], false);
    assert!(!plain.capabilities.contains(CapabilityFlags::CLIENT_SSL));
    assert!(
        back.scramble
            .iter()
            .all(|&b| (1..=127).contains(&b) && b != b'$')
    );
}

#[test]
fn for_server_passes_the_applications_session_settings() {
    let cap = capture("native_ok.txt");
    let server = Greeting::parse(&cap[0].payload()).unwrap();
    let app = app_response(&cap[1].payload());
    let r = HandshakeResponse::for_server(&app, &server, b"svc_orders", false);
    assert_eq!(r.username, b"svc_orders");
    assert_eq!(r.database, app.database);
    assert_eq!(r.connect_attrs, app.connect_attrs);
    assert_eq!(r.charset, app.charset);
    assert!(
        r.auth_response.is_empty(),
        "application's authentication data never forwarded"
    );
    assert!(
        r.capabilities
            .contains(CapabilityFlags::CLIENT_CONNECT_WITH_DB)
    );
    assert!(!r.capabilities.contains(CapabilityFlags::CLIENT_SSL));
    assert_eq!(
        r.capabilities
            .difference(app.capabilities & server.capabilities),
        CapabilityFlags::empty(),
        "nothing either side lacks"
    );
    let tls = HandshakeResponse::for_server(&app, &server, b"svc", true);
    assert!(tls.capabilities.contains(CapabilityFlags::CLIENT_SSL));
    assert!(
        tls.ssl_request()
            .capabilities
            .contains(CapabilityFlags::CLIENT_SSL)
    );
}

#[test]
fn ok_and_err_toward_the_application() {
    let mut out = BytesMut::new();
    ErrPacket::new(er::CON_COUNT_ERROR, "Too many connections")
        .encode(CapabilityFlags::CLIENT_PROTOCOL_41, &mut out);
    assert_eq!(&out[..], b"\xff\x10\x04#08004Too many connections");
    out.clear();
    // Before capabilities are known (instead of a greeting) there is no SQLSTATE marker.
    ErrPacket::new(er::CON_COUNT_ERROR, "Too many connections")
        .encode(CapabilityFlags::empty(), &mut out);
    assert_eq!(&out[..], b"\xff\x10\x04Too many connections");
    out.clear();
    OkPacket::new(StatusFlags::SERVER_STATUS_AUTOCOMMIT).encode(
        CapabilityFlags::CLIENT_PROTOCOL_41 | CapabilityFlags::CLIENT_SESSION_TRACK,
        &mut out,
    );
    assert_eq!(&out[..], b"\x00\x00\x00\x02\x00\x00\x00");
    assert_eq!(
        ErrPacket::new((1045, "bad"), "x").sql_state,
        Some(*b"HY000"),
        "a malformed SQLSTATE is replaced"
    );
}
