//! The protocol code on captured and hand-written bytes.
use bytes::{BufMut as _, BytesMut};

use super::{
    ErrorFields, Frame, PgError, SqlState,
    auth::{Allowed, AuthAction, AuthError, ClientAuth, TargetTls},
    backend::{AuthRequest, BackendMessage},
    encode, frame,
    handshake::{Event, HandshakeError, TargetHandshake},
    scram::{ChannelBinding, ScramClient, ScramError},
    startup::{self, Initial, MAX_STARTUP_LEN, StartupRefusal},
};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The captured PostgreSQL 15 SCRAM login: (from_server, bytes) per message.
fn captured() -> Vec<(bool, Vec<u8>)> {
    include_str!("testdata/scram_pg15.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (dir, bytes) = l.split_once(' ').unwrap();
            (dir == "S", hex(bytes))
        })
        .collect()
}

// --- framing ---

#[test]
fn frames_need_all_their_bytes_and_bounded_lengths() {
    let mut buf = BytesMut::from(&b"Z\0\0\0\x05"[..]);
    assert_eq!(frame::parse(&mut buf, 100), Ok(None));
    buf.put_u8(b'I');
    buf.extend_from_slice(b"S\0\0");
    let f = frame::parse(&mut buf, 100).unwrap().unwrap();
    assert_eq!((f.tag, &f.body[..]), (b'Z', &b"I"[..]));
    assert_eq!(&buf[..], b"S\0\0", "the next frame's start stays buffered");

    let mut bad = BytesMut::from(&b"Z\0\0\0\x03"[..]);
    assert_eq!(frame::parse(&mut bad, 100), Err(PgError::BadLength(3)));
    let mut neg = BytesMut::from(&b"Z\xff\xff\xff\xff"[..]);
    assert_eq!(frame::parse(&mut neg, 100), Err(PgError::BadLength(-1)));
    let mut big = BytesMut::from(&b"D\x7f\0\0\0"[..]);
    assert!(matches!(
        frame::parse(&mut big, 1 << 20),
        Err(PgError::TooLarge { .. })
    ));
}

#[test]
fn frame_encode_round_trips() {
    let f = Frame {
        tag: b'S',
        body: bytes::Bytes::from_static(b"a\0b\0"),
    };
    let mut out = BytesMut::new();
    f.encode(&mut out);
    assert_eq!(&out[..], b"S\0\0\0\x08a\0b\0");
    assert_eq!(frame::parse(&mut out, 100).unwrap(), Some(f));
}

// --- the first packet ---

/// A StartupMessage as psql 15 sends it: user, database, application_name, client_encoding.
const PSQL_STARTUP: &[u8] = b"\0\0\0\x4f\0\x03\0\0user\0alice\0database\0orders\0application_name\0psql\0client_encoding\0UTF8\0\0";

#[test]
fn startup_packets_parse_as_the_protocol_documents_them() {
    let mut buf = BytesMut::from(PSQL_STARTUP);
    // Byte by byte: nothing until the last one.
    let mut partial = BytesMut::new();
    for (i, b) in PSQL_STARTUP.iter().enumerate() {
        partial.put_u8(*b);
        let r = startup::parse(&mut partial, MAX_STARTUP_LEN).unwrap();
        assert_eq!(r.is_some(), i == PSQL_STARTUP.len() - 1);
    }
    let Initial::Startup(s) = startup::parse(&mut buf, MAX_STARTUP_LEN).unwrap().unwrap() else {
        panic!("not a startup")
    };
    assert_eq!((s.major, s.minor), (3, 0));
    assert_eq!(s.get("user"), Some("alice"));
    assert_eq!(s.get("application_name"), Some("psql"));
    assert_eq!(s.params.len(), 4);

    let ssl = b"\0\0\0\x08\x04\xd2\x16\x2f";
    assert_eq!(
        startup::parse(&mut BytesMut::from(&ssl[..]), 100).unwrap(),
        Some(Initial::SslRequest)
    );
    let gss = b"\0\0\0\x08\x04\xd2\x16\x30";
    assert_eq!(
        startup::parse(&mut BytesMut::from(&gss[..]), 100).unwrap(),
        Some(Initial::GssEncRequest)
    );
    let cancel = b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\x30\x39\xde\xad\xbe\xef";
    assert_eq!(
        startup::parse(&mut BytesMut::from(&cancel[..]), 100).unwrap(),
        Some(Initial::Cancel {
            pid: 12345,
            secret: 0xdeadbeefu32 as i32
        })
    );
}

