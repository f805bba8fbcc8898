//! The lobby: every direct-mode application's messages before the hand-over, each behind a
//! header naming its socket; one task per connection, started by its first message.
//!
//! A header's length is the size of the application's send, which the application chooses:
//! the lobby never reserves room for it. It reads at most [`LOBBY_BUF`] at a time and passes a
//! message on in pieces as its bytes arrive ([`Framer`]); each connection's task gets at most
//! [`MAX_FROM_APP`] (and one piece) before the rest is dropped.
use std::sync::Arc;

use bytes::{Buf as _, Bytes, BytesMut};
use latch_common::direct::{HEADER_LEN, Header, KIND_SKB, SKB_HEAD_LEN, SkbHeader};
use tokio::{io::AsyncReadExt as _, net::TcpStream, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::{Direct, MAX_FROM_APP, Session};
use crate::{
    audit,
    broker::{
        Shared,
        admit::{self, Admitted, Unrecorded, Verdict, ms},
    },
    config::Protocol,
    connector::{
        ConnectError,
        mysql::{self as my, direct as my_direct},
        postgres::{
            Failure,
            direct::{self as pg_direct, Ended, Leg},
        },
        refuse::Refusal,
    },
    metrics::{Outcome, RefusedReason},
};

/// What one read of the lobby may bring, and about all the lobby's buffer ever reserves.
const LOBBY_BUF: usize = 64 * 1024;

/// Reads the lobby until `stop` fires: each message goes to its connection's task; the first
/// message of a connection starts one. Sessions count in `tracker` (the drain waits for them)
/// and end when `abort` fires.
pub async fn run_lobby(
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
    abort: CancellationToken,
) {
    let Some(direct) = shared.direct.clone() else {
        return;
    };
    let Some(lobby) = direct
        .lobby
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return;
    };
    let lobby = match lobby
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(lobby))
    {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%err, "direct mode: cannot read the lobby");
            return;
        }
    };
    tokio::spawn(release_closed(direct.clone(), stop.clone()));
    let mut lobby = lobby;
    let mut buf = BytesMut::with_capacity(LOBBY_BUF);
    let mut framer = Framer::default();
    let run = Run { tracker, abort };
    loop {
        while let Some(piece) = framer.next(&mut buf) {
            dispatch(&direct, &shared, &run, piece);
        }
        // What is left is less than a header: room for one more read, whatever the
        // application announced.
        buf.reserve(LOBBY_BUF);
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            n = lobby.read_buf(&mut buf) => n,
        };
        match n {
            Ok(0) | Err(_) => {
                tracing::error!("direct mode: the lobby closed");
                return;
            }
            Ok(_) => {}
        }
    }
}

/// Gives back the workload slots of handed-over connections whose sockets closed.
async fn release_closed(direct: Arc<Direct>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(super::RELEASE_EVERY) => {}
        }
        direct.release_closed();
    }
}

/// What every session is run under: the broker's drain and its abort.
struct Run {
    tracker: TaskTracker,
    abort: CancellationToken,
}

/// Part of an application's message, as the lobby passes it on.
#[derive(Debug)]
pub(super) struct Piece {
    /// The header of the message it belongs to.
    pub header: Header,
    pub body: Bytes,
    /// The message's first piece: only a first piece may start a connection's task.
    pub first: bool,
}

/// Splits the lobby's stream into pieces of messages, passing on what has arrived of a message
/// without waiting (or reserving room) for the rest of it. Sans-IO: feed it the buffer the
/// lobby reads into.
#[derive(Debug, Default)]
pub(super) struct Framer {
    current: Option<Current>,
}

#[derive(Debug)]
struct Current {
    header: Header,
    /// Bytes of the message still to come.
    left: usize,
    /// A piece of it was passed on.
    started: bool,
}

