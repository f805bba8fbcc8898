//! IPv6 addresses between the byte form our maps use and the four network-order words of
//! `bpf_sock_addr` / `bpf_sock_ops`. The verifier allows only 4-byte accesses to those words.
use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::generated::bpf_get_netns_cookie, programs::SkMsgContext,
};
use latch_common::TupleKey;

const AF_INET: u32 = 2;

/// Reads the four words of an IPv6 address in a program context one by one. The verifier
/// allows only 4-byte accesses there, and without volatile loads the compiler may merge two
/// of them into one 8-byte load ("invalid bpf_context access").
#[inline(always)]
pub fn ctx_words(p: *const [u32; 4]) -> [u32; 4] {
    let p = p.cast::<u32>();
    // SAFETY: `p` points at a 16-byte address field of the program's own context.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// Four words (as the kernel stores them) → 16 address bytes.
#[inline(always)]
pub fn from_words(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&w[0].to_ne_bytes());
    out[4..8].copy_from_slice(&w[1].to_ne_bytes());
    out[8..12].copy_from_slice(&w[2].to_ne_bytes());
    out[12..16].copy_from_slice(&w[3].to_ne_bytes());
    out
}

/// Writes `a` into the context's destination address, word by word.
#[inline(always)]
pub fn set_user_ip6(sa: &mut bpf_sock_addr, a: &[u8; 16]) {
    sa.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    sa.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
    sa.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
    sa.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
}

/// An IPv4 address as read from a context (network order in a u32), IPv4-mapped IPv6.
#[inline(always)]
pub fn mapped(ip: u32) -> [u8; 16] {
    let b = ip.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// The key of an IPv4 socket in namespace `netns`, from the 4-tuple sock_ops and sk_msg
/// contexts give: the socket's own end is the "peer" (the application's end, as the broker
/// sees it). `local_port`
/// is host order; `remote_port` holds the network-order port in its upper 16 bits on
/// little-endian machines (the kernel shifts it there).
#[inline(always)]
pub fn tuple_key4(
    netns: u64,
    local_ip: u32,
    remote_ip: u32,
    local_port: u32,
    remote_port: u32,
) -> TupleKey {
    TupleKey {
        peer_addr: mapped(local_ip),
        local_addr: mapped(remote_ip),
        peer_port: local_port as u16,
        local_port: u16::from_be((remote_port >> 16) as u16),
        _pad: 0,
        netns,
    }
}

/// As [`tuple_key4`], for IPv6 sockets.
#[inline(always)]
pub fn tuple_key6(
    netns: u64,
    local_ip: [u32; 4],
    remote_ip: [u32; 4],
    local_port: u32,
    remote_port: u32,
) -> TupleKey {
    TupleKey {
        peer_addr: from_words(local_ip),
        local_addr: from_words(remote_ip),
        peer_port: local_port as u16,
        local_port: u16::from_be((remote_port >> 16) as u16),
        _pad: 0,
        netns,
    }
}

/// The key of the socket an sk_msg program runs for, in its network namespace.
#[inline(always)]
pub fn msg_key(ctx: &SkMsgContext) -> TupleKey {
    // SAFETY: the context is the program's own; its fields are plain reads, and the helper is
    // allowed for sk_msg programs (Linux 5.15).
    let (md, netns) = unsafe { (&*ctx.msg, bpf_get_netns_cookie(ctx.msg as *mut _)) };
    if md.family == AF_INET {
        tuple_key4(
            netns,
            md.local_ip4,
            md.remote_ip4,
            md.local_port,
            md.remote_port,
        )
    } else {
        tuple_key6(
            netns,
            ctx_words(&raw const md.local_ip6),
            ctx_words(&raw const md.remote_ip6),
            md.local_port,
            md.remote_port,
        )
    }
}
