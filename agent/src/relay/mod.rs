//! Byte relay between the application's connection and the target's, once any handshake is
//! done. Plain TCP to TCP uses splice(2) through a pipe per direction: the payload never
//! enters user space and no buffer is allocated per chunk.
//!
//! With a [`Handover`], the application-to-target direction is given to the kernel once it has
//! carried [`HANDOVER_AFTER`] bytes and nothing is in flight (see `latch_common::flow`): from then on the application's sends go
//! straight into the target socket and this side only waits for the end of the stream.
use std::{
    io,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use tokio::net::TcpStream;

pub mod park;
pub mod pipes;
mod splice;

use crate::{
    connector::stream::{AppStream, MaybeTls, TargetStream},
    ebpf::FastPath,
};

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub to_target: u64,
    pub to_app: u64,
}

/// Live byte counters a relay updates as it goes (for metrics and status).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the broker moved; bytes the kernel carried after a hand-over are added when the
    /// relay ends.
    pub to_target: AtomicU64,
    pub to_app: AtomicU64,
    /// The application-to-target direction was handed over to the kernel.
    pub handed_over: AtomicBool,
}

/// What the relay needs to hand the application-to-target direction to the kernel.
pub struct Handover<'a> {
    pub fast: &'a FastPath,
    /// Cookie of the application's socket (from the kernel's record).
    pub cookie: u64,
    /// Bytes already taken from the application before the relay started (handshake
    /// included), all of them dealt with: written toward the target or dropped.
    pub taken: u64,
}

/// When a relay ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    /// When both directions have seen end-of-stream: half-closes are passed on (TCP).
    EachWay,
    /// When the target's direction has: its end-of-stream is passed on and the relay stops,
    /// so the application's socket is closed at once, as the server closes its own when the
    /// session ends (a PostgreSQL backend exits; it never half-closes). A write the
    /// application makes after that is answered with a reset, as the server's host would.
    WithTarget,
}

/// Relays until both directions have seen end-of-stream (half-closes are passed on) or either
/// fails. Returns the totals; on error the totals so far are in `progress`, and both sockets
/// are set to close with a reset (see [`abort_on_close`]).
pub async fn splice_both(
    app: &TcpStream,
    target: &TcpStream,
    progress: &Progress,
    handover: Option<Handover<'_>>,
) -> io::Result<Transferred> {
    let t = splice_parkable(app, target, progress, handover, None, Ends::EachWay).await?;
    Ok(t.expect("a relay without a gate never parks"))
}

/// As [`splice_both`]; with `parking`, the relay also stops when an upgrade asks it to park
/// and both directions are at a safe point (nothing taken from either socket that is not yet
/// written, no pipe held): `Ok(None)`, the sockets untouched, the counts so far in `progress`
/// (bytes the kernel carried included, the flow taken back from the kernel).
pub fn splice_parkable<'a>(
    app: &'a TcpStream,
    target: &'a TcpStream,
    progress: &'a Progress,
    handover: Option<Handover<'a>>,
    parking: Option<&'a park::Parking>,
    ends: Ends,
) -> splice::Splice<'a> {
    let state = handover.map(|h| HandoverState::new(h, target));
    let gate = parking.and_then(park::Gate::new);
    splice::Splice::new(app, target, progress, state, gate, ends)
}

/// Bytes the application sends through the broker before its direction is handed to the
/// kernel. Small exchanges (one request per connection, a session of short queries) gain
/// nothing from the hand-over, which costs five system calls (registering the target socket,
/// its send buffer, the allowance, and the release); a bulk sender reaches this within its
/// first milliseconds.
const HANDOVER_AFTER: u64 = 64 * 1024;

/// How often a handed-over flow's allowance is renewed while the application keeps sending.
const TICK: Duration = Duration::from_millis(1);
/// A flow is renewed every tick while it uses at least 1/TICKS_AHEAD of its allowance per
/// renewal.
const TICKS_AHEAD: u64 = 8;
/// Send buffer asked for on target sockets of handed-over flows (the allowance is half the
/// free buffer, renewed every [`TICK`]).
const TARGET_SNDBUF: usize = 4 << 20;