#[test]
fn hostile_first_packets_are_refused_before_buffering() {
    // A 1 MB length prefix is refused from its first 4 bytes.
    let mut big = BytesMut::from(&b"\0\x0f\x42\x40"[..]);
    assert_eq!(
        startup::parse(&mut big, MAX_STARTUP_LEN),
        Err(PgError::TooLarge {
            len: 1_000_000,
            max: MAX_STARTUP_LEN
        })
    );
    for (bytes, what) in [
        (&b"\0\0\0\x04\0\x03\0\0"[..], "length below 8"),
        (&b"\0\0\0\x0c\0\x03\0\0user"[..], "unterminated parameter"),
        (
            &b"\0\0\0\x0e\0\x03\0\0user\0x"[..],
            "value without terminator",
        ),
        (
            &b"\0\0\0\x0c\x04\xd2\x16\x2f\0\0\0\0"[..],
            "SSLRequest with a body",
        ),
        (&b"\0\0\0\x0d\0\x03\0\0\xff\xfe\0\0\0"[..], "not UTF-8"),
    ] {
        assert!(
            startup::parse(&mut BytesMut::from(bytes), MAX_STARTUP_LEN).is_err(),
            "{what}"
        );
    }
    assert_eq!(
        startup::parse(&mut BytesMut::from(&b"\0\0\0\x09\0\x02\0\0\0"[..]), 100),
        Err(PgError::UnsupportedVersion { major: 2, minor: 0 })
    );
}

#[test]
fn the_startup_is_rewritten_for_the_policys_user() {
    let Ok(Some(Initial::Startup(s))) = startup::parse(&mut BytesMut::from(PSQL_STARTUP), 10_000)
    else {
        panic!()
    };
    let r = startup::rewrite(&s, Some("orders_rw")).unwrap();
    assert_eq!(r.params[0], ("user".into(), "orders_rw".into()));
    assert!(r.params.contains(&("database".into(), "orders".into())));
    assert!(
        r.params
            .contains(&("application_name".into(), "psql".into()))
    );
    assert!(!r.negotiate);

    // Without a database, the application's user name stays the database.
    let s2 = startup::Startup {
        major: 3,
        minor: 2,
        params: vec![
            ("user".into(), "alice".into()),
            ("_pq_.protocol_managed_params".into(), "x".into()),
            ("options".into(), "-c search_path=app".into()),
        ],
    };
    let r = startup::rewrite(&s2, Some("orders_rw")).unwrap();
    assert!(r.params.contains(&("database".into(), "alice".into())));
    assert!(
        r.params
            .contains(&("options".into(), "-c search_path=app".into()))
    );
    assert!(r.params.iter().all(|(k, _)| !k.starts_with("_pq_.")));
    assert!(r.negotiate);
    assert_eq!(
        r.unrecognized,
        vec!["_pq_.protocol_managed_params".to_string()]
    );
    // No policy user: the application's is kept.
    assert_eq!(startup::rewrite(&s, None).unwrap().params[0].1, "alice");

    let repl = startup::Startup {
        major: 3,
        minor: 0,
        params: vec![
            ("user".into(), "a".into()),
            ("replication".into(), "database".into()),
        ],
    };
    assert_eq!(
        startup::rewrite(&repl, Some("u")),
        Err(StartupRefusal::Replication)
    );
    let nouser = startup::Startup {
        major: 3,
        minor: 0,
        params: vec![],
    };
    assert_eq!(startup::rewrite(&nouser, None), Err(StartupRefusal::NoUser));
}

