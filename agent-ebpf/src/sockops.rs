//! sock_ops: re-key redirected connections by namespace and 4-tuple once established; forget
//! everything a socket made when it closes.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT2,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use latch_common::{CONN_APP_CLOSED, RULE_DIRECT, RULE_FAST_PATH, TupleKey, stat};

use crate::maps::{CONNS, DIRECT_FIRST, DIRECT_KEYS, DIRECT_RECV, FAST_KEYS, SOCKS, count};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn latch_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            established(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => closed(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn established(ctx: &SockOpsContext) -> Option<()> {
    // SAFETY: helper allowed for sock_ops; the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once; a concurrent LRU eviction can only make us
    // read a record that is being replaced, never freed memory (the map is preallocated).
    let meta = *unsafe { SOCKS.get(&cookie) }?;
    let key = tuple_key(ctx);
    // Ask for state callbacks first, so that whatever is inserted below is deleted when the
    // socket closes.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    if CONNS.insert(&key, &meta, 0).is_err() {
        count(stat::MAP_ERRORS);
        return None;
    }
    count(stat::ESTABLISHED);
    if meta.flags & RULE_FAST_PATH != 0 {
        crate::fastpath::enroll(ctx, &key, cookie);
    }
    if meta.flags & RULE_DIRECT != 0 {
        crate::direct::enroll(ctx, &key, cookie, meta.flags);
    }
    Some(())
}

/// The socket is gone: its record, and every entry keyed by its 4-tuple that is still its
/// own, go with it. Nothing of it can be found by a later socket with the same 4-tuple. The
/// one exception is the connection record of a socket closed in an orderly way before the
/// broker took it: the broker's socket still holds the 4-tuple, so the record is marked
/// [`CONN_APP_CLOSED`] and left for it.
#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    // SAFETY: helper allowed for sock_ops; the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCKS.remove(&cookie);
    let _ = DIRECT_RECV.remove(&cookie);
    let _ = DIRECT_FIRST.remove(&cookie);
    let key = tuple_key(ctx);
    // SAFETY (the three gets): values are copied out at once (preallocated maps).
    // A direct-mode socket's record stays for the lobby, which may still be reading what the
    // socket sent before it closed; the lobby checks the cookie in its header against it, and
    // the next socket with this 4-tuple in this namespace overwrites it.
    if let Some(&meta) = unsafe { CONNS.get(&key) }
        && meta.socket_cookie == cookie
        && meta.flags & RULE_DIRECT == 0
    {
        if peer_acked_our_fin(ctx.arg(0)) {
            // Closed before the broker accepted, but the broker's socket acknowledged the
            // FIN: it exists, holds this 4-tuple and waits in the accept queue, and no other
            // socket can take the 4-tuple before the broker has accepted it (and taken this).
            let mut meta = meta;
            meta.flags |= CONN_APP_CLOSED;
            if CONNS.insert(&key, &meta, 0).is_err() {
                let _ = CONNS.remove(&key);
            }
        } else {
            let _ = CONNS.remove(&key);
        }
    }
    if unsafe { FAST_KEYS.get(&key) }.is_some_and(|&c| c == cookie) {
        let _ = FAST_KEYS.remove(&key);
    }
    if unsafe { DIRECT_KEYS.get(&key) }.is_some_and(|e| e.cookie == cookie) {
        let _ = DIRECT_KEYS.remove(&key);
    }
}

/// Whether a socket leaving `old_state` for CLOSE had its FIN acknowledged by its peer (it
/// closed in an orderly way), rather than being reset or timing out.
#[inline(always)]
fn peer_acked_our_fin(old_state: u32) -> bool {
    old_state == BPF_TCP_FIN_WAIT2 || old_state == BPF_TCP_CLOSING
}

/// The connection's key as the broker sees it on accept: the application's end is the
/// broker's peer (see [`crate::addr::tuple_key4`]), in the socket's network namespace.
#[inline(always)]
fn tuple_key(ctx: &SockOpsContext) -> TupleKey {
    // SAFETY: helper allowed for sock_ops (Linux 5.15); the context is the program's own.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if ctx.family() == AF_INET {
        crate::addr::tuple_key4(
            netns,
            ctx.local_ip4(),
            ctx.remote_ip4(),
            ctx.local_port(),
            ctx.remote_port(),
        )
    } else {
        // SAFETY: the context is the program's own; only field addresses are taken here.
        let ops = unsafe { &*ctx.ops };
        crate::addr::tuple_key6(
            netns,
            crate::addr::ctx_words(&raw const ops.local_ip6),
            crate::addr::ctx_words(&raw const ops.remote_ip6),
            ctx.local_port(),
            ctx.remote_port(),
        )
    }
}
