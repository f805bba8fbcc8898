//! Network values of a destination: CIDR blocks, port ranges and host names.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::str::FromStr;

/// An IPv4 or IPv6 network: a network address with its host bits clear, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// Builds a network; fails when the prefix is too long or host bits are set.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Cidr, String> {
        let max = max_prefix(&addr);
        if prefix_len > max {
            return Err(format!("prefix length must be at most {max}"));
        }
        let network = mask(addr, prefix_len);
        if network != addr {
            return Err(format!(
                "host bits are set (did you mean \"{network}/{prefix_len}\"?)"
            ));
        }
        Ok(Cidr {
            network,
            prefix_len,
        })
    }

    /// The single-address network of `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            network: addr,
            prefix_len: max_prefix(&addr),
        }
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn is_ipv4(&self) -> bool {
        self.network.is_ipv4()
    }

    /// Whether `addr` is inside this network (an IPv4 address is never inside an IPv6 network).
    pub fn contains(&self, addr: &IpAddr) -> bool {
        addr.is_ipv4() == self.network.is_ipv4() && mask(*addr, self.prefix_len) == self.network
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(&other.network)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let Some((addr, len)) = s.split_once('/') else {
            return Err("missing prefix length, e.g. \"10.0.3.0/24\"".to_string());
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("prefix length {len:?} is not a number"));
        }
        let max = max_prefix(&addr);
        let len: u32 = len
            .parse()
            .map_err(|_| format!("prefix length must be at most {max}"))?;
        let len = u8::try_from(len).map_err(|_| format!("prefix length must be at most {max}"))?;
        Cidr::new(addr, len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

fn max_prefix(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// An inclusive range of TCP ports; a single port has `from == to`. Ranges hold at most
/// [`PortRange::MAX_LEN`] ports, because each port becomes a kernel map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub from: u16,
    pub to: u16,
}

impl PortRange {
    /// The most ports one destination may name.
    pub const MAX_LEN: usize = 1024;

    pub fn single(port: u16) -> PortRange {
        PortRange {
            from: port,
            to: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.from..=self.to).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.from <= other.to && other.from <= self.to
    }

    pub fn len(&self) -> usize {
        usize::from(self.to) - usize::from(self.from) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn iter(&self) -> RangeInclusive<u16> {
        self.from..=self.to
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from == self.to {
            write!(f, "{}", self.from)
        } else {
            write!(f, "{}-{}", self.from, self.to)
        }
    }
}

/// Checks a DNS host name (RFC 1123 labels, no wildcards) and returns it lowercased, without a
/// trailing dot.
pub fn host_name(text: &str) -> Result<String, String> {
    if text.parse::<IpAddr>().is_ok() {
        return Err("this is an IP address; write it as `address:`".to_string());
    }
    if text.contains('/') {
        return Err("a host name has no '/'; for a network write `cidr:`".to_string());
    }
    if text.contains(':') {
        return Err("a host name has no ':'; write the port as `port:`".to_string());
    }
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() {
        return Err("empty host name".to_string());
    }
    if name.len() > 253 {
        return Err("a host name has at most 253 characters".to_string());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row?)".to_string());
        }
        if label == "*" {
            return Err("wildcards are not supported".to_string());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("{c:?} is not allowed in a host name"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("not a valid host name or IP address".to_string());
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_and_containment() {
        let c: Cidr = "10.0.3.0/24".parse().unwrap();
        assert!(c.contains(&"10.0.3.7".parse().unwrap()));
        assert!(!c.contains(&"10.0.4.7".parse().unwrap()));
        assert!(!c.contains(&"::1".parse().unwrap()));
        let wide: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(wide.contains_cidr(&c) && !c.contains_cidr(&wide));
        assert_eq!(
            "10.0.3.0/33".parse::<Cidr>().unwrap_err(),
            "prefix length must be at most 32"
        );
        assert!(
            "10.0.3.7/24"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("\"10.0.3.0/24\"")
        );
        assert!(
            "10.0.3.0"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("missing prefix")
        );
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(&"fd12::1".parse().unwrap()));
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len(), 0);
        assert!("::/129".parse::<Cidr>().is_err());
    }

    #[test]
    fn ports_and_hosts() {
        let r = PortRange {
            from: 8000,
            to: 8010,
        };
        assert_eq!(r.len(), 11);
        assert!(r.overlaps(&PortRange::single(8010)));
        assert!(!r.overlaps(&PortRange::single(8011)));
        assert_eq!(r.to_string(), "8000-8010");
        assert_eq!(
            host_name("Orders-DB.internal.").unwrap(),
            "orders-db.internal"
        );
        assert!(host_name("10.0.3.7").is_err());
        assert!(host_name("a..b").is_err());
        assert!(host_name("*.internal").is_err());
        assert!(host_name("-a.b").is_err());
        assert!(host_name("db:5432").is_err());
        assert!(host_name("10.0.3.300").is_err());
    }
}
