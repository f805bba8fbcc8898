//! Types shared by latch's eBPF programs (`latch-ebpf`) and its user-space agent.
//!
//! Every type is `#[repr(C)]` with fields of explicit width and no implicit padding, so the
//! kernel and user space agree on the layout byte for byte. `aya::Pod` is implemented only
//! behind the `user` feature, which the eBPF side never enables.
#![no_std]

/// Names of the maps in the eBPF object. Kernel object names are at most 15 bytes.
pub mod map_names {
    /// `LpmTrie<Rule4Key, RuleValue>`: IPv4 interception rules.
    pub const RULES4: &str = "LATCH_RULES4";
    /// `LpmTrie<Rule6Key, RuleValue>`: IPv6 interception rules.
    pub const RULES6: &str = "LATCH_RULES6";
    /// `Array<BrokerConfig>` with one entry: where to redirect, which mark to skip.
    pub const CONFIG: &str = "LATCH_CONFIG";
    /// `LruHashMap<u64 (socket cookie), ConnMeta>`: redirected sockets, for getpeername.
    pub const SOCKS: &str = "LATCH_SOCKS";
    /// `LruHashMap<TupleKey, ConnMeta>`: established redirected connections, for the broker.
    pub const CONNS: &str = "LATCH_CONNS";
    /// `PerCpuArray<u64>`: counters, indexed by [`crate::stat`].
    pub const STATS: &str = "LATCH_STATS";
    /// `SockHash<u64 (app socket cookie)>`: applications' sockets eligible for the fast path;
    /// `latch_sk_msg` runs on every send from them.
    pub const APP_SOCKS: &str = "LATCH_APP_SOCKS";
    /// `LruHashMap<TupleKey, u64>`: enrolled application sockets' cookies by 4-tuple (sk_msg
    /// programs cannot read a socket's cookie).
    pub const FAST_KEYS: &str = "LATCH_FAST_KEYS";
    /// `SockHash<u64 (app socket cookie)>`: the broker's socket toward the target of a flow
    /// that has been handed over to the kernel.
    pub const TARGETS: &str = "LATCH_TARGETS";
    /// `Array<flow::Slot>` with [`crate::flow::SLOTS`] entries, mmapable; see [`crate::flow`].
    pub const FLOWS: &str = "LATCH_FLOWS";
    /// `SockHash<u64>`: direct-mode sockets; see [`crate::direct`].
    pub const DIRECT: &str = "LATCH_DIRECT";
    /// `HashMap<TupleKey, direct::Entry>`: direct-mode sockets by namespace and 4-tuple; see
    /// [`crate::direct`].
    pub const DIRECT_KEYS: &str = "LATCH_DIR_KEYS";
    /// `HashMap<u64 (app socket cookie), u32 (flags)>`: direct-mode application sockets whose
    /// received bytes go to the broker (stream verdict programs can read a socket's cookie but
    /// not its namespace); see [`crate::direct`].
    pub const DIRECT_RECV: &str = "LATCH_DIR_RECV";
    /// `SockHash<u64 (app socket cookie)>`: direct-mode application sockets handed over to the
    /// kernel, with no program attached: the kernel drops a socket from it when it closes, so
    /// the agent knows when to give the workload's concurrency slot back.
    pub const DIRECT_LIVE: &str = "LATCH_DIR_LIVE";
    /// `LruHashMap<u64 (app socket cookie), direct::First>`: direct-mode application sockets of
    /// protocols whose server speaks first (MySQL), until their first received bytes went to
    /// the lobby; see [`crate::direct`].
    pub const DIRECT_FIRST: &str = "LATCH_DIR_FIRST";
    /// `SockHash<netns::ListenerKey>`: the broker's own listening sockets, one per namespace
    /// and family (see [`crate::netns`]). A redirect is made only to a listener in this map.
    pub const NETNS: &str = "LATCH_NETNS";
    /// `RingBuf` of [`ConnMeta`]: connects the hooks matched in a namespace where
    /// `LATCH_NETNS` holds no listener of latch's (refused or let through as the fail mode says); the agent audits them and
    /// prepares that namespace.
    pub const EVENTS: &str = "LATCH_EVENTS";
}

