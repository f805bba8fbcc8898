//! The broker's view of `LATCH_CONNS`: what the kernel recorded for an accepted connection.
use std::{net::SocketAddr, sync::Mutex};

use aya::maps::{HashMap, MapData, MapError};
use latch_common::{ConnMeta, TupleKey};

/// Lookup-and-remove access to the kernel's per-connection records.
pub struct ConnTable {
    map: Mutex<HashMap<MapData, TupleKey, ConnMeta>>,
    /// Another handle on the same map, for [`ConnTable::len`] (so counting never holds up
    /// [`ConnTable::take`]).
    counter: Mutex<HashMap<MapData, TupleKey, ConnMeta>>,
}

impl ConnTable {
    pub(super) fn new(
        map: HashMap<MapData, TupleKey, ConnMeta>,
        counter: HashMap<MapData, TupleKey, ConnMeta>,
    ) -> Self {
        Self {
            map: Mutex::new(map),
            counter: Mutex::new(counter),
        }
    }

    /// Takes the record of the connection the broker accepted from `peer` on `local`, on a
    /// listener in the network namespace with cookie `netns`.
    ///
    /// The record is removed so that a later connection reusing the same 4-tuple without being
    /// redirected can never inherit it (the kernel also removes it when the application's
    /// socket closes first). A record made in another namespace has another key, and one whose
    /// namespace is not `netns` is refused all the same.
    pub fn take(
        &self,
        netns: u64,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<ConnMeta>, MapError> {
        let meta = self.take_key(&tuple_key(netns, peer, local))?;
        // A direct-mode record was never redirected to a listener.
        Ok(meta.filter(|m| m.netns_cookie == netns && m.flags & latch_common::RULE_DIRECT == 0))
    }

    /// As [`ConnTable::take`], by the key itself (direct mode gets it from the kernel).
    pub fn take_key(&self, key: &TupleKey) -> Result<Option<ConnMeta>, MapError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Number of records currently held (for metrics; walks the map).
    pub fn len(&self) -> usize {
        let map = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    fn the_same_4_tuple_in_two_namespaces_gives_two_keys() {
        let (peer, local) = (
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:951".parse().unwrap(),
        );
        assert_ne!(tuple_key(1, peer, local), tuple_key(2, peer, local));
    }
}
