//! The threads direct-mode startups run on: one per CPU, pinned to it, each with a
//! single-threaded tokio runtime, started the first time a startup needs it and kept.
//!
//! A startup runs on the thread of the CPU the application's thread last ran on, so every
//! wake-up of the application and of the server's process that the startup causes comes from
//! that CPU, as in a direct connection's startup, and the scheduler (which keeps a woken task
//! near its waker) places the session as it would a direct one. Measured (pgbench -S -c 4 -j 2,
//! client and server in one autogroup, 8 alternated runs each): with the startup on the agent's
//! main runtime the session settled in the slow placement (~44k instead of ~63k tps) in 5 runs
//! of 6 and 4 of 8, against 1 in 8 for direct connections; pinned, 1 in 8 too.
//!
//! These threads used to be made per startup (a blocking-pool thread pinned for the startup,
//! with a runtime built for it): building a runtime (an epoll, an eventfd, a timer wheel) and
//! pinning and unpinning a thread for every connection was a fifth of the agent's work per
//! connection when an application opened one connection per query.
use std::sync::{
    OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

pub struct StartupThreads {
    /// By CPU number, up to the highest CPU this process may run on.
    cpus: Vec<OnceLock<Option<Handle>>>,
    /// For startups whose CPU is unknown.
    next: AtomicUsize,
    stop: CancellationToken,
}

impl StartupThreads {
    pub fn new() -> Self {
        let highest = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .ok()
            .and_then(|set| {
                (0..nix::sched::CpuSet::count())
                    .rev()
                    .find(|&c| set.is_set(c).unwrap_or(false))
            })
            .unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get) - 1
            });
        Self {
            cpus: (0..=highest).map(|_| OnceLock::new()).collect(),
            next: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        }
    }

    /// The runtime of `cpu`'s thread (of some CPU's when `cpu` is unknown or out of range),
    /// started now if it is the first startup there; `None` if no thread could be made.
    pub fn on(&self, cpu: Option<usize>) -> Option<Handle> {
        let i = cpu
            .filter(|&c| c < self.cpus.len())
            .unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed) % self.cpus.len());
        self.cpus[i]
            .get_or_init(|| match start(i, self.stop.clone()) {
                Ok(handle) => Some(handle),
                Err(err) => {
                    tracing::error!(%err, cpu = i, "direct mode: no thread for startups");
                    None
                }
            })
            .clone()
    }
}

impl Drop for StartupThreads {
    /// Lets the threads end (each drops its runtime and any startup still on it).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A thread pinned to `cpu` (unpinned if the CPU cannot be had) running a runtime until `stop`.
fn start(cpu: usize, stop: CancellationToken) -> std::io::Result<Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name(format!("latch-startup-{cpu}"))
        .spawn(move || {
            let mut one = nix::sched::CpuSet::new();
            if one.set(cpu).is_ok() {
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one);
            }
            rt.block_on(stop.cancelled());
        })?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread's name and id, and the CPU it is on.
    fn where_it_runs(handle: &Handle) -> (String, Option<usize>) {
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let t = std::thread::current();
            let name = format!("{} {:?}", t.name().unwrap_or_default(), t.id());
            // SAFETY: sched_getcpu has no preconditions.
            let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).ok();
            tx.send((name, cpu)).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn a_startup_runs_on_the_thread_pinned_to_its_cpu_and_the_thread_is_kept() {
        let threads = StartupThreads::new();
        let (first, cpu) = where_it_runs(&threads.on(Some(0)).unwrap());
        assert!(first.starts_with("latch-startup-0 "), "{first}");
        assert_eq!(cpu, Some(0), "the thread is pinned to CPU 0");
        // The same thread (by id) every time, not a new one.
        for _ in 0..10 {
            assert_eq!(
                where_it_runs(&threads.on(Some(0)).unwrap()),
                (first.clone(), Some(0))
            );
        }
        // An unknown CPU goes to some CPU's thread.
        assert!(
            where_it_runs(&threads.on(Some(100_000)).unwrap())
                .0
                .starts_with("latch-startup-")
        );
    }
}