/// A hand-over, shared by both directions of one relay (the kernel may hand the flow back at
/// any moment; the relay then carries on and hands over again when it has caught up). The
/// target socket leaves `LATCH_TARGETS` on drop.
struct HandoverState<'a> {
    h: Handover<'a>,
    target: &'a TcpStream,
    registered: AtomicBool,
    /// Gave up (the target socket could not be registered).
    failed: AtomicBool,
    /// Handed over at least once.
    ever: AtomicBool,
    /// Renew the allowance every TICK (the flow is handed over and fast enough to use up
    /// its allowance within a few ticks).
    ticking: AtomicBool,
    /// Bytes charged at the last renewal.
    last: AtomicU64,
    /// The allowance last given.
    granted: AtomicU64,
}

impl<'a> HandoverState<'a> {
    fn new(h: Handover<'a>, target: &'a TcpStream) -> Self {
        Self {
            h,
            target,
            registered: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            ever: AtomicBool::new(false),
            ticking: AtomicBool::new(false),
            last: AtomicU64::new(0),
            granted: AtomicU64::new(0),
        }
    }

    /// Tries to hand over after the broker has taken and written `moved` relay bytes.
    fn attempt(&self, moved: u64) {
        let (fast, cookie) = (self.h.fast, self.h.cookie);
        if self.failed.load(Ordering::Relaxed) || fast.is_handed_over(cookie) {
            return;
        }
        if !self.registered.load(Ordering::Relaxed) {
            if let Err(err) = fast.register(cookie, self.target) {
                tracing::debug!(%err, "fast path unavailable for this connection");
                self.failed.store(true, Ordering::Relaxed);
                return;
            }
            // A larger buffer means a larger allowance per tick; best effort (needs
            // CAP_NET_ADMIN beyond net.core.wmem_max).
            let _ = nix::sys::socket::setsockopt(
                self.target,
                nix::sys::socket::sockopt::SndBufForce,
                &TARGET_SNDBUF,
            );
            self.registered.store(true, Ordering::Relaxed);
        }
        let granted = |room: u64| {
            self.granted.store(room, Ordering::Relaxed);
            room
        };
        if fast.hand_over(cookie, self.h.taken + moved, || granted(room(self.target))) {
            tracing::trace!(
                taken = self.h.taken + moved,
                "application-to-target direction handed over to the kernel"
            );
            self.ever.store(true, Ordering::Relaxed);
            self.last.store(fast.charged(cookie), Ordering::Relaxed);
            self.ticking.store(true, Ordering::Relaxed);
        }
    }

    /// Renews the allowance while handed over. After a reply, only when less than half of
    /// the last allowance is left (request and response flows then cost no extra system
    /// call). Ticking goes on only while the flow would use up its allowance within
    /// [`TICKS_AHEAD`] ticks: a slower flow is renewed as replies pass, and if it runs out
    /// the kernel hands it back, so an idle or chatty connection does not wake the broker
    /// every tick.
    fn renew(&self, from_tick: bool) {
        let (fast, cookie) = (self.h.fast, self.h.cookie);
        if !fast.is_handed_over(cookie) {
            self.ticking.store(false, Ordering::Relaxed);
            return;
        }
        if !from_tick && fast.remaining(cookie) >= self.granted.load(Ordering::Relaxed) / 2 {
            return;
        }
        let charged = fast.charged(cookie);
        let used = charged.saturating_sub(self.last.swap(charged, Ordering::Relaxed));
        let room = fast.allow(cookie, || room(self.target));
        self.granted.store(room, Ordering::Relaxed);
        self.ticking
            .store(used.saturating_mul(TICKS_AHEAD) >= room, Ordering::Relaxed);
    }

    /// Ends the hand-over: marks it in `progress` and returns (and adds to `progress`) the
    /// bytes the kernel carried, which the broker never saw.
    fn finish(&self, progress: &Progress) -> u64 {
        let mut carried = 0;
        if self.ever.load(Ordering::Relaxed) {
            progress.handed_over.store(true, Ordering::Relaxed);
            carried = self.h.fast.redirected(self.h.cookie).unwrap_or(0);
            progress.to_target.fetch_add(carried, Ordering::Relaxed);
        }
        self.release();
        carried
    }

    fn release(&self) {
        if self.registered.swap(false, Ordering::Relaxed) {
            self.h.fast.release(self.h.cookie);
        }
    }
}

