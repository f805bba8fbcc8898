//! The plain relay (TCP to TCP through splice(2)) as one hand-written future for both
//! directions. An idle relay is what most brokered connections are, for hours: this future is
//! all of its state in the connection's task (about 250 bytes; the two `async fn` pumps joined
//! it replaced took 1.4 KiB, most of it `select!` branches waiting at once). Nothing else is
//! held while a direction waits for data: no pipe, no buffer, no timer.
//!
//! Each direction is a small state machine: [`State::Idle`] (waiting for the source to be
//! readable, holding nothing: the safe point where an upgrade may park it), then the bytes
//! read are written out of a pooled pipe ([`State::Pipe`]) or, when no pipe is to be had, a
//! buffer ([`State::Buf`]) before it is idle again. The application-to-target direction hands
//! itself to the kernel as [`super::HandoverState`] allows; the tick that renews a fast flow's
//! allowance is a timer that exists only while the flow is fast.
use std::{
    future::Future,
    io,
    os::fd::AsFd as _,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
};

use nix::{
    fcntl::{SpliceFFlags, splice},
    sys::socket::{Shutdown, shutdown},
};
use tokio::{io::Interest, net::TcpStream, time::Sleep};
use tokio_util::sync::WaitForCancellationFuture;

use super::{
    Ends, HANDOVER_AFTER, HandoverState, Progress, Role, TICK, Transferred, abort_on_close,
    park::Gate,
    pipes::{self, PIPE_SIZE, Pipe},
};

/// Bytes copied at a time when no pipe is to be had.
const COPY_BUF: usize = 16 * 1024;

pin_project_lite::pin_project! {
    /// The relay between two plain TCP sockets; see [`super::splice_parkable`].
    pub struct Splice<'a> {
        app: &'a TcpStream,
        target: &'a TcpStream,
        progress: &'a Progress,
        handover: Option<HandoverState<'a>>,
        to_target: Dir,
        to_app: Dir,
        // Renews a handed-over flow's allowance every TICK; only while it is fast.
        tick: Option<Pin<Box<Sleep>>>,
        // Takes part in upgrades: `requested` wakes the relay when one asks it to park,
        // `window` when the upgrade stops waiting for its safe point.
        gate: Option<Gate<'a>>,
        #[pin]
        requested: Option<WaitForCancellationFuture<'a>>,
        window: Option<Pin<Box<Sleep>>>,
        ends: Ends,
    }
}

impl<'a> Splice<'a> {
    pub(super) fn new(
        app: &'a TcpStream,
        target: &'a TcpStream,
        progress: &'a Progress,
        handover: Option<HandoverState<'a>>,
        gate: Option<Gate<'a>>,
        ends: Ends,
    ) -> Self {
        let requested = gate.as_ref().map(Gate::requested);
        Self {
            app,
            target,
            progress,
            handover,
            to_target: Dir::default(),
            to_app: Dir::default(),
            tick: None,
            gate,
            requested,
            window: None,
            ends,
        }
    }
}

/// How the relay ended, before the hand-over's bytes are added.
enum End {
    Both,
    Parked,
}

impl Future for Splice<'_> {
    type Output = io::Result<Option<Transferred>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let res = loop {
            // An upgrade's request: both directions at their safe points park together; one
            // that is moving data finishes first, while the other waits at its own. If the
            // window closes first, the relay carries on and is not asked again.
            let mut holding = false;
            if let Some(gate) = this.gate.as_mut().filter(|g| g.undecided()) {
                if let Some(req) = this.requested.as_mut().as_pin_mut()
                    && req.poll(cx).is_ready()
                {
                    this.requested.set(None);
                }
                if gate.is_requested() {
                    let window = this.window.get_or_insert_with(|| {
                        Box::pin(tokio::time::sleep_until(gate.window_end()))
                    });
                    if window.as_mut().poll(cx).is_ready() {
                        gate.decide(false);
                        *this.window = None;
                    } else if this.to_target.at_safe_point() && this.to_app.at_safe_point() {
                        gate.decide(true);
                        break Ok(End::Parked);
                    } else {
                        holding = true;
                    }
                }
            }
            let handover = this.handover.as_ref();
            // Only while the application's direction is live: once it has ended, nothing is
            // left to renew an allowance for (the pump it replaced stopped ticking then too).
            let ticking = handover.filter(|h| {
                h.ticking.load(Ordering::Relaxed) && !matches!(this.to_target.state, State::Ended)
            });
            if let Some(h) = ticking {
                let tick = this
                    .tick
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(TICK)));
                if tick.as_mut().poll(cx).is_ready() {
                    h.renew(true);
                    tick.as_mut().reset(tokio::time::Instant::now() + TICK);
                    continue;
                }
            } else {
                *this.tick = None;
            }
            let up = this.to_target.poll(
                cx,
                this.app,
                this.target,
                &this.progress.to_target,
                Role::to_target(handover),
                holding,
            );
            let down = this.to_app.poll(
                cx,
                this.target,
                this.app,
                &this.progress.to_app,
                Role::to_app(handover),
                holding,
            );
            match (up, down) {
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => break Err(e),
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => break Ok(End::Both),
                // The target ended and the application was told: the session is over (what
                // the application still had on its way is dropped with its socket).
                (_, Poll::Ready(Ok(()))) if *this.ends == Ends::WithTarget => {
                    break Ok(End::Both);
                }
                // A direction that reached its safe point while an upgrade waits for both:
                // look again.
                _ if holding && this.to_target.at_safe_point() && this.to_app.at_safe_point() => {
                    continue;
                }
                _ => return Poll::Pending,
            }
        };
        let carried = this
            .handover
            .as_ref()
            .map_or(0, |h| h.finish(this.progress));
        Poll::Ready(match res {
            Err(e) => {
                abort_on_close(&[this.app, this.target]);
                Err(e)
            }
            Ok(End::Parked) => Ok(None),
            Ok(End::Both) => Ok(Some(Transferred {
                to_target: this.to_target.total + carried,
                to_app: this.to_app.total,
            })),
        })
    }
}