/// Names of the programs in the eBPF object (also their kernel names; at most 15 bytes).
pub mod prog_names {
    pub const CONNECT4: &str = "latch_connect4";
    pub const CONNECT6: &str = "latch_connect6";
    pub const SOCK_OPS: &str = "latch_sockops";
    pub const PEERNAME4: &str = "latch_peername4";
    pub const PEERNAME6: &str = "latch_peername6";
    pub const SK_MSG: &str = "latch_sk_msg";
    pub const DIRECT_MSG: &str = "latch_dir_msg";
    pub const DIRECT_SKB: &str = "latch_dir_skb";
}

/// Capacity of the per-socket and per-connection maps (both LRU, so they cannot fill up).
pub const CONN_MAP_ENTRIES: u32 = 65_536;
/// Capacity of each rule trie.
pub const RULE_MAP_ENTRIES: u32 = 4_096;
/// Network namespaces the broker can listen in at once (the bound of `--max-namespaces`).
pub const MAX_NAMESPACES: u32 = 16_384;
/// Capacity of `LATCH_NETNS`: an IPv4 and an IPv6 listener per namespace.
pub const NETNS_MAP_ENTRIES: u32 = 2 * MAX_NAMESPACES;
/// Size of the `LATCH_EVENTS` ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 64 * 1024;

/// Indices into the `LATCH_STATS` per-CPU counter array.
pub mod stat {
    /// connect() calls redirected to the broker.
    pub const REDIRECTED: u32 = 0;
    /// connect() calls skipped because the socket carries the broker's mark.
    pub const SKIPPED_MARK: u32 = 1;
    /// Redirected connections re-keyed by 4-tuple once established.
    pub const ESTABLISHED: u32 = 2;
    /// Map updates that failed (kernel out of memory, map full).
    pub const MAP_ERRORS: u32 = 3;
    /// getpeername() answers rewritten to the original destination.
    pub const PEERNAME: u32 = 4;
    /// Application sockets added to `LATCH_APP_SOCKS` (eligible for the fast path).
    pub const FAST_SOCKS: u32 = 5;
    /// Connections left on their way to the target, with the broker in their startup only
    /// (direct mode).
    pub const DIRECT: u32 = 6;
    /// Matching connects from a network namespace the broker does not listen in (refused, or
    /// let through with the fail mode `open`).
    pub const UNPREPARED: u32 = 7;
    /// Events the ring buffer had no room for.
    pub const EVENTS_LOST: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// `BrokerConfig::flags` bit: redirection is enabled (the broker listens).
pub const CONFIG_ENABLED: u32 = 1;
/// `BrokerConfig::flags` bit: a matching connect from a namespace the broker does not listen
/// in goes to its destination directly (fail mode `open`); without it the connect fails with
/// EPERM (fail mode `closed`).
pub const CONFIG_FAIL_OPEN: u32 = 2;

/// Network namespaces: every key and record carries the cookie of the namespace its socket
/// lives in, because 4-tuples (loopback above all) repeat in every namespace.
///
/// * The broker listens in each namespace it serves, at the same address and port as in its
///   own; `LATCH_NETNS` holds those listening sockets themselves, keyed by namespace cookie
///   and family. The kernel drops a socket from the map when it closes, however its process
///   ends (a crash, SIGKILL), so an entry exists exactly while latch holds the port: whoever
///   binds it after that (a local user while the agent is down, root in a workload's own
///   namespace) is never sent a connection. A connect that a rule matches with no listener of
///   latch's in its namespace is never redirected: the hook refuses it (EPERM) or lets it
///   through as [`CONFIG_FAIL_OPEN`] says, and reports it in `LATCH_EVENTS` so the agent
///   audits it and prepares the namespace.
/// * `LATCH_CONNS`, `LATCH_FAST_KEYS` and `LATCH_DIR_KEYS` are keyed by [`TupleKey`], whose
///   `netns` field is the socket's namespace cookie; sock_ops deletes a socket's entries when
///   it closes, so a later socket with the same 4-tuple never finds them.
pub mod netns {
    /// `LATCH_NETNS` key: the broker's listener for one address family in one namespace.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct ListenerKey {
        /// The namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
        pub netns_cookie: u64,
        /// [`FAMILY_V4`] or [`FAMILY_V6`]: the listener a redirect of that family goes to
        /// (IPv4-mapped IPv6 connects go to the IPv4 one).
        pub family: u32,
        pub _pad: u32,
    }

