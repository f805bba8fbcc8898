//! The MySQL/MariaDB client/server protocol as latch speaks it, without I/O: framing with
//! sequence ids, the connection phase on both sides (latch as the server toward the
//! application, latch as the client toward the real server) and the client authentication
//! plugins. Everything here takes bytes and returns bytes or typed values; the connector owns
//! the sockets, TLS and timeouts.
//!
//! Layout, one file per thing it holds:
//! - [`frame`]: packets (3-byte length, sequence id, the 0xFFFFFF continuation rule) and [`Seq`].
//! - [`greeting`]: HandshakeV10, built by latch toward the application and parsed from the server.
//! - [`response`]: HandshakeResponse41 and the SSLRequest, parsed from the application and built
//!   toward the server, and the capability negotiation between the two.
//! - [`compress`]: compressed-protocol frames (CLIENT_COMPRESS), `mysql_common`'s codec.
//! - [`command`]: the commands latch must recognise after the handshake (COM_CHANGE_USER,
//!   COM_RESET_CONNECTION, COM_QUIT).
//! - [`reset`]: making a finished session fit for the next application connection.
//! - [`ok_err`]: OK and ERR packets; [`auth_packets`]: AuthSwitchRequest and AuthMoreData.
//! - [`scramble`]: what each authentication plugin computes from a password and a scramble.
//! - [`client_auth`]: the client authentication state machine.
//! - [`constants`]: capability and status flags, command bytes, error codes, plugin names.
//!
//! Secrets: passwords and the authentication data an application sends are held in
//! [`zeroize::Zeroizing`] buffers, never appear in `Debug` output or in an error.

pub mod auth_packets;
pub mod client_auth;
pub mod command;
pub mod compress;
pub mod constants;
pub mod error;
pub mod frame;
pub mod greeting;
pub mod ok_err;
pub mod reset;
pub mod response;
pub mod scramble;
mod wire;

pub use auth_packets::{AuthMoreData, AuthSwitchRequest};
pub use client_auth::{AuthStep, ClientAuth, ClientAuthOptions, Sha2Path, Transport};
pub use command::{ChangeUser, Command};
pub use constants::{CapabilityFlags, MariadbCapabilities, StatusFlags};
pub use error::{AuthError, EncodeError, FrameError, ParseError, ServerError};
pub use frame::{Packet, Seq};
pub use greeting::Greeting;
pub use ok_err::{ErrPacket, OkPacket};
pub use response::{AuthResponse, ClientHello, ConnectAttrs, HandshakeResponse, SslRequest};

#[cfg(test)]
mod tests;
