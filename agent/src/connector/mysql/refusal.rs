//! latch's own refusals told to a MySQL client: an ERR packet in place of the greeting, as a
//! MariaDB server answers a client it will not serve ("Too many connections", "Host is not
//! allowed"), or, when a handshake is cut short, with the sequence id the application expects
//! at the point it had reached.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use latch_mysql::{CapabilityFlags, ErrPacket, constants::er};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use crate::{config::Policy, connector::Refusal};

/// How long a refused application gets to take the answer.
const REFUSAL_IO: Duration = Duration::from_secs(2);

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

/// Handshakes in progress, by the application's address, so that one the broker cuts short
/// ([`crate::connector::Connector::abort`], which gets only the socket) is answered with the
/// sequence id its client expects.
#[derive(Default)]
pub struct InProgress {
    map: Arc<Mutex<HashMap<SocketAddr, AppLeg>>>,
}

/// More than this many entries and the map starts over (entries of handshakes whose serving
/// was dropped without an abort, e.g. at shutdown).
const MAX_IN_PROGRESS: usize = 65_536;

impl InProgress {
    /// Tracks the handshake of the application at `peer` until the guard says it is done.
    pub fn track(&self, peer: Option<SocketAddr>) -> Tracked {
        Tracked {
            map: self.map.clone(),
            peer,
            done: false,
        }
    }

    fn take(&self, peer: SocketAddr) -> Option<AppLeg> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer)
    }
}

/// One handshake's entry. Dropped after [`Tracked::done`] it goes away; dropped before (the
/// broker's handshake deadline passed), it stays for the abort to read.
pub struct Tracked {
    map: Arc<Mutex<HashMap<SocketAddr, AppLeg>>>,
    peer: Option<SocketAddr>,
    done: bool,
}

impl Tracked {
    pub fn set(&self, leg: AppLeg) {
        if let Some(peer) = self.peer {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= MAX_IN_PROGRESS && !map.contains_key(&peer) {
                map.clear();
            }
            map.insert(peer, leg);
        }
    }

    pub fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let (true, Some(peer)) = (self.done, self.peer) {
            self.map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&peer);
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

/// A handshake cut short: told at the point the application had reached.
pub async fn abort(app: TcpStream, policy: &Policy, why: Refusal, legs: &InProgress) {
    let leg = app
        .peer_addr()
        .ok()
        .and_then(|p| legs.take(p))
        .unwrap_or_default();
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
    let _ = tokio::time::timeout(REFUSAL_IO, async {
        app.write_all(&out).await?;
        app.shutdown().await
    })
    .await;
}