    pub const FAMILY_V4: u32 = 4;
    pub const FAMILY_V6: u32 = 6;

    impl ListenerKey {
        pub const fn new(netns_cookie: u64, family: u32) -> Self {
            Self {
                netns_cookie,
                family,
                _pad: 0,
            }
        }
    }
}

/// Where redirected connections go. One entry in `LATCH_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BrokerConfig {
    /// IPv4 listener address, network byte order (as the octets appear on the wire).
    pub addr4: [u8; 4],
    /// IPv4 listener port, host byte order.
    pub port4: u16,
    /// IPv6 listener port, host byte order.
    pub port6: u16,
    /// SO_MARK value carried by the broker's own sockets; connects from them are never redirected.
    pub mark: u32,
    /// [`CONFIG_ENABLED`] and future flags.
    pub flags: u32,
    /// IPv6 listener address, network byte order.
    pub addr6: [u8; 16],
}

/// LPM trie data for IPv4 rules: destination port (big endian) then address.
/// The prefix length counts the 16 port bits plus the address prefix.
pub type Rule4Data = [u8; 6];
/// LPM trie data for IPv6 rules: destination port (big endian) then address.
pub type Rule6Data = [u8; 18];

/// `RuleValue::flags` / `ConnMeta::flags` bit: once the broker's handshake is done, the
/// application-to-target direction of these connections may be handed to the kernel.
pub const RULE_FAST_PATH: u32 = 1;

/// `RuleValue::flags` / `ConnMeta::flags` bit: the connection is not redirected; the broker
/// takes part in its startup only (see [`direct`]).
pub const RULE_DIRECT: u32 = 2;

/// `RuleValue::flags` / `ConnMeta::flags` bit, with [`RULE_DIRECT`]: the protocol's server
/// speaks first (MySQL's greeting), and speaks MySQL's packets (see [`direct::GREETING`]).
pub const RULE_SERVER_FIRST: u32 = 4;

/// `ConnMeta::flags` bit, set by sock_ops only: the application closed its socket after the
/// broker's socket had acknowledged its FIN but before the broker accepted the connection
/// (`nc -z`, or a client that sends and closes). The broker's socket still holds the 4-tuple
/// and sits in the accept queue, so the record still belongs to it; the broker serves it as a
/// server would (what was sent is delivered), if it is taken within
/// [`APP_CLOSED_RECORD_TTL_NS`] of the connect.
pub const CONN_APP_CLOSED: u32 = 1 << 31;

/// How long after its connect a [`CONN_APP_CLOSED`] record may still be taken (nanoseconds).
/// A broker socket waits in the accept queue for far less; a record left behind (its listener
/// closed with the connection queued) must not outlive the window in which its 4-tuple is
/// still held by the application's TIME_WAIT socket.
pub const APP_CLOSED_RECORD_TTL_NS: u64 = 10_000_000_000;

