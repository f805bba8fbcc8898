//! The relay of a MySQL session, watching the application's commands: every packet passes
//! through untouched (streamed, never buffered whole) except COM_CHANGE_USER, which would hand
//! the server authentication data of the application's; latch performs the change itself with
//! the policy's credentials ([`super::change_user`]) and tells the application the outcome.
//!
//! A command starts with a packet of sequence id 0. Inside a long exchange (LOAD DATA LOCAL
//! INFILE) the application's sequence ids can wrap from 255 to 0: a 0 right after a 255 is a
//! continuation, not a command.
//!
//! A COM_QUIT ends the relay without reaching the server: the session is then given back
//! whole ([`Relayed::quit`]) for the connector to keep for the next connection, unless
//! the application changed its user, sent anything after the COM_QUIT, or the server closed.
//!
//! The server-to-application direction owns the target's read half; for a COM_CHANGE_USER the
//! other direction asks it to step aside ([`Shared::pause`]) and takes the read half for the
//! exchange. The application is waiting for the answer to its command then, so the server has
//! nothing else in flight.
use std::{
    io,
    sync::{Arc, atomic::Ordering},
};

use bytes::BytesMut;
use latch_mysql::constants::{COM_CHANGE_USER, COM_QUIT};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{Mutex, Notify},
};

use super::{
    change_user::Reauth,
    compressed::{CommandAt, Compressed, Joined, Packets, whole_frame},
    target::SessionAuth,
};

use crate::{
    connector::stream::{AppStream, MaybeTls, TargetStream},
    relay::{Progress, Transferred},
};

/// Largest COM_CHANGE_USER latch reads; a longer one ends the session.
const MAX_CHANGE_USER: usize = 64 * 1024;

/// How a relay ended.
pub struct Relayed {
    pub transferred: Transferred,
    /// The target connection, when the application ended the session with COM_QUIT as the
    /// session's only user (no COM_CHANGE_USER) and sent nothing after it. The COM_QUIT was
    /// not passed on: the connector keeps the session, or sends it.
    pub quit: Option<(TargetStream, SessionAuth)>,
}

/// How the application's direction ended.
enum Ended {
    /// Closed, or the session cannot be given back.
    Closed,
    /// COM_QUIT, last of everything the application sent, by the session's first user (what
    /// a COM_CHANGE_USER would have needed comes back).
    Quit(SessionAuth),
}

/// Relays until either side closes. `early`: bytes the application sent after its handshake
/// response, relayed first.
pub async fn relay(
    app: AppStream,
    target: TargetStream,
    early: BytesMut,
    reauth: Reauth<'_>,
    progress: &Progress,
) -> io::Result<Relayed> {
    let (transferred, quit) = match app {
        MaybeTls::Plain(tcp) => {
            let (app_r, app_w) = tcp.into_split();
            relay_halves(app_r, app_w, target, early, reauth, Mode::Packets, progress).await?
        }
        MaybeTls::Tls(tls) => {
            let (app_r, app_w) = tokio::io::split(*tls);
            relay_halves(app_r, app_w, target, early, reauth, Mode::Packets, progress).await?
        }
    };
    Ok(Relayed { transferred, quit })
}

/// As [`relay`], both legs in the compressed protocol: the frames pass as they are, each way
/// (the packets' sequence ids follow the frames', so the numbering must stay the sender's),
/// and latch decodes the application's to see its commands ([`to_target_framed`]).
/// `target_early`: what the server sent after its OK. The session is not kept: a COM_QUIT
/// goes to the server. Byte counts are of the frames.
pub async fn relay_compressed(
    app: AppStream,
    target: TargetStream,
    early: BytesMut,
    target_early: BytesMut,
    reauth: Reauth<'_>,
    progress: &Progress,
) -> io::Result<Relayed> {
    let mut app = app;
    if !target_early.is_empty() {
        app.write_all(&target_early).await?;
        progress
            .to_app
            .fetch_add(target_early.len() as u64, Ordering::Relaxed);
    }
    let (app_r, app_w) = tokio::io::split(app);
    let (transferred, _) =
        relay_halves(app_r, app_w, target, early, reauth, Mode::Framed, progress).await?;
    Ok(Relayed {
        transferred,
        quit: None,
    })
}

/// How the application's direction is watched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Plain packets; a COM_QUIT ends the relay without reaching the server, the target
    /// handed back with it, for the connector to keep.
    Packets,
    /// Compressed frames, passed on whole.
    Framed,
}

/// What both directions use.
struct Shared<R, W> {
    target_r: Mutex<R>,
    app_w: Mutex<W>,
    /// Asks the server-to-application direction to let go of `target_r`.
    pause: Notify,
}