#[test]
fn rewritten_startup_encodes_like_libpq() {
    let mut out = BytesMut::new();
    startup::encode_startup(
        [
            ("user", "alice"),
            ("database", "orders"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
        ],
        &mut out,
    );
    assert_eq!(&out[..], PSQL_STARTUP);
}

// --- server side toward the application ---

#[test]
fn messages_to_the_application_have_the_documented_bytes() {
    let mut out = BytesMut::new();
    encode::authentication_ok(&mut out);
    encode::backend_key_data(12345, -1, &mut out);
    encode::negotiate_protocol_version(&["_pq_.x".into()], &mut out);
    assert_eq!(
        &out[..],
        b"R\0\0\0\x08\0\0\0\0K\0\0\0\x0c\0\0\x30\x39\xff\xff\xff\xffv\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0"
    );
}

#[test]
fn error_responses_round_trip_and_never_carry_nul() {
    let e = ErrorFields::fatal(
        SqlState::INVALID_PASSWORD,
        "latch: policy \"db\": bad\0thing",
    )
    .with_hint("h");
    let mut out = BytesMut::new();
    e.encode(b'E', &mut out);
    let f = frame::parse(&mut out, 1000).unwrap().unwrap();
    assert_eq!(f.tag, b'E');
    let back = ErrorFields::decode(&f.body).unwrap();
    assert_eq!(back.severity, "FATAL");
    assert_eq!(back.code, "28P01");
    assert_eq!(back.message, "latch: policy \"db\": badthing");
    assert_eq!(back.hint.as_deref(), Some("h"));
    assert!(back.is_auth_failure());
    // A real server's error (captured from PostgreSQL 15, database missing).
    let server = b"SFATAL\0VFATAL\0C3D000\0Mdatabase \"nope\" does not exist\0Fpostinit.c\0L885\0RInitPostgres\0\0";
    let f = ErrorFields::decode(server).unwrap();
    assert_eq!(
        (f.code.as_str(), f.message.as_str()),
        ("3D000", "database \"nope\" does not exist")
    );
    assert!(ErrorFields::decode(b"SFATAL\0Cx").is_err());
}

// --- backend messages ---

#[test]
fn authentication_requests_decode() {
    let cases: [(&[u8], AuthRequest); 5] = [
        (b"\0\0\0\0", AuthRequest::Ok),
        (b"\0\0\0\x03", AuthRequest::CleartextPassword),
        (
            b"\0\0\0\x05\x01\x02\x03\x04",
            AuthRequest::Md5Password { salt: [1, 2, 3, 4] },
        ),
        (
            b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
            AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()],
            },
        ),
        (b"\0\0\0\x07", AuthRequest::Other(7)),
    ];
    for (body, want) in cases {
        let f = Frame {
            tag: b'R',
            body: bytes::Bytes::copy_from_slice(body),
        };
        assert_eq!(
            BackendMessage::decode(&f).unwrap(),
            BackendMessage::Auth(want)
        );
    }
    let bad = Frame {
        tag: b'R',
        body: bytes::Bytes::from_static(b"\0\0\0\x05\x01"),
    };
    assert!(BackendMessage::decode(&bad).is_err());
}

// --- SCRAM ---

