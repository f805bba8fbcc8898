//! The application-to-target fast path (protocol in `latch_common::flow`).
use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    bindings::{BPF_ANY, sk_action::SK_PASS},
    macros::sk_msg,
    programs::{SkMsgContext, SockOpsContext},
};
use latch_common::{TupleKey, flow, stat};

use crate::maps::{APP_SOCKS, FAST_KEYS, FLOWS, TARGETS, count};

/// Called at ACTIVE_ESTABLISHED for a redirected connection whose rule allows the fast path:
/// gives the socket a fresh flow slot, then adds it to `LATCH_APP_SOCKS` so that
/// `latch_sk_msg` sees every byte it sends from now on (nothing can be sent earlier).
#[inline(always)]
pub fn enroll(ctx: &SockOpsContext, key: &TupleKey, cookie: u64) {
    let Some(slot) = FLOWS.get_ptr_mut(flow::slot(cookie)) else {
        return;
    };
    // SAFETY: `slot` points into the array map's value area, which lives as long as the map.
    // A socket that owned the slot before may still add to it concurrently; aligned 64-bit
    // stores are single-copy atomic, so the worst case is that its addition lands after these
    // and this flow's hand-over compare never matches. `state` (the generation) goes last.
    unsafe {
        core::ptr::write_volatile(&raw mut (*slot).limit, 0);
        core::ptr::write_volatile(&raw mut (*slot).charged, 0);
        core::ptr::write_volatile(&raw mut (*slot).bytes, 0);
        core::ptr::write_volatile(&raw mut (*slot).state, flow::initial(cookie));
    }
    // sk_msg programs cannot read the socket cookie; they find it by 4-tuple.
    if FAST_KEYS.insert(key, &cookie, 0).is_err() {
        count(stat::MAP_ERRORS);
        return;
    }
    let mut key = cookie;
    // SAFETY: the context is the program's own sock_ops context.
    let ops = unsafe { &mut *ctx.ops };
    if APP_SOCKS.update(&mut key, ops, u64::from(BPF_ANY)).is_ok() {
        count(stat::FAST_SOCKS);
    } else {
        count(stat::MAP_ERRORS);
    }
}

/// Atomic add (BPF_ATOMIC, no fetch). The BPF target has no read-modify-write atomics in
/// core's stable API, hence the intrinsic.
#[inline(always)]
fn add(p: *mut u64, v: u64) {
    // SAFETY: callers pass aligned pointers into the flow map's value area.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) };
}

#[inline(always)]
fn load(p: *const u64) -> u64 {
    // BPF atomic instructions are full barriers, so this load is not moved before an add.
    // SAFETY: as in `add`.
    unsafe { core::ptr::read_volatile(p) }
}

#[sk_msg]
pub fn latch_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context is the program's own; its fields are plain reads.
    let key = crate::addr::msg_key(&ctx);
    // SAFETY: the value is copied out at once (preallocated LRU map).
    let Some(&cookie) = (unsafe { FAST_KEYS.get(&key) }) else {
        return SK_PASS;
    };
    let Some(slot) = FLOWS.get_ptr_mut(flow::slot(cookie)) else {
        return SK_PASS;
    };
    let size = u64::from(ctx.size());
    // SAFETY (here and below): `slot` is a valid pointer into the array map (see `enroll`);
    // only field addresses are taken, all accesses go through `add` and `load`.
    let state = unsafe { &raw mut (*slot).state };
    // A newer socket owns the slot: leave its count alone.
    if !flow::owned_by(load(state), cookie) {
        return SK_PASS;
    }
    // Count first, then look: a flag seen after our addition was set before it.
    add(state, size);
    let now = load(state);
    if now & flow::HANDED_OVER == 0 || !flow::owned_by(now, cookie) {
        return SK_PASS;
    }
    let charged = unsafe { &raw mut (*slot).charged };
    let cost = size + flow::MSG_OVERHEAD;
    let limit = flow::limit_bound(load(unsafe { &raw const (*slot).limit }), cookie);
    if load(charged) + cost > limit {
        // Hand back: the broker relays this message (it stays counted as passed).
        add(state, flow::HANDED_OVER.wrapping_neg());
        return SK_PASS;
    }
    add(state, size.wrapping_neg());
    add(charged, cost);
    add(unsafe { &raw mut (*slot).bytes }, size);
    let mut key = cookie;
    // Egress of the target socket; SK_DROP (the send fails) only if it is gone.
    TARGETS.redirect_msg(&ctx, &mut key, 0) as u32
}