impl Framer {
    /// The next piece in `buf`, or `None` until more bytes arrive. Never reserves room in
    /// `buf`.
    pub(super) fn next(&mut self, buf: &mut BytesMut) -> Option<Piece> {
        if self.current.is_none() {
            if buf.len() < SKB_HEAD_LEN {
                return None;
            }
            // SAFETY: SkbHeader is plain integers; the buffer holds at least SKB_HEAD_LEN bytes.
            let head: SkbHeader = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
            let header = if head.kind == KIND_SKB {
                // Bytes a server-first application socket received: the header took the place
                // of their first bytes (the dispatcher puts those back), and names no 4-tuple.
                buf.advance(SKB_HEAD_LEN);
                Header {
                    len: head.len.saturating_sub(SKB_HEAD_LEN as u32),
                    kind: KIND_SKB,
                    cookie: head.cookie,
                    key: Default::default(),
                }
            } else {
                if buf.len() < HEADER_LEN {
                    return None;
                }
                // SAFETY: Header is plain integers; the buffer holds at least HEADER_LEN bytes.
                let header: Header = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
                buf.advance(HEADER_LEN);
                header
            };
            self.current = Some(Current {
                header,
                left: header.len as usize,
                started: false,
            });
        }
        let cur = self.current.as_mut()?;
        let n = cur.left.min(buf.len());
        if n == 0 && cur.left > 0 {
            return None;
        }
        let first = !std::mem::replace(&mut cur.started, true);
        cur.left -= n;
        let header = cur.header;
        if cur.left == 0 {
            self.current = None;
        }
        Some(Piece {
            header,
            body: buf.split_to(n).freeze(),
            first,
        })
    }
}

fn dispatch(direct: &Arc<Direct>, shared: &Arc<Shared>, run: &Run, piece: Piece) {
    let Piece {
        mut header,
        mut body,
        first,
    } = piece;
    // The server's first bytes (MySQL's greeting): what the header replaced, and the socket's
    // 4-tuple, are in LATCH_DIR_FIRST.
    let server_first = header.kind == KIND_SKB;
    if server_first && first {
        let Some(saved) = direct.maps.first(header.cookie) else {
            tracing::warn!("direct mode: received bytes of a socket latch does not know");
            return;
        };
        header.key = saved.key;
        let mut whole = BytesMut::with_capacity(SKB_HEAD_LEN + body.len());
        whole.extend_from_slice(&saved.head);
        whole.extend_from_slice(&body);
        body = whole.freeze();
    }
    let mut sessions = direct.sessions.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = sessions.get_mut(&header.cookie) {
        if s.bytes > MAX_FROM_APP {
            return;
        }
        s.bytes += body.len();
        // The task may be ending: the message is dropped then.
        let _ = s.tx.send(body);
        return;
    }
    if !first {
        // The rest of a message whose connection's task has ended.
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let bytes = body.len();
    let _ = tx.send(body);
    sessions.insert(header.cookie, Session { tx, bytes });
    // The kernel record and the CPU are read without holding up the other sessions.
    drop(sessions);
    let (direct, shared) = (direct.clone(), shared.clone());
    // The session runs on the startup thread of the CPU the application's thread last ran on
    // (`threads.rs` says why). The record must be the one the socket named in the header made
    // (a later socket with the same 4-tuple in the same namespace replaces it).
    let meta = shared
        .conns
        .take_key(&header.key)
        .map(|m| m.filter(|m| m.socket_cookie == header.cookie));
    let main = tokio::runtime::Handle::current();
    // The drain waits for the session; past the grace period it is cut.
    let (in_drain, abort) = (run.tracker.token(), run.abort.clone());
    let Ok(permit) = direct.startups.clone().try_acquire_owned() else {
        // Too many startups at once: refuse this one without a thread (it reads the startup,
        // then answers 53300 on the agent's runtime).
        tokio::spawn(async move {
            let _in_drain = in_drain;
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = handle(&direct, &shared, main, header, meta, rx, true, server_first) => {}
            }
            direct
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&header.cookie);
        });
        return;
    };
    let cpu = match &meta {
        // Where the application's thread connected (the kernel's record), or, in a record an
        // older agent's programs made, where it last ran.
        Ok(Some(m)) => m
            .cpu
            .checked_sub(1)
            .map(|c| c as usize)
            .or_else(|| super::cpu_of(m.pid, m.tid)),
        _ => None,
    };
    let on = direct.threads.on(cpu).unwrap_or_else(|| main.clone());
    on.spawn(async move {
        let (_permit, _in_drain) = (permit, in_drain);
        tokio::select! {
            _ = abort.cancelled() => {}
            _ = handle(&direct, &shared, main, header, meta, rx, false, server_first) => {}
        }
        direct
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&header.cookie);
    });
}