impl Drop for HandoverState<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Half the free send buffer of `target` (kernel accounting, overheads included), so that
/// what the kernel redirects within it never meets a full buffer.
fn room(target: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd as _;
    // SK_MEMINFO_SNDBUF = 3, SK_MEMINFO_WMEM_QUEUED = 5 (linux/sock_diag.h).
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: info is writable for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            target.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < 6 * 4 {
        return 0;
    }
    u64::from(info[3].saturating_sub(info[5]) / 2)
}

/// What a pump does about a hand-over.
#[derive(Clone, Copy)]
enum Role<'s, 'a> {
    /// The application-to-target direction: hands over, renews every tick while fast.
    ToTarget(&'s HandoverState<'a>),
    /// The other direction: renews when a reply passes.
    ToApp(&'s HandoverState<'a>),
    Plain,
}

impl<'s, 'a> Role<'s, 'a> {
    fn to_target(h: Option<&'s HandoverState<'a>>) -> Self {
        h.map_or(Role::Plain, Role::ToTarget)
    }

    fn to_app(h: Option<&'s HandoverState<'a>>) -> Self {
        h.map_or(Role::Plain, Role::ToApp)
    }
}

/// Relays between two legs that may each be TLS, once a connector's handshake is done:
/// `early` (bytes the application sent before, already vetted) goes to the target first; then
/// splice(2) when both legs are plain TCP (with the fast-path hand-over `handover` may allow),
/// a copy loop when either is TLS.
pub async fn streams<'s>(
    app: AppStream,
    target: &mut TargetStream,
    early: &[u8],
    progress: &Progress,
    handover: impl FnOnce(&TcpStream) -> Option<Handover<'s>>,
    ends: Ends,
) -> io::Result<Transferred> {
    let done = streams_parkable(app, target, early, progress, handover, None, ends).await?;
    Ok(done.unwrap_or_else(|_| unreachable!("a relay without parking never parks")))
}

/// As [`streams`]; with `parking`, a relay whose legs are both plain TCP also parks for an
/// upgrade (see [`splice_parkable`]): `Ok(Err(app))`, the application's socket given back (the
/// target's stays in `target`).
pub async fn streams_parkable<'s>(
    mut app: AppStream,
    target: &mut TargetStream,
    early: &[u8],
    progress: &Progress,
    handover: impl FnOnce(&TcpStream) -> Option<Handover<'s>>,
    parking: Option<&park::Parking>,
    ends: Ends,
) -> io::Result<Result<Transferred, TcpStream>> {
    use tokio::io::AsyncWriteExt as _;
    if !early.is_empty() {
        target.write_all(early).await?;
        progress
            .to_target
            .fetch_add(early.len() as u64, Ordering::Relaxed);
    }
    match (&mut app, target) {
        (MaybeTls::Plain(a), MaybeTls::Plain(tcp)) => {
            match splice_parkable(a, tcp, progress, handover(a), parking, ends).await? {
                Some(t) => Ok(Ok(t)),
                None => match app {
                    MaybeTls::Plain(a) => Ok(Err(a)),
                    MaybeTls::Tls(_) => unreachable!("matched plain"),
                },
            }
        }
        (_, target) if ends == Ends::EachWay => {
            let (to_target, to_app) = tokio::io::copy_bidirectional(&mut app, target)
                .await
                .inspect_err(|_| abort_on_close(&[app.tcp(), target.tcp()]))?;
            progress.to_target.fetch_add(to_target, Ordering::Relaxed);
            progress.to_app.fetch_add(to_app, Ordering::Relaxed);
            Ok(Ok(Transferred { to_target, to_app }))
        }
        (_, target) => {
            let relayed = copy_until_target_ends(&mut app, target, progress).await;
            if relayed.is_err() {
                abort_on_close(&[app.tcp(), target.tcp()]);
            }
            relayed.map(Ok)
        }
    }
}

