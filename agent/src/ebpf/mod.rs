//! Loading, attaching and feeding latch's eBPF programs.
//!
//! The object is built by `agent/build.rs` and embedded in the binary. [`Interceptor`] owns the
//! loaded programs; dropping it detaches them (their links are file descriptors we own), so a
//! crash cannot leave programs attached unless they were pinned.
pub mod btf_offsets;
mod conns;
mod direct;
mod fastpath;
pub mod pins;
mod rules;

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapData, MapError, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkMsg, SkSkb, SockOps},
};
use latch_common::{BrokerConfig, Rule4Data, Rule6Data, RuleValue, map_names, prog_names, stat};

pub use conns::{ConnTable, tuple_addrs, tuple_key};
pub use direct::DirectMaps;
pub use fastpath::FastPath;
pub use rules::{Rule, RuleKey};

/// The compiled eBPF object.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latch"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning links in {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping the fast-path flow words: {0}")]
    Mmap(#[source] std::io::Error),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Counters kept by the eBPF programs (summed over CPUs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub redirected: u64,
    pub skipped_mark: u64,
    pub established: u64,
    pub map_errors: u64,
    pub peername: u64,
    pub fast_socks: u64,
    pub direct: u64,
    /// Matching connects from namespaces the broker did not listen in yet.
    pub unprepared: u64,
    /// Reports of such connects the ring buffer had no room for.
    pub events_lost: u64,
}

/// Loaded (and, after [`Interceptor::attach`], attached) eBPF programs plus their maps.
pub struct Interceptor {
    bpf: Ebpf,
    rules4: LpmTrie<MapData, Rule4Data, RuleValue>,
    rules6: LpmTrie<MapData, Rule6Data, RuleValue>,
    config: Array<MapData, BrokerConfig>,
    stats: PerCpuArray<MapData, u64>,
    /// Read only here, to report occupancy.
    socks: aya::maps::HashMap<MapData, u64, latch_common::ConnMeta>,
    /// Held so that `latch_sk_msg` stays attached to it.
    app_socks: SockHash<MapData, u64>,
    /// `LATCH_DIRECT` until the broker takes it (the direct-mode programs stay attached).
    direct_socks: Option<SockHash<MapData, u64>>,
    logger: Option<Logger>,
    /// Links pinned on bpffs (empty unless interception is kept across restarts).
    pinned: Vec<aya::programs::links::PinnedLink>,
    installed: HashMap<RuleKey, RuleValue>,
    /// Whether rules may enrol sockets for the fast path.
    fast_path: bool,
    /// Whether rules may put connections in direct mode (the kernel passed the self-test).
    direct: bool,
    attached_to: Option<PathBuf>,
    /// Whether the connect hooks record the connecting task's executable.
    exe_identity: ExeIdentity,
}

/// Whether the connect hooks record the executable of the task that connects (what `exe`
/// selectors compare with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExeIdentity {
    /// They do (device and inode of `current->mm->exe_file`).
    Recorded,
    /// They do not, for this reason: every `exe` selector fails closed.
    Unavailable(String),
}

/// `LATCH_NETNS` and `LATCH_EVENTS`, taken by the agent (see [`Interceptor::take_netns`]).
pub type NetnsMaps = (
    aya::maps::SockHash<MapData, latch_common::netns::ListenerKey>,
    aya::maps::RingBuf<MapData>,
);

/// See [`Interceptor::attach`]: with bpf_link this is multi-attach.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    prog_names::CONNECT4,
    prog_names::CONNECT6,
    prog_names::PEERNAME4,
    prog_names::PEERNAME6,
];

impl Interceptor {
    /// Loads the embedded object and its programs into the kernel, without attaching them.
    ///
    /// The connect hooks record the connecting task's executable with field offsets read from
    /// the kernel's BTF (`kernel_btf`, normally [`btf_offsets::VMLINUX`]). Without BTF, or if the kernel refuses the programs that read kernel
    /// memory (`bpf_probe_read_kernel` needs CAP_PERFMON), they are loaded without those reads
    /// and [`Interceptor::exe_identity`] says why: `exe` selectors then match nothing.
    pub fn load(kernel_btf: &Path) -> Result<Self, EbpfError> {
        let offsets = btf_offsets::from_file(kernel_btf);
        let Ok(found) = offsets else {
            let why = offsets.err().map(|e| e.to_string()).unwrap_or_default();
            let mut me = Self::load_with(&latch_common::exe::Offsets::default())?;
            me.exe_identity = ExeIdentity::Unavailable(why);
            return Ok(me);
        };
        match Self::load_with(&found) {
            Ok(me) => Ok(me),
            Err(first) => {
                // Either the kernel refuses the reads to this program type, or the load fails
                // for another reason, which the second attempt then reports.
                let mut me = Self::load_with(&latch_common::exe::Offsets::default())?;
                me.exe_identity = ExeIdentity::Unavailable(format!(
                    "the kernel refused the connect hooks that read the executable: {first}"
                ));
                Ok(me)
            }
        }
    }

