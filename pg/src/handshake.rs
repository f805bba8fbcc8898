//! The target-side handshake after the StartupMessage is sent: authentication, then the
//! server's ParameterStatus/BackendKeyData/notices up to ReadyForQuery. Pure: one frame in,
//! one [`Event`] out.
use bytes::BytesMut;

use super::{
    Frame, PgError,
    auth::{AuthAction, AuthError, ClientAuth},
    backend::BackendMessage,
    error_fields::ErrorFields,
};

/// Limit of one server message during the handshake (SASL, parameters, errors are small).
pub const MAX_HANDSHAKE_MESSAGE: usize = 64 * 1024;

/// Most ParameterStatus and NoticeResponse messages before ReadyForQuery (PostgreSQL 15 sends
/// 14 ParameterStatus), and their bytes: latch holds them until the session starts, so a
/// hostile server streaming them must not grow the agent's memory.
pub const MAX_STARTUP_MESSAGES: usize = 256;
pub const MAX_STARTUP_BYTES: usize = 64 * 1024;

/// What the connector does next.
#[derive(Debug)]
pub enum Event {
    /// Send these bytes to the server (they may hold password-derived data: wipe after use).
    Reply(BytesMut),
    /// Nothing to do; read the next frame.
    Continue,
    /// The server accepted the credentials: tell the application AuthenticationOk.
    Authenticated,
    /// Forward this frame to the application unchanged (ParameterStatus, NoticeResponse).
    Forward(Frame),
    /// The server's cancellation key, passed on to the application as it is.
    BackendKey { pid: i32, secret: i32 },
    /// ReadyForQuery: forward it; the handshake is over.
    Ready(Frame),
}

/// Why the handshake failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandshakeError {
    /// The server sent an ErrorResponse.
    #[error("the server refused: {0}")]
    Server(ErrorFields),
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("protocol: {0}")]
    Protocol(#[from] PgError),
    #[error(
        "the server sent more than {MAX_STARTUP_MESSAGES} messages or {MAX_STARTUP_BYTES} bytes of \
         parameters and notices before it was ready"
    )]
    Flood,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Auth,
    Startup,
    Done,
}

/// The target-side handshake.
#[derive(Debug)]
pub struct TargetHandshake {
    auth: ClientAuth,
    phase: Phase,
    key_seen: bool,
    /// ParameterStatus and NoticeResponse messages (and their bytes) seen so far.
    chatter: (usize, usize),
}

impl TargetHandshake {
    pub fn new(auth: ClientAuth) -> TargetHandshake {
        TargetHandshake {
            auth,
            phase: Phase::Auth,
            key_seen: false,
            chatter: (0, 0),
        }
    }

    /// The authentication method the server asked for.
    pub fn method(&self) -> &'static str {
        self.auth.method()
    }

    /// Whether ReadyForQuery has been seen.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Handles one frame from the server.
    pub fn on_frame(&mut self, frame: Frame) -> Result<Event, HandshakeError> {
        let msg = BackendMessage::decode(&frame)?;
        if matches!(
            msg,
            BackendMessage::ParameterStatus { .. } | BackendMessage::Notice
        ) {
            self.chatter.0 += 1;
            self.chatter.1 += frame.wire_len();
            if self.chatter.0 > MAX_STARTUP_MESSAGES || self.chatter.1 > MAX_STARTUP_BYTES {
                self.phase = Phase::Done;
                return Err(HandshakeError::Flood);
            }
        }
        let unexpected = |stage| {
            HandshakeError::Protocol(PgError::Unexpected {
                tag: frame.tag as char,
                stage,
            })
        };
        match (self.phase, msg) {
            (_, BackendMessage::Error(fields)) => {
                self.phase = Phase::Done;
                Err(HandshakeError::Server(fields))
            }
            (Phase::Auth, BackendMessage::Auth(req)) => match self.auth.on_request(req)? {
                AuthAction::Send(bytes) => Ok(Event::Reply(bytes)),
                AuthAction::Wait => Ok(Event::Continue),
                AuthAction::Done => {
                    self.phase = Phase::Startup;
                    Ok(Event::Authenticated)
                }
            },
            // latch asks for 3.0 without options; a server answering anyway is harmless.
            (Phase::Auth, BackendMessage::NegotiateProtocolVersion { .. }) => Ok(Event::Continue),
            (Phase::Auth, BackendMessage::Notice) => Ok(Event::Continue),
            (Phase::Startup, BackendMessage::ParameterStatus { .. } | BackendMessage::Notice) => {
                Ok(Event::Forward(frame))
            }
            (Phase::Startup, BackendMessage::BackendKeyData { pid, secret }) => {
                if std::mem::replace(&mut self.key_seen, true) {
                    return Err(unexpected("startup (second BackendKeyData)"));
                }
                Ok(Event::BackendKey { pid, secret })
            }
            (Phase::Startup, BackendMessage::ReadyForQuery { .. }) => {
                self.phase = Phase::Done;
                Ok(Event::Ready(frame))
            }
            (Phase::Auth, _) => Err(unexpected("authentication")),
            (Phase::Startup, _) => Err(unexpected("startup")),
            (Phase::Done, _) => Err(unexpected("after ReadyForQuery")),
        }
    }
}
