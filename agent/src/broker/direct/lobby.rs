//! The lobby: every direct-mode application's messages before the hand-over, each behind a
//! header naming its socket; one task per connection, started by its first message.
//!
//! A header's length is the size of the application's send, which the application chooses:
//! the lobby never reserves room for it. It reads at most [`LOBBY_BUF`] at a time and passes a
//! message on in pieces as its bytes arrive ([`Framer`]); each connection's task gets at most
//! [`MAX_FROM_APP`] (and one piece) before the rest is dropped.
use std::{sync::Arc, time::Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use latch_common::direct::{HEADER_LEN, Header};
use tokio::{io::AsyncReadExt as _, net::TcpStream, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{Direct, MAX_FROM_APP, Session};
use crate::{
    audit::{self, Record},
    broker::{Origin, Shared, conn::ms},
    connector::postgres::{
        Failure,
        direct::{self as pg_direct, Ended, Leg},
    },
    identity::Workload,
    metrics::{Outcome, RefusedReason},
};

/// What one read of the lobby may bring, and about all the lobby's buffer ever reserves.
const LOBBY_BUF: usize = 64 * 1024;

/// Reads the lobby until `stop` fires: each message goes to its connection's task; the first
/// message of a connection starts one.
pub async fn run_lobby(shared: Arc<Shared>, stop: CancellationToken) {
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
    let mut lobby = lobby;
    let mut buf = BytesMut::with_capacity(LOBBY_BUF);
    let mut framer = Framer::default();
    loop {
        while let Some(piece) = framer.next(&mut buf) {
            dispatch(&direct, &shared, piece);
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
            if buf.len() < HEADER_LEN {
                return None;
            }
            // SAFETY: Header is plain integers; the buffer holds at least HEADER_LEN bytes.
            let header: Header = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
            buf.advance(HEADER_LEN);
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

fn dispatch(direct: &Arc<Direct>, shared: &Arc<Shared>, piece: Piece) {
    let Piece {
        header,
        body,
        first,
    } = piece;
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
    // The session runs on a thread of its own, pinned to the CPU the application's thread last
    // ran on, with a runtime of its own: every wake-up of the application and of the server's
    // process that the startup causes then comes from there, as in a direct connection's
    // startup, and the scheduler (which keeps a woken task near its waker) places the session
    // as it would a direct one. Measured (pgbench -S -c 4 -j 2, client and server in one
    // autogroup, 8 alternated runs each): with the startup on the agent's main runtime the
    // session settled in the slow placement (~44k instead of ~63k tps) in 5 runs of 6 and
    // 4 of 8, against 1 in 8 for direct connections; pinned, 1 in 8 too.
    // The record must be the one the socket named in the header made (a later socket with the
    // same 4-tuple in the same namespace replaces it).
    let meta = shared
        .conns
        .take_key(&header.key)
        .map(|m| m.filter(|m| m.socket_cookie == header.cookie));
    let main = tokio::runtime::Handle::current();
    let Ok(permit) = direct.startups.clone().try_acquire_owned() else {
        // Too many startups at once: refuse this one without a thread (it reads the startup,
        // then answers 53300 on the agent's runtime).
        tokio::spawn(async move {
            handle(&direct, &shared, main, header, meta, rx, true).await;
            direct
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&header.cookie);
        });
        return;
    };
    let cpu = match &meta {
        Ok(Some(m)) => super::cpu_of(m.pid, m.tid),
        _ => None,
    };
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        super::on_cpu(cpu, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt.block_on(handle(&direct, &shared, main, header, meta, rx, false)),
                Err(err) => tracing::error!(%err, "direct mode: no runtime for a session"),
            }
        });
        direct
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&header.cookie);
    });
}

