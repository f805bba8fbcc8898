//! Who opened a redirected connection and where it was going, as the kernel recorded it.
use std::{
    fmt,
    net::{Ipv6Addr, SocketAddr},
};

use latch_common::ConnMeta;

/// The kernel's record of a redirected connection, in user-space types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Where the application was connecting.
    pub dst: SocketAddr,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub comm: String,
    pub rule_id: u32,
    /// When the connect happened (CLOCK_BOOTTIME, ns).
    pub ktime_ns: u64,
    /// Cookie of the application's socket.
    pub socket_cookie: u64,
    /// The executable the connecting task ran, as the kernel recorded it.
    pub exe: crate::identity::exe::ExeRecord,
    /// The kernel enrolled the application's socket for the fast path.
    pub fast_path: bool,
    /// The application's network namespace, where the broker opens the target socket (so the
    /// target sees the address it would see without latch); `None`: the agent's own.
    pub netns: Option<crate::netns::Handle>,
    /// The connection's id in logs and audit records (0 until the broker assigns it).
    pub conn: u64,
    /// The process's start (CLOCK_BOOTTIME ns) and name as the kernel recorded them at
    /// connect time (its thread group leader's); `None` when not recorded.
    pub leader: Option<(u64, String)>,
}

impl From<&ConnMeta> for Origin {
    fn from(m: &ConnMeta) -> Self {
        // IPv4 destinations are recorded IPv4-mapped.
        let ip = Ipv6Addr::from(m.orig_addr).to_canonical();
        let text = |b: &[u8; 16]| {
            let len = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..len]).into_owned()
        };
        Self {
            dst: SocketAddr::new(ip, m.orig_port),
            pid: m.pid,
            tid: m.tid,
            uid: m.uid,
            gid: m.gid,
            cgroup_id: m.cgroup_id,
            netns_cookie: m.netns_cookie,
            comm: text(&m.comm),
            rule_id: m.rule_id,
            ktime_ns: m.ktime_ns,
            socket_cookie: m.socket_cookie,
            exe: m.into(),
            fast_path: m.flags & latch_common::RULE_FAST_PATH != 0,
            netns: None,
            conn: 0,
            leader: (m.leader_start_ns != 0).then(|| (m.leader_start_ns, text(&m.leader_comm))),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} ({}) uid {} to {}",
            self.pid, self.comm, self.uid, self.dst
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_destination_becomes_ipv4_and_comm_is_trimmed() {
        let mut meta = ConnMeta {
            orig_port: 5432,
            pid: 42,
            uid: 1001,
            rule_id: 3,
            ..Default::default()
        };
        meta.orig_addr[10] = 0xff;
        meta.orig_addr[11] = 0xff;
        meta.orig_addr[12..].copy_from_slice(&[10, 0, 3, 7]);
        meta.comm[..4].copy_from_slice(b"psql");
        let o = Origin::from(&meta);
        assert_eq!(o.dst, "10.0.3.7:5432".parse().unwrap());
        assert_eq!(o.comm, "psql");
        assert_eq!(o.to_string(), "pid 42 (psql) uid 1001 to 10.0.3.7:5432");
    }

    #[test]
    fn ipv6_destination_stays_ipv6() {
        let meta = ConnMeta {
            orig_addr: Ipv6Addr::LOCALHOST.octets(),
            orig_port: 80,
            ..Default::default()
        };
        assert_eq!(Origin::from(&meta).dst, "[::1]:80".parse().unwrap());
    }
}
