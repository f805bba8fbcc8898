//! Interception rules as the connect hooks see them: (destination prefix, port) → rule id.
use std::net::IpAddr;

use latch_common::{Rule4Data, Rule6Data, RuleValue, map_names};

/// One entry of a rule trie: connections to `addr/prefix_len` port `port` are redirected and
/// attributed to `rule_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub port: u16,
    pub rule_id: u32,
    /// Connections may use the application-to-target fast path once the broker's handshake
    /// is done ([`latch_common::RULE_FAST_PATH`]).
    pub fast_path: bool,
    /// Connections are not redirected; the broker takes part in their startup only
    /// ([`latch_common::RULE_DIRECT`]).
    pub direct: bool,
    /// With `direct`: the protocol's server speaks first (MySQL;
    /// [`latch_common::RULE_SERVER_FIRST`]).
    pub server_first: bool,
}

/// Identity of a trie entry (what the kernel keys on), normalized so equal prefixes compare
/// equal whatever host bits the policy wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleKey {
    addr: IpAddr,
    prefix_len: u8,
    port: u16,
}

pub(super) enum Lpm {
    V4(u32, Rule4Data),
    V6(u32, Rule6Data),
}

impl Rule {
    pub(super) fn entry(&self) -> (RuleKey, RuleValue) {
        let addr = match self.addr {
            // An IPv4-mapped IPv6 rule is an IPv4 rule: that is how the hooks look it up.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let mapped_shift = if addr.is_ipv4() && self.addr.is_ipv6() {
            96
        } else {
            0
        };
        let prefix_len = self.prefix_len.saturating_sub(mapped_shift).min(max);
        let key = RuleKey {
            addr: mask(addr, prefix_len),
            prefix_len,
            port: self.port,
        };
        let value = RuleValue {
            rule_id: self.rule_id,
            flags: if self.direct && self.server_first {
                latch_common::RULE_DIRECT | latch_common::RULE_SERVER_FIRST
            } else if self.direct {
                latch_common::RULE_DIRECT
            } else if self.fast_path {
                latch_common::RULE_FAST_PATH
            } else {
                0
            },
        };
        (key, value)
    }
}

impl RuleKey {
    pub(super) fn lpm(&self) -> Lpm {
        let port = self.port.to_be_bytes();
        let prefix = 16 + u32::from(self.prefix_len);
        match self.addr {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                Lpm::V4(prefix, [port[0], port[1], o[0], o[1], o[2], o[3]])
            }
            IpAddr::V6(v6) => {
                let mut data = [0u8; 18];
                data[..2].copy_from_slice(&port);
                data[2..].copy_from_slice(&v6.octets());
                Lpm::V6(prefix, data)
            }
        }
    }

    pub(super) fn map_name(&self) -> &'static str {
        if self.addr.is_ipv4() {
            map_names::RULES4
        } else {
            map_names::RULES6
        }
    }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(addr: &str, prefix_len: u8, port: u16) -> Rule {
        Rule {
            addr: addr.parse().unwrap(),
            prefix_len,
            port,
            rule_id: 7,
            fast_path: true,
            direct: false,
            server_first: false,
        }
    }

    #[test]
    fn ipv4_key_is_port_then_address_with_port_bits_in_prefix() {
        let (key, value) = rule("10.0.3.9", 24, 5432).entry();
        assert_eq!(value.rule_id, 7);
        assert_eq!(value.flags, latch_common::RULE_FAST_PATH);
        match key.lpm() {
            Lpm::V4(prefix, data) => {
                assert_eq!(prefix, 16 + 24);
                assert_eq!(data, [0x15, 0x38, 10, 0, 3, 0]);
            }
            Lpm::V6(..) => panic!("expected an IPv4 key"),
        }
    }

    #[test]
    fn mapped_ipv6_rule_becomes_ipv4() {
        let (key, _) = rule("::ffff:127.0.0.2", 128, 80).entry();
        assert!(matches!(key.lpm(), Lpm::V4(48, [0, 80, 127, 0, 0, 2])));
    }

    #[test]
    fn ipv6_key_holds_full_address() {
        let (key, _) = rule("::1", 128, 443).entry();
        match key.lpm() {
            Lpm::V6(prefix, data) => {
                assert_eq!(prefix, 144);
                assert_eq!(&data[..2], &[1, 187]);
                assert_eq!(data[17], 1);
            }
            Lpm::V4(..) => panic!("expected an IPv6 key"),
        }
    }

    #[test]
    fn host_bits_do_not_make_distinct_keys() {
        assert_eq!(
            rule("10.0.3.1", 24, 1).entry().0,
            rule("10.0.3.200", 24, 1).entry().0
        );
        let (key, _) = rule("10.1.2.3", 0, 1).entry();
        assert!(matches!(key.lpm(), Lpm::V4(16, [0, 1, 0, 0, 0, 0])));
    }
}