/// Admission and the connector for one direct-mode connection.
async fn handle(
    direct: &Direct,
    shared: &Arc<Shared>,
    main: tokio::runtime::Handle,
    header: Header,
    meta: Result<Option<latch_common::ConnMeta>, aya::maps::MapError>,
    from_app: mpsc::UnboundedReceiver<Bytes>,
    busy: bool,
) {
    let id = shared.next_conn_id();
    let started = Instant::now();
    let meta = match meta {
        Ok(Some(m)) => m,
        _ => {
            shared.metrics.refuse(RefusedReason::not_redirected);
            tracing::warn!(
                conn = id,
                "direct mode: no kernel record for a connection; leaving it"
            );
            let _ = direct.maps.remove_socket(header.cookie);
            direct.maps.forget(&header.key, header.cookie);
            return;
        }
    };
    let mut origin = Origin::from(&meta);
    origin.conn = id;
    let policies = shared.policies();
    let Some(policy) = policies.by_rule(origin.rule_id).cloned() else {
        tracing::warn!(conn = id, %origin, "direct mode: no policy any more; leaving it");
        let _ = direct.maps.remove_socket(header.cookie);
        direct.maps.forget(&header.key, header.cookie);
        return;
    };
    let workload = Workload::resolve(&origin, &shared.cgroups);
    let span = crate::broker::conn::span(id, &policy.name, &origin, true);
    async {
        let mut record =
            Record::new(id, audit::Outcome::Relayed, origin.dst.to_string()).with_policy(&policy);
        record.direct = true;
        let (side, _side_peer) = match direct.side(header.cookie) {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(%err, "direct mode: no broker socket for the connection");
                return;
            }
        };
        let admitted = workload.admitted_by(&policy.workloads);
        let slot = admitted
            .then(|| shared.per_workload.try_acquire(origin.cgroup_id))
            .flatten();
        let refusal = if !admitted {
            shared.metrics.deny(&policy.name);
            let exe_verdicts = workload.exe_verdicts(&policy.workloads);
            tracing::warn!(exe = ?workload.exe, exe_verdicts, "denied: the policy does not admit this workload");
            record.outcome = audit::Outcome::Denied;
            record.reason = Some(crate::broker::conn::denial_reason(&policy.name, exe_verdicts));
            Some(Failure::Denied)
        } else if slot.is_none() {
            shared.metrics.refuse(RefusedReason::workload_limit);
            record.outcome = audit::Outcome::Refused;
            Some(Failure::WorkloadLimit {
                max: shared.per_workload.max(),
            })
        } else if busy {
            shared.metrics.refuse(RefusedReason::capacity);
            record.outcome = audit::Outcome::Refused;
            Some(Failure::Busy {
                max: direct.startups_max(),
            })
        } else {
            None
        };
        record.workload = Some(workload);
        let mut leg = Leg {
            direct,
            cookie: header.cookie,
            key: header.key,
            pid: meta.pid,
            tid: meta.tid,
            from_app,
            side,
            main,
            shared: shared.clone(),
        };
        let result = pg_direct::serve(&mut leg, &origin, &policy, refusal).await;
        match &result {
            Ok(ended) => {
                shared.metrics.connection(&policy.name, Outcome::relayed);
                record.handshake_ms = Some(ms(started.elapsed()));
                tracing::info!(
                    ?ended,
                    ms = started.elapsed().as_millis() as u64,
                    "handed over"
                );
                if *ended == Ended::HandedOver {
                    shared.metrics.direct.inc();
                }
            }
            Err(f) => {
                pg_direct::refuse(&mut leg, &policy, id, f).await;
                if record.outcome == audit::Outcome::Relayed {
                    record.outcome = audit::Outcome::Failed;
                    shared.metrics.connection(&policy.name, Outcome::failed);
                }
                // A denial's reason is set above (with how `exe` selectors compared).
                record.reason.get_or_insert_with(|| f.to_string());
                tracing::warn!(err = %f, "direct-mode startup failed");
            }
        }
        direct.drop_side(header.cookie, &leg.side);
        // The application may have closed its socket while the entry was being rewritten (the
        // kernel drops both at close): an entry for a socket that is gone must not stay.
        if !direct.maps.has_socket(header.cookie) {
            direct.maps.forget(&header.key, header.cookie);
        }
        record.duration_ms = ms(started.elapsed());
        shared.audit.record(&record);
        drop(slot);
    }
    .instrument(span)
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cookie: u64, len: u32) -> Vec<u8> {
        let h = Header {
            cookie,
            len,
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