/// Direct mode: the application's own TCP connection goes to the target; latch takes part only
/// in its startup, through sockmap programs, and then leaves the connection to the kernel.
///
/// * At establishment sock_ops adds the application's socket (A) to `LATCH_DIRECT` under its
///   cookie, to `LATCH_DIR_KEYS` under its namespace and 4-tuple with [`direct::TO_BROKER`]
///   and [`direct::FROM_TARGET`], and to `LATCH_DIR_RECV` under its cookie with
///   `FROM_TARGET` (the receive-side program finds it there).
/// * With `TO_BROKER`, what A sends goes to the broker's lobby socket (key [`direct::LOBBY`]),
///   each message behind a [`direct::Header`] that names A. Without it, A's sends pass.
/// * With `FROM_TARGET`, what A receives goes to the broker's socket for A (key
///   `cookie | SIDE`). Without it, A's received bytes pass.
/// * What the broker writes on that socket (its entry carries [`direct::SIDE`]) lands in A's
///   receive queue: this is how the application gets its answers during startup.
/// * Server-first protocols (MySQL, [`RULE_SERVER_FIRST`]): sock_ops also sets
///   [`direct::GREETING`] and [`direct::MYSQL`] and puts A's 4-tuple in `LATCH_DIR_FIRST`.
///   The first bytes A receives (the server's greeting, before the broker knows A) go to the
///   lobby: their first [`direct::SKB_HEAD_LEN`] bytes are saved in A's `LATCH_DIR_FIRST`
///   entry and overwritten with a [`direct::SkbHeader`] naming A. The length of the received
///   bytes must not change (the kernel accounts the received sequence by the skb's length
///   after the verdict, `tcp_eat_skb`): a header pushed in front would advance A's
///   `copied_seq` past what it received.
/// * The broker writes toward the target on a duplicate of A (pidfd_getfd), and at the
///   application's first message after ReadyForQuery removes A from both maps: nothing is
///   queued then (the server waits for that message), so leaving the sockmap loses nothing.
pub mod direct {
    /// Entry flag: the socket's sends go to the broker's lobby.
    pub const TO_BROKER: u32 = 1;
    /// Entry flag: what the socket receives goes to the broker's socket for it.
    pub const FROM_TARGET: u32 = 2;
    /// Entry flag: this is the broker's socket for the application socket `cookie`; what the
    /// broker writes on it goes into that socket's receive queue.
    pub const SIDE: u32 = 4;
    /// `LATCH_DIR_RECV` flag: the next bytes received go to the lobby, behind a
    /// [`SkbHeader`] (the broker has no socket for this application yet).
    pub const GREETING: u32 = 8;
    /// `LATCH_DIR_RECV` flag: the server speaks MySQL's packets; an ERR packet (0xFF after the
    /// 4-byte packet header) passes to the application, as PostgreSQL's ErrorResponse does.
    pub const MYSQL: u32 = 16;
    /// [`Header::kind`] of a message the application sent (a whole [`Header`] precedes it).
    pub const KIND_MSG: u32 = 1;
    /// [`Header::kind`] of bytes the application's socket received, in place of their first
    /// [`SKB_HEAD_LEN`] bytes (a [`SkbHeader`]; those bytes are in `LATCH_DIR_FIRST`).
    pub const KIND_SKB: u32 = 2;
    /// `LATCH_DIRECT` key bit of the broker's socket for an application socket.
    pub const SIDE_KEY: u64 = 1 << 63;
    /// `LATCH_DIRECT` key of the broker's lobby socket.
    pub const LOBBY: u64 = u64::MAX;

    /// A `LATCH_DIR_KEYS` value.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Entry {
        /// Cookie of the application's socket.
        pub cookie: u64,
        pub flags: u32,
        pub _pad: u32,
    }

    /// What precedes each message an application socket sends to the lobby. Its first
    /// [`SKB_HEAD_LEN`] bytes are laid out as a [`SkbHeader`]'s, which `kind` tells apart.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Header {
        /// Bytes of the message that follow.
        pub len: u32,
        /// [`KIND_MSG`].
        pub kind: u32,
        /// Cookie of the application's socket.
        pub cookie: u64,
        /// The application socket's 4-tuple, as sock_ops wrote it.
        pub key: super::TupleKey,
    }

    pub const HEADER_LEN: usize = core::mem::size_of::<Header>();

    /// What replaces the first bytes an application socket received when they go to the
    /// lobby ([`GREETING`]).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SkbHeader {
        /// Bytes received, this header's included.
        pub len: u32,
        /// [`KIND_SKB`].
        pub kind: u32,
        /// Cookie of the application's socket.
        pub cookie: u64,
    }

    pub const SKB_HEAD_LEN: usize = core::mem::size_of::<SkbHeader>();

    /// A `LATCH_DIR_FIRST` value.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct First {
        /// The application socket's 4-tuple, as sock_ops wrote it.
        pub key: super::TupleKey,
        /// The received bytes the [`SkbHeader`] replaced.
        pub head: [u8; SKB_HEAD_LEN],
    }
}

