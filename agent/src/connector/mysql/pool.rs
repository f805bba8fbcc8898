//! Sessions kept for the next application connection of the same workload: a client that
//! opens a connection per query then costs the server no new connection and no login.
//!
//! A session is kept when the application ends it with COM_QUIT ([`super::commands`]): latch
//! asks the server to take it back to how it was opened ([`latch_mysql::reset`]: reset, the
//! database it was opened with, and an end marker, in one write) and keeps it at once, so an
//! application that reconnects straight away finds it. The replies are read when the session
//! is taken: exactly the three, nothing after them, and the connection still open, or the
//! session is closed and the next one tried. Those that have not come yet (an application
//! that reconnects at once finds the server still at its reset) are read after the application
//! has answered its greeting, so the server's reset and the application's handshake overlap;
//! a session found unfit only then (ended in that moment) is replaced by a new login, whose
//! connection id differs from the greeting's. It is handed only to a
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
use std::{sync::OnceLock, time::Duration};

use bytes::{Bytes, BytesMut};
use latch_mysql::{
    CapabilityFlags, HandshakeResponse, MariadbCapabilities,
    reset::{self, Replies, Step},
};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::{io::read_packet, target::SessionAuth};
use crate::{
    broker::workers,
    connector::{
        kept::{self, Keep},
        stream::{MaybeTls, TargetStream, peek_now},
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

    /// Reads what the server has already sent in reply to the reset, without waiting: a
    /// session whose replies all arrived is confirmed (or found unfit: a KILL, a timeout, an
    /// unexpected reply) on the spot; one whose server is still at its reset is handed out
    /// with the rest to be read ([`Taken::confirm`]), while its next application is greeted.
    async fn take_now(mut self) -> Option<Taken> {
        let warm = self.warm.take()?;
        let mut taken = Taken {
            warm,
            confirming: self.due.then(|| (Replies::default(), BytesMut::new())),
        };
        let mut read = taken.read_ready();
        if matches!(read, Some(Read::Pending)) && waiting(&taken.warm.stream) == Some(1) {
            // Bytes the reactor has not reported yet (a session that just moved to this
            // thread): one turn of it, and they are read now, a KILL's error and close with
            // them.
            tokio::task::yield_now().await;
            read = taken.read_ready();
        }
        match read {
            Some(Read::Done) | Some(Read::Pending) => Some(taken),
            None => {
                drop(Parked::new(taken.warm, false));
                None
            }
        }
    }
}

/// A session taken from the pool, its reset perhaps still to be confirmed.
pub struct Taken {
    warm: Warm,
    /// The replies read so far and the bytes after them, while some are due.
    confirming: Option<(Replies, BytesMut)>,
}

/// What reading the replies to the reset found.
enum Read {
    /// All three, nothing after them, the session open.
    Done,
    /// More are on their way.
    Pending,
}

impl Taken {
    /// The session, as the next application will be told of it (its greeting, its fit).
    pub fn warm(&self) -> &Warm {
        &self.warm
    }

    /// Reads the replies that have arrived. `None`: the session is unfit (logged).
    fn read_ready(&mut self) -> Option<Read> {
        let Some((replies, buf)) = &mut self.confirming else {
            return Some(Read::Done);
        };
        loop {
            let packet = {
                // The read future holds nothing of its own (bytes go to `buf`): polled once,
                // with nobody to wake, it either has a packet or leaves what it read in `buf`.
                let mut read = std::pin::pin!(read_packet(&mut self.warm.stream, buf));
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match read.as_mut().poll(&mut cx) {
                    std::task::Poll::Pending => return Some(Read::Pending),
                    std::task::Poll::Ready(Ok(p)) => p,
                    std::task::Poll::Ready(Err(_)) => return None,
                }
            };
            match replies.on_packet(&packet) {
                Step::More => {}
                // Nothing after the replies, and not closed (a KILL after the reset).
                Step::Fit if buf.is_empty() && waiting(&self.warm.stream) == Some(0) => break,
                Step::Fit => return None,
                Step::Unfit(why) => {
                    tracing::debug!(why, "kept session not fit; closed");
                    return None;
                }
            }
        }
        self.confirming = None;
        Some(Read::Done)
    }

    /// The session, once the server's replies to its reset say it is as it was opened;
    /// otherwise it is closed, and why it is not had.
    pub async fn confirm(mut self) -> Result<Warm, Unconfirmed> {
        let work = async {
            loop {
                match self.read_ready()? {
                    Read::Done => return Some(()),
                    Read::Pending => {
                        let readable = self.warm.stream.tcp().readable().await;
                        readable.ok()?;
                    }
                }
            }
        };
        let outcome = match tokio::time::timeout(RESET_TIMEOUT, work).await {
            Ok(Some(())) => return Ok(self.warm),
            Ok(None) => Unconfirmed::Unfit,
            Err(_) => Unconfirmed::Slow,
        };
        drop(Parked::new(self.warm, false));
        Err(outcome)
    }
}

/// Why a kept session was not handed out.
pub enum Unconfirmed {
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
    match peek_now(stream.tcp(), &mut [0u8; 1]) {
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

/// The most recently kept session for `key` that is not found unfit by what the server has
/// sent so far (others met on the way are closed). Its reset may still be under way: confirm
/// it ([`Taken::confirm`]) before it is used, after greeting the application, so the server's
/// reset and the application's handshake overlap.
pub async fn take(pool: &Pool, key: &kept::Key) -> Option<Taken> {
    while let Some(parked) = pool.take(key) {
        if let Some(taken) = parked.take_now().await {
            return Some(taken);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use latch_mysql::{Greeting, MariadbCapabilities, StatusFlags, Transport, frame};
    use tokio::{io::AsyncWriteExt as _, net::TcpStream};

    use super::*;

    /// A kept session over loopback: latch's end, and the server's.
    async fn parked() -> (Parked, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let greeting = Greeting {
            server_version: b"10.11.19-MariaDB".to_vec(),
            connection_id: 42,
            scramble: vec![7; 20],
            capabilities: CapabilityFlags::CLIENT_PROTOCOL_41,
            mariadb_capabilities: MariadbCapabilities::empty(),
            charset: 45,
            status: StatusFlags::empty(),
            auth_plugin: None,
        };
        let warm = Warm {
            stream: MaybeTls::Plain(ours),
            ok: Bytes::from_static(&[7, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0]),
            session: SessionAuth {
                greeting,
                caps: CapabilityFlags::CLIENT_PROTOCOL_41,
                transport: Transport::Plain,
            },
            fit: Fit {
                capabilities: CapabilityFlags::CLIENT_PROTOCOL_41,
                mariadb_capabilities: MariadbCapabilities::empty(),
                max_packet_size: 1 << 24,
                charset: 45,
                user: b"app".to_vec(),
                database: b"orders".to_vec(),
                credentials: [0; 32],
            },
        };
        (Parked::new(warm, true), server)
    }

    /// The server's three replies to the reset, as MariaDB sends them.
    fn replies() -> BytesMut {
        let mut out = BytesMut::new();
        frame::encode(&[0, 0, 0, 2, 0, 0, 0], 1, &mut out);
        frame::encode(&[0, 0, 0, 2, 0, 0, 0], 1, &mut out);
        frame::encode(b"Uptime: 140  Threads: 8  Questions: 9", 1, &mut out);
        out
    }

    #[tokio::test]
    async fn replies_that_have_arrived_confirm_the_session_when_it_is_taken() {
        let (parked, mut server) = parked().await;
        server.write_all(&replies()).await.unwrap();
        // Taken before the reactor has reported them (as when the session just moved to
        // this thread).
        let taken = parked.take_now().await.expect("fit");
        assert!(taken.confirming.is_none(), "confirmed on the spot");
        let warm = taken.confirm().await.ok().expect("fit");
        assert_eq!(warm.session.greeting.connection_id, 42);
    }

    #[tokio::test]
    async fn a_session_whose_reset_is_under_way_is_taken_and_confirmed_when_its_replies_come() {
        let (parked, mut server) = parked().await;
        // The first reply is here, the others are not yet: taken all the same.
        let all = replies();
        let first = frame::parse(&mut all.clone(), 1 << 20).unwrap().unwrap();
        let first_len = 4 + first.payload.len();
        server.write_all(&all[..first_len]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let taken = parked
            .take_now()
            .await
            .expect("taken while its reset is under way");
        assert!(taken.confirming.is_some());
        let rest = all[first_len..].to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.write_all(&rest).await.unwrap();
            // Held open until the session is confirmed.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert!(taken.confirm().await.is_ok());
    }

    #[tokio::test]
    async fn a_session_the_server_ended_after_its_reset_is_not_taken() {
        let (parked, mut server) = parked().await;
        let mut wire = replies();
        // A KILL: the server's error, then it closes.
        frame::encode(
            &[0xFF, 0x47, 0x07, b'#', b'7', b'0', b'1', b'0', b'0'],
            0,
            &mut wire,
        );
        server.write_all(&wire).await.unwrap();
        drop(server);
        assert!(parked.take_now().await.is_none());
    }

    #[tokio::test]
    async fn a_reply_that_is_not_the_resets_makes_the_taken_session_unfit() {
        let (parked, mut server) = parked().await;
        let taken = parked.take_now().await.expect("nothing has come yet");
        let mut wire = BytesMut::new();
        frame::encode(
            &[0xFF, 0x28, 0x04, b'#', b'0', b'8', b'S', b'0', b'1'],
            1,
            &mut wire,
        );
        server.write_all(&wire).await.unwrap();
        assert!(matches!(taken.confirm().await, Err(Unconfirmed::Unfit)));
    }
}