async fn relay_halves<T: AsyncRead + AsyncWrite + Unpin>(
    app_r: impl AsyncRead + Unpin,
    app_w: impl AsyncWrite + Unpin,
    target: T,
    early: BytesMut,
    reauth: Reauth<'_>,
    mode: Mode,
    progress: &Progress,
) -> io::Result<(Transferred, Option<(T, SessionAuth)>)> {
    let (target_r, mut target_w) = tokio::io::split(target);
    let shared = Arc::new(Shared {
        target_r: Mutex::new(target_r),
        app_w: Mutex::new(app_w),
        pause: Notify::new(),
    });
    let ended = {
        let down = to_app(&shared, progress);
        // Either direction ending ends the session (a client's COM_QUIT closes both).
        match mode {
            Mode::Packets => {
                let up = to_target(app_r, &mut target_w, early, &shared, reauth, progress);
                tokio::select! {
                    r = up => r?,
                    r = down => { r?; Ended::Closed }
                }
            }
            Mode::Framed => {
                let up = to_target_framed(app_r, &mut target_w, early, &shared, reauth, progress);
                tokio::select! {
                    r = up => r?,
                    r = down => { r?; Ended::Closed }
                }
            }
        }
    };
    // Both directions are gone: the application's halves close here, at once, as the server
    // closes after COM_QUIT; the target's are joined again for the connector to keep.
    let quit = match (ended, Arc::try_unwrap(shared)) {
        (Ended::Quit(session), Ok(shared)) => {
            // As the server closes: a TLS application is told close_notify first.
            let _ = shared.app_w.into_inner().shutdown().await;
            Some((shared.target_r.into_inner().unsplit(target_w), session))
        }
        _ => None,
    };
    let transferred = Transferred {
        to_target: progress.to_target.load(Ordering::Relaxed),
        to_app: progress.to_app.load(Ordering::Relaxed),
    };
    Ok((transferred, quit))
}

