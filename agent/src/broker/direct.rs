//! Direct mode's broker side (protocol in `latch_common::direct`).
//!
//! | file | holds |
//! |---|---|
//! | `direct.rs` | the maps, the lobby socket, the broker's socket per application |
//! | [`lobby`] | reading the lobby; admission (policy, workload, limits, audit) per connection |
//! | [`self_test`] | the kernel self-test run at start |
//! | [`sockets`] | the application's socket from its process (pidfd_getfd), cookies, FIONREAD |
//! | [`threads`] | the threads startups run on, one per CPU |
mod lobby;
mod self_test;
mod sockets;
mod threads;

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use latch_common::direct::{LOBBY, SIDE_KEY};
use tokio::{net::TcpStream, sync::mpsc};

pub use lobby::run_lobby;
pub use sockets::{app_socket, cpu_of, fionread};

use crate::ebpf::DirectMaps;

/// The direct-mode maps and the broker's lobby socket.
pub struct Direct {
    maps: DirectMaps,
    /// Makes the broker's socket pairs (loopback, never seen by applications). Locked so
    /// that each connect gets its own accept.
    pairs: Mutex<std::net::TcpListener>,
    lobby: Mutex<Option<std::net::TcpStream>>,
    /// The other ends of the broker's sockets, kept open while their socket is in use.
    _lobby_peer: std::net::TcpStream,
    /// Pairs no session uses, left empty by the last one ([`Direct::end_side`]), for the
    /// next: a new pair is a loopback connect, accept and, at the end, two closes.
    spare: Mutex<Vec<Pair>>,
    sessions: Mutex<HashMap<u64, Session>>,
    /// Startups running at once (`--max-direct-startups`); past it a connection is refused
    /// with 53300 on the agent's main runtime.
    startups: Arc<tokio::sync::Semaphore>,
    /// Where startups run: the thread of the CPU the application last ran on.
    threads: threads::StartupThreads,
    startups_limit: usize,
    /// The workload slots of handed-over connections, by application socket cookie, until
    /// their sockets close ([`Direct::release_closed`]).
    held: Mutex<HashMap<u64, crate::broker::per_workload::Slot>>,
}

/// A broker socket and its other end.
type Pair = (std::net::TcpStream, std::net::TcpStream);

/// At most this many spare pairs are kept (the startups a burst of connections leaves behind;
/// two descriptors each).
const SPARE_PAIRS: usize = 32;

/// How often the slots of closed direct-mode connections are given back.
pub const RELEASE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A connection's task, as the lobby reader sees it.
struct Session {
    tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes passed on so far; past [`MAX_FROM_APP`] the rest is dropped.
    bytes: usize,
}

/// What one application may send to the lobby: its SSLRequest and StartupMessage (at most
/// 10 000 bytes, as PostgreSQL allows) and a little more. Anything past it is dropped (the
/// connection fails its startup anyway), so an application cannot grow the agent's memory.
const MAX_FROM_APP: usize = 16 * 1024;

impl Direct {
    /// Makes the lobby socket and puts it in the sock map. Call before the programs are
    /// attached, so that no application message finds the lobby missing.
    pub fn new(maps: DirectMaps, max_startups: usize) -> io::Result<Self> {
        let pairs = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let (lobby, lobby_peer) = pair(&pairs)?;
        maps.add_socket(LOBBY, &lobby).map_err(io::Error::other)?;
        Ok(Self {
            maps,
            pairs: Mutex::new(pairs),
            lobby: Mutex::new(Some(lobby)),
            _lobby_peer: lobby_peer,
            spare: Mutex::new(Vec::new()),
            sessions: Mutex::new(HashMap::new()),
            startups: Arc::new(tokio::sync::Semaphore::new(max_startups.max(1))),
            startups_limit: max_startups.max(1),
            threads: threads::StartupThreads::new(),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Holds a handed-over connection's workload slot until its socket closes (the hand-over
    /// put it in `LATCH_DIR_LIVE`).
    fn hold_until_closed(&self, cookie: u64, slot: crate::broker::per_workload::Slot) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(cookie, slot);
    }

    /// Gives back the slots of connections whose sockets have closed; returns how many are
    /// still held.
    pub fn release_closed(&self) -> usize {
        if self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return 0;
        }
        let open = self.maps.open_watched();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|cookie, _| open.contains(cookie));
        held.len()
    }

