//! Direct mode (protocol in `latch_common::direct`): the application's own connection goes to
//! the target; its startup is diverted to the broker and its answers injected.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_INGRESS,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_msg_pull_data},
    macros::{sk_msg, stream_verdict},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};
use latch_common::{
    RULE_SERVER_FIRST, TupleKey,
    direct::{self, Entry, First, HEADER_LEN, Header, SKB_HEAD_LEN, SkbHeader},
    stat,
};

use crate::maps::{DIRECT, DIRECT_FIRST, DIRECT_KEYS, DIRECT_RECV, count};

/// Called at ACTIVE_ESTABLISHED for a connection whose rule is in direct mode: from now on
/// what the socket sends goes to the broker, and what it receives too, until the broker says
/// otherwise. Nothing can have been sent earlier. When the server speaks first (`rule_flags`
/// has [`RULE_SERVER_FIRST`]), its first bytes go to the lobby ([`direct::GREETING`]).
#[inline(always)]
pub fn enroll(ctx: &SockOpsContext, key: &TupleKey, cookie: u64, rule_flags: u32) {
    let entry = Entry {
        cookie,
        flags: direct::TO_BROKER | direct::FROM_TARGET,
        _pad: 0,
    };
    let mut recv = direct::FROM_TARGET;
    if rule_flags & RULE_SERVER_FIRST != 0 {
        recv |= direct::GREETING | direct::MYSQL;
        let first = First {
            key: *key,
            head: [0; SKB_HEAD_LEN],
        };
        if DIRECT_FIRST.insert(&cookie, &first, 0).is_err() {
            count(stat::MAP_ERRORS);
            return;
        }
    }
    if DIRECT_KEYS.insert(key, &entry, 0).is_err() || DIRECT_RECV.insert(&cookie, &recv, 0).is_err()
    {
        count(stat::MAP_ERRORS);
        return;
    }
    let mut key = cookie;
    // SAFETY: the context is the program's own sock_ops context.
    let ops = unsafe { &mut *ctx.ops };
    if DIRECT.update(&mut key, ops, u64::from(BPF_ANY)).is_ok() {
        count(stat::DIRECT);
    } else {
        count(stat::MAP_ERRORS);
    }
}

/// Sends: from an application socket to the lobby (behind a header naming it) while the
/// broker runs its startup; from the broker's socket for an application into that
/// application's receive queue.
#[sk_msg]
pub fn latch_dir_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context is the program's own; its fields are plain reads.
    let key = crate::addr::msg_key(&ctx);
    // SAFETY: the value is copied out at once.
    let Some(entry) = (unsafe { DIRECT_KEYS.get(&key) }).copied() else {
        return SK_PASS;
    };
    if entry.flags & direct::SIDE != 0 {
        let mut app = entry.cookie;
        return DIRECT.redirect_msg(&ctx, &mut app, u64::from(BPF_F_INGRESS)) as u32;
    }
    if entry.flags & direct::TO_BROKER == 0 {
        return SK_PASS;
    }
    let header = Header {
        len: ctx.size(),
        kind: direct::KIND_MSG,
        cookie: entry.cookie,
        key,
    };
    let hlen = HEADER_LEN as u32;
    // SAFETY: helper allowed for sk_msg programs; the context is the program's own.
    if ctx.push_data(0, hlen, 0).is_err() || unsafe { bpf_msg_pull_data(ctx.msg, 0, hlen, 0) } != 0
    {
        count(stat::MAP_ERRORS);
        return SK_DROP;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + HEADER_LEN > end {
        return SK_DROP;
    }
    // SAFETY: bounds checked just above; the header is written unaligned.
    unsafe { core::ptr::write_unaligned(data as *mut Header, header) };
    let mut lobby = direct::LOBBY;
    DIRECT.redirect_msg(&ctx, &mut lobby, u64::from(BPF_F_INGRESS)) as u32
}

/// Receives: an application socket's bytes from the target go to the broker's socket for it
/// while the broker runs the startup, except the server's ErrorResponse.
#[stream_verdict]
pub fn latch_dir_skb(ctx: SkBuffContext) -> u32 {
    // Stream verdict programs cannot read the namespace cookie, but they can read the
    // receiving socket's own cookie: entries here are per socket, not per 4-tuple.
    // SAFETY: helper allowed for sk_skb programs; the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(flags) = (unsafe { DIRECT_RECV.get(&cookie) }).copied() else {
        return SK_PASS;
    };
    if flags & direct::FROM_TARGET == 0 {
        return SK_PASS;
    }
    if flags & direct::GREETING != 0 {
        return greeting(&ctx, cookie, flags);
    }
    if flags & direct::MYSQL != 0 {
        // MySQL: an ERR packet (0xFF after the packet header) passes, for the same reason as
        // PostgreSQL's ErrorResponse below. The broker mirrors every exchange to the
        // application, so its sequence id is the one the application expects.
        if ctx.load::<u8>(4) == Ok(0xFF) {
            return SK_PASS;
        }
        let mut side = cookie | direct::SIDE_KEY;
        return DIRECT.redirect_skb(&ctx, &mut side, u64::from(BPF_F_INGRESS)) as u32;
    }
    // An ErrorResponse during the startup is followed by the server closing the connection;
    // the close reaches the application at once, so the error must go straight to it too
    // (anything the broker injected afterwards would come after the end of the stream).
    if ctx.load::<u8>(0) == Ok(b'E') {
        return SK_PASS;
    }
    let mut side = cookie | direct::SIDE_KEY;
    DIRECT.redirect_skb(&ctx, &mut side, u64::from(BPF_F_INGRESS)) as u32
}

/// The first bytes a server-first application socket receives (MySQL's greeting), before the
/// broker has a socket for it: to the lobby, their first bytes replaced by a header naming
/// the socket and saved in its `LATCH_DIR_FIRST` entry. The skb keeps its length: the kernel
/// counts what the socket consumed by the skb's length after this program (`tcp_eat_skb`), so
/// a header pushed in front (`bpf_skb_change_head`) would move the socket's `copied_seq`
/// past what it received. Later bytes go to the broker's socket for the application.
#[inline(always)]
fn greeting(ctx: &SkBuffContext, cookie: u64, flags: u32) -> u32 {
    let Some(first) = DIRECT_FIRST.get_ptr_mut(&cookie) else {
        count(stat::MAP_ERRORS);
        return SK_DROP;
    };
    let len = ctx.len();
    let Ok(head) = ctx.load::<[u8; SKB_HEAD_LEN]>(0) else {
        // Fewer bytes than a header: no server's greeting is that short.
        return SK_DROP;
    };
    // SAFETY: a pointer to this map's preallocated value, written once here.
    unsafe { (*first).head = head };
    let header = SkbHeader {
        len,
        kind: direct::KIND_SKB,
        cookie,
    };
    if ctx.store(0, &header, 0).is_err()
        || DIRECT_RECV
            .insert(&cookie, &(flags & !direct::GREETING), 0)
            .is_err()
    {
        count(stat::MAP_ERRORS);
        return SK_DROP;
    }
    let mut lobby = direct::LOBBY;
    DIRECT.redirect_skb(ctx, &mut lobby, u64::from(BPF_F_INGRESS)) as u32
}
