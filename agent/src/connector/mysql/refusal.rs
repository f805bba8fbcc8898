//! latch's own refusals told to a MySQL client: an ERR packet in place of the greeting, as a
//! MariaDB server answers a client it will not serve ("Too many connections", "Host is not
//! allowed"), or, when a handshake is cut short, with the sequence id the application expects
//! at the point it had reached (noted in the connection's session as it goes).

use bytes::BytesMut;
use latch_mysql::{CapabilityFlags, ErrPacket, constants::er};
use tokio::net::TcpStream;

use crate::{config::Policy, connector::Refusal};

/// The error code and SQLSTATE a MySQL client is told for `why`.
pub fn code(why: &Refusal) -> (u16, &'static str) {
    match why {
        Refusal::WorkloadLimit { .. } | Refusal::Busy { .. } => er::CON_COUNT_ERROR,
        Refusal::HandshakeTimeout(_) => super::failure::CANNOT_REACH,
    }
}

/// Where an application is in its handshake: the sequence id it expects next from the server,
/// and its capabilities once its response was read.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppLeg {
    pub seq: u8,
    pub caps: Option<CapabilityFlags>,
}

impl AppLeg {
    /// As noted in the connection's session: bits 0-7 the sequence id, bit 8 whether the
    /// capabilities are known, bits 32-63 the capabilities.
    pub fn stage(self) -> u64 {
        let caps = self
            .caps
            .map_or(0, |c| (1 << 8) | (u64::from(c.bits()) << 32));
        u64::from(self.seq) | caps
    }

    /// The leg a session's note describes (0: nothing sent yet).
    pub fn from_stage(stage: u64) -> Self {
        Self {
            seq: stage as u8,
            caps: (stage & (1 << 8) != 0)
                .then(|| CapabilityFlags::from_bits_retain((stage >> 32) as u32)),
        }
    }
}

/// Refuses before anything was exchanged: an ERR in place of the greeting.
pub async fn before_greeting(app: TcpStream, policy: &Policy, why: Refusal) {
    let err = ErrPacket::new(
        code(&why),
        format!("latch: policy \"{}\": {why}", policy.name),
    );
    tell(app, &err, AppLeg::default()).await;
}

/// A handshake cut short: told at the point the application had reached (`leg`).
pub async fn abort(app: TcpStream, policy: &Policy, why: Refusal, leg: AppLeg) {
    let err = ErrPacket::new(
        code(&why),
        format!("latch: policy \"{}\": {why}", policy.name),
    );
    tell(app, &err, leg).await;
}

/// Writes `err` for an application at `leg`, then closes.
pub async fn tell(mut app: TcpStream, err: &ErrPacket, leg: AppLeg) {
    let mut out = BytesMut::new();
    super::failure::encode(err, leg.seq, leg.caps, &mut out);
    crate::connector::refuse::tell_and_close(&mut app, Some(&out)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leg_survives_its_note_in_the_session() {
        for leg in [
            AppLeg::default(),
            AppLeg { seq: 1, caps: None },
            AppLeg {
                seq: 2,
                caps: Some(CapabilityFlags::CLIENT_PROTOCOL_41 | CapabilityFlags::CLIENT_SSL),
            },
        ] {
            let back = AppLeg::from_stage(leg.stage());
            assert_eq!((back.seq, back.caps), (leg.seq, leg.caps));
        }
    }
}