    fn load_with(exe_offsets: &latch_common::exe::Offsets) -> Result<Self, EbpfError> {
        let mut bpf = EbpfLoader::new()
            .override_global(latch_common::exe::OFFSETS_GLOBAL, exe_offsets, true)
            .load(OBJECT)?;
        // The logger must outlive program loading: it holds the log ring buffer's fd.
        let logger = aya_log::EbpfLogger::init(&mut bpf)
            .map_err(|err| tracing::debug!(%err, "eBPF logging unavailable"))
            .ok();
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut bpf, name)?;
            prog.load()
                .map_err(|source| EbpfError::Program { name, source })?;
        }
        let prog: &mut SockOps = program(&mut bpf, prog_names::SOCK_OPS)?;
        prog.load().map_err(|source| EbpfError::Program {
            name: prog_names::SOCK_OPS,
            source,
        })?;
        // sk_msg programs attach to a sock map, not a cgroup: only sockets the sock_ops program
        // enrolled run it.
        let app_socks: SockHash<MapData, u64> = take_map(&mut bpf, map_names::APP_SOCKS)?;
        let err = |source| EbpfError::Program {
            name: prog_names::SK_MSG,
            source,
        };
        let prog: &mut SkMsg = program(&mut bpf, prog_names::SK_MSG)?;
        prog.load().map_err(err)?;
        prog.attach(app_socks.fd()).map_err(err)?;
        let direct_socks: SockHash<MapData, u64> = take_map(&mut bpf, map_names::DIRECT)?;
        let err = |source| EbpfError::Program {
            name: prog_names::DIRECT_MSG,
            source,
        };
        let prog: &mut SkMsg = program(&mut bpf, prog_names::DIRECT_MSG)?;
        prog.load().map_err(err)?;
        prog.attach(direct_socks.fd()).map_err(err)?;
        let err = |source| EbpfError::Program {
            name: prog_names::DIRECT_SKB,
            source,
        };
        let prog: &mut SkSkb = program(&mut bpf, prog_names::DIRECT_SKB)?;
        prog.load().map_err(err)?;
        prog.attach(direct_socks.fd()).map_err(err)?;
        Ok(Self {
            app_socks,
            direct_socks: Some(direct_socks),
            rules4: take_map(&mut bpf, map_names::RULES4)?,
            rules6: take_map(&mut bpf, map_names::RULES6)?,
            config: take_map(&mut bpf, map_names::CONFIG)?,
            stats: take_map(&mut bpf, map_names::STATS)?,
            socks: take_map(&mut bpf, map_names::SOCKS)?,
            bpf,
            logger,
            pinned: Vec::new(),
            installed: HashMap::new(),
            fast_path: true,
            direct: true,
            attached_to: None,
            exe_identity: ExeIdentity::Recorded,
        })
    }

    /// Whether the connect hooks record the connecting task's executable.
    pub fn exe_identity(&self) -> &ExeIdentity {
        &self.exe_identity
    }

    /// Takes the connection map for the broker. Call once, before the broker starts.
    pub fn take_conn_table(&mut self) -> Result<ConnTable, EbpfError> {
        let fd = self.bpf.map(map_names::CONNS).and_then(|m| match m {
            aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) => {
                use std::os::fd::AsFd as _;
                d.fd().as_fd().try_clone_to_owned().ok()
            }
            _ => None,
        });
        let (map, counter) = take_map_twice(&mut self.bpf, map_names::CONNS)?;
        Ok(ConnTable::new(map, counter, fd))
    }

    /// Detaches every program from the cgroup (an upgrade: the next agent's are attached),
    /// pinned links included; the maps stay for the connections still being served.
    pub fn detach(&mut self) {
        self.pinned.clear();
        for name in SOCK_ADDR_PROGRAMS {
            if let Ok(prog) = program::<CgroupSockAddr>(&mut self.bpf, name) {
                let _ = prog.unload();
            }
        }
        if let Ok(prog) = program::<SockOps>(&mut self.bpf, prog_names::SOCK_OPS) {
            let _ = prog.unload();
        }
        self.attached_to = None;
    }

    /// Takes the fast-path maps for the broker. Call once, before the broker starts.
    pub fn take_fast_path(&mut self) -> Result<FastPath, EbpfError> {
        let flows: aya::maps::Map = self
            .bpf
            .take_map(map_names::FLOWS)
            .ok_or(EbpfError::Missing(map_names::FLOWS))?;
        let aya::maps::Map::Array(flows) = flows else {
            return Err(EbpfError::Missing(map_names::FLOWS));
        };
        let (targets, counter) = take_map_twice(&mut self.bpf, map_names::TARGETS)?;
        FastPath::new(flows, targets, counter).map_err(EbpfError::Mmap)
    }

    /// Takes the direct-mode maps for the broker. Call once, before the broker starts.
    pub fn take_direct(&mut self) -> Result<DirectMaps, EbpfError> {
        let socks = self
            .direct_socks
            .take()
            .ok_or(EbpfError::Missing(map_names::DIRECT))?;
        let (keys, counter) = take_map_twice(&mut self.bpf, map_names::DIRECT_KEYS)?;
        Ok(DirectMaps::new(
            socks,
            keys,
            counter,
            take_map(&mut self.bpf, map_names::DIRECT_RECV)?,
            take_map(&mut self.bpf, map_names::DIRECT_LIVE)?,
            take_map(&mut self.bpf, map_names::DIRECT_FIRST)?,
        ))
    }

    /// Takes `LATCH_NETNS` (the namespaces the broker listens in) and `LATCH_EVENTS` (connects
    /// matched elsewhere). Call once, before the programs are attached.
    pub fn take_netns(&mut self) -> Result<NetnsMaps, EbpfError> {
        Ok((
            take_map(&mut self.bpf, map_names::NETNS)?,
            take_map(&mut self.bpf, map_names::EVENTS)?,
        ))
    }

    /// Attaches every program to the cgroup v2 directory `cgroup`.
    ///
    /// aya attaches through bpf_link on kernels >= 5.7 (latch needs 5.8). The kernel rejects
    /// any flag on a cgroup link (EINVAL) and always treats links as BPF_F_ALLOW_MULTI, so
    /// `Single` here still means "alongside every other agent's programs".
    ///
    /// `pins` is the instance's pin directory. Links a previous agent pinned there are taken
    /// over and detached once the new ones are attached; with `keep` the new links are pinned
    /// there in turn (see [`pins`]).
    pub fn attach(&mut self, cgroup: &Path, pins: &Path, keep: bool) -> Result<(), EbpfError> {
        let pin_err = |source: std::io::Error| EbpfError::Pin {
            path: pins.to_owned(),
            source,
        };
        let file = File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let previous = pins::take_over(pins).map_err(pin_err)?;
        if !previous.is_empty() {
            tracing::info!(links = previous.len(), dir = %pins.display(), "taking over pinned links");
        }
        let mut fd_links = Vec::new();
        // The two program types share no trait for attach/take_link; one body for both.
        macro_rules! attach {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let err = |source| EbpfError::Program { name, source };
                let prog: &mut $ty = program(&mut self.bpf, name)?;
                let id = prog.attach(&file, ATTACH_MODE).map_err(err)?;
                if keep {
                    let link = prog.take_link(id).map_err(err)?;
                    let link = aya::programs::links::FdLink::try_from(link)
                        .map_err(|e| pin_err(std::io::Error::other(e)))?;
                    fd_links.push((name, link));
                }
            }};
        }
        for name in SOCK_ADDR_PROGRAMS {
            attach!(CgroupSockAddr, name);
        }
        attach!(SockOps, prog_names::SOCK_OPS);
        for (name, link) in fd_links {
            self.pinned
                .push(pins::pin(link, pins, name).map_err(pin_err)?);
        }
        // The new programs run now; the old ones go.
        drop(previous);
        if !keep {
            pins::remove_empty(pins);
        }
        self.attached_to = Some(cgroup.to_owned());
        Ok(())
    }

    /// Whether the links are pinned (they outlive this process).
    pub fn is_pinned(&self) -> bool {
        !self.pinned.is_empty()
    }

    /// The cgroup the programs are attached to, if any.
    pub fn attached_to(&self) -> Option<&Path> {
        self.attached_to.as_deref()
    }

    /// Tells the connect hooks where the broker listens; `enabled: false` stops redirection.
    pub fn set_broker(&mut self, cfg: BrokerConfig) -> Result<(), EbpfError> {
        self.config.set(0, cfg, 0).map_err(|source| EbpfError::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    /// With `false`, rules installed from now on never enrol sockets for the fast path.
    pub fn set_fast_path(&mut self, enabled: bool) {
        self.fast_path = enabled;
    }

    /// With `false`, rules installed from now on never put connections in direct mode: their
    /// policies are brokered by the relay instead.
    pub fn set_direct(&mut self, enabled: bool) {
        self.direct = enabled;
    }

    /// Makes the rule tries hold exactly `rules`: inserts what is new or changed, removes what
    /// is gone. Existing connections are unaffected.
    pub fn sync_rules(&mut self, rules: &[Rule]) -> Result<(), EbpfError> {
        let wanted: HashMap<RuleKey, RuleValue> = rules
            .iter()
            .map(|r| Rule {
                fast_path: r.fast_path && self.fast_path,
                direct: r.direct && self.direct,
                ..*r
            })
            .map(|r| r.entry())
            .collect();
        for (key, value) in &wanted {
            if self.installed.get(key) != Some(value) {
                self.insert(key, *value)?;
            }
        }
        let stale: Vec<RuleKey> = self
            .installed
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in &stale {
            self.remove(key)?;
        }
        self.installed = wanted;
        Ok(())
    }

    /// Entries in the per-socket map (walks the keys; for metrics).
    pub fn socks_len(&self) -> usize {
        self.socks.keys().filter(Result::is_ok).count()
    }

    /// Application sockets enrolled for the fast path (walks the keys; for status).
    pub fn app_socks_len(&self) -> usize {
        self.app_socks.keys().filter(Result::is_ok).count()
    }

    /// Number of rule entries currently installed.
    pub fn rule_count(&self) -> usize {
        self.installed.len()
    }

    /// Sums the per-CPU counters.
    pub fn stats(&self) -> Stats {
        let read = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        Stats {
            redirected: read(stat::REDIRECTED),
            skipped_mark: read(stat::SKIPPED_MARK),
            established: read(stat::ESTABLISHED),
            map_errors: read(stat::MAP_ERRORS),
            peername: read(stat::PEERNAME),
            fast_socks: read(stat::FAST_SOCKS),
            direct: read(stat::DIRECT),
            unprepared: read(stat::UNPREPARED),
            events_lost: read(stat::EVENTS_LOST),
        }
    }

    fn insert(&mut self, key: &RuleKey, value: RuleValue) -> Result<(), EbpfError> {
        let res = match key.lpm() {
            rules::Lpm::V4(prefix, data) => self.rules4.insert(&Key::new(prefix, data), value, 0),
            rules::Lpm::V6(prefix, data) => self.rules6.insert(&Key::new(prefix, data), value, 0),
        };
        res.map_err(|source| EbpfError::Map {
            name: key.map_name(),
            source,
        })
    }

    fn remove(&mut self, key: &RuleKey) -> Result<(), EbpfError> {
        let res = match key.lpm() {
            rules::Lpm::V4(prefix, data) => self.rules4.remove(&Key::new(prefix, data)),
            rules::Lpm::V6(prefix, data) => self.rules6.remove(&Key::new(prefix, data)),
        };
        match res {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(EbpfError::Map {
                name: key.map_name(),
                source,
            }),
        }
    }
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    bpf.program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

/// Takes a map and opens a second handle on it: walking a map for `/status` must not hold the
/// lock the data path uses it under.
fn take_map_twice<T>(bpf: &mut Ebpf, name: &'static str) -> Result<(T, T), EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let err = |source| EbpfError::Map { name, source };
    let raw = bpf.take_map(name).ok_or(EbpfError::Missing(name))?;
    let data = match &raw {
        aya::maps::Map::HashMap(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::SockHash(d) => d,
        _ => return Err(EbpfError::Missing(name)),
    };
    let fd = {
        use std::os::fd::AsFd as _;
        data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
            err(MapError::SyscallError(aya::sys::SyscallError {
                call: "dup",
                io_error,
            }))
        })?
    };
    let second = aya::maps::Map::from_map_data(MapData::from_fd(fd).map_err(err)?)
        .and_then(T::try_from)
        .map_err(err)?;
    Ok((T::try_from(raw).map_err(err)?, second))
}

fn take_map<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    bpf.take_map(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(|source| EbpfError::Map { name, source })
}

type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

impl Interceptor {
    /// Forwards log records from the eBPF programs to `log` (and so to tracing) on a task of
    /// the current tokio runtime.
    pub fn spawn_log_reader(&mut self) {
        let Some(logger) = self.logger.take() else {
            return;
        };
        // SAFETY: the AsyncFd owns the logger, and with it the ring buffer fd, for as long as
        // the fd is registered; nothing else closes it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        match fd {
            Ok(fd) => {
                tokio::spawn(read_logs(fd));
            }
            Err(err) => tracing::debug!(%err, "cannot poll the eBPF log buffer"),
        }
    }
}

async fn read_logs(mut fd: tokio::io::unix::AsyncFd<Logger>) {
    while let Ok(mut guard) = fd.readable_mut().await {
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
