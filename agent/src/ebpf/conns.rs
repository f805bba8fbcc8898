//! The broker's view of `LATCH_CONNS`: what the kernel recorded for an accepted connection.
use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::Mutex,
};

use aya::maps::{HashMap, MapData, MapError};
use latch_common::{ConnMeta, TupleKey};

/// Lookup-and-remove access to the kernel's per-connection records.
pub struct ConnTable {
    map: Mutex<HashMap<MapData, TupleKey, ConnMeta>>,
    /// Another handle on the same map, for [`ConnTable::len`] (so counting never holds up
    /// [`ConnTable::take`]).
    counter: Mutex<HashMap<MapData, TupleKey, ConnMeta>>,
    /// A third descriptor of the map, for the next agent on an upgrade.
    fd: Option<OwnedFd>,
    /// The previous agent's table during an upgrade (see `crate::upgrade`): connections its
    /// programs redirected just before they were detached are recorded there.
    previous: Mutex<Option<HashMap<MapData, TupleKey, ConnMeta>>>,
}

impl ConnTable {
    pub(super) fn new(
        map: HashMap<MapData, TupleKey, ConnMeta>,
        counter: HashMap<MapData, TupleKey, ConnMeta>,
        fd: Option<OwnedFd>,
    ) -> Self {
        Self {
            map: Mutex::new(map),
            counter: Mutex::new(counter),
            fd,
            previous: Mutex::new(None),
        }
    }

    /// A duplicate descriptor of the kernel map, to hand to the next agent.
    pub fn dup_fd(&self) -> Option<OwnedFd> {
        self.fd.as_ref().and_then(|fd| fd.try_clone().ok())
    }

    /// Also looks records up in the previous agent's map `fd` (an upgrade), until
    /// [`ConnTable::forget_previous`].
    pub fn adopt_previous(&self, fd: OwnedFd) -> Result<(), MapError> {
        let map = aya::maps::Map::from_map_data(MapData::from_fd(fd)?)?;
        let map = HashMap::try_from(map)?;
        *self.previous.lock().unwrap_or_else(|e| e.into_inner()) = Some(map);
        Ok(())
    }

