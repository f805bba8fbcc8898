//! The maps shared with user space; names and layouts live in `latch-common`.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use latch_common::{
    BrokerConfig, CONN_MAP_ENTRIES, ConnMeta, EVENTS_BYTES, NETNS_MAP_ENTRIES, RULE_MAP_ENTRIES,
    Rule4Data, Rule6Data, RuleValue, TupleKey, direct, flow, netns::ListenerKey, stat,
};

#[map(name = "LATCH_RULES4")]
pub static RULES4: LpmTrie<Rule4Data, RuleValue> = LpmTrie::with_max_entries(RULE_MAP_ENTRIES, 0);

#[map(name = "LATCH_RULES6")]
pub static RULES6: LpmTrie<Rule6Data, RuleValue> = LpmTrie::with_max_entries(RULE_MAP_ENTRIES, 0);

#[map(name = "LATCH_CONFIG")]
pub static CONFIG: Array<BrokerConfig> = Array::with_max_entries(1, 0);

#[map(name = "LATCH_SOCKS")]
pub static SOCKS: LruHashMap<u64, ConnMeta> = LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_CONNS")]
pub static CONNS: LruHashMap<TupleKey, ConnMeta> =
    LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[map(name = "LATCH_APP_SOCKS")]
pub static APP_SOCKS: SockHash<u64> = SockHash::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_TARGETS")]
pub static TARGETS: SockHash<u64> = SockHash::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_FAST_KEYS")]
pub static FAST_KEYS: LruHashMap<TupleKey, u64> = LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_FLOWS")]
pub static FLOWS: Array<flow::Slot> = Array::with_max_entries(flow::SLOTS, BPF_F_MMAPABLE);

#[map(name = "LATCH_DIRECT")]
pub static DIRECT: SockHash<u64> = SockHash::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_DIR_KEYS")]
pub static DIRECT_KEYS: LruHashMap<TupleKey, direct::Entry> =
    LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_DIR_RECV")]
pub static DIRECT_RECV: LruHashMap<u64, u32> = LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_DIR_FIRST")]
pub static DIRECT_FIRST: LruHashMap<u64, direct::First> =
    LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_DIR_LIVE")]
pub static DIRECT_LIVE: SockHash<u64> = SockHash::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "LATCH_NETNS")]
pub static NETNS: SockHash<ListenerKey> = SockHash::with_max_entries(NETNS_MAP_ENTRIES, 0);

#[map(name = "LATCH_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}
