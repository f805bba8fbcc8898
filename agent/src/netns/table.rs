//! The prepared namespaces: the broker's listeners in each, and `LATCH_NETNS`, which hands
//! those listening sockets themselves to the connect hooks. The kernel drops a socket from
//! that map when it closes, so the hooks redirect into a namespace only while latch holds the
//! broker's port there, and never to whoever binds it once latch has let go (a crash, a stop
//! with `--keep-interception`, a released namespace).
use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::Instant,
};

use aya::maps::{MapData, MapError, SockHash};
use latch_common::netns::{FAMILY_V4, FAMILY_V6, ListenerKey};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Handle, Netns, cookie_of};

/// Starts the accept loop of one listener in one namespace.
pub type Serve = Box<dyn Fn(&Handle, Arc<std::net::TcpListener>) + Send + Sync>;

/// A listener handed over by the previous agent (see `crate::upgrade`): its namespace's nsfs
/// inode, and the listening socket itself.
pub type InheritedListener = (u64, std::net::TcpListener);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("listening on {addr} in network namespace {inode}: {source}")]
    Listen {
        addr: SocketAddr,
        inode: u64,
        #[source]
        source: io::Error,
    },
    #[error("eBPF map LATCH_NETNS: {0}")]
    Map(#[from] MapError),
    #[error(
        "network namespace {inode} not prepared: the broker already listens in {max} \
         (--max-namespaces)"
    )]
    Full { inode: u64, max: usize },
}

/// Every namespace the broker listens in, by nsfs inode.
pub struct Namespaces {
    prepared: Mutex<HashMap<u64, Handle>>,
    kernel: Mutex<SockHash<MapData, ListenerKey>>,
    listen4: SocketAddr,
    listen6: Option<SocketAddr>,
    /// Most namespaces served at once (the agent's own included).
    max: usize,
    serve: Serve,
    /// Parent of every namespace's stop token: cancelled when the broker stops accepting.
    stop: CancellationToken,
    /// Namespaces that could not be prepared (already warned about), by inode.
    failed: Mutex<HashSet<u64>>,
    /// How long the last preparations took (microseconds), at most [`PREPARE_SAMPLES`].
    prepare_us: Mutex<std::collections::VecDeque<u32>>,
    /// Each served namespace's listeners (shared with their accept loops), by inode: what an
    /// upgrade hands to the next agent.
    listeners: Mutex<HashMap<u64, Vec<Arc<std::net::TcpListener>>>>,
    /// Listeners the previous agent handed over for namespaces not prepared yet, by inode:
    /// preparing one of those takes them rather than binding the port again.
    inherited: Mutex<HashMap<u64, Vec<std::net::TcpListener>>>,
}

/// Preparation times kept for status (a ring of the latest).
const PREPARE_SAMPLES: usize = 1024;

/// Percentiles of the latest preparation times, in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PrepareTimes {
    pub samples: usize,
    pub p50: u32,
    pub p99: u32,
    pub max: u32,
}