async fn to_app(
    shared: &Shared<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>,
    progress: &Progress,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut target = shared.target_r.lock().await;
        // `read` is cancel safe: a pause loses no bytes.
        let n = tokio::select! {
            n = target.read(&mut buf) => n?,
            () = shared.pause.notified() => {
                // The mutex is fair: the waiting COM_CHANGE_USER exchange gets it first.
                drop(target);
                continue;
            }
        };
        drop(target);
        let mut app = shared.app_w.lock().await;
        if n == 0 {
            return app.shutdown().await;
        }
        app.write_all(&buf[..n]).await?;
        // A TLS leg may keep records buffered until flushed.
        app.flush().await?;
        progress.to_app.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn to_target(
    mut app: impl AsyncRead + Unpin,
    target: &mut (impl AsyncWrite + Unpin),
    mut buf: BytesMut,
    shared: &Shared<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>,
    mut reauth: Reauth<'_>,
    progress: &Progress,
) -> io::Result<Ended> {
    // The sequence id of the application's last packet.
    let mut last_seq = None::<u8>;
    // A COM_CHANGE_USER made the session another user's.
    let mut changed = false;
    // Bytes of the current chunk still to pass on.
    let mut pass = 0usize;
    loop {
        if pass > 0 {
            if buf.is_empty() && fill(&mut app, &mut buf, target).await? == 0 {
                target.shutdown().await?;
                return Ok(Ended::Closed);
            }
            let n = pass.min(buf.len());
            let chunk = buf.split_to(n);
            target.write_all(&chunk).await?;
            progress.to_target.fetch_add(n as u64, Ordering::Relaxed);
            pass -= n;
            continue;
        }
        // A packet header, and the first payload byte of a command.
        loop {
            let empty = buf.len() >= 4 && buf[..3] == [0, 0, 0];
            if buf.len() >= 5 || empty {
                break;
            }
            if fill(&mut app, &mut buf, target).await? == 0 {
                if !buf.is_empty() {
                    target.write_all(&buf).await?;
                }
                target.shutdown().await?;
                return Ok(Ended::Closed);
            }
        }
        let len = usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16;
        let seq = buf[3];
        let command = seq == 0 && last_seq != Some(255);
        last_seq = Some(seq);
        if command && len == 1 && buf[4] == COM_QUIT && buf.len() == 5 && !changed {
            // Not passed on (nor counted): the connector passes it on unless it keeps the
            // session.
            return Ok(Ended::Quit(reauth.session));
        }
        if command && len > 0 && buf[4] == COM_CHANGE_USER {
            if len > MAX_CHANGE_USER {
                return Err(io::Error::other("oversized COM_CHANGE_USER"));
            }
            while buf.len() < 4 + len {
                if fill(&mut app, &mut buf, target).await? == 0 {
                    target.shutdown().await?;
                    return Ok(Ended::Closed);
                }
            }
            changed = true;
            // The application's credentials go nowhere: read, wiped and dropped.
            let mut packet = buf.split_to(4 + len);
            shared.pause.notify_one();
            let mut target_r = shared.target_r.lock().await;
            let outcome = reauth.run(&packet[4..], &mut *target_r, target).await;
            drop(target_r);
            let out = change_user_done(&mut packet, outcome)?;
            tell_app(shared, &out, progress).await?;
            continue;
        }
        pass = 4 + len;
    }
}

/// The application's direction in the compressed protocol: each frame is read whole,
/// decoded to find the commands in it, and passed on as it came, except a frame holding a
/// COM_CHANGE_USER, which latch performs itself (the frame must hold that packet alone; a
/// COM_CHANGE_USER anywhere else ends the session). A frame is at most 16 MiB of what the
/// application sent; what it inflates to is looked at 64 KiB at a time.
async fn to_target_framed(
    mut app: impl AsyncRead + Unpin,
    target: &mut (impl AsyncWrite + Unpin),
    mut raw: BytesMut,
    shared: &Shared<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>,
    mut reauth: Reauth<'_>,
    progress: &Progress,
) -> io::Result<Ended> {
    let mut packets = Packets::default();
    loop {
        let Some(len) = whole_frame(&raw) else {
            if fill(&mut app, &mut raw, target).await? == 0 {
                if !raw.is_empty() {
                    target.write_all(&raw).await?;
                }
                target.shutdown().await?;
                return Ok(Ended::Closed);
            }
            continue;
        };
        let frame = raw.split_to(len);
        let seq = frame[3];
        let mut reader = latch_mysql::compress::FrameReader::default();
        let (mut input, mut offset) = (&frame[..], 0usize);
        let mut plain = BytesMut::new();
        let mut change_user = None::<BytesMut>;
        let mut elsewhere = false;
        loop {
            plain.clear();
            let read = reader
                .read(input, &mut plain, 64 * 1024)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            input = &input[read.used..];
            if read.used == 0 && plain.is_empty() {
                break;
            }
            if let Some(held) = &mut change_user {
                held.extend_from_slice(&plain);
                if held.len() > 4 + MAX_CHANGE_USER {
                    return Err(io::Error::other("oversized COM_CHANGE_USER"));
                }
            }
            packets.feed(&plain, offset, &mut |c: CommandAt| {
                if c.command == COM_CHANGE_USER {
                    match c.offset {
                        0 => change_user = Some(BytesMut::new()),
                        _ => elsewhere = true,
                    }
                }
            });
            if offset == 0
                && let Some(held) = &mut change_user
                && held.is_empty()
            {
                held.extend_from_slice(&plain);
            }
            offset += plain.len();
        }
        if elsewhere {
            return Err(io::Error::other(
                "a COM_CHANGE_USER inside a compressed frame",
            ));
        }
        let Some(mut packet) = change_user else {
            target.write_all(&frame).await?;
            progress
                .to_target
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            continue;
        };
        let body =
            usize::from(packet[0]) | usize::from(packet[1]) << 8 | usize::from(packet[2]) << 16;
        if packet.len() != 4 + body {
            return Err(io::Error::other(
                "a COM_CHANGE_USER frame does not hold the command alone",
            ));
        }
        // The application's credentials go nowhere: read, wiped and dropped. The exchange
        // with the server is latch's own, in frames of its own numbering.
        target.flush().await?;
        shared.pause.notify_one();
        let mut target_r = shared.target_r.lock().await;
        let outcome = {
            let mut leg = Compressed::new(Joined {
                r: &mut *target_r,
                w: &mut *target,
            });
            let (mut r, mut w) = tokio::io::split(&mut leg);
            reauth.run(&packet[4..], &mut r, &mut w).await
        };
        drop(target_r);
        let out = change_user_done(&mut packet, outcome)?;
        // The answer, in the frame after the application's.
        let mut framed = BytesMut::new();
        latch_mysql::compress::encode(
            seq.wrapping_add(1),
            latch_mysql::compress::Compression::fast(),
            &out,
            &mut framed,
        );
        tell_app(shared, &framed, progress).await?;
    }
}

/// The application's COM_CHANGE_USER packet wiped, and latch's answer to it, or the failure
/// that ends the session.
fn change_user_done(
    packet: &mut BytesMut,
    outcome: Result<BytesMut, super::Failure>,
) -> io::Result<BytesMut> {
    packet.iter_mut().for_each(|b| *b = 0);
    outcome.map_err(|failure| {
        tracing::warn!(error = %failure, "COM_CHANGE_USER failed on the target; ending the session");
        io::Error::other(failure)
    })
}

/// Writes latch's own answer to the application (between the server's replies: the
/// application waits for this one).
async fn tell_app(
    shared: &Shared<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>,
    bytes: &[u8],
    progress: &Progress,
) -> io::Result<()> {
    let mut app = shared.app_w.lock().await;
    app.write_all(bytes).await?;
    app.flush().await?;
    progress
        .to_app
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Reads more of the application's bytes into `buf`, after flushing `target`: what was written
/// to a TLS leg may sit in its buffer (the socket was full) until flushed, and the server would
/// wait for the rest of a command while the application waits for the answer.
async fn fill(
    app: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    target: &mut (impl AsyncWrite + Unpin),
) -> io::Result<usize> {
    target.flush().await?;
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 * 1024);
    }
    app.read_buf(buf).await
}
