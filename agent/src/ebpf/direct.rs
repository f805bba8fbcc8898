//! The broker's side of direct mode (protocol in `latch_common::direct`): which sockets the
//! programs divert, and how.
use std::{os::fd::AsRawFd, sync::Mutex};

use aya::maps::{HashMap, MapData, MapError, SockHash};
use latch_common::{TupleKey, direct};

/// `LATCH_DIRECT` (the sockets), `LATCH_DIR_KEYS` (what to do with each socket's sends, by
/// namespace and 4-tuple) and `LATCH_DIR_RECV` (what to do with an application socket's
/// received bytes, by its cookie).
pub struct DirectMaps {
    socks: Mutex<SockHash<MapData, u64>>,
    keys: Mutex<HashMap<MapData, TupleKey, direct::Entry>>,
    /// A second handle on `LATCH_DIR_KEYS`, for [`DirectMaps::len`].
    counter: Mutex<HashMap<MapData, TupleKey, direct::Entry>>,
    recv: Mutex<HashMap<MapData, u64, u32>>,
    /// `LATCH_DIR_LIVE`: handed-over application sockets, until they close.
    live: Mutex<SockHash<MapData, u64>>,
    /// `LATCH_DIR_FIRST`: server-first application sockets' 4-tuples and the bytes their
    /// lobby header replaced.
    first: Mutex<HashMap<MapData, u64, direct::First>>,
}

impl DirectMaps {
    pub(super) fn new(
        socks: SockHash<MapData, u64>,
        keys: HashMap<MapData, TupleKey, direct::Entry>,
        counter: HashMap<MapData, TupleKey, direct::Entry>,
        recv: HashMap<MapData, u64, u32>,
        live: SockHash<MapData, u64>,
        first: HashMap<MapData, u64, direct::First>,
    ) -> Self {
        Self {
            socks: Mutex::new(socks),
            keys: Mutex::new(keys),
            counter: Mutex::new(counter),
            recv: Mutex::new(recv),
            live: Mutex::new(live),
            first: Mutex::new(first),
        }
    }

    /// Watches the handed-over application socket `cookie` until it closes (no program runs
    /// for it there). False if it could not be watched (closed already, or the map is full).
    pub fn watch_close(&self, cookie: u64, socket: &impl AsRawFd) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.insert(cookie, socket.as_raw_fd(), 0).is_ok()
    }

    /// The watched application sockets still open, by cookie. (A sock map's values cannot be
    /// read from user space when they are 4 bytes wide, as aya makes them; its keys can.)
    pub fn open_watched(&self) -> std::collections::HashSet<u64> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.keys().filter_map(Result::ok).collect()
    }

    /// Adds one of the broker's sockets (the lobby, or its socket for an application).
    pub fn add_socket(&self, key: u64, socket: &impl AsRawFd) -> Result<(), MapError> {
        let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
        socks.insert(key, socket.as_raw_fd(), 0)
    }

    /// Takes a socket out of the sock map (its programs no longer run for it).
    pub fn remove_socket(&self, key: u64) -> Result<(), MapError> {
        let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
        match socks.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            // A socket leaves the map by itself when it is closed.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sets what the programs do with the application socket `cookie` (key `key`).
    pub fn set(&self, key: &TupleKey, cookie: u64, flags: u32) -> Result<(), MapError> {
        self.set_entry(key, cookie, flags)?;
        let mut recv = self.recv.lock().unwrap_or_else(|e| e.into_inner());
        if flags & direct::FROM_TARGET != 0 {
            recv.insert(cookie, flags, 0)
        } else {
            match recv.remove(&cookie) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }

    /// Marks the broker's socket `key` as its socket for the application socket `app`.
    pub fn set_side(&self, key: &TupleKey, app: u64) -> Result<(), MapError> {
        self.set_entry(key, app, direct::SIDE)
    }

    fn set_entry(&self, key: &TupleKey, cookie: u64, flags: u32) -> Result<(), MapError> {
        let entry = direct::Entry {
            cookie,
            flags,
            _pad: 0,
        };
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.insert(key, entry, 0)
    }

    /// Forgets the application socket `cookie` (key `key`): its traffic passes untouched.
    pub fn forget(&self, key: &TupleKey, cookie: u64) {
        self.forget_side(key);
        let mut recv = self.recv.lock().unwrap_or_else(|e| e.into_inner());
        let _ = recv.remove(&cookie);
        drop(recv);
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        let _ = first.remove(&cookie);
    }

    /// Marks the application socket `cookie` (key `key`) as server-first, as sock_ops does
    /// (for the self-test).
    pub fn set_first(&self, cookie: u64, key: &TupleKey) -> Result<(), MapError> {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        let value = direct::First {
            key: *key,
            head: [0; direct::SKB_HEAD_LEN],
        };
        first.insert(cookie, value, 0)
    }

    /// The server-first application socket `cookie`'s 4-tuple and the received bytes its
    /// lobby header replaced ([`direct::GREETING`]).
    pub fn first(&self, cookie: u64) -> Option<direct::First> {
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        first.get(&cookie, 0).ok()
    }

    /// Forgets one of the broker's sockets.
    pub fn forget_side(&self, key: &TupleKey) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let _ = keys.remove(key);
    }

    /// Entries in the 4-tuple map (walks the keys; for tests and status).
    pub fn len(&self) -> usize {
        let keys = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        keys.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