/// Admission and the connector for one direct-mode connection. `server_first`: its first
/// message is what the server sent (MySQL's greeting), not the application.
#[allow(clippy::too_many_arguments)]
async fn handle(
    direct: &Direct,
    shared: &Arc<Shared>,
    main: tokio::runtime::Handle,
    header: Header,
    meta: Result<Option<latch_common::ConnMeta>, aya::maps::MapError>,
    from_app: mpsc::UnboundedReceiver<Bytes>,
    busy: bool,
    server_first: bool,
) {
    let id = shared.next_conn_id();
    let unrecorded = || {
        let (peer, local) = crate::ebpf::tuple_addrs(&header.key);
        Unrecorded {
            destination: local.to_string(),
            peer: peer.to_string(),
            reset: false,
        }
    };
    let Some(mut admitted) = admit::admit(shared, id, meta, None, unrecorded, true).await else {
        // Not latch's to serve: the kernel path goes on without it.
        let _ = direct.maps.remove_socket(header.cookie);
        direct.maps.forget(&header.key, header.cookie);
        return;
    };
    if busy && admitted.verdict == Verdict::Admit {
        admitted.refuse(
            shared,
            Refusal::Busy {
                max: direct.startups_max(),
            },
            RefusedReason::capacity,
        );
    }
    let span = admitted.span.clone();
    serve(
        direct,
        shared,
        main,
        header,
        from_app,
        admitted,
        server_first,
    )
    .instrument(span)
    .await;
}

