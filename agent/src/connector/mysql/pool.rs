//! Sessions kept for the next application connection of the same workload: a client that
//! opens a connection per query then costs the server no new connection and no login.
//!
//! A session is kept when the application ends it with COM_QUIT ([`super::commands`]) and the
//! server confirms it is back to how it was opened ([`latch_mysql::reset`]: reset, the
//! database it was opened with, and an end marker, in one round trip). It is handed only to a
//! connection with the same [`kept::Key`] (policy, target, network namespace, workload cgroup
//! and executable, TLS configuration) whose handshake response would open the same session
//! ([`Fit`]: user, database, character set, capabilities, max packet size, and the
//! credentials in force, so that a rotated password is used by the next connection as without
//! the pool). The application is greeted with the kept session's own connection id, so
//! `CONNECTION_ID()` and `KILL` agree with the server. Sessions opened without a database are
//! not kept: no command takes a session back to no database. Bounds and timeouts are
//! [`kept`]'s.
//!
//! The greeting goes out before the application says how it wants its session, so a
//! connection whose response does not fit the kept session it was greeted for (which stays
//! kept) gets a new login, whose connection id differs from the one in its greeting. One program
//! connecting with different options (character set, database) to one target shows this;
//! `mysql.keepSessions: false` turns keeping off.
use std::{os::fd::AsRawFd as _, sync::OnceLock, time::Duration};

use bytes::{Bytes, BytesMut};
use latch_mysql::{
    CapabilityFlags, HandshakeResponse, MariadbCapabilities,
    reset::{self, Replies, Step},
};
use nix::sys::socket::{MsgFlags, recv};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::{io::read_packet, target::SessionAuth};
use crate::{
    connector::{
        kept::{self, Keep},
        stream::{MaybeTls, TargetStream},
    },
    secrets::Credentials,
};

/// The MySQL connector's kept sessions.
pub type Pool = kept::Pool<Parked>;

/// How long the server may take to confirm a session is fit to keep.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(2);

/// Capabilities of the application's leg or of the handshake alone, which do not shape the
/// session on the server: TLS toward latch, compression (never negotiated), the
/// authentication plugins' framing, connect attributes and the database flag (the database
/// itself is compared).
const NOT_SESSION: CapabilityFlags = latch_mysql::response::NEVER
    .union(latch_mysql::response::HANDSHAKE_ONLY)
    .union(CapabilityFlags::CLIENT_CONNECT_ATTRS)
    .union(CapabilityFlags::CLIENT_CONNECT_WITH_DB);

/// What a session was opened with: a kept session serves only a connection that would open
/// it the same way.
#[derive(Clone, PartialEq, Eq)]
pub struct Fit {
    capabilities: CapabilityFlags,
    mariadb_capabilities: MariadbCapabilities,
    max_packet_size: u32,
    charset: u8,
    /// The user the application asked for (it selects the policy's role).
    user: Vec<u8>,
    database: Vec<u8>,
    /// The credentials the session logged in with, as a digest under a key of this process's.
    credentials: [u8; 32],
}

impl Fit {
    /// The fit of a session opened for `app` with `creds`; `None` when such a session cannot
    /// be kept (no database).
    pub fn of(app: &HandshakeResponse, creds: &Credentials) -> Option<Fit> {
        let database = app.database.clone()?;
        Some(Fit {
            capabilities: app.capabilities.difference(NOT_SESSION),
            mariadb_capabilities: app.mariadb_capabilities,
            max_packet_size: app.max_packet_size,
            charset: app.charset,
            user: app.username.clone(),
            database,
            credentials: digest(creds),
        })
    }
}

/// A keyed digest of `creds` (user name and password): equal credentials give equal digests
/// in this process, and the digest tells nothing about them elsewhere.
fn digest(creds: &Credentials) -> [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("the kernel's random numbers");
        k
    });
    let mut h = Sha256::new();
    h.update(key);
    for part in [&creds.username, &creds.password] {
        match part {
            Some(s) => {
                let s = s.expose().as_bytes();
                h.update([1]);
                h.update((s.len() as u64).to_le_bytes());
                h.update(s);
            }
            None => h.update([0]),
        }
    }
    h.finalize().into()
}

/// A session that can be kept, and what the next connection needs of it.
pub struct Warm {
    pub stream: TargetStream,
    /// The server's OK to the login, told to the next application.
    pub ok: Bytes,
    /// The server's greeting when the session was opened (its connection id, version and
    /// capabilities greet the next application) and what a COM_CHANGE_USER needs.
    pub session: SessionAuth,
    pub fit: Fit,
}

/// A kept session. Dropped unused (expired, past the bounds), it says COM_QUIT first, as a
/// client leaving does, so the server does not log an aborted connection.
pub struct Parked(Option<Warm>);

impl From<Warm> for Parked {
    fn from(warm: Warm) -> Self {
        Parked(Some(warm))
    }
}

impl Parked {
    pub fn into_warm(mut self) -> Warm {
        self.0.take().expect("a parked session holds one")
    }
}

impl Keep for Parked {
    /// Open, with nothing from the server waiting (an idle session's server sends nothing; a
    /// close, a KILL's error or a TLS alert make it unusable).
    fn usable(&self) -> bool {
        let Some(warm) = &self.0 else { return false };
        let mut b = [0u8; 1];
        matches!(
            recv(
                warm.stream.tcp().as_raw_fd(),
                &mut b,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
            ),
            Err(nix::errno::Errno::EAGAIN)
        )
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(Warm {
            stream: MaybeTls::Plain(tcp),
            ..
        }) = &self.0
        {
            // Best effort; a TLS session just closes.
            let _ = tcp.try_write(&QUIT);
        }
    }
}

/// COM_QUIT, as the first packet of a command.
pub const QUIT: [u8; 5] = [1, 0, 0, 0, latch_mysql::constants::COM_QUIT];

/// After the application's COM_QUIT: has the server reset `warm` and keeps it for `key` if the
/// server confirms it is as it was opened; otherwise it is closed.
pub async fn give_back(pool: &Pool, key: kept::Key, mut warm: Warm) {
    let mut out = BytesMut::new();
    reset::encode(&warm.fit.database, &mut out);
    let work = async {
        warm.stream.write_all(&out).await.ok()?;
        warm.stream.flush().await.ok()?;
        let mut buf = BytesMut::new();
        let mut replies = Replies::default();
        loop {
            let packet = read_packet(&mut warm.stream, &mut buf).await.ok()?;
            match replies.on_packet(&packet) {
                Step::More => {}
                Step::Fit if buf.is_empty() => return Some(()),
                Step::Fit => return None,
                Step::Unfit(why) => {
                    tracing::debug!(why, "session not kept");
                    return None;
                }
            }
        }
    };
    match tokio::time::timeout(RESET_TIMEOUT, work).await {
        Ok(Some(())) => pool.put(key, warm.into()),
        _ => drop(Parked::from(warm)),
    }
}
