//! sock_ops: re-key redirected connections by 4-tuple once established; forget them on close.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use latch_common::{RULE_DIRECT, RULE_FAST_PATH, TupleKey, stat};

use crate::maps::{CONNS, DIRECT_KEYS, FAST_KEYS, SOCKS, count};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn latch_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            established(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: helper allowed for sock_ops; the context is the program's own.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = SOCKS.remove(&cookie);
            // A fast-path socket's 4-tuple entry, unless a newer socket has taken the tuple.
            let key = tuple_key(&ctx);
            // SAFETY: the value is copied out at once (preallocated LRU map).
            if unsafe { FAST_KEYS.get(&key) }.is_some_and(|&c| c == cookie) {
                let _ = FAST_KEYS.remove(&key);
            }
            // SAFETY: as above.
            if unsafe { DIRECT_KEYS.get(&key) }.is_some_and(|e| e.cookie == cookie) {
                let _ = DIRECT_KEYS.remove(&key);
            }
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn established(ctx: &SockOpsContext) -> Option<()> {
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once; a concurrent LRU eviction can only make us
    // read a record that is being replaced, never freed memory (the map is preallocated).
    let meta = *unsafe { SOCKS.get(&cookie) }?;
    let key = tuple_key(ctx);
    if CONNS.insert(&key, &meta, 0).is_err() {
        count(stat::MAP_ERRORS);
        return None;
    }
    count(stat::ESTABLISHED);
    if meta.flags & RULE_FAST_PATH != 0 {
        crate::fastpath::enroll(ctx, &key, cookie);
    }
    if meta.flags & RULE_DIRECT != 0 {
        crate::direct::enroll(ctx, &key, cookie);
    }
    // Ask for state callbacks so the per-socket record is dropped when the socket closes.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    Some(())
}

/// The connection's 4-tuple as the broker sees it on accept: the application's end is the
/// broker's peer (see [`crate::addr::tuple_key4`]).
#[inline(always)]
fn tuple_key(ctx: &SockOpsContext) -> TupleKey {
    if ctx.family() == AF_INET {
        crate::addr::tuple_key4(
            ctx.local_ip4(),
            ctx.remote_ip4(),
            ctx.local_port(),
            ctx.remote_port(),
        )
    } else {
        crate::addr::tuple_key6(
            ctx.local_ip6(),
            ctx.remote_ip6(),
            ctx.local_port(),
            ctx.remote_port(),
        )
    }
}
