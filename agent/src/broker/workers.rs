//! Connection threads: one single-threaded tokio runtime per CPU. A connection lives on one
//! of them from accept to close, so the readiness of its sockets wakes the thread that runs it
//! (its own epoll), never a second thread that would then have to wake it: on request/response
//! traffic that halves the wake-ups per reply (pgbench `-S` through latch went from about 21k
//! to 31k transactions per second here). The agent's other work (admin, reload,
//! DNS) stays on the main runtime.
//!
//! Which thread: the connections one application thread opens share a connection thread, and
//! each new application thread gets the next connection thread round robin. An application
//! thread that multiplexes connections (an event loop, pgbench's threads) then pairs with one
//! broker thread, and the scheduler keeps the pair close. Measured with pgbench `-S -c 4 -j 2`:
//! when accept order happened to give each pgbench thread a broker thread of its own, 42–45k
//! transactions per second; when each pgbench thread's connections were split over both broker
//! threads, 25–32k; both pgbench threads on one broker thread, 23–25k.
//!
//! One connection thread in [`CPUS_PER_ACCEPTOR`] (at most [`MAX_ACCEPTORS`], the first ones)
//! runs an accept loop on every listener (`Serving::listen`). Every thread that accepts on a
//! listener is woken for each of its connections and all but one find nothing, so their
//! number is kept low.
//!
//! An application thread that opens connections faster than [`CHURN`] a second (one connection
//! per request: ab, wrk with `Connection: close`, PHP and CGI-style workers) is not paired: its
//! connections stay on the thread that accepted them. Opening them is most of their work, and
//! moving each to another thread costs a wake-up there. On a small machine, where latch shares
//! the CPUs with the applications and servers it serves, one thread doing that work beats two.
//! Measured on 2 CPUs (means of three alternating runs, nginx target):
//!
//! | one connection per request | both threads accept, each serves what it accepted | one accepts and serves | one connection thread in all |
//! |---|---|---|---|
//! | wrk `-c8`, `Connection: close`, http policy (requests/s) | 8 770 | 11 830 | 12 170 |
//! | `ab -c 32`, tcp policy (connections/s) | 9 270 | 10 140 | 10 260 |
//!
//! sysbench connect-per-query through a mysql policy showed no difference beyond noise (4 357
//! against 4 294 a second). Long-lived connections still spread over every thread (pairing,
//! above), so one accepting thread does not cap what the others relay.
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Slots of the application-thread table.
const OPENER_SLOTS: usize = 1024;

/// Connections an application thread opens in one second before its next ones stay on the
/// thread that accepted them.
pub const CHURN: u32 = 64;

/// Connection threads that accept (the first ones), at most.
pub const MAX_ACCEPTORS: usize = 4;

/// Connection threads (CPUs) per accepting thread: measured only on 2 CPUs, where one
/// accepting thread served connections from fast openers better than two; from 8 CPUs on,
/// four accept, as before.
pub const CPUS_PER_ACCEPTOR: usize = 2;

thread_local! {
    /// Which connection thread this is (`None` on any other thread).
    static THREAD: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Numbers the connection threads of every pool in the process.
static THREADS: AtomicU64 = AtomicU64::new(1);

/// The connection thread the caller runs on (unique in the process), `None` off them. A
/// socket is registered with the reactor of the thread that made its tokio object; a task on
/// another thread using it is woken through that thread (an event there, then a wake-up
/// across), so what is handed between connections notes where it lives
/// ([`crate::connector::kept`]).
pub fn current() -> Option<u64> {
    THREAD.with(Cell::get)
}

#[derive(Clone, Copy, Default)]
struct Opener {
    /// `pid << 32 | tid`, 0 for an empty slot.
    key: u64,
    worker: usize,
    /// The second (since the pool started) of this thread's latest connections, and how many
    /// it opened in it.
    second: u64,
    opened: u32,
}

pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Application thread → connection thread, by hash of (pid, tid). A collision or a reused
    /// thread id only moves a connection to another thread: this is placement, not identity.
    openers: Mutex<Box<[Opener; OPENER_SLOTS]>>,
    /// Ends the threads (each drops its runtime, and with it any task still there).
    stop: CancellationToken,
    started: Instant,
}

impl Workers {
    /// Starts `n` (at least one) connection threads.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            let id = THREADS.fetch_add(1, Ordering::Relaxed);
            std::thread::Builder::new()
                .name(format!("latch-conn-{i}"))
                .spawn(move || {
                    THREAD.with(|t| t.set(Some(id)));
                    rt.block_on(stop.cancelled())
                })?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            openers: Mutex::new(Box::new([Opener::default(); OPENER_SLOTS])),
            stop,
            started: Instant::now(),
        })
    }

    /// The thread for the next connection (round robin).
    pub fn next(&self) -> &Handle {
        &self.handles[self.next_index()]
    }

    /// How many connection threads there are (at least one).
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// How many of them accept (the first ones): one per [`CPUS_PER_ACCEPTOR`], at most
    /// [`MAX_ACCEPTORS`].
    pub fn acceptors(&self) -> usize {
        acceptors_for(self.count())
    }

    /// Connection thread `i` (`i < count()`).
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i]
    }

    /// The thread (index) for a connection opened by thread `tid` of process `pid` and
    /// accepted on thread `here`: the one its earlier connections went to, or the next one
    /// round robin for a new opener. One that opened more than [`CHURN`] connections this
    /// second: `here`, so its connections cost no hand-over between threads.
    pub fn for_opener(&self, pid: u32, tid: u32, here: usize) -> usize {
        self.pick(pid, tid, self.started.elapsed(), here)
    }

    /// [`Self::for_opener`]'s choice at `now` (since the pool started).
    fn pick(&self, pid: u32, tid: u32, now: Duration, here: usize) -> usize {
        let key = u64::from(pid) << 32 | u64::from(tid);
        if key == 0 {
            return here;
        }
        let slot = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as usize % OPENER_SLOTS;
        let second = now.as_secs();
        let mut openers = self.openers.lock().unwrap_or_else(|e| e.into_inner());
        let entry = &mut openers[slot];
        if entry.key != key {
            *entry = Opener {
                key,
                worker: self.next_index(),
                second,
                opened: 0,
            };
        }
        if entry.second != second {
            entry.second = second;
            entry.opened = 0;
        }
        entry.opened = entry.opened.saturating_add(1);
        if entry.opened > CHURN {
            return here;
        }
        entry.worker
    }

    fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }
}