    /// The most startups run at once.
    pub fn startups_max(&self) -> usize {
        self.startups_limit
    }

    pub fn maps(&self) -> &DirectMaps {
        &self.maps
    }

    /// The broker's socket for the application socket `cookie`: in the sock map, with an entry
    /// that sends what the broker writes into that application's receive queue.
    fn side(&self, cookie: u64) -> io::Result<(TcpStream, std::net::TcpStream)> {
        let (side, peer) = self.side_std(cookie)?;
        side.set_nonblocking(true)?;
        Ok((TcpStream::from_std(side)?, peer))
    }

    fn side_std(&self, cookie: u64) -> io::Result<Pair> {
        let (side, peer) = match self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            Some(spare) => spare,
            None => pair(&self.pairs.lock().unwrap_or_else(|e| e.into_inner()))?,
        };
        let key = crate::ebpf::tuple_key(
            crate::netns::cookie_of(std::os::fd::AsFd::as_fd(&side))?,
            side.local_addr()?,
            side.peer_addr()?,
        );
        self.maps.set_side(&key, cookie).map_err(io::Error::other)?;
        if let Err(e) = self.maps.add_socket(cookie | SIDE_KEY, &side) {
            self.maps.forget_side(&key);
            return Err(io::Error::other(e));
        }
        Ok((side, peer))
    }

    /// Takes the broker's socket for `cookie` out of the maps and keeps its pair for a later
    /// session if nothing is left queued on either end (so no byte of this session can reach
    /// another), else closes it.
    fn end_side(&self, cookie: u64, side: TcpStream, peer: std::net::TcpStream) {
        self.drop_side(cookie, &side);
        // Out of the sock map, the socket's queue is its own again: what is counted now is
        // all there is.
        let Ok(side) = side.into_std() else {
            return;
        };
        if fionread(&side).ok() != Some(0) || fionread(&peer).ok() != Some(0) {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_PAIRS {
            spare.push((side, peer));
        }
    }

    fn drop_side(&self, cookie: u64, side: &(impl SocketAddrs + std::os::fd::AsFd)) {
        let _ = self.maps.remove_socket(cookie | SIDE_KEY);
        if let (Ok(l), Ok(p), Ok(ns)) = (
            side.local(),
            side.peer(),
            crate::netns::cookie_of(side.as_fd()),
        ) {
            self.maps.forget_side(&crate::ebpf::tuple_key(ns, l, p));
        }
    }
}

/// Local and peer addresses of std and tokio TCP streams alike.
trait SocketAddrs {
    fn local(&self) -> io::Result<std::net::SocketAddr>;
    fn peer(&self) -> io::Result<std::net::SocketAddr>;
}

impl SocketAddrs for TcpStream {
    fn local(&self) -> io::Result<std::net::SocketAddr> {
        self.local_addr()
    }
    fn peer(&self) -> io::Result<std::net::SocketAddr> {
        self.peer_addr()
    }
}

impl SocketAddrs for std::net::TcpStream {
    fn local(&self) -> io::Result<std::net::SocketAddr> {
        self.local_addr()
    }
    fn peer(&self) -> io::Result<std::net::SocketAddr> {
        self.peer_addr()
    }
}

/// A connected loopback pair made through `listener`.
fn pair(
    listener: &std::net::TcpListener,
) -> io::Result<(std::net::TcpStream, std::net::TcpStream)> {
    let a = std::net::TcpStream::connect(listener.local_addr()?)?;
    // Anything else that connected to the listener is dropped.
    let b = loop {
        let (b, from) = listener.accept()?;
        if from == a.local_addr()? {
            break b;
        }
    };
    a.set_nodelay(true)?;
    Ok((a, b))
}
