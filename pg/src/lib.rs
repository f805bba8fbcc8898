//! The PostgreSQL wire protocol (version 3.0), without I/O.
//!
//! latch speaks it on both legs of a `protocol: postgres` connection: as a *server* toward the
//! application (it reads the startup packet and answers it) and as a *client* toward the real
//! server (it sends the rewritten startup packet and authenticates with the policy's
//! credentials). Everything here works on byte buffers; the tokio glue lives in
//! `latch::connector::postgres` in the agent.
//!
//! | module | holds |
//! |---|---|
//! | [`frame`] | framing of regular (tagged) messages: `parse(&mut BytesMut) -> Option<Frame>` |
//! | [`startup`] | the untagged first packet: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage |
//! | [`startup_rules`] | which role, database and `options` a policy lets the application ask for |
//! | [`pre_startup`] | what a PostgreSQL 15 server answers before it accepts a StartupMessage |
//! | [`backend`] | decoding what a server sends (authentication requests, key data, parameters) |
//! | [`error_fields`] | ErrorResponse / NoticeResponse fields, decode and encode |
//! | [`encode`] | messages latch writes as a server toward the application |
//! | [`scram`] | SCRAM-SHA-256(-PLUS) client with injectable nonce |
//! | [`scram_cache`] | derived SCRAM keys by target, user, salt, iterations and password |
//! | [`auth`] | client-side authentication exchange (cleartext, MD5, SASL) as a state machine |
//! | [`handshake`] | the whole target-side handshake from startup to ReadyForQuery |
pub mod auth;
pub mod backend;
pub mod encode;
pub mod error;
pub mod error_fields;
pub mod frame;
pub mod handshake;
pub mod pre_startup;
pub mod scram;
pub mod scram_cache;
pub mod startup;
pub mod startup_rules;

#[cfg(test)]
mod tests;

pub use error::PgError;
pub use error_fields::{ErrorFields, SqlState};
pub use frame::Frame;

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 3 << 16;
