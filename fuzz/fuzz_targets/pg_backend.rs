//! The target-side parsers: framing, every startup-time backend message, and the whole
//! handshake state machine (including SCRAM) fed with arbitrary server bytes.
#![no_main]
use bytes::BytesMut;
use latch_pg::{
    auth::{ClientAuth, TargetTls},
    backend::BackendMessage,
    frame,
    handshake::{MAX_HANDSHAKE_MESSAGE, TargetHandshake},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let auth = ClientAuth::new(
        "u",
        Some("pw"),
        TargetTls::Tls {
            end_point: Some(vec![7; 32]),
        },
    )
    .with_nonce("fuzznonce");
    let mut hs = TargetHandshake::new(auth);
    let mut alive = true;
    while let Ok(Some(f)) = frame::parse(&mut buf, MAX_HANDSHAKE_MESSAGE) {
        let _ = BackendMessage::decode(&f);
        if alive {
            alive = hs.on_frame(f).is_ok();
        }
    }
});
