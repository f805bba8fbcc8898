//! cgroup/getpeername4|6: a redirected socket reports its original destination as the peer.
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use latch_common::{ConnMeta, stat};

use crate::maps::{SOCKS, count};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn latch_peername4(ctx: SockAddrContext) -> i32 {
    if let Some(meta) = lookup(&ctx) {
        let sa = unsafe { &mut *ctx.sock_addr };
        let a = &meta.orig_addr;
        sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        sa.user_port = u32::from(meta.orig_port.to_be());
        count(stat::PEERNAME);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn latch_peername6(ctx: SockAddrContext) -> i32 {
    if let Some(meta) = lookup(&ctx) {
        let sa = unsafe { &mut *ctx.sock_addr };
        crate::addr::set_user_ip6(sa, &meta.orig_addr);
        sa.user_port = u32::from(meta.orig_port.to_be());
        count(stat::PEERNAME);
    }
    ALLOW
}

#[inline(always)]
fn lookup(ctx: &SockAddrContext) -> Option<ConnMeta> {
    // SAFETY: helper allowed for cgroup_sock_addr programs; the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once (see sockops.rs).
    unsafe { SOCKS.get(&cookie) }.copied()
}
