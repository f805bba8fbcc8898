//! The pipes splice(2) moves bytes through, pooled as HAProxy pools them: a direction takes a
//! pipe when data arrives and gives it back once the pipe is drained, so an idle connection
//! holds its two sockets and nothing else. At most [`set_max`] pipes exist at once; past it a
//! direction copies through a buffer instead (slower, never a failure).
use std::{
    cell::RefCell,
    io,
    os::fd::OwnedFd,
    sync::atomic::{AtomicUsize, Ordering},
};

use nix::{
    fcntl::{FcntlArg, OFlag, fcntl},
    unistd::pipe2,
};

/// Pipe capacity asked for; the kernel may grant less.
pub const PIPE_SIZE: usize = 1 << 20;

/// Drained pipes kept for reuse per connection thread; more are closed.
const IDLE_PER_THREAD: usize = 16;

/// Pipes that exist (in use or idle), and the most that may.
static BOUND: Bound = Bound::new(usize::MAX);

/// A count bounded by a maximum that can change.
struct Bound {
    live: AtomicUsize,
    max: AtomicUsize,
}

impl Bound {
    const fn new(max: usize) -> Self {
        Self {
            live: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// Counts one more, unless at the maximum.
    fn acquire(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    static IDLE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Bounds the pipes that may exist at once (`--max-pipes`).
pub fn set_max(max: usize) {
    BOUND.max.store(max, Ordering::Relaxed);
}

/// Pipes that exist now (metrics, tests).
pub fn live() -> usize {
    BOUND.live.load(Ordering::Relaxed)
}

/// One pipe: read end, write end, and how many buffers (pages) it holds. Closing it gives its
/// place in the bound back.
pub struct Pipe {
    pub r: OwnedFd,
    pub w: OwnedFd,
    /// Each splice into the pipe fills at least one buffer per non-empty piece it takes, so a
    /// splice from a socket that moved fewer bytes than this stopped because the socket had no
    /// more, not because the pipe was full.
    pub slots: usize,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        BOUND.release();
    }
}

/// A drained pipe from this thread's idle list, or a new one while under the bound. `None`:
/// at the bound, or the process is out of descriptors; the caller copies through a buffer.
pub fn take() -> Option<Pipe> {
    if let Some(p) = IDLE.with(|idle| idle.borrow_mut().pop()) {
        return Some(p);
    }
    if !BOUND.acquire() {
        return None;
    }
    match new_pipe() {
        Ok((r, w, slots)) => Some(Pipe { r, w, slots }),
        Err(err) => {
            BOUND.release();
            crate::warn_throttled!(%err, "no pipe for splice; copying through a buffer");
            None
        }
    }
}

/// Gives back a pipe that is empty (everything spliced in was spliced out).
pub fn give(pipe: Pipe) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        if idle.len() < IDLE_PER_THREAD {
            idle.push(pipe);
        }
    });
}

fn new_pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let (r, w) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A larger pipe means fewer splice calls per megabyte; not fatal if refused (the pipe then
    // keeps the size it has, which the kernel says).
    let size = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
        .or_else(|_| fcntl(&w, FcntlArg::F_GETPIPE_SZ))
        .unwrap_or(0);
    Ok((r, w, usize::try_from(size).unwrap_or(0) / page_size()))
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| usize::try_from(p).ok())
            .filter(|p| *p > 0)
            .unwrap_or(4096)
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn a_pipe_knows_how_many_buffers_it_holds() {
        let (_r, w, slots) = new_pipe().unwrap();
        let size = fcntl(&w, FcntlArg::F_GETPIPE_SZ).unwrap();
        assert_eq!(slots, usize::try_from(size).unwrap() / page_size());
        assert!(slots >= 1);
    }

    #[test]
    fn the_bound_refuses_past_its_maximum_and_frees_on_release() {
        let b = Bound::new(2);
        assert!(b.acquire() && b.acquire());
        assert!(!b.acquire(), "at the bound");
        b.release();
        assert!(b.acquire());
    }

    #[test]
    fn a_drained_pipe_is_reused_by_the_next_taker_on_its_thread() {
        // A thread of its own: its idle list starts empty.
        std::thread::spawn(|| {
            let a = take().expect("a pipe");
            let fd = a.r.as_raw_fd();
            give(a);
            let b = take().expect("the idle one");
            assert_eq!(b.r.as_raw_fd(), fd);
        })
        .join()
        .unwrap();
    }
}