/// The application-to-target fast path: after the broker has finished its handshake, an
/// application's sends go straight into the broker's socket toward the target (sk_msg
/// redirect to egress), without waking the broker.
///
/// Each eligible application socket owns a [`flow::Slot`] in `LATCH_FLOWS`, chosen by its
/// socket cookie. `state` is `gen (16 bits) | HANDED_OVER (1 bit) | passed (47 bits)`.
///
/// * `latch_sk_msg` adds every message's size to `passed` *before* looking at `HANDED_OVER`.
///   Without the flag (or with another socket's generation) the message takes the normal path
///   to the broker. The broker sets the flag with a compare-and-swap that expects `passed` to
///   equal the bytes it has already taken from the application and written toward the target:
///   bytes counted but not yet taken make the swap fail, so the flag is only set when nothing
///   is in flight, and every later message sees it. The stream stays in order.
/// * With the flag, a message is redirected only if `charged + size + MSG_OVERHEAD <= limit`;
///   it is then uncounted from `passed` and added to `bytes` and `charged`. The broker keeps
///   `limit` within the free send buffer of the target socket, so a redirected send never
///   meets a full buffer (which would fail a non-blocking application's send with EAGAIN and
///   no wake-up to follow).
/// * `limit` carries the generation too (`gen | bound`), so that an allowance the broker of an
///   older flow writes after a newer socket took the slot counts as none for the newer flow.
/// * Over the limit, the program clears the flag itself and passes the message: the flow is
///   handed back to the broker, which relays with ordinary TCP back-pressure and hands over
///   again once it has caught up. Verdicts for one socket run under its lock, so these updates
///   never race each other.
pub mod flow {
    /// Number of flow slots (a power of two).
    pub const SLOTS: u32 = 65_536;
    /// Set while the flow is handed over.
    pub const HANDED_OVER: u64 = 1 << 47;
    /// The `passed` part of `state`.
    pub const PASSED: u64 = HANDED_OVER - 1;
    /// What a redirected message is charged beyond its size: the socket buffer bookkeeping of
    /// a small message (an skb of its own) is about a kilobyte.
    pub const MSG_OVERHEAD: u64 = 2048;
    const GEN_SHIFT: u32 = 48;

    /// One flow's words (32 bytes, so slots never straddle a cache line).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Slot {
        pub state: u64,
        /// Bytes redirected.
        pub bytes: u64,
        /// Bytes redirected plus MSG_OVERHEAD per message.
        pub charged: u64,
        /// `gen | bound on charged`, set by the broker ([`limit_word`]).
        pub limit: u64,
    }

    /// The slot of the socket with this cookie.
    #[inline(always)]
    pub const fn slot(cookie: u64) -> u32 {
        (cookie as u32) & (SLOTS - 1)
    }

    /// The state a fresh flow starts with: its generation, no flag, nothing passed.
    #[inline(always)]
    pub const fn initial(cookie: u64) -> u64 {
        ((cookie >> 16) & 0xffff) << GEN_SHIFT
    }

    /// Whether `state` belongs to the socket with this cookie.
    #[inline(always)]
    pub const fn owned_by(state: u64, cookie: u64) -> bool {
        state >> GEN_SHIFT == (cookie >> 16) & 0xffff
    }

    /// The `limit` word for this cookie's flow: its generation and `bound` (capped to the
    /// 48 bits below the generation).
    #[inline(always)]
    pub const fn limit_word(cookie: u64, bound: u64) -> u64 {
        let max = (1 << GEN_SHIFT) - 1;
        let bound = if bound > max { max } else { bound };
        initial(cookie) | bound
    }

    /// The bound a `limit` word gives this cookie's flow: none if another flow wrote it.
    #[inline(always)]
    pub const fn limit_bound(word: u64, cookie: u64) -> u64 {
        if owned_by(word, cookie) {
            word & ((1 << GEN_SHIFT) - 1)
        } else {
            0
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn an_allowance_counts_only_for_the_flow_that_was_given_it() {
            let old = 0x0003_0000_0000_1234_u64;
            let new = old + (1 << 16); // same slot (low 16 bits), next generation
            assert_eq!(slot(old), slot(new));
            let word = limit_word(old, 4 << 20);
            assert_eq!(limit_bound(word, old), 4 << 20);
            assert_eq!(limit_bound(word, new), 0);
            // a fresh slot (enrol writes 0) gives nothing either
            assert_eq!(limit_bound(0, new), 0);
        }

        #[test]
        fn a_bound_past_48_bits_is_capped_not_spilled_into_the_generation() {
            let cookie = 0x0000_0000_0007_0001_u64;
            let word = limit_word(cookie, u64::MAX);
            assert!(owned_by(word, cookie));
            assert_eq!(limit_bound(word, cookie), (1 << 48) - 1);
        }
    }
}

