//! The MySQL codec: framing, the parsers of what an application sends (HandshakeResponse41 /
//! SSLRequest, commands), and the client authentication state machine fed arbitrary server
//! packets; the input read as compressed-protocol frames, and re-encoded. The first input byte
//! picks the greeting's plugin and the leg's transport.
#![no_main]
use bytes::BytesMut;
use latch_mysql::{
    AuthResponse, CapabilityFlags, ClientAuth, ClientAuthOptions, ClientHello, Command, Greeting,
    HandshakeResponse, MariadbCapabilities, StatusFlags, Transport, compress, frame,
};
use libfuzzer_sys::fuzz_target;

const MAX_PAYLOAD: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let _ = ClientHello::parse(rest);
    let _ = HandshakeResponse::parse(rest);
    let _ = Greeting::parse(rest);

    // Compressed frames, read a bounded piece at a time: whatever reads re-encodes to frames
    // that read back to the same bytes.
    let (plain, _) = read_frames(rest, 1 + usize::from(mode));
    let mut framed = BytesMut::new();
    compress::encode(mode, compress::Compression::fast(), &plain, &mut framed);
    let (back, clean) = read_frames(&framed, 1 << 16);
    assert!(clean);
    assert_eq!(back, plain);

    let caps = CapabilityFlags::from_bits_retain(0xFFFF_FFFE);
    let greeting = Greeting {
        server_version: b"8.0.36".to_vec(),
        connection_id: 1,
        scramble: b"abcdefghij0123456789".to_vec(),
        capabilities: caps,
        mariadb_capabilities: MariadbCapabilities::empty(),
        charset: 45,
        status: StatusFlags::SERVER_STATUS_AUTOCOMMIT,
        auth_plugin: Some(if mode & 1 == 0 {
            b"mysql_native_password".to_vec()
        } else {
            b"caching_sha2_password".to_vec()
        }),
    };
    let transport = match (mode >> 1) % 3 {
        0 => Transport::Plain,
        1 => Transport::Tls,
        _ => Transport::TlsVerified,
    };
    let mut auth = ClientAuth::new(&greeting, b"fuzz-pw", ClientAuthOptions::default());
    let mut resp = HandshakeResponse {
        capabilities: caps,
        max_packet_size: 1 << 24,
        charset: 45,
        mariadb_capabilities: MariadbCapabilities::empty(),
        username: b"u".to_vec(),
        auth_response: AuthResponse::default(),
        database: None,
        auth_plugin: None,
        connect_attrs: None,
        zstd_level: None,
    };
    let mut out = BytesMut::new();
    if auth.start(&mut resp, transport, &mut out).is_err() {
        return;
    }
    let mut buf = BytesMut::from(rest);
    let mut alive = true;
    while let Ok(Some(p)) = frame::parse(&mut buf, MAX_PAYLOAD) {
        let _ = ClientHello::parse(&p.payload);
        let _ = Command::parse(&p.payload, caps);
        if alive {
            out.clear();
            alive = auth.on_packet(&p, &mut out).is_ok();
        }
    }
});

/// Plain bytes read from `input` as frames, `room` at a time, until an error or no progress;
/// and whether everything was read without error, ending between frames.
fn read_frames(mut input: &[u8], room: usize) -> (BytesMut, bool) {
    let mut reader = compress::FrameReader::default();
    let mut plain = BytesMut::new();
    loop {
        let before = plain.len();
        match reader.read(input, &mut plain, room) {
            Ok(r) if r.used == 0 && plain.len() == before => {
                return (plain, input.is_empty() && reader.between_frames());
            }
            Ok(r) => input = &input[r.used..],
            Err(_) => return (plain, false),
        }
        assert!(plain.len() - before <= room);
    }
}
