//! The application-side parsers: the first packet (any bytes, in any chunking) and the
//! StartupMessage rewrite. Must never panic, and never buffer more than the limit.
#![no_main]
use bytes::BytesMut;
use latch_pg::startup::{self, Initial, MAX_STARTUP_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Feed in two chunks split at a data-dependent point, as a socket might.
    let split = data
        .first()
        .map(|&b| b as usize % (data.len() + 1))
        .unwrap_or(0);
    let mut buf = BytesMut::new();
    for chunk in [&data[..split], &data[split..]] {
        buf.extend_from_slice(chunk);
        loop {
            match startup::parse(&mut buf, MAX_STARTUP_LEN) {
                Ok(Some(Initial::Startup(s))) => {
                    let _ = startup::rewrite(&s, Some("policy_user"));
                    let _ = startup::rewrite(&s, None);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        assert!(buf.capacity() <= 2 * MAX_STARTUP_LEN + data.len());
    }
});
