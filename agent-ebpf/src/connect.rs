//! cgroup/connect4 and cgroup/connect6: redirect matching TCP connects to the broker.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_smp_processor_id,
            bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_map_lookup_elem, bpf_sk_release,
        },
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use latch_common::{
    BrokerConfig, CONFIG_ENABLED, CONFIG_FAIL_OPEN, ConnMeta, RULE_DIRECT, RuleValue,
    netns::{self, ListenerKey},
    stat,
};

use crate::{
    addr, exe,
    maps::{CONFIG, EVENTS, NETNS, RULES4, RULES6, SOCKS, count},
};

const SOCK_STREAM: u32 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// Verdict that lets connect() proceed (with whatever address we left in the context).
const ALLOW: i32 = 1;
/// Verdict that fails connect() with EPERM.
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn latch_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn latch_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx)
}

/// The broker config, if redirection is enabled and this socket is one we may redirect:
/// a TCP socket that does not carry the broker's own mark.
#[inline(always)]
fn eligible(ctx: &SockAddrContext) -> Option<&'static BrokerConfig> {
    // SAFETY: the context pointer is valid for the program's run; fields are read as the
    // verifier allows (4-byte reads of u32 fields, an 8-byte read of `sk`).
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return None;
    }
    let cfg = CONFIG.get(0)?;
    if cfg.flags & CONFIG_ENABLED == 0 {
        return None;
    }
    // SAFETY: as above.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a PTR_TO_SOCKET; `mark` is a readable field of struct bpf_sock.
    if unsafe { (*sk).mark } == cfg.mark {
        count(stat::SKIPPED_MARK);
        return None;
    }
    Some(cfg)
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = eligible(ctx) else {
        return ALLOW;
    };
    // SAFETY: the program's own context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let Some(rule) = lookup4(ip, port) else {
        return ALLOW;
    };
    let mut orig = [0u8; 16];
    orig[10] = 0xff;
    orig[11] = 0xff;
    orig[12..16].copy_from_slice(&ip);
    let meta = meta(ctx, rule, orig, port, AF_INET);
    if let Some(verdict) = unprepared(ctx, cfg, &meta, netns::FAMILY_V4) {
        return verdict;
    }
    if record(ctx, &meta).is_none() || rule.flags & RULE_DIRECT != 0 {
        return ALLOW;
    }
    sa.user_ip4 = u32::from_ne_bytes(cfg.addr4);
    sa.user_port = u32::from(cfg.port4.to_be());
    count(stat::REDIRECTED);
    ALLOW
}

#[inline(always)]
fn try_connect6(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = eligible(ctx) else {
        return ALLOW;
    };
    // SAFETY: the program's own context.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Four 4-byte reads: the verifier allows only word-sized access to user_ip6.
    let w = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let orig = addr::from_words(w);
    let port = u16::from_be(sa.user_port as u16);
    let v4_mapped = w[0] == 0 && w[1] == 0 && orig[8..12] == [0, 0, 0xff, 0xff];
    // An AF_INET6 socket connecting to ::ffff:a.b.c.d travels as IPv4: IPv4 rules apply and
    // the broker's IPv4 listener is the target, written in mapped form.
    let rule = if v4_mapped {
        lookup4([orig[12], orig[13], orig[14], orig[15]], port)
    } else {
        lookup6(orig, port)
    };
    let Some(rule) = rule else {
        return ALLOW;
    };
    let meta = meta(ctx, rule, orig, port, AF_INET6);
    let family = if v4_mapped {
        netns::FAMILY_V4
    } else {
        netns::FAMILY_V6
    };
    if let Some(verdict) = unprepared(ctx, cfg, &meta, family) {
        return verdict;
    }
    if record(ctx, &meta).is_none() || rule.flags & RULE_DIRECT != 0 {
        return ALLOW;
    }
    if v4_mapped {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        sa.user_ip6[3] = u32::from_ne_bytes(cfg.addr4);
        sa.user_port = u32::from(cfg.port4.to_be());
    } else {
        addr::set_user_ip6(sa, &cfg.addr6);
        sa.user_port = u32::from(cfg.port6.to_be());
    }
    count(stat::REDIRECTED);
    ALLOW
}

