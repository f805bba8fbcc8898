//! latch's eBPF programs.
//!
//! * `latch_connect4` / `latch_connect6` (cgroup/connect4|6): when a TCP connect() of a task in
//!   the attached cgroup matches an interception rule, record who connected where (by socket
//!   cookie) and rewrite the destination to the broker's listener.
//! * `latch_sockops` (sock_ops): once such a connection is established, re-key the record by its
//!   4-tuple so the broker can find it from accept(); drop the per-socket record on close.
//! * `latch_peername4` / `latch_peername6` (cgroup/getpeername4|6): the application still sees
//!   its original destination as the peer.
//! * `latch_sk_msg` (sk_msg on `LATCH_APP_SOCKS`): once the broker has handed a flow over,
//!   the application's sends go straight to the broker's socket toward the target.
//! * `latch_dir_msg` / `latch_dir_skb` (sk_msg and stream verdict on `LATCH_DIRECT`): direct
//!   mode, where the broker takes part in a connection's startup only.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod connect;
mod direct;
mod exe;
mod fastpath;
mod maps;
mod peername;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