/// What a matching rule tells the connect hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Identifier of the policy that owns this rule; the broker maps it back to the policy.
    pub rule_id: u32,
    /// [`RULE_FAST_PATH`] and future per-rule behaviour.
    pub flags: u32,
}

/// What the kernel recorded when it redirected a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnMeta {
    /// Original destination: IPv6, or IPv4 as an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
    pub orig_addr: [u8; 16],
    /// cgroup v2 id of the connecting task.
    pub cgroup_id: u64,
    /// Cookie of the network namespace the socket lives in.
    pub netns_cookie: u64,
    /// Cookie of the application's socket.
    pub socket_cookie: u64,
    /// `bpf_ktime_get_boot_ns()` at connect time (CLOCK_BOOTTIME, like /proc/<pid>/stat).
    pub ktime_ns: u64,
    /// Process id (kernel tgid).
    pub pid: u32,
    /// Thread id (kernel pid).
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// [`RuleValue::rule_id`] of the rule that matched.
    pub rule_id: u32,
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// Address family of the application's socket (AF_INET = 2, AF_INET6 = 10).
    pub family: u16,
    /// Command name of the connecting task (NUL padded).
    pub comm: [u8; 16],
    /// The matching rule's [`RuleValue::flags`].
    pub flags: u32,
    /// Device of the connecting task's executable (`current->mm->exe_file->f_inode->i_sb->s_dev`)
    /// in the kernel's internal encoding (`major << 20 | minor`); see [`exe`].
    pub exe_dev: u32,
    /// Inode number of the connecting task's executable; 0 when none was recorded
    /// (`exe_status` says why).
    pub exe_ino: u64,
    /// One of [`exe::RECORDED`], [`exe::NO_OFFSETS`], [`exe::NO_MM`], [`exe::READ_FAILED`].
    pub exe_status: u32,
    /// The CPU the connecting thread ran on, plus one (`bpf_get_smp_processor_id() + 1`);
    /// 0 when not recorded. Direct mode runs the connection's startup on that CPU.
    pub cpu: u32,
    /// When the connecting process (its thread group leader) started, CLOCK_BOOTTIME ns
    /// (`group_leader->start_boottime`, what /proc/<pid>/stat shows in ticks): with `pid`, it
    /// names the process across pid reuse. 0 when not recorded (see [`exe::LEADER`]).
    pub leader_start_ns: u64,
    /// The thread group leader's command name (the process's, which policies mean; `comm` is
    /// the connecting thread's), NUL padded; all zero when not recorded.
    pub leader_comm: [u8; 16],
}