#[test]
fn scram_reproduces_the_rfc_7677_example() {
    let mut c = ScramClient::new(
        "user",
        b"pencil",
        ChannelBinding::Unsupported,
        "rOprNGfwEbeRWgbNEkqO".into(),
    );
    assert_eq!(c.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
    let fin = c
        .server_first(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
        .unwrap();
    assert_eq!(
        String::from_utf8(fin).unwrap(),
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    );
    c.server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
        .unwrap();
}

#[test]
fn scram_refuses_forged_or_hostile_servers() {
    let first = b"r=abcXYZ,s=c2FsdA==,i=4096";
    let mut c = ScramClient::new("", b"pw", ChannelBinding::Unsupported, "abc".into());
    c.server_first(first).unwrap();
    assert_eq!(
        c.server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
        Err(ScramError::BadServerSignature)
    );
    let mut c = ScramClient::new("", b"pw", ChannelBinding::Unsupported, "abc".into());
    assert_eq!(
        c.server_first(b"r=zzz,s=c2FsdA==,i=1"),
        Err(ScramError::NonceMismatch)
    );
    let mut c = ScramClient::new("", b"pw", ChannelBinding::Unsupported, "abc".into());
    assert_eq!(
        c.server_first(b"r=abcd,s=c2FsdA==,i=999999999"),
        Err(ScramError::Iterations(999_999_999))
    );
    let mut c = ScramClient::new("", b"pw", ChannelBinding::Unsupported, "abc".into());
    assert!(c.server_first(b"garbage").is_err());
    let mut c = ScramClient::new("", b"pw", ChannelBinding::Unsupported, "abc".into());
    c.server_first(first).unwrap();
    assert_eq!(
        c.server_final(b"e=invalid-proof"),
        Err(ScramError::ServerError("invalid-proof".into()))
    );
}

#[test]
fn scram_plus_binds_the_certificate_hash() {
    let c = ScramClient::new(
        "",
        b"pw",
        ChannelBinding::TlsServerEndPoint(vec![1, 2, 3]),
        "n".into(),
    );
    assert_eq!(c.mechanism(), "SCRAM-SHA-256-PLUS");
    assert_eq!(c.client_first(), b"p=tls-server-end-point,,n=,r=n");
    let mut c = ScramClient::new(
        "",
        b"pw",
        ChannelBinding::TlsServerEndPoint(vec![1, 2, 3]),
        "n".into(),
    );
    let fin = String::from_utf8(c.server_first(b"r=nX,s=c2FsdA==,i=4096").unwrap()).unwrap();
    // c = base64("p=tls-server-end-point,," + 01 02 03)
    assert!(
        fin.starts_with("c=cD10bHMtc2VydmVyLWVuZC1wb2ludCwsAQID,r=nX,p="),
        "{fin}"
    );
}

/// Replays the captured PostgreSQL 15 login through the whole target handshake: latch must
/// send exactly the bytes the real server accepted, and end at ReadyForQuery with the key.
#[test]
fn the_captured_postgres_15_scram_login_replays_byte_for_byte() {
    let auth = ClientAuth::new("vector_user", Some("pencil"), TargetTls::Plain)
        .with_nonce("rOprNGfwEbeRWgbNEkqOlatch");
    let mut hs = TargetHandshake::new(auth);
    let mut forwarded = 0;
    let mut key = None;
    let mut expect_reply: Option<Vec<u8>> = None;
    for (from_server, bytes) in captured() {
        if !from_server {
            assert_eq!(
                expect_reply.take().as_deref(),
                Some(&bytes[..]),
                "client message differs"
            );
            continue;
        }
        assert!(expect_reply.is_none(), "latch did not answer");
        let mut buf = BytesMut::from(&bytes[..]);
        let f = frame::parse(&mut buf, 1 << 16).unwrap().unwrap();
        assert!(buf.is_empty());
        match hs.on_frame(f).unwrap() {
            Event::Reply(b) => expect_reply = Some(b.to_vec()),
            Event::Forward(_) => forwarded += 1,
            Event::BackendKey { pid, secret } => key = Some((pid, secret)),
            Event::Ready(f) => assert_eq!(&f.body[..], b"I"),
            Event::Continue | Event::Authenticated => {}
        }
    }
    assert!(hs.is_done());
    assert_eq!(forwarded, 13, "ParameterStatus messages");
    assert_eq!(key, Some((0x332d, 0xa698ea93u32 as i32)));
}

#[test]
fn a_server_skipping_scram_final_is_refused() {
    let auth = ClientAuth::new("u", Some("pw"), TargetTls::Plain).with_nonce("abc");
    let mut hs = TargetHandshake::new(auth);
    let sasl = hex("52000000170000000a534352414d2d5348412d3235360000");
    let f = frame::parse(&mut BytesMut::from(&sasl[..]), 1000)
        .unwrap()
        .unwrap();
    assert!(matches!(hs.on_frame(f).unwrap(), Event::Reply(_)));
    let ok = frame::parse(&mut BytesMut::from(&b"R\0\0\0\x08\0\0\0\0"[..]), 1000)
        .unwrap()
        .unwrap();
    assert!(matches!(hs.on_frame(ok), Err(HandshakeError::Auth(_))));
}

#[test]
fn md5_and_cleartext_answers() {
    // As a policy that names both, toward a server TLS verified.
    let both = Allowed {
        md5: true,
        cleartext: true,
        verified_target: true,
        ..Allowed::SCRAM
    };
    // md5(md5("md5-Secret" + "md5_app") + salt), computed independently (Python hashlib).
    let mut a = ClientAuth::new("md5_app", Some("md5-Secret"), TargetTls::Plain).allowing(both);
    let AuthAction::Send(b) = a
        .on_request(AuthRequest::Md5Password { salt: [1, 2, 3, 4] })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(&b[..], b"p\0\0\0\x28md559c3ca6d4ac3b40ee3070cfb5578fbcc\0");
    let mut a = ClientAuth::new("u", Some("pw"), TargetTls::Plain).allowing(both);
    let AuthAction::Send(b) = a.on_request(AuthRequest::CleartextPassword).unwrap() else {
        panic!()
    };
    assert_eq!(&b[..], b"p\0\0\0\x07pw\0");
    let mut none = ClientAuth::new("u", None, TargetTls::Plain).allowing(both);
    assert!(matches!(
        none.on_request(AuthRequest::CleartextPassword),
        Err(AuthError::NoPassword { .. })
    ));
    let mut nul = ClientAuth::new("u", Some("p\0w"), TargetTls::Plain).allowing(both);
    assert_eq!(
        nul.on_request(AuthRequest::CleartextPassword).unwrap_err(),
        AuthError::NulInPassword
    );
}

#[test]
fn cleartext_and_md5_are_never_volunteered_to_whoever_answers() {
    let ask = |allowed: Allowed, req: AuthRequest| {
        ClientAuth::new("u", Some("hunter2"), TargetTls::Plain)
            .allowing(allowed)
            .on_request(req)
    };
    // By default: SCRAM only.
    assert_eq!(
        ask(Allowed::SCRAM, AuthRequest::CleartextPassword).unwrap_err(),
        AuthError::NotAllowed("password")
    );
    assert_eq!(
        ask(
            Allowed::SCRAM,
            AuthRequest::Md5Password { salt: [1, 2, 3, 4] }
        )
        .unwrap_err(),
        AuthError::NotAllowed("md5")
    );
    // Named by the policy, but the server's identity was not verified.
    let named = Allowed {
        md5: true,
        cleartext: true,
        ..Allowed::SCRAM
    };
    assert_eq!(
        ask(named, AuthRequest::CleartextPassword).unwrap_err(),
        AuthError::Unverified("password")
    );
    assert_eq!(
        ask(named, AuthRequest::Md5Password { salt: [1, 2, 3, 4] }).unwrap_err(),
        AuthError::Unverified("md5")
    );
    // A policy without SCRAM refuses it too.
    let no_scram = Allowed {
        scram: false,
        md5: true,
        verified_target: true,
        ..Allowed::SCRAM
    };
    let sasl = AuthRequest::Sasl {
        mechanisms: vec!["SCRAM-SHA-256".into()],
    };
    assert_eq!(
        ask(no_scram, sasl).unwrap_err(),
        AuthError::NotAllowed("SCRAM-SHA-256")
    );
}

#[test]
fn channel_binding_can_be_required_and_low_iteration_counts_are_refused() {
    let bound = Allowed {
        require_binding: true,
        ..Allowed::SCRAM
    };
    let sasl = |m: &[&str]| AuthRequest::Sasl {
        mechanisms: m.iter().map(|s| s.to_string()).collect(),
    };
    // TLS without the PLUS mechanism, or plain text: refused.
    let mut a = ClientAuth::new(
        "u",
        Some("pw"),
        TargetTls::Tls {
            end_point: Some(vec![1]),
        },
    )
    .allowing(bound);
    assert_eq!(
        a.on_request(sasl(&["SCRAM-SHA-256"])).unwrap_err(),
        AuthError::BindingRequired
    );
    let mut a = ClientAuth::new("u", Some("pw"), TargetTls::Plain).allowing(bound);
    assert_eq!(
        a.on_request(sasl(&["SCRAM-SHA-256"])).unwrap_err(),
        AuthError::BindingRequired
    );
    let mut a = ClientAuth::new(
        "u",
        Some("pw"),
        TargetTls::Tls {
            end_point: Some(vec![1]),
        },
    )
    .allowing(bound);
    assert!(matches!(
        a.on_request(sasl(&["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"])),
        Ok(AuthAction::Send(_))
    ));
    // A hostile server asking for 1 iteration (cheap offline guessing from the proof).
    let mut c = ScramClient::new("", b"pw", ChannelBinding::Unsupported, "n".into());
    assert!(matches!(
        c.server_first(b"r=nX,s=c2FsdA==,i=1"),
        Err(ScramError::Iterations(1))
    ));
}

#[test]
fn server_errors_during_the_handshake_surface_as_fields() {
    let mut hs = TargetHandshake::new(ClientAuth::new("u", Some("pw"), TargetTls::Plain));
    let mut out = BytesMut::new();
    ErrorFields::fatal(
        SqlState::INVALID_PASSWORD,
        "password authentication failed for user \"u\"",
    )
    .encode(b'E', &mut out);
    let f = frame::parse(&mut out, 1000).unwrap().unwrap();
    let Err(HandshakeError::Server(e)) = hs.on_frame(f) else {
        panic!()
    };
    assert!(e.is_auth_failure());
    // A data row before authentication is a protocol violation.
    let mut hs = TargetHandshake::new(ClientAuth::new("u", Some("pw"), TargetTls::Plain));
    let d = frame::parse(&mut BytesMut::from(&b"D\0\0\0\x06\0\0"[..]), 100)
        .unwrap()
        .unwrap();
    assert!(matches!(hs.on_frame(d), Err(HandshakeError::Protocol(_))));
}

#[test]
fn debug_output_of_auth_state_shows_no_secret() {
    let a = ClientAuth::new("u", Some("hunter2"), TargetTls::Plain);
    assert!(!format!("{a:?}").contains("hunter2"));
    let c = ScramClient::new("", b"hunter2", ChannelBinding::Unsupported, "n".into());
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn a_server_streaming_parameters_before_ready_is_cut_off() {
    // Trust authentication (AuthenticationOk at once), then ParameterStatus without end.
    let mut hs = TargetHandshake::new(ClientAuth::new("u", Some("pw"), TargetTls::Plain));
    let ok = frame::parse(&mut BytesMut::from(&b"R\0\0\0\x08\0\0\0\0"[..]), 100)
        .unwrap()
        .unwrap();
    assert!(matches!(hs.on_frame(ok).unwrap(), Event::Authenticated));
    let param = |i: usize| {
        let mut out = BytesMut::new();
        let body = format!("p{i}\0v\0");
        crate::Frame {
            tag: b'S',
            body: bytes::Bytes::from(body.into_bytes()),
        }
        .encode(&mut out);
        frame::parse(&mut out, 1000).unwrap().unwrap()
    };
    for i in 0..crate::handshake::MAX_STARTUP_MESSAGES {
        assert!(
            matches!(hs.on_frame(param(i)).unwrap(), Event::Forward(_)),
            "{i}"
        );
    }
    assert!(matches!(
        hs.on_frame(param(9999)),
        Err(HandshakeError::Flood)
    ));
    // Fewer but larger messages reach the byte bound first.
    let mut hs = TargetHandshake::new(ClientAuth::new("u", Some("pw"), TargetTls::Plain));
    let ok = frame::parse(&mut BytesMut::from(&b"R\0\0\0\x08\0\0\0\0"[..]), 100)
        .unwrap()
        .unwrap();
    hs.on_frame(ok).unwrap();
    let big = |i: usize| {
        let mut out = BytesMut::new();
        let body = format!("p{i}\0{}\0", "x".repeat(8000));
        crate::Frame {
            tag: b'S',
            body: bytes::Bytes::from(body.into_bytes()),
        }
        .encode(&mut out);
        frame::parse(&mut out, 1 << 16).unwrap().unwrap()
    };
    let flooded = (0..16).find_map(|i| hs.on_frame(big(i)).err());
    assert!(
        matches!(flooded, Some(HandshakeError::Flood)),
        "{flooded:?}"
    );
}