/// How many of `threads` connection threads accept.
fn acceptors_for(threads: usize) -> usize {
    threads.div_ceil(CPUS_PER_ACCEPTOR).min(MAX_ACCEPTORS)
}

impl Drop for Workers {
    /// Lets the threads end; does not wait for them (this may run inside a runtime).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_round_robin_to_threads_of_their_own() {
        let workers = Workers::start(2).unwrap();
        let names: Vec<String> = (0..4)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel();
                workers.next().spawn(async move {
                    let name = std::thread::current().name().unwrap_or_default().to_owned();
                    tx.send(name).unwrap();
                });
                rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap()
            })
            .collect();
        assert_eq!(
            names,
            [
                "latch-conn-0",
                "latch-conn-1",
                "latch-conn-0",
                "latch-conn-1"
            ]
        );
    }

    fn thread_name(handle: &Handle) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let name = std::thread::current().name().unwrap_or_default().to_owned();
            tx.send(name).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn an_application_threads_connections_share_a_thread_and_new_ones_spread() {
        let workers = Workers::start(2).unwrap();
        // pgbench -j 2: threads 100 and 102 of process 100, connections interleaved
        let on = |pid, tid| thread_name(workers.handle(workers.for_opener(pid, tid, 0)));
        let names: Vec<String> = [(100, 100), (100, 102), (100, 102), (100, 100), (100, 100)]
            .iter()
            .map(|&(pid, tid)| on(pid, tid))
            .collect();
        assert_eq!(
            names,
            [
                "latch-conn-0",
                "latch-conn-1",
                "latch-conn-1",
                "latch-conn-0",
                "latch-conn-0"
            ]
        );
        // the same thread id in another process is another opener
        assert_eq!(on(7, 100), "latch-conn-0");
        assert_eq!(on(7, 100), "latch-conn-0");
        assert_eq!(on(8, 100), "latch-conn-1");
    }

    #[test]
    fn a_thread_that_opens_connections_fast_has_them_served_where_accepted() {
        let workers = Workers::start(2).unwrap();
        let at = |ms: u64| Duration::from_millis(ms);
        // The first CHURN connections in a second stay on the opener's thread...
        let first = workers.pick(5, 5, at(0), 0);
        for i in 1..CHURN {
            assert_eq!(workers.pick(5, 5, at(u64::from(i)), 1 - first), first);
        }
        // ...past that each is served by the thread that accepted it...
        assert_eq!(workers.pick(5, 5, at(500), 0), 0);
        assert_eq!(workers.pick(5, 5, at(501), 1), 1);
        // ...and another opener keeps its own pairing meanwhile.
        let other = workers.pick(6, 6, at(600), 0);
        assert_eq!(workers.pick(6, 6, at(700), 1 - other), other);
        // In the next second the opener is paired with its thread again.
        assert_eq!(workers.pick(5, 5, at(1000), 1 - first), first);
        assert_eq!(workers.pick(5, 5, at(1001), 1 - first), first);
    }

    #[test]
    fn one_thread_in_two_accepts_and_at_most_four() {
        let accepting: Vec<usize> = [1, 2, 3, 4, 8, 40].map(acceptors_for).into();
        assert_eq!(accepting, [1, 1, 2, 2, 4, MAX_ACCEPTORS]);
        assert_eq!(Workers::start(2).unwrap().acceptors(), 1);
    }

    #[test]
    fn with_more_threads_than_accept_a_fast_openers_connections_stay_where_accepted() {
        let workers = Workers::start(4).unwrap();
        assert_eq!(workers.acceptors(), 2);
        let at = |ms: u64| Duration::from_millis(ms);
        for i in 0..=CHURN {
            workers.pick(5, 5, at(u64::from(i)), 0);
        }
        // Past CHURN, each is served by the accepting thread that took it.
        for i in 0..8 {
            assert_eq!(workers.pick(5, 5, at(500 + i), 0), 0);
            assert_eq!(workers.pick(5, 5, at(600 + i), 1), 1);
        }
    }

    #[test]
    fn dropping_the_pool_ends_its_threads() {
        let workers = Workers::start(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        workers.next().spawn(async move {
            // Held until the runtime drops this task.
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(workers);
        // The sender is dropped with the task when the thread's runtime goes.
        assert!(matches!(
            rx.recv_timeout(std::time::Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}