    /// Stops looking at the previous agent's map.
    pub fn forget_previous(&self) {
        *self.previous.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Takes the record of the connection the broker accepted from `peer` on `local`, on a
    /// listener in the network namespace with cookie `netns`.
    ///
    /// The record is removed so that a later connection reusing the same 4-tuple without being
    /// redirected can never inherit it (the kernel also removes it when the application's
    /// socket closes first, unless it closed in an orderly way while this connection waited
    /// to be accepted: see [`still_held`]). A record made in another namespace has another key, and one whose
    /// namespace is not `netns` is refused all the same.
    pub fn take(
        &self,
        netns: u64,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<ConnMeta>, MapError> {
        let meta = self.take_key(&tuple_key(netns, peer, local))?;
        // A direct-mode record was never redirected to a listener.
        Ok(meta.filter(|m| {
            m.netns_cookie == netns
                && m.flags & latch_common::RULE_DIRECT == 0
                && still_held(m, boottime_ns())
        }))
    }

    /// As [`ConnTable::take`], by the key itself (direct mode gets it from the kernel).
    pub fn take_key(&self, key: &TupleKey) -> Result<Option<ConnMeta>, MapError> {
        let found = take_from(&mut self.map.lock().unwrap_or_else(|e| e.into_inner()), key)?;
        if found.is_some() {
            return Ok(found);
        }
        match &mut *self.previous.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(previous) => take_from(previous, key),
            None => Ok(None),
        }
    }

    /// Number of records currently held (for metrics; walks the map).
    pub fn len(&self) -> usize {
        let map = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a record is still its connection's at `now` (CLOCK_BOOTTIME ns): always, unless
/// the application closed before the broker accepted ([`latch_common::CONN_APP_CLOSED`]);
/// then only within [`latch_common::APP_CLOSED_RECORD_TTL_NS`] of the connect, while the
/// application's TIME_WAIT socket still holds the 4-tuple.
fn still_held(meta: &ConnMeta, now: u64) -> bool {
    meta.flags & latch_common::CONN_APP_CLOSED == 0
        || now.saturating_sub(meta.ktime_ns) <= latch_common::APP_CLOSED_RECORD_TTL_NS
}

/// CLOCK_BOOTTIME in nanoseconds, the clock of [`ConnMeta::ktime_ns`].
fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_BOOTTIME exists on every kernel latch runs on.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return u64::MAX;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Looks `key` up in `map` and removes it: one `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (Linux 5.14
/// for hash maps), or a lookup then a delete where the kernel does not have it.
fn take_from(
    map: &mut HashMap<MapData, TupleKey, ConnMeta>,
    key: &TupleKey,
) -> Result<Option<ConnMeta>, MapError> {
    use aya::maps::IterableMap as _;
    match lookup_and_delete(map.map().fd().as_fd(), key) {
        Ok(found) => return Ok(found),
        Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {}
        Err(io_error) => {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_and_delete_elem",
                io_error,
            }));
        }
    }
    match map.get(key, 0) {
        Ok(meta) => {
            match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(err) => return Err(err),
            }
            Ok(Some(meta))
        }
        Err(MapError::KeyNotFound) => Ok(None),
        Err(err) => Err(err),
    }
}

/// The kernel's "operation not supported" (not in libc: it never reaches user space except
/// from interfaces like bpf(2)).
const ENOTSUPP: i32 = 524;

/// `bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM)` on a hash map of [`TupleKey`] → [`ConnMeta`]:
/// `Ok(None)` when the key is not there.
fn lookup_and_delete(map: BorrowedFd<'_>, key: &TupleKey) -> std::io::Result<Option<ConnMeta>> {
    /// The map-element member of `union bpf_attr` (linux/bpf.h); the kernel takes a prefix of
    /// the union no longer than the command uses.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = ConnMeta::default();
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        flags: 0,
    };
    // SAFETY: `attr` names a live map descriptor, a key of the map's key size and a value
    // buffer of its value size (both `repr(C)` types shared with the programs), all valid for
    // the call; the kernel reads `attr` and writes only `value`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        return Ok(Some(value));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(err),
    }
}

/// The key the sock_ops program wrote for this connection in namespace `netns`: both ends as
/// IPv6 (IPv4 mapped).
pub fn tuple_key(netns: u64, peer: SocketAddr, local: SocketAddr) -> TupleKey {
    TupleKey {
        peer_addr: mapped(peer),
        local_addr: mapped(local),
        peer_port: peer.port(),
        local_port: local.port(),
        _pad: 0,
        netns,
    }
}

/// The (peer, local) addresses of a key: [`tuple_key`] the other way round.
pub fn tuple_addrs(key: &TupleKey) -> (SocketAddr, SocketAddr) {
    let addr = |octets: [u8; 16], port| {
        SocketAddr::new(std::net::Ipv6Addr::from(octets).to_canonical(), port)
    };
    (
        addr(key.peer_addr, key.peer_port),
        addr(key.local_addr, key.local_port),
    )
}

fn mapped(addr: SocketAddr) -> [u8; 16] {
    match addr {
        SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped().octets(),
        SocketAddr::V6(v6) => v6.ip().octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_mapped_ipv6_peers_give_the_same_key() {
        let a = tuple_key(
            7,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:951".parse().unwrap(),
        );
        let b = tuple_key(
            7,
            "[::ffff:127.0.0.1]:40000".parse().unwrap(),
            "[::ffff:127.0.0.1]:951".parse().unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.peer_port, 40000);
        assert_eq!(a.local_addr[10..], [0xff, 0xff, 127, 0, 0, 1]);
    }

    #[test]
    fn a_record_whose_application_closed_first_is_held_only_briefly() {
        let meta = |flags| ConnMeta {
            ktime_ns: 5_000_000_000,
            flags,
            ..ConnMeta::default()
        };
        let ttl = latch_common::APP_CLOSED_RECORD_TTL_NS;
        let closed = meta(latch_common::CONN_APP_CLOSED);
        assert!(still_held(&closed, 5_000_000_000 + ttl));
        assert!(!still_held(&closed, 5_000_000_001 + ttl));
        assert!(
            still_held(&meta(0), u64::MAX),
            "a live record has no age limit"
        );
        assert!(!still_held(&closed, u64::MAX), "no clock: not held");
    }

    #[test]
    fn the_same_4_tuple_in_two_namespaces_gives_two_keys() {
        let (peer, local) = (
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:951".parse().unwrap(),
        );
        assert_ne!(tuple_key(1, peer, local), tuple_key(2, peer, local));
    }
}
