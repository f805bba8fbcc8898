//! The loaded policies as the data path uses them: rule ids for the eBPF tries, and the way
//! back from a kernel record's rule id to its policy.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use crate::{
    config::{Config, Policy, Target},
    ebpf::Rule,
};

/// Host name → the addresses it currently resolves to.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// An immutable set of policies. Replaced whole, never edited, so a connection sees one
/// consistent set from accept to close.
#[derive(Debug, Default)]
pub struct PolicySet {
    /// Rule id `n` is `policies[n - 1]`; 0 is never a rule id.
    policies: Vec<Arc<Policy>>,
}

impl PolicySet {
    pub fn new(config: &Config) -> Self {
        Self {
            policies: config.policies.iter().cloned().map(Arc::new).collect(),
        }
    }

    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    /// The policy a kernel rule id stands for.
    pub fn by_rule(&self, rule_id: u32) -> Option<&Arc<Policy>> {
        let index = usize::try_from(rule_id).ok()?.checked_sub(1)?;
        self.policies.get(index)
    }

    /// Host names that need resolving.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .policies
            .iter()
            .filter_map(|p| match &p.destination.target {
                Target::Host(h) => Some(h.clone()),
                _ => None,
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// The trie entries for these policies, given what their host names resolve to.
    /// `ipv6` false leaves out IPv6 entries (no IPv6 listener to redirect them to).
    pub fn rules(&self, resolved: &Resolved, ipv6: bool) -> Vec<Rule> {
        let mut rules = Vec::new();
        for (index, policy) in self.policies.iter().enumerate() {
            let rule_id = index as u32 + 1;
            let prefixes: Vec<(IpAddr, u8)> = match &policy.destination.target {
                Target::Address(a) => vec![(*a, if a.is_ipv4() { 32 } else { 128 })],
                Target::Cidr(c) => vec![(c.network(), c.prefix_len())],
                Target::Host(h) => resolved
                    .get(h)
                    .into_iter()
                    .flatten()
                    .map(|a| (*a, if a.is_ipv4() { 32 } else { 128 }))
                    .collect(),
            };
            for (addr, prefix_len) in prefixes {
                let is_v6 = addr.is_ipv6() && !is_mapped(addr);
                if is_v6 && !ipv6 {
                    continue;
                }
                for port in policy.destination.ports.iter() {
                    rules.push(Rule {
                        addr,
                        prefix_len,
                        port,
                        rule_id,
                    });
                }
            }
        }
        rules
    }
}

fn is_mapped(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: &str = "\
apiVersion: latch.dev/v1alpha1
kind: Policy
metadata: {name: web}
spec:
  destination: {address: 127.0.0.2, port: 8080}
  protocol: tcp
---
apiVersion: latch.dev/v1alpha1
kind: Policy
metadata: {name: api}
spec:
  destination: {host: localhost, ports: {from: 9000, to: 9001}}
  protocol: tcp
";

    #[test]
    fn rule_ids_map_back_to_policies() {
        let config = crate::config::load_str("p.yaml", POLICIES).expect("valid policies");
        let set = PolicySet::new(&config);
        assert_eq!(set.by_rule(1).unwrap().name, "web");
        assert_eq!(set.by_rule(2).unwrap().name, "api");
        assert!(set.by_rule(0).is_none());
        assert!(set.by_rule(3).is_none());
        assert_eq!(set.hosts(), vec!["localhost".to_owned()]);

        let mut resolved = Resolved::new();
        resolved.insert(
            "localhost".into(),
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        );
        let rules = set.rules(&resolved, true);
        // web: one; api: two addresses × two ports.
        assert_eq!(rules.len(), 5);
        assert!(
            rules
                .iter()
                .any(|r| r.rule_id == 2 && r.port == 9001 && r.addr.is_ipv6())
        );
        assert_eq!(set.rules(&resolved, false).len(), 3);
    }
}