/// One direction.
#[derive(Default)]
struct Dir {
    total: u64,
    state: State,
}

#[derive(Default)]
enum State {
    /// Waiting for data (or the end of the stream), holding nothing.
    #[default]
    Idle,
    /// `n` bytes taken into a pipe, `left` of them still to write.
    Pipe { pipe: Pipe, n: usize, left: usize },
    /// `n` bytes taken into a buffer, `sent` of them written.
    Buf {
        buf: Box<[u8]>,
        n: usize,
        sent: usize,
    },
    /// End of stream passed on (the destination half-closed for writing).
    Ended,
}

impl Dir {
    /// Nothing taken from the source that is not yet written, no pipe held.
    fn at_safe_point(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Moves what `src` has on to `dst` until it would block (`Pending`) or the stream has
    /// ended and `dst` is half-closed (`Ready(Ok)`). With `hold`, an idle direction takes
    /// nothing new (it waits at its safe point).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
        role: Role<'_, '_>,
        hold: bool,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Ended => return Poll::Ready(Ok(())),
                State::Idle => {
                    if hold {
                        return Poll::Pending;
                    }
                    ready!(src.poll_read_ready(cx))?;
                    let taken = match pipes::take() {
                        Some(pipe) => read_into_pipe(src, pipe),
                        None => read_into_buf(src),
                    };
                    match taken {
                        Ok(Some(next)) => self.state = next,
                        Ok(None) => continue, // readiness was stale
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    if matches!(self.state, State::Ended) {
                        match shutdown(std::os::fd::AsRawFd::as_raw_fd(dst), Shutdown::Write) {
                            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => {}
                            Err(e) => return Poll::Ready(Err(e.into())),
                        }
                    }
                }
                State::Pipe { pipe, n, left } => {
                    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
                    while *left > 0 {
                        ready!(dst.poll_write_ready(cx))?;
                        match dst.try_io(Interest::WRITABLE, || {
                            splice(pipe.r.as_fd(), None, dst.as_fd(), None, *left, flags)
                                .map_err(io::Error::from)
                        }) {
                            Ok(m) => *left -= m,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    let n = *n;
                    if let State::Pipe { pipe, .. } = std::mem::take(&mut self.state) {
                        pipes::give(pipe);
                    }
                    self.moved(n, counter, role);
                }
                State::Buf { buf, n, sent } => {
                    while *sent < *n {
                        ready!(dst.poll_write_ready(cx))?;
                        match dst.try_write(&buf[*sent..*n]) {
                            Ok(m) => *sent += m,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    let n = *n;
                    self.state = State::Idle;
                    self.moved(n, counter, role);
                }
            }
        }
    }

    /// `n` more bytes written: counted, and the hand-over told.
    fn moved(&mut self, n: usize, counter: &AtomicU64, role: Role<'_, '_>) {
        self.total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        match role {
            Role::ToTarget(h) if h.h.taken + self.total >= HANDOVER_AFTER => h.attempt(self.total),
            Role::ToTarget(_) | Role::Plain => {}
            Role::ToApp(h) => h.renew(false),
        }
    }
}

/// Splices what `src` has into `pipe`. `None`: nothing to read after all (the pipe goes back).
/// On an error the pipe is closed.
///
/// A splice that took less than the pipe could hold emptied the socket, so its readiness is
/// cleared then and there (as tokio's own `poll_read` does after a short read): the next
/// bytes or the end of the stream bring a new edge, and the `EAGAIN` splice that would only
/// have found that out is saved (one system call per request on request/response traffic).
fn read_into_pipe(src: &TcpStream, pipe: Pipe) -> io::Result<Option<State>> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut drained = 0;
    let read = src.try_io(Interest::READABLE, || {
        let n = splice(src.as_fd(), None, pipe.w.as_fd(), None, PIPE_SIZE, flags)?;
        if n > 0 && n < pipe.slots {
            // `try_io` clears readiness on WouldBlock, and only then.
            drained = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Ok(0) => {
            pipes::give(pipe);
            Ok(Some(State::Ended))
        }
        Ok(n) => Ok(Some(State::Pipe { pipe, n, left: n })),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && drained > 0 => Ok(Some(State::Pipe {
            pipe,
            n: drained,
            left: drained,
        })),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            pipes::give(pipe);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The same as [`read_into_pipe`] through a buffer of the process's, for when every pipe is
/// taken (or descriptors ran out): slower, but the connection goes on.
fn read_into_buf(src: &TcpStream) -> io::Result<Option<State>> {
    let mut buf = vec![0u8; COPY_BUF].into_boxed_slice();
    match src.try_read(&mut buf) {
        Ok(0) => Ok(Some(State::Ended)),
        Ok(n) => Ok(Some(State::Buf { buf, n, sent: 0 })),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_relay_is_small() {
        // All an idle plain relay holds in its connection's task, for hours: a regression
        // here is paid per held connection (the two async pumps it replaced took 1.4 KiB).
        let size = std::mem::size_of::<Splice<'static>>();
        assert!(size <= 320, "the relay future grew to {size} bytes");
        assert!(std::mem::size_of::<Dir>() <= 48);
    }
}