/// The copy relay of [`Ends::WithTarget`] (either leg TLS): the application's end-of-stream is
/// passed on and the target's direction carries on; the target's ends the relay.
async fn copy_until_target_ends(
    app: &mut AppStream,
    target: &mut TargetStream,
    progress: &Progress,
) -> io::Result<Transferred> {
    let before = (
        progress.to_target.load(Ordering::Relaxed),
        progress.to_app.load(Ordering::Relaxed),
    );
    let (mut app_r, mut app_w) = tokio::io::split(app);
    let (mut target_r, mut target_w) = tokio::io::split(target);
    let up = pump(&mut app_r, &mut target_w, &progress.to_target);
    let down = pump(&mut target_r, &mut app_w, &progress.to_app);
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut down => r?,
        r = &mut up => {
            r?;
            down.await?
        }
    };
    Ok(Transferred {
        to_target: progress.to_target.load(Ordering::Relaxed) - before.0,
        to_app: progress.to_app.load(Ordering::Relaxed) - before.1,
    })
}

/// Copies `src` to `dst` until end-of-stream, flushing each chunk (a TLS leg keeps records
/// buffered until flushed) and counting it; then half-closes `dst`.
async fn pump(
    src: &mut (impl tokio::io::AsyncRead + Unpin),
    dst: &mut (impl tokio::io::AsyncWrite + Unpin),
    counter: &AtomicU64,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // As tokio's copy: a session idle for hours holds this much per direction.
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = src.read(&mut buf).await?;
        if n == 0 {
            return dst.shutdown().await;
        }
        dst.write_all(&buf[..n]).await?;
        dst.flush().await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Makes the sockets' closes abortive (SO_LINGER 0: RST, unsent data dropped). After a relay
/// fails (one side reset, or a read or write failed), the other side must see the failure as
/// a direct connection would, not a clean end-of-stream that looks like a complete reply.
pub fn abort_on_close(streams: &[&TcpStream]) {
    for s in streams {
        let _ = socket2::SockRef::from(*s).set_linger(Some(Duration::ZERO));
    }
}

/// Bytes the broker has read from `stream` so far, from the kernel's counters: in-order bytes
/// received minus those still queued. `None` if the peer has sent FIN (the counters then
/// disagree by one) or the counters moved while being read.
pub fn bytes_read(stream: &TcpStream) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    let fd = stream.as_raw_fd();
    let received = || -> Option<(u8, u64)> {
        // struct tcp_info: tcpi_state is byte 0, tcpi_bytes_received the u64 at offset 128
        // (linux/tcp.h, since 4.1); libc's copy of the struct stops before it.
        let mut buf = [0u64; 29];
        let mut len = std::mem::size_of_val(&buf) as libc::socklen_t;
        // SAFETY: buf is writable for len bytes; len is updated with what the kernel wrote.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        (rc == 0 && len as usize >= 136).then(|| (buf[0].to_ne_bytes()[0], buf[16]))
    };
    let (state, before) = received()?;
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) } != 0 {
        return None;
    }
    let (_, after) = received()?;
    const TCP_ESTABLISHED: u8 = 1;
    (state == TCP_ESTABLISHED && before == after).then(|| before - queued as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn bytes_read_counts_what_was_taken_not_what_is_queued() {
        let (mut client, mut server) = pair().await;
        assert_eq!(bytes_read(&server), Some(0));
        client.write_all(&[7u8; 5000]).await.unwrap();
        let mut buf = [0u8; 1200];
        server.read_exact(&mut buf).await.unwrap();
        // Wait until all 5000 bytes have arrived, then check that only the 1200 read count.
        for _ in 0..100 {
            let mut q: libc::c_int = 0;
            use std::os::fd::AsRawFd as _;
            // SAFETY: FIONREAD writes one c_int into `q`, which outlives the call.
            unsafe { libc::ioctl(server.as_raw_fd(), libc::FIONREAD, &mut q) };
            if q == 3800 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(bytes_read(&server), Some(1200));
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), 3800);
        assert_eq!(
            bytes_read(&server),
            None,
            "after FIN the counters are not trusted"
        );
    }

    /// The application side once the relay has ended with the target: it reads what the
    /// target sent, then end-of-stream, and a write it makes after that is reset, as by the
    /// host of a server that closed its socket.
    async fn app_sees_a_closed_server(app_client: &mut TcpStream, farewell: &[u8]) {
        let mut got = Vec::new();
        app_client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, farewell);
        let mut reset = false;
        for _ in 0..50 {
            if app_client.write_all(b"select 1").await.is_err() {
                reset = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(reset, "the application's writes were still taken");
    }

    /// The target's last word and its close, while `relay` runs: what the relay moved, once
    /// it has ended (within 5 s) without the application closing.
    async fn target_says_bye(
        mut target_server: TcpStream,
        relay: impl std::future::Future<Output = io::Result<Transferred>>,
    ) -> Transferred {
        target_server.write_all(b"FATAL bye").await.unwrap();
        drop(target_server);
        tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("the relay ended with the target")
            .unwrap()
    }

    #[tokio::test]
    async fn a_relay_that_ends_with_the_target_closes_the_application_socket() {
        // Plain legs (splice): the target says its last word and closes; the application,
        // which has not closed, is left with a closed socket, not a half-closed one.
        let (mut app_client, app_side) = pair().await;
        let (target_side, target_server) = pair().await;
        let progress = Progress::default();
        let relay = splice_parkable(
            &app_side,
            &target_side,
            &progress,
            None,
            None,
            Ends::WithTarget,
        );
        let done = target_says_bye(target_server, async { Ok(relay.await?.unwrap()) }).await;
        assert_eq!(done.to_app, 9);
        drop((app_side, target_side));
        app_sees_a_closed_server(&mut app_client, b"FATAL bye").await;
    }

    #[tokio::test]
    async fn each_way_a_relay_outlives_the_targets_end() {
        // The default for TCP: the target's end-of-stream is passed on and the application
        // may still send (a half-close is legitimate TCP).
        let (mut app_client, app_side) = pair().await;
        let (target_side, mut target_server) = pair().await;
        let progress = Progress::default();
        let relay = splice_both(&app_side, &target_side, &progress, None);
        target_server.shutdown().await.unwrap();
        let peers = async {
            let mut got = Vec::new();
            app_client.read_to_end(&mut got).await.unwrap();
            app_client.write_all(b"late").await.unwrap();
            app_client.shutdown().await.unwrap();
            let mut late = Vec::new();
            target_server.read_to_end(&mut late).await.unwrap();
            assert_eq!(late, b"late");
        };
        let (done, ()) = tokio::join!(relay, peers);
        assert_eq!(done.unwrap().to_target, 4);
    }

    #[tokio::test]
    async fn the_copy_relay_also_ends_with_the_target() {
        // The same through the copy relay that TLS legs use (`MaybeTls` plain here: the
        // path is chosen by `ends`, the streams are only read and written).
        let (mut app_client, app_side) = pair().await;
        let (target_side, target_server) = pair().await;
        let progress = Progress::default();
        let mut app = crate::connector::stream::MaybeTls::Plain(app_side);
        let mut target = crate::connector::stream::MaybeTls::Plain(target_side);
        let relay = copy_until_target_ends(&mut app, &mut target, &progress);
        let done = target_says_bye(target_server, relay).await;
        assert_eq!(done.to_app, 9);
        drop((app, target));
        app_sees_a_closed_server(&mut app_client, b"FATAL bye").await;
    }

    #[tokio::test]
    async fn small_exchanges_each_after_a_pause_all_get_through() {
        // Each small splice clears the socket's readiness (it emptied the socket): the next
        // bytes must bring a new wake-up, whether they come at once or after a pause.
        let (mut app_client, app_side) = pair().await;
        let (target_side, mut target_server) = pair().await;
        let progress = Progress::default();
        let relay = async { splice_both(&app_side, &target_side, &progress, None).await };
        let peers = async {
            for i in 0..20u8 {
                let request = vec![i; 1 + usize::from(i) * 13];
                app_client.write_all(&request).await.unwrap();
                let mut got = vec![0u8; request.len()];
                target_server.read_exact(&mut got).await.unwrap();
                assert_eq!(got, request);
                if i % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                target_server.write_all(&[i, i]).await.unwrap();
                let mut reply = [0u8; 2];
                app_client.read_exact(&mut reply).await.unwrap();
                assert_eq!(reply, [i, i]);
            }
            drop(app_client);
            drop(target_server);
        };
        let (res, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(relay, peers)
        })
        .await
        .expect("an exchange stalled in the relay");
        let t = res.unwrap();
        assert_eq!(t.to_app, 40);
    }

    #[tokio::test]
    async fn relays_both_ways_and_passes_half_close() {
        // app_client <-> [app_side | relay | target_side] <-> target_server
        let (mut app_client, app_side) = pair().await;
        let (target_side, mut target_server) = pair().await;
        let progress = Progress::default();
        let relay = async { splice_both(&app_side, &target_side, &progress, None).await };
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let peers = async {
            let (mut r, mut w) = target_server.split();
            let echo = async {
                let mut buf = Vec::new();
                r.read_to_end(&mut buf).await.unwrap();
                w.write_all(&buf).await.unwrap();
                w.shutdown().await.unwrap();
                buf.len()
            };
            let (mut cr, mut cw) = app_client.split();
            let send = async {
                cw.write_all(&payload).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let recv = async {
                let mut back = Vec::new();
                cr.read_to_end(&mut back).await.unwrap();
                back
            };
            let (n, (), back) = tokio::join!(echo, send, recv);
            (n, back)
        };
        let (res, (n, back)) = tokio::join!(relay, peers);
        let t = res.unwrap();
        assert_eq!(n, payload.len());
        assert!(back == payload, "echoed bytes differ");
        assert_eq!(t.to_target, payload.len() as u64);
        assert_eq!(t.to_app, payload.len() as u64);
        assert_eq!(
            progress.to_app.load(Ordering::Relaxed),
            payload.len() as u64
        );
    }

    #[tokio::test]
    async fn a_parked_relay_leaves_its_sockets_whole_for_the_next_one() {
        let (mut app_client, app_side) = pair().await;
        let (target_side, mut target_server) = pair().await;
        let parking = park::Parking::default();
        let progress = Progress::default();
        let relay = splice_parkable(
            &app_side,
            &target_side,
            &progress,
            None,
            Some(&parking),
            Ends::EachWay,
        );
        let before = async {
            app_client.write_all(b"before").await.unwrap();
            let mut got = [0u8; 6];
            target_server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"before");
            // Parked while idle; what is sent meanwhile waits in the sockets.
            parking.request(Duration::from_secs(2));
        };
        let (parked, ()) = tokio::join!(relay, before);
        assert!(parked.unwrap().is_none(), "the relay parked");
        assert_eq!(progress.to_target.load(Ordering::Relaxed), 6);
        app_client.write_all(b"during").await.unwrap();
        target_server.write_all(b"reply").await.unwrap();
        let (taken, done) = parking.collect();
        assert!(taken.is_empty());
        assert!(
            !done,
            "one relay parked, not submitted (the broker does that)"
        );
        parking.lost();
        // The next relay (another agent's) on the same sockets sees every byte, in order.
        let next = Progress::default();
        let relay = splice_both(&app_side, &target_side, &next, None);
        let after = async {
            let mut got = [0u8; 6];
            target_server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"during");
            let mut got = [0u8; 5];
            app_client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"reply");
            app_client.shutdown().await.unwrap();
            target_server.shutdown().await.unwrap();
        };
        let (t, ()) = tokio::join!(relay, after);
        assert_eq!(
            t.unwrap(),
            Transferred {
                to_target: 6,
                to_app: 5
            }
        );
    }

    #[tokio::test]
    async fn a_relay_blocked_mid_write_is_not_parked_and_carries_on() {
        let (mut app_client, app_side) = pair().await;
        let (target_side, mut target_server) = pair().await;
        let parking = park::Parking::default();
        let progress = Progress::default();
        let relay = splice_parkable(
            &app_side,
            &target_side,
            &progress,
            None,
            Some(&parking),
            Ends::EachWay,
        );
        let payload: Vec<u8> = (0..16_000_000u32).map(|i| i as u8).collect();
        let peers = async {
            // The target reads nothing for a while: the relay's write toward it blocks.
            let send = async {
                app_client.write_all(&payload).await.unwrap();
                app_client.shutdown().await.unwrap();
            };
            let stall_then_read = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                parking.request(Duration::from_millis(200));
                tokio::time::sleep(Duration::from_millis(400)).await;
                let mut got = Vec::new();
                target_server.read_to_end(&mut got).await.unwrap();
                target_server.shutdown().await.unwrap();
                got
            };
            let ((), got) = tokio::join!(send, stall_then_read);
            got
        };
        let (res, got) = tokio::join!(relay, peers);
        let t = res.unwrap().expect("not parked: drained as before");
        assert_eq!(t.to_target, payload.len() as u64);
        assert!(got == payload, "bytes lost or reordered");
        assert!(parking.collect().1, "nothing left to collect");
    }
}
