//! Connection threads: one single-threaded tokio runtime per CPU. A connection lives on one
//! of them from accept to close (assigned round robin), so the readiness of its sockets wakes
//! the thread that runs it (its own epoll), never a second thread that would then have to wake
//! it: on request/response traffic that halves the wake-ups per reply (pgbench `-S` through
//! latch went from about 21k to 31k transactions per second here). The agent's other work
//! (accept loops, admin, reload, DNS) stays on the main runtime.
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Ends the threads (each drops its runtime, and with it any task still there).
    stop: CancellationToken,
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
            std::thread::Builder::new()
                .name(format!("latch-conn-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()))?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// The thread for the next connection (round robin).
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
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
