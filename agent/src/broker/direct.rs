//! Direct mode's broker side (protocol in `latch_common::direct`): the lobby where the
//! applications' startup messages arrive, the broker's socket per application, and admission
//! (policy, workload, limits, audit) before the PostgreSQL connector takes over.
use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Instant,
};

use bytes::{Buf as _, Bytes, BytesMut};
use latch_common::direct::{FROM_TARGET, HEADER_LEN, Header, LOBBY, SIDE, SIDE_KEY, TO_BROKER};
use tokio::{io::AsyncReadExt as _, net::TcpStream, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{Origin, Shared};
use crate::{
    audit::{self, Record},
    connector::postgres::{
        Failure,
        direct::{self as pg_direct, Ended, Leg},
    },
    ebpf::DirectMaps,
    identity::Workload,
    metrics::{Outcome, RefusedReason},
};

/// The direct-mode maps and the broker's lobby socket.
pub struct Direct {
    maps: DirectMaps,
    /// Makes the broker's socket pairs (loopback, never seen by applications). Locked so
    /// that each connect gets its own accept.
    pairs: Mutex<std::net::TcpListener>,
    lobby: Mutex<Option<std::net::TcpStream>>,
    /// The other ends of the broker's sockets, kept open while their socket is in use.
    _lobby_peer: std::net::TcpStream,
    sessions: Mutex<HashMap<u64, Session>>,
}

/// A connection's task, as the lobby reader sees it.
struct Session {
    tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes passed on so far; past [`MAX_FROM_APP`] the rest is dropped.
    bytes: usize,
}

/// What one application may send to the lobby: its SSLRequest and StartupMessage (at most
/// 10 000 bytes, as PostgreSQL allows) and a little more. Anything past it is dropped (the
/// connection fails its startup anyway), so an application cannot grow the agent's memory.
const MAX_FROM_APP: usize = 16 * 1024;

impl Direct {
    /// Makes the lobby socket and puts it in the sock map. Call before the programs are
    /// attached, so that no application message finds the lobby missing.
    pub fn new(maps: DirectMaps) -> io::Result<Self> {
        let pairs = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let (lobby, lobby_peer) = pair(&pairs)?;
        maps.add_socket(LOBBY, &lobby).map_err(io::Error::other)?;
        Ok(Self {
            maps,
            pairs: Mutex::new(pairs),
            lobby: Mutex::new(Some(lobby)),
            _lobby_peer: lobby_peer,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    pub fn maps(&self) -> &DirectMaps {
        &self.maps
    }

    /// The broker's socket for the application socket `cookie`: in the sock map, with an entry
    /// that sends what the broker writes into that application's receive queue.
    fn side(&self, cookie: u64) -> io::Result<(TcpStream, std::net::TcpStream)> {
        let (side, peer) = self.side_std(cookie)?;
        side.set_nonblocking(true)?;
        Ok((TcpStream::from_std(side)?, peer))
    }

    fn side_std(&self, cookie: u64) -> io::Result<(std::net::TcpStream, std::net::TcpStream)> {
        let (side, peer) = pair(&self.pairs.lock().unwrap_or_else(|e| e.into_inner()))?;
        let key = crate::ebpf::tuple_key(side.local_addr()?, side.peer_addr()?);
        self.maps
            .set(&key, cookie, SIDE)
            .map_err(io::Error::other)?;
        if let Err(e) = self.maps.add_socket(cookie | SIDE_KEY, &side) {
            self.maps.forget(&key);
            return Err(io::Error::other(e));
        }
        Ok((side, peer))
    }

    fn drop_side(&self, cookie: u64, side: &impl SocketAddrs) {
        let _ = self.maps.remove_socket(cookie | SIDE_KEY);
        if let (Ok(l), Ok(p)) = (side.local(), side.peer()) {
            self.maps.forget(&crate::ebpf::tuple_key(l, p));
        }
    }

    /// Runs direct mode's kernel steps on a loopback pair of the agent's own: a message the
    /// "application" sends reaches the lobby behind its header, what the "server" sends
    /// reaches the side socket, what the broker writes there reaches the application's receive
    /// queue (and FIONREAD counts it), and once the socket has left the sock map the server's
    /// next bytes arrive as plain TCP. Kernels whose sockmap loses or misplaces bytes on the
    /// way fail it, and direct mode is not used there.
    pub fn self_test(&self) -> io::Result<()> {
        let timeout = Some(std::time::Duration::from_secs(2));
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let (mut app, mut server) = pair(&listener)?;
        let cookie = socket_cookie_of(&app)?;
        let key = crate::ebpf::tuple_key(app.local_addr()?, app.peer_addr()?);
        let (mut side, _side_peer) = self.side_std(cookie)?;
        let result = (|| {
            use std::io::{Read as _, Write as _};
            let expect = |what: &str, got: &[u8], want: &[u8]| {
                if got == want {
                    Ok(())
                } else {
                    Err(io::Error::other(format!(
                        "{what}: got {got:?}, expected {want:?}"
                    )))
                }
            };
            self.maps
                .set(&key, cookie, TO_BROKER | FROM_TARGET)
                .map_err(io::Error::other)?;
            self.maps
                .add_socket(cookie, &app)
                .map_err(io::Error::other)?;
            let mut lobby_guard = self.lobby.lock().unwrap_or_else(|e| e.into_inner());
            let lobby = lobby_guard
                .as_mut()
                .ok_or_else(|| io::Error::other("the lobby is in use"))?;
            lobby.set_read_timeout(timeout)?;
            app.write_all(b"startup")?;
            let mut got = vec![0u8; HEADER_LEN + 7];
            lobby.read_exact(&mut got)?;
            let mut buf = BytesMut::from(&got[..]);
            let (header, body) = next_message(&mut buf)
                .ok_or_else(|| io::Error::other("lobby: no whole message"))?;
            expect("lobby message", &body, b"startup")?;
            if header.cookie != cookie || header.key != key {
                return Err(io::Error::other("lobby: the header names another socket"));
            }
            self.maps
                .set(&key, cookie, FROM_TARGET)
                .map_err(io::Error::other)?;
            server.write_all(b"challenge")?;
            side.set_read_timeout(timeout)?;
            let mut got = [0u8; 9];
            side.read_exact(&mut got)?;
            expect("server to side socket", &got, b"challenge")?;
            side.write_all(b"welcome")?;
            let mut queued = 0;
            for _ in 0..200 {
                queued = fionread(&app)?;
                if queued == 7 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if queued != 7 {
                return Err(io::Error::other(format!(
                    "FIONREAD counted {queued} of 7 injected bytes"
                )));
            }
            app.set_read_timeout(timeout)?;
            let mut got = [0u8; 7];
            app.read_exact(&mut got)?;
            expect("side socket to application", &got, b"welcome")?;
            self.maps.remove_socket(cookie).map_err(io::Error::other)?;
            self.maps.forget(&key);
            server.write_all(b"ready")?;
            let mut got = [0u8; 5];
            app.read_exact(&mut got)?;
            expect("server to application after the hand-over", &got, b"ready")?;
            app.write_all(b"query")?;
            server.set_read_timeout(timeout)?;
            let mut got = [0u8; 5];
            server.read_exact(&mut got)?;
            expect("application to server after the hand-over", &got, b"query")
        })();
        let _ = self.maps.remove_socket(cookie);
        self.maps.forget(&key);
        self.drop_side(cookie, &side);
        result
    }
}

/// Local and peer addresses of std and tokio TCP streams alike.
trait SocketAddrs {
    fn local(&self) -> io::Result<std::net::SocketAddr>;
    fn peer(&self) -> io::Result<std::net::SocketAddr>;
}

impl SocketAddrs for TcpStream {
    fn local(&self) -> io::Result<std::net::SocketAddr> {
        self.local_addr()
    }
    fn peer(&self) -> io::Result<std::net::SocketAddr> {
        self.peer_addr()
    }
}

impl SocketAddrs for std::net::TcpStream {
    fn local(&self) -> io::Result<std::net::SocketAddr> {
        self.local_addr()
    }
    fn peer(&self) -> io::Result<std::net::SocketAddr> {
        self.peer_addr()
    }
}

fn socket_cookie_of(s: &std::net::TcpStream) -> io::Result<u64> {
    let fd = s.as_fd().try_clone_to_owned()?;
    socket_cookie(&fd)
}

/// Bytes waiting in a socket's receive queue (for a socket in a sock map: the messages
/// injected into it, not yet read).
pub fn fionread(s: &impl std::os::fd::AsRawFd) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// A connected loopback pair made through `listener`.
fn pair(
    listener: &std::net::TcpListener,
) -> io::Result<(std::net::TcpStream, std::net::TcpStream)> {
    let a = std::net::TcpStream::connect(listener.local_addr()?)?;
    // Anything else that connected to the listener is dropped.
    let b = loop {
        let (b, from) = listener.accept()?;
        if from == a.local_addr()? {
            break b;
        }
    };
    a.set_nodelay(true)?;
    Ok((a, b))
}

/// A descriptor of the socket with this cookie among process `pid`'s open files
/// (pidfd_getfd(2): the same socket, not a copy). The application's file flags are shared
/// with it and must not be changed.
pub fn app_socket(pid: u32, cookie: u64) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the returned descriptors are owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target
            .as_os_str()
            .as_encoded_bytes()
            .starts_with(b"socket:")
        {
            continue;
        }
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if got < 0 {
            continue;
        }
        let got = unsafe { OwnedFd::from_raw_fd(got as i32) };
        if socket_cookie(&got).is_ok_and(|c| c == cookie) {
            return Ok(got);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("process {pid} no longer holds the connection's socket"),
    ))
}

fn socket_cookie(fd: &OwnedFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

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
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        while let Some((header, body)) = next_message(&mut buf) {
            dispatch(&direct, &shared, header, body);
        }
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

fn next_message(buf: &mut BytesMut) -> Option<(Header, Bytes)> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    // SAFETY: Header is plain integers; the buffer holds at least HEADER_LEN bytes.
    let header: Header = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    let len = header.len as usize;
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return None;
    }
    buf.advance(HEADER_LEN);
    Some((header, buf.split_to(len).freeze()))
}

fn dispatch(direct: &Arc<Direct>, shared: &Arc<Shared>, header: Header, body: Bytes) {
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
    let (tx, rx) = mpsc::unbounded_channel();
    let bytes = body.len();
    let _ = tx.send(body);
    sessions.insert(header.cookie, Session { tx, bytes });
    let (direct, shared) = (direct.clone(), shared.clone());
    tokio::spawn(async move {
        handle(&direct, &shared, header, rx).await;
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
    shared: &Shared,
    header: Header,
    from_app: mpsc::UnboundedReceiver<Bytes>,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let meta = match shared.conns.take_key(&header.key) {
        Ok(Some(m)) => m,
        _ => {
            shared.metrics.refuse(RefusedReason::not_redirected);
            tracing::warn!(
                conn = id,
                "direct mode: no kernel record for a connection; leaving it"
            );
            let _ = direct.maps.remove_socket(header.cookie);
            direct.maps.forget(&header.key);
            return;
        }
    };
    let origin = Origin::from(&meta);
    let policies = shared.policies();
    let Some(policy) = policies.by_rule(origin.rule_id).cloned() else {
        tracing::warn!(conn = id, %origin, "direct mode: no policy any more; leaving it");
        let _ = direct.maps.remove_socket(header.cookie);
        direct.maps.forget(&header.key);
        return;
    };
    let workload = Workload::resolve(&origin, &shared.cgroup_root);
    let span = super::conn::span(id, &policy.name, &origin, true);
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
            tracing::warn!(exe = ?workload.exe, "denied: the policy does not admit this workload");
            record.outcome = audit::Outcome::Denied;
            Some(Failure::Denied)
        } else if slot.is_none() {
            shared.metrics.refuse(RefusedReason::workload_limit);
            record.outcome = audit::Outcome::Refused;
            Some(Failure::WorkloadLimit {
                max: shared.per_workload.max(),
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
            from_app,
            side,
        };
        let result = pg_direct::serve(&mut leg, &origin, &policy, shared, refusal).await;
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
                pg_direct::refuse(&mut leg, &policy, f).await;
                if record.outcome == audit::Outcome::Relayed {
                    record.outcome = audit::Outcome::Failed;
                    shared.metrics.connection(&policy.name, Outcome::failed);
                }
                record.reason = Some(f.to_string());
                tracing::warn!(err = %f, "direct-mode startup failed");
            }
        }
        direct.drop_side(header.cookie, &leg.side);
        record.duration_ms = ms(started.elapsed());
        shared.audit.record(&record);
        drop(slot);
    }
    .instrument(span)
    .await;
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