impl Namespaces {
    /// `listeners` are the broker's, already bound in the agent's own namespace (recorded by
    /// [`super::init_own`]); it is served from now on and never released.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kernel: SockHash<MapData, ListenerKey>,
        listeners: Vec<TcpListener>,
        inherited: Vec<InheritedListener>,
        listen4: SocketAddr,
        listen6: Option<SocketAddr>,
        max: usize,
        stop: CancellationToken,
        serve: Serve,
    ) -> Result<Self, NetnsError> {
        let mut pool: HashMap<u64, Vec<std::net::TcpListener>> = HashMap::new();
        for (inode, l) in inherited {
            pool.entry(inode).or_default().push(l);
        }
        let this = Self {
            prepared: Mutex::new(HashMap::new()),
            kernel: Mutex::new(kernel),
            listen4,
            listen6,
            max,
            serve,
            stop,
            failed: Mutex::new(HashSet::new()),
            prepare_us: Mutex::new(std::collections::VecDeque::new()),
            listeners: Mutex::new(HashMap::new()),
            inherited: Mutex::new(pool),
        };
        let handle = super::own(this.stop.child_token()).map_err(|source| NetnsError::Listen {
            addr: this.listen4,
            inode: super::own_inode().unwrap_or(0),
            source,
        })?;
        let listeners = listeners
            .into_iter()
            .map(|l| l.into_std().map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| NetnsError::Listen {
                addr: this.listen4,
                inode: handle.inode,
                source,
            })?;
        this.publish(handle.cookie, &listeners)?;
        this.serve_all(&handle, listeners);
        this.lock().insert(handle.inode, handle);
        Ok(this)
    }

    /// Starts the accept loops of a namespace's listeners and keeps them for a hand-over.
    fn serve_all(&self, handle: &Handle, listeners: Vec<Arc<std::net::TcpListener>>) {
        for l in &listeners {
            (self.serve)(handle, l.clone());
        }
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle.inode, listeners);
    }

    /// Duplicates of every listener served, with their namespace's inode (for the next agent).
    pub fn handover(&self) -> io::Result<Vec<(u64, OwnedFd)>> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (inode, ls) in listeners.iter() {
            for l in ls {
                out.push((*inode, l.as_fd().try_clone_to_owned()?));
            }
        }
        Ok(out)
    }

    /// The namespaces with inherited listeners not taken yet, by inode.
    pub fn inherited_inodes(&self) -> Vec<u64> {
        self.inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Lets go of inherited listeners no namespace took (their namespaces are gone).
    pub fn drop_inherited(&self) {
        self.inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        self.prepared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the namespace with this inode is prepared.
    pub fn contains(&self, inode: u64) -> bool {
        self.lock().contains_key(&inode)
    }

    /// Number of namespaces served (the agent's own included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inodes of the namespaces served.
    pub fn inodes(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// The namespaces served, as (inode, cookie), sorted.
    pub fn entries(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.lock().values().map(|h| (h.inode, h.cookie)).collect();
        v.sort_unstable();
        v
    }

    /// The namespaces whose listeners are in `LATCH_NETNS` (walks the kernel map), as sorted
    /// cookies.
    pub fn kernel_cookies(&self) -> Vec<u64> {
        let map = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<u64> = map
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.netns_cookie)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Hands the namespace's listeners to the connect hooks, keyed by their family.
    fn publish(
        &self,
        cookie: u64,
        listeners: &[Arc<std::net::TcpListener>],
    ) -> Result<(), NetnsError> {
        let mut map = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        for l in listeners {
            let family = match l.local_addr() {
                Ok(SocketAddr::V6(_)) => FAMILY_V6,
                _ => FAMILY_V4,
            };
            map.insert(ListenerKey::new(cookie, family), l.as_raw_fd(), 0)?;
        }
        Ok(())
    }

    /// Takes the namespace's listeners out of `LATCH_NETNS` (closing them would too).
    fn unpublish(&self, cookie: u64) {
        let mut map = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        for family in [FAMILY_V4, FAMILY_V6] {
            let _ = map.remove(&ListenerKey::new(cookie, family));
        }
    }

    /// How long preparing a namespace took lately.
    pub fn prepare_times(&self) -> PrepareTimes {
        let mut v: Vec<u32> = self
            .prepare_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        if v.is_empty() {
            return PrepareTimes::default();
        }
        PrepareTimes {
            samples: v.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }

    /// Listens in the namespace `fd` (nsfs inode `inode`) and tells the kernel it may redirect
    /// there. Idempotent. The listeners are up before the kernel entry exists, so no redirect
    /// into that namespace ever finds nobody listening.
    pub fn prepare(&self, fd: OwnedFd, inode: u64) -> Result<Handle, NetnsError> {
        // Held throughout, so two preparations of one namespace never race for its port.
        let mut prepared = self.lock();
        // Timed from here: a burst of namespaces queues on the lock, and the bench reports
        // that end to end separately.
        let started = Instant::now();
        if let Some(h) = prepared.get(&inode) {
            return Ok(h.clone());
        }
        // A workload that makes namespaces without end cannot make the agent hold sockets
        // without end: past the bound, its connects fail closed.
        if prepared.len() >= self.max {
            return Err(NetnsError::Full {
                inode,
                max: self.max,
            });
        }
        let mut ns = Netns {
            cookie: 0,
            inode,
            fd,
            own: false,
            stop: self.stop.child_token(),
        };
        let listen_err = |source| NetnsError::Listen {
            addr: self.listen4,
            inode,
            source,
        };
        let inherited = self
            .inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&inode);
        let (listeners, cookie) = match inherited {
            // The previous agent's listeners: the port stays open throughout the upgrade.
            Some(ls) if !ls.is_empty() => {
                let cookie = cookie_of(ls[0].as_fd()).map_err(listen_err)?;
                (ls, cookie)
            }
            _ => ns
                .run(|| {
                    let l4 = listen(self.listen4)?;
                    let cookie = cookie_of(l4.as_fd())?;
                    // Without IPv6 in the namespace (disabled by sysctl) its IPv6 connects
                    // fail as they would without latch; IPv4 is served.
                    let l6 = self.listen6.and_then(|a| listen(a).ok());
                    Ok((std::iter::once(l4).chain(l6).collect::<Vec<_>>(), cookie))
                })
                .map_err(listen_err)?,
        };
        ns.cookie = cookie;
        let handle = Arc::new(ns);
        let listeners: Vec<Arc<std::net::TcpListener>> =
            listeners.into_iter().map(Arc::new).collect();
        if let Err(e) = self.publish(cookie, &listeners) {
            self.unpublish(cookie);
            return Err(e);
        }
        self.serve_all(&handle, listeners);
        prepared.insert(inode, handle.clone());
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&inode);
        let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        {
            let mut times = self.prepare_us.lock().unwrap_or_else(|e| e.into_inner());
            if times.len() == PREPARE_SAMPLES {
                times.pop_front();
            }
            times.push_back(us);
        }
        tracing::debug!(inode, cookie, us, "network namespace prepared");
        Ok(handle)
    }

    /// Stops serving the namespace with this inode: the kernel stops redirecting there, then
    /// its listeners close. Connections already accepted carry on. The agent's own is kept.
    pub fn release(&self, inode: u64) {
        let Some(handle) = self.lock().remove(&inode) else {
            return;
        };
        if handle.is_own() {
            self.lock().insert(inode, handle);
            return;
        }
        self.unpublish(handle.cookie);
        handle.stop.cancel();
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&inode);
        tracing::debug!(inode, cookie = handle.cookie, "network namespace released");
    }

    /// Records that `inode` could not be prepared; true the first time (warn once).
    pub fn note_failure(&self, inode: u64) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inode)
    }

    /// Makes the served namespaces exactly `in_use` (inode → a path to open it) plus the
    /// agent's own: prepares what is new, releases what is gone.
    pub fn sync(&self, in_use: &HashMap<u64, std::path::PathBuf>) {
        for (inode, path) in in_use {
            if self.contains(*inode) {
                continue;
            }
            match super::open(path) {
                Ok((fd, found)) if found == *inode => {
                    if let Err(err) = self.prepare(fd, found)
                        && self.note_failure(found)
                    {
                        tracing::warn!(%err, path = %path.display(), "network namespace not prepared: matching connects from it are refused (fail mode closed) or go direct (open)");
                    }
                }
                // Gone or replaced since the scan: the next one sees it as it is.
                _ => {}
            }
        }
        for inode in self.inodes() {
            if !in_use.contains_key(&inode) {
                self.release(inode);
            }
        }
        // Forget failures of namespaces that are gone, so the set stays as small as the node.
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|inode| in_use.contains_key(inode));
    }
}

/// A listener at `addr` in the calling thread's namespace. `IP_FREEBIND`: a namespace whose
/// loopback is still down (a pod being set up) can be prepared; connects there fail until it
/// is up, as they would without latch.
fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_cloexec(true)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(crate::broker::LISTEN_BACKLOG as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
