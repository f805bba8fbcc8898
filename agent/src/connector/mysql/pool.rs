//! Sessions kept for the next application connection of the same workload: a client that
//! opens a connection per query then costs the server no new connection and no login.
//!
//! A session is kept when the application ends it with COM_QUIT ([`super::commands`]): latch
//! asks the server to take it back to how it was opened ([`latch_mysql::reset`]: reset, the
//! database it was opened with, and an end marker, in one write) and keeps it at once, so an
//! application that reconnects straight away finds it. The replies are read when the session
//! is taken, before the next application is greeted: exactly the three, nothing after them,
//! and the connection still open, or the session is closed and the next one tried. It is handed only to a
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
    broker::workers,
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
/// session on the server: TLS toward latch, zstd (never negotiated), the
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

/// A kept session, its reset sent and its replies not read yet ([`Parked::confirm`] reads
/// them when the session is taken: by then they have long arrived, and the application that
/// quit did not wait for them). Dropped unused (expired, past the bounds), it says COM_QUIT
/// first (inside TLS when the leg is TLS), as a client leaving does, so the server does not
/// count an aborted client.
pub struct Parked {
    warm: Option<Warm>,
    /// The replies to its reset are still to be read.
    due: bool,
    /// The connection thread whose reactor has its socket: where it was parked (a session
    /// runs where its target socket is registered, [`Keep::rehome`]).
    home: Option<u64>,
}

impl Parked {
    fn new(warm: Warm, due: bool) -> Self {
        Parked {
            warm: Some(warm),
            due,
            home: workers::current(),
        }
    }

    /// The session, once the server's replies to its reset say it is as it was opened;
    /// otherwise it is closed, and why it is not had.
    async fn confirm(mut self) -> Result<Warm, Unconfirmed> {
        let mut warm = self.warm.take().ok_or(Unconfirmed::Unfit)?;
        if !self.due {
            return Ok(warm);
        }
        let work = async {
            let mut buf = BytesMut::new();
            let mut replies = Replies::default();
            loop {
                let packet = read_packet(&mut warm.stream, &mut buf).await.ok()?;
                match replies.on_packet(&packet) {
                    Step::More => {}
                    // Nothing after the replies, and not closed (a KILL after the reset).
                    Step::Fit if buf.is_empty() && waiting(&warm.stream) == Some(0) => {
                        return Some(());
                    }
                    Step::Fit => return None,
                    Step::Unfit(why) => {
                        tracing::debug!(why, "kept session not fit; closed");
                        return None;
                    }
                }
            }
        };
        let outcome = match tokio::time::timeout(RESET_TIMEOUT, work).await {
            Ok(Some(())) => return Ok(warm),
            Ok(None) => Unconfirmed::Unfit,
            Err(_) => Unconfirmed::Slow,
        };
        drop(Parked::new(warm, false));
        Err(outcome)
    }
}

/// Why a kept session was not handed out.
enum Unconfirmed {
    /// Its replies were not the expected ones, or it was closed.
    Unfit,
    /// The server did not answer its reset within [`RESET_TIMEOUT`].
    Slow,
}

impl Keep for Parked {
    /// Open: the server has not closed it (`wait_timeout`, KILL). What it sent (the replies to
    /// the reset, or a KILL's error) is read when it is taken.
    fn usable(&self) -> bool {
        let Some(warm) = &self.warm else { return false };
        match waiting(&warm.stream) {
            Some(0) => true,
            // Bytes waiting: the replies when they are due, else something unasked for.
            Some(_) => self.due,
            None => false,
        }
    }

    fn home(&self) -> Option<u64> {
        self.home
    }

    const MOVABLE: bool = true;

    fn rehome(&mut self) {
        let Some(warm) = &mut self.warm else { return };
        match warm.stream.rehome() {
            Ok(()) => self.home = workers::current(),
            // It stays usable where it is, woken through its old thread.
            Err(err) => tracing::debug!(%err, "kept session not moved to this thread"),
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        let Some(warm) = &mut self.warm else { return };
        // Best effort, without waiting. What the server sent is read first (a socket closed
        // with unread bytes is reset, not closed).
        let mut sink = [0u8; 512];
        while matches!(warm.stream.tcp().try_read(&mut sink), Ok(n) if n > 0) {}
        match &mut warm.stream {
            MaybeTls::Plain(tcp) => {
                let _ = tcp.try_write(&QUIT);
            }
            MaybeTls::Tls(tls) => {
                // COM_QUIT and close_notify as TLS records, written straight to the socket.
                let (tcp, conn) = tls.get_mut();
                let _ = std::io::Write::write_all(&mut conn.writer(), &QUIT);
                conn.send_close_notify();
                while conn.wants_write() {
                    match conn.write_tls(&mut Unwaiting(tcp)) {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
            }
        }
    }
}

/// A socket written without waiting (what does not fit now is dropped).
struct Unwaiting<'a>(&'a tokio::net::TcpStream);

impl std::io::Write for Unwaiting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether bytes wait on `stream`'s socket (`Some(1)`) or none (`Some(0)`); `None` when it is
/// closed or failed.
fn waiting(stream: &TargetStream) -> Option<usize> {
    let mut b = [0u8; 1];
    match recv(
        stream.tcp().as_raw_fd(),
        &mut b,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Err(nix::errno::Errno::EAGAIN) => Some(0),
        Ok(1) => Some(1),
        _ => None,
    }
}

/// COM_QUIT, as the first packet of a command.
pub const QUIT: [u8; 5] = [1, 0, 0, 0, latch_mysql::constants::COM_QUIT];

/// After the application's COM_QUIT: asks the server to reset `warm` and keeps it for `key`,
/// to be confirmed when taken ([`Parked::confirm`]).
pub async fn give_back(pool: &Pool, key: kept::Key, mut warm: Warm) {
    let mut out = BytesMut::new();
    reset::encode(&warm.fit.database, &mut out);
    let sent = async {
        warm.stream.write_all(&out).await?;
        warm.stream.flush().await
    };
    match tokio::time::timeout(RESET_TIMEOUT, sent).await {
        Ok(Ok(())) => pool.put(key, Parked::new(warm, true)),
        _ => drop(Parked::new(warm, false)),
    }
}

/// Keeps a session taken and confirmed but not used (it did not fit the connection it was
/// taken for).
pub fn keep_confirmed(pool: &Pool, key: kept::Key, warm: Warm) {
    pool.put(key, Parked::new(warm, false));
}

/// The most recently kept session for `key` that the server confirms fit (others met on the
/// way are closed). A server too slow to confirm one is not waited for again: the connection
/// then gets a new session, as without the pool.
pub async fn take(pool: &Pool, key: &kept::Key) -> Option<Warm> {
    while let Some(parked) = pool.take(key) {
        match parked.confirm().await {
            Ok(warm) => return Some(warm),
            Err(Unconfirmed::Unfit) => {}
            Err(Unconfirmed::Slow) => return None,
        }
    }
    None
}