/// The verdict for a connect a rule matched in a namespace where latch holds no listener of
/// `family`, or `None` if it does (or the rule leaves the connection on its way, as direct
/// mode does). A redirect there would reach nobody, or whoever bound the broker's port after
/// latch let go of it, so the connect is refused or let through as the fail mode says, and
/// reported so that the agent audits it and prepares the namespace.
#[inline(always)]
fn unprepared(
    ctx: &SockAddrContext,
    cfg: &BrokerConfig,
    meta: &ConnMeta,
    family: u32,
) -> Option<i32> {
    if meta.flags & RULE_DIRECT != 0 {
        return None;
    }
    if holds_listener(meta.netns_cookie, family) {
        return None;
    }
    count(stat::UNPREPARED);
    if EVENTS.output::<ConnMeta>(meta, 0).is_err() {
        count(stat::EVENTS_LOST);
    }
    aya_log_ebpf::debug!(ctx, "latch: connect from a network namespace not prepared");
    Some(if cfg.flags & CONFIG_FAIL_OPEN != 0 {
        ALLOW
    } else {
        DENY
    })
}

/// Whether `LATCH_NETNS` holds latch's listener for `family` in the namespace `netns_cookie`.
/// The kernel removes a socket from a sockhash when it closes, so this is true exactly while
/// latch holds the broker's port there.
#[inline(always)]
fn holds_listener(netns_cookie: u64, family: u32) -> bool {
    let key = ListenerKey::new(netns_cookie, family);
    // SAFETY: a sockhash lookup returns a referenced socket (or null) that must be released;
    // `NETNS` is repr(transparent) over its map definition, as the helper expects.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::from_ref(&NETNS).cast_mut().cast(),
            core::ptr::from_ref(&key).cast(),
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

#[inline(always)]
fn lookup4(ip: [u8; 4], port: u16) -> Option<RuleValue> {
    let p = port.to_be_bytes();
    let key = Key::new(48, [p[0], p[1], ip[0], ip[1], ip[2], ip[3]]);
    RULES4.get(&key).copied()
}

#[inline(always)]
fn lookup6(ip: [u8; 16], port: u16) -> Option<RuleValue> {
    let mut data = [0u8; 18];
    data[0..2].copy_from_slice(&port.to_be_bytes());
    data[2..18].copy_from_slice(&ip);
    RULES6.get(&Key::new(144, data)).copied()
}

/// What the kernel knows about this connect.
#[inline(always)]
fn meta(
    ctx: &SockAddrContext,
    rule: RuleValue,
    orig_addr: [u8; 16],
    orig_port: u16,
    family: u16,
) -> ConnMeta {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let (exe_dev, exe_ino, exe_status) = exe::current();
    let (leader_start_ns, leader_comm) = exe::leader();
    // SAFETY: helpers allowed for cgroup_sock_addr programs; the context is the program's own.
    let (cookie, netns_cookie, cgroup_id, now, cpu) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
            bpf_ktime_get_boot_ns(),
            bpf_get_smp_processor_id(),
        )
    };
    ConnMeta {
        orig_addr,
        cgroup_id,
        netns_cookie,
        socket_cookie: cookie,
        ktime_ns: now,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        rule_id: rule.rule_id,
        orig_port,
        family,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        flags: rule.flags,
        exe_dev,
        exe_ino,
        exe_status,
        cpu: cpu.wrapping_add(1),
        leader_start_ns,
        leader_comm,
    }
}

/// Stores the record under the socket's cookie.
#[inline(always)]
fn record(ctx: &SockAddrContext, meta: &ConnMeta) -> Option<()> {
    if SOCKS.insert(&meta.socket_cookie, meta, 0).is_err() {
        // Without a record the broker could not tell where this connection was going:
        // leave it alone rather than redirect it blind.
        count(stat::MAP_ERRORS);
        aya_log_ebpf::warn!(
            ctx,
            "latch: socket map update failed; connection not redirected"
        );
        return None;
    }
    Some(())
}