async fn serve(
    direct: &Direct,
    shared: &Arc<Shared>,
    main: tokio::runtime::Handle,
    header: Header,
    from_app: mpsc::UnboundedReceiver<Bytes>,
    mut admitted: Admitted,
    server_first: bool,
) {
    let mysql = admitted.policy.protocol == Protocol::Mysql;
    if mysql != server_first {
        // The rule changed between the connect and now: the kernel and the policy disagree on
        // who speaks first. Nothing sensible can be said; the connection is left alone.
        tracing::warn!("direct mode: the policy's protocol changed under a connection");
        admitted.record.outcome = audit::Outcome::Failed;
        admitted.record.reason = Some("direct mode: the policy changed during the startup".into());
        direct.maps.forget(&header.key, header.cookie);
        let _ = direct.maps.remove_socket(header.cookie);
        admitted.audit(shared);
        return;
    }
    let (side, side_peer) = match direct.side(header.cookie) {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(%err, "direct mode: no broker socket for the connection");
            admitted.record.outcome = audit::Outcome::Failed;
            admitted.record.reason = Some(format!("direct mode: no broker socket: {err}"));
            admitted.audit(shared);
            return;
        }
    };
    let (deadline, timeout) = admitted.handshake_deadline(shared);
    let mut leg = Leg {
        direct,
        cookie: header.cookie,
        key: header.key,
        pid: admitted.origin.pid,
        tid: admitted.origin.tid,
        from_app,
        side,
        main,
        shared: shared.clone(),
        deadline,
        watched: false,
    };
    let (origin, policy) = (admitted.origin.clone(), admitted.policy.clone());
    // The outcome: how it ended, or (whether it timed out, the audit's reason).
    let result: Result<Ended, (bool, String)> = if mysql {
        let refusal = match admitted.verdict {
            Verdict::Admit => None,
            // Admission never lets a direct-mode connection through (it denies it instead).
            Verdict::Deny | Verdict::Bypass => Some(my::Failure::Denied),
            Verdict::Refuse(why) => Some(my::Failure::Limit(why)),
        };
        let mut app = my::refusal::AppLeg::default();
        let until = leg.deadline;
        let run = my_direct::serve(&mut leg, &origin, &policy, refusal, &mut app);
        let result = match tokio::time::timeout_at(until, run).await {
            Ok(r) => r,
            Err(_) => Err(my::Failure::Limit(Refusal::HandshakeTimeout(timeout))),
        };
        match result {
            Ok(e) => Ok(e),
            Err(f) => {
                my_direct::refuse(&mut leg, &policy, admitted.id, app, &f).await;
                let timed_out = matches!(f, my::Failure::Limit(Refusal::HandshakeTimeout(_)));
                let reason = match &f {
                    my::Failure::Limit(Refusal::HandshakeTimeout(t)) => {
                        ConnectError::HandshakeTimeout(*t).to_string()
                    }
                    f => f.to_string(),
                };
                Err((timed_out, reason))
            }
        }
    } else {
        let refusal = match admitted.verdict {
            Verdict::Admit => None,
            Verdict::Deny | Verdict::Bypass => Some(Failure::Denied),
            Verdict::Refuse(why) => Some(Failure::Limit(why)),
        };
        let result = match tokio::time::timeout_at(
            leg.deadline,
            pg_direct::serve(&mut leg, &origin, &policy, refusal),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Failure::Limit(Refusal::HandshakeTimeout(timeout))),
        };
        match result {
            Ok(e) => Ok(e),
            Err(f) => {
                pg_direct::refuse(&mut leg, &policy, admitted.id, &f).await;
                let timed_out = matches!(f, Failure::Limit(Refusal::HandshakeTimeout(_)));
                let reason = match &f {
                    // Worded as the relay's audit records word it.
                    Failure::Limit(Refusal::HandshakeTimeout(t)) => {
                        ConnectError::HandshakeTimeout(*t).to_string()
                    }
                    f => f.to_string(),
                };
                Err((timed_out, reason))
            }
        }
    };
    let started = admitted.started;
    match result {
        Ok(ended) => {
            shared.metrics.connection(&policy.name, Outcome::relayed);
            admitted.record.handshake_ms = Some(ms(started.elapsed()));
            tracing::info!(
                ?ended,
                ms = started.elapsed().as_millis() as u64,
                "handed over"
            );
            if ended == Ended::HandedOver {
                shared.metrics.direct.inc();
                // The session is the kernel's now, but still this workload's connection: its
                // slot is held until the application's socket closes.
                if let Some(slot) = admitted.slot.take()
                    && leg.watched
                {
                    direct.hold_until_closed(header.cookie, slot);
                }
            }
        }
        Err((timed_out, reason)) => {
            if admitted.record.outcome == audit::Outcome::Relayed {
                admitted.record.outcome = audit::Outcome::Failed;
                shared.metrics.connection(
                    &policy.name,
                    if timed_out {
                        Outcome::timed_out
                    } else {
                        Outcome::failed
                    },
                );
                crate::warn_throttled!(err = %reason, "direct-mode startup failed");
                admitted.record.reason = Some(reason);
            }
        }
    }
    direct.end_side(header.cookie, leg.side, side_peer);
    // The session is over: whatever its socket's entries say is stale (handed over, refused,
    // or the application closed it while they were being rewritten). This used to ask the
    // sock map whether the socket was still there, which user space cannot read from a map
    // whose values are 4 bytes wide (the kernel answers ENOSPC): it always forgot.
    direct.maps.forget(&header.key, header.cookie);
    admitted.audit(shared);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cookie: u64, len: u32) -> Vec<u8> {
        let h = Header {
            cookie,
            len,
            kind: latch_common::direct::KIND_MSG,
            ..Header::default()
        };
        // SAFETY: Header is repr(C) plain integers with explicit padding.
        unsafe { std::slice::from_raw_parts((&h as *const Header).cast::<u8>(), HEADER_LEN) }
            .to_vec()
    }

    #[test]
    fn an_announced_message_length_reserves_nothing_in_the_lobby() {
        // A header announcing 256 MiB, then what the application did send.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&header(7, 256 << 20));
        buf.extend_from_slice(&[b'x'; 100]);
        let mut framer = Framer::default();
        let piece = framer.next(&mut buf).expect("what arrived is passed on");
        assert_eq!((piece.header.cookie, piece.first), (7, true));
        assert_eq!(&piece.body[..], &[b'x'; 100]);
        assert!(framer.next(&mut buf).is_none());
        assert!(
            buf.capacity() < 1 << 20,
            "reserved {} bytes",
            buf.capacity()
        );
        // More of it: a later piece, which cannot start a task of its own.
        buf.extend_from_slice(&[b'y'; 50]);
        let piece = framer.next(&mut buf).unwrap();
        assert_eq!((piece.body.len(), piece.first), (50, false));
        assert!(
            buf.capacity() < 1 << 20,
            "reserved {} bytes",
            buf.capacity()
        );
    }

    #[test]
    fn received_bytes_behind_a_short_header_are_framed_by_their_own_length() {
        // A server's greeting of 40 bytes whose first 16 a header replaced, then a message.
        let skb = latch_common::direct::SkbHeader {
            len: 40,
            kind: KIND_SKB,
            cookie: 9,
        };
        let mut buf = BytesMut::new();
        // SAFETY: SkbHeader is repr(C) plain integers without padding.
        buf.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                (&skb as *const latch_common::direct::SkbHeader).cast::<u8>(),
                SKB_HEAD_LEN,
            )
        });
        buf.extend_from_slice(&[b'g'; 24]);
        buf.extend_from_slice(&header(4, 2));
        buf.extend_from_slice(b"hi");
        let mut framer = Framer::default();
        let p = framer.next(&mut buf).unwrap();
        assert_eq!(
            (p.header.kind, p.header.cookie, p.body.len(), p.first),
            (KIND_SKB, 9, 24, true)
        );
        let p = framer.next(&mut buf).unwrap();
        assert_eq!((p.header.cookie, &p.body[..]), (4, &b"hi"[..]));
        assert!(framer.next(&mut buf).is_none());
    }

    #[test]
    fn messages_are_passed_on_whole_or_in_pieces_in_order() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&header(1, 5));
        buf.extend_from_slice(b"hel");
        let mut framer = Framer::default();
        let p = framer.next(&mut buf).unwrap();
        assert_eq!((&p.body[..], p.first), (&b"hel"[..], true));
        assert!(framer.next(&mut buf).is_none());
        // the end of the first message, an empty one and half a header
        buf.extend_from_slice(b"lo");
        buf.extend_from_slice(&header(2, 0));
        buf.extend_from_slice(&header(3, 4)[..HEADER_LEN / 2]);
        let p = framer.next(&mut buf).unwrap();
        assert_eq!(
            (&p.body[..], p.first, p.header.cookie),
            (&b"lo"[..], false, 1)
        );
        let p = framer.next(&mut buf).unwrap();
        assert_eq!((p.body.len(), p.first, p.header.cookie), (0, true, 2));
        assert!(framer.next(&mut buf).is_none());
        buf.extend_from_slice(&header(3, 4)[HEADER_LEN / 2..]);
        buf.extend_from_slice(b"abcd");
        let p = framer.next(&mut buf).unwrap();
        assert_eq!(
            (&p.body[..], p.first, p.header.cookie),
            (&b"abcd"[..], true, 3)
        );
        assert!(framer.next(&mut buf).is_none());
        assert!(buf.is_empty());
    }
}
