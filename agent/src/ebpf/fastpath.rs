//! The broker's side of the application-to-target fast path (see `latch_common::flow`).
use std::{
    num::NonZeroUsize,
    os::fd::{AsFd as _, AsRawFd},
    ptr::NonNull,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{MapData, MapError, SockHash};
use latch_common::flow;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// The flow slots (mapped from `LATCH_FLOWS`) and the target sockets (`LATCH_TARGETS`).
pub struct FastPath {
    words: NonNull<AtomicU64>,
    targets: Mutex<SockHash<MapData, u64>>,
    /// A second handle on `LATCH_TARGETS`, for [`FastPath::targets_len`].
    counter: Mutex<SockHash<MapData, u64>>,
    /// Keeps the array map alive for as long as the mapping is used.
    _flows: MapData,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the sock hash is behind
// a mutex.
unsafe impl Send for FastPath {}
// SAFETY: as for Send.
unsafe impl Sync for FastPath {}

const LEN: usize = flow::SLOTS as usize * std::mem::size_of::<flow::Slot>();

impl FastPath {
    pub(super) fn new(
        flows: MapData,
        targets: SockHash<MapData, u64>,
        counter: SockHash<MapData, u64>,
    ) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping of the map's value area, unmapped in Drop; the kernel
        // keeps the map alive while it is mapped.
        let ptr = unsafe {
            mmap(
                None,
                NonZeroUsize::new(LEN).expect("non-zero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                flows.fd().as_fd(),
                0,
            )
        }?;
        Ok(Self {
            words: ptr.cast(),
            targets: Mutex::new(targets),
            counter: Mutex::new(counter),
            _flows: flows,
        })
    }

    /// Word `i` (0 state, 1 bytes, 2 charged, 3 limit; see `flow::Slot`) of the cookie's slot.
    fn word(&self, cookie: u64, i: usize) -> &AtomicU64 {
        const WORDS: usize = std::mem::size_of::<flow::Slot>() / 8;
        // SAFETY: the slot is below SLOTS, so inside the mapping, which lives as long as self;
        // u64 words are 8-byte aligned in a page-aligned mapping.
        unsafe {
            &*self
                .words
                .as_ptr()
                .add(flow::slot(cookie) as usize * WORDS + i)
        }
    }

    fn state(&self, cookie: u64) -> Option<u64> {
        let s = self.word(cookie, 0).load(Ordering::SeqCst);
        flow::owned_by(s, cookie).then_some(s)
    }

    /// Whether the flow is handed over now (the kernel may hand it back at any moment).
    pub fn is_handed_over(&self, cookie: u64) -> bool {
        self.state(cookie)
            .is_some_and(|s| s & flow::HANDED_OVER != 0)
    }

    /// Bytes the kernel has redirected for this flow, or `None` if the slot now belongs to
    /// another socket.
    pub fn redirected(&self, cookie: u64) -> Option<u64> {
        let bytes = self.word(cookie, 1).load(Ordering::SeqCst);
        self.state(cookie).map(|_| bytes)
    }

    /// Registers `target` as where the flow's sends go once it is handed over.
    pub fn register<S: AsRawFd>(&self, cookie: u64, target: &S) -> Result<(), MapError> {
        let mut map = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(cookie, target.as_raw_fd(), 0)
    }

    /// Lets the kernel redirect `room()` more bytes (charged) from now on. `room` is asked
    /// after the charge so far is read: bytes charged meanwhile count against the new room.
    /// Returns the room given.
    pub fn allow(&self, cookie: u64, room: impl FnOnce() -> u64) -> u64 {
        let charged = self.charged(cookie);
        let room = room();
        self.word(cookie, 3).store(
            flow::limit_word(cookie, charged.saturating_add(room)),
            Ordering::SeqCst,
        );
        room
    }

    /// Bytes charged against allowances so far (redirected bytes plus the per-message
    /// overhead).
    pub fn charged(&self, cookie: u64) -> u64 {
        self.word(cookie, 2).load(Ordering::SeqCst)
    }

    /// What is left of the allowance.
    pub fn remaining(&self, cookie: u64) -> u64 {
        let charged = self.charged(cookie);
        flow::limit_bound(self.word(cookie, 3).load(Ordering::SeqCst), cookie)
            .saturating_sub(charged)
    }

    /// Hands the flow over, allowing `room()` bytes, if the application has passed exactly
    /// `taken` bytes to the broker — all of which the broker has read and written toward the
    /// target. `false` if more are in flight (try again later) or the slot is not this flow's.
    pub fn hand_over(&self, cookie: u64, taken: u64, room: impl FnOnce() -> u64) -> bool {
        let expect = flow::initial(cookie) | taken;
        // Cheap check first: while bytes are in flight (the usual case mid-stream) the swap
        // would fail, so the allowance is not worth computing.
        if taken > flow::PASSED || self.word(cookie, 0).load(Ordering::SeqCst) != expect {
            return false;
        }
        self.allow(cookie, room);
        self.word(cookie, 0)
            .compare_exchange(
                expect,
                expect | flow::HANDED_OVER,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Target sockets registered now (walks the keys; for status).
    pub fn targets_len(&self) -> usize {
        let map = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().filter(Result::is_ok).count()
    }

    /// Takes the flow back (the application's later sends go to the broker's socket), then
    /// forgets its target socket (closing it would too). Without the first step a send racing
    /// the end of the connection would fail with EACCES instead of the usual reset.
    pub fn release(&self, cookie: u64) {
        let state = self.word(cookie, 0);
        let mut s = state.load(Ordering::SeqCst);
        while flow::owned_by(s, cookie) && s & flow::HANDED_OVER != 0 {
            match state.compare_exchange(
                s,
                s & !flow::HANDED_OVER,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        let mut map = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        match map.remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => tracing::debug!(%err, "removing a fast-path target"),
        }
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, used by nobody once self is dropped.
        let _ = unsafe { munmap(self.words.cast(), LEN) };
    }
}