/// The connecting task's executable, recorded by the connect hooks so that an `exe` selector
/// is decided by what the process ran when it connected, not by what it runs when the broker
/// accepts (a process could connect and then exec an allowed binary, keeping the socket).
///
/// Rust eBPF cannot carry CO-RE relocations, so the agent reads the offsets of the fields on
/// the path `task_struct.mm → mm_struct.exe_file → file.f_inode → inode.{i_ino, i_sb} →
/// super_block.s_dev` from the kernel's BTF at load time and hands them to the programs in
/// the read-only global [`exe::OFFSETS_GLOBAL`] ([`exe::Offsets`]). Without them (`flags`
/// 0) the programs never read kernel memory and record [`exe::NO_OFFSETS`].
pub mod exe {
    /// `ConnMeta::exe_status`: `exe_dev` and `exe_ino` hold the executable's identity.
    pub const RECORDED: u32 = 0;
    /// The agent gave the programs no field offsets (no kernel BTF, or the helpers needed
    /// are not allowed): nothing was read.
    pub const NO_OFFSETS: u32 = 1;
    /// The task had no memory map or no executable file (a kernel thread).
    pub const NO_MM: u32 = 2;
    /// A `bpf_probe_read_kernel` on the way failed.
    pub const READ_FAILED: u32 = 3;

    /// Name of the global the programs read [`Offsets`] from.
    pub const OFFSETS_GLOBAL: &str = "LATCH_EXE_OFFSETS";
    /// `Offsets::flags` bit: the offsets are valid, read the executable.
    pub const ENABLED: u32 = 1;
    /// `Offsets::flags` bit: the leader offsets are valid, read the thread group leader's
    /// start time and name.
    pub const LEADER: u32 = 2;

    /// Byte offsets of kernel struct fields, from the running kernel's BTF.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Offsets {
        /// [`ENABLED`] or 0.
        pub flags: u32,
        /// `task_struct.mm` (a pointer).
        pub task_mm: u32,
        /// `mm_struct.exe_file` (a pointer).
        pub mm_exe_file: u32,
        /// `file.f_inode` (a pointer).
        pub file_inode: u32,
        /// `inode.i_ino` (8 bytes).
        pub inode_ino: u32,
        /// `inode.i_sb` (a pointer).
        pub inode_sb: u32,
        /// `super_block.s_dev` (4 bytes).
        pub sb_dev: u32,
        /// `task_struct.group_leader` (a pointer).
        pub task_group_leader: u32,
        /// `task_struct.start_boottime` (8 bytes, ns).
        pub task_start_boottime: u32,
        /// `task_struct.comm` (16 bytes).
        pub task_comm: u32,
    }
}

/// Key of `LATCH_CONNS`, `LATCH_FAST_KEYS` and `LATCH_DIR_KEYS`: a connection as the broker
/// sees the accepted connection, in the application's network namespace. Addresses are IPv6
/// or IPv4-mapped IPv6, ports host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    /// The application's end (the broker's peer).
    pub peer_addr: [u8; 16],
    /// The broker's listening end.
    pub local_addr: [u8; 16],
    pub peer_port: u16,
    pub local_port: u16,
    pub _pad: u32,
    /// Cookie of the network namespace of the application's socket.
    pub netns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // Each is repr(C), made only of integers and integer arrays, with no padding (the size
    // assertions below fail to compile if a change adds any).
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BrokerConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::direct::Entry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::direct::First {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::netns::ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::exe::Offsets {}
}

// Layout checks: a change that introduces padding fails to compile.
const _: () = assert!(core::mem::size_of::<BrokerConfig>() == 32);
const _: () = assert!(core::mem::size_of::<RuleValue>() == 8);
const _: () = assert!(core::mem::size_of::<ConnMeta>() == 136);
const _: () = assert!(core::mem::size_of::<TupleKey>() == 48);
const _: () = assert!(core::mem::size_of::<flow::Slot>() == 32);
const _: () = assert!(core::mem::size_of::<direct::Entry>() == 16);
const _: () = assert!(core::mem::size_of::<netns::ListenerKey>() == 16);
const _: () = assert!(direct::HEADER_LEN == 64);
const _: () = assert!(direct::SKB_HEAD_LEN == 16);
const _: () = assert!(core::mem::size_of::<direct::First>() == 64);
const _: () = assert!(core::mem::size_of::<exe::Offsets>() == 40);
