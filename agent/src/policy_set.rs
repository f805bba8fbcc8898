//! The loaded policies as the data path uses them: rule ids for the eBPF tries, and the way
//! back from a kernel record's rule id to its policy.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    config::{Config, Policy, Target},
    ebpf::Rule,
};

/// Host name → the addresses it currently resolves to.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// An immutable set of policies. Replaced whole, never edited, so a connection sees one
/// consistent set from accept to close.
///
/// Each policy has a rule id, the value the eBPF tries return and the kernel records with the
/// connection. Ids are stable across reloads for policies of the same name, and never reused
/// for another name, so a connection redirected just before a reload can never be attributed
/// to a different policy after it.
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: Vec<Arc<Policy>>,
    /// `ids[i]` is the rule id of `policies[i]`; 0 is never a rule id.
    ids: Vec<u32>,
    by_id: HashMap<u32, usize>,
    /// Ids handed out so far, by policy name (kept across reloads).
    names: HashMap<String, u32>,
    next_id: u32,
}

impl PolicySet {
    /// The first set: ids 1, 2, … in load order.
    pub fn new(config: &Config) -> Self {
        Self::successor(config, None)
    }

    /// A set for a reloaded configuration: policies keep the ids their names had in `previous`.
    pub fn successor(config: &Config, previous: Option<&PolicySet>) -> Self {
        let mut names = previous.map(|p| p.names.clone()).unwrap_or_default();
        let mut next_id = previous.map_or(1, |p| p.next_id);
        let mut set = Self::default();
        for (index, policy) in config.policies.iter().enumerate() {
            let id = *names.entry(policy.name.clone()).or_insert_with(|| {
                next_id += 1;
                next_id - 1
            });
            set.policies.push(Arc::new(policy.clone()));
            set.ids.push(id);
            set.by_id.insert(id, index);
        }
        set.names = names;
        set.next_id = next_id;
        set
    }

    /// The ids handed out so far by policy name, and the next one: what the next agent needs
    /// on an upgrade so that a connection redirected by this agent's programs keeps its policy.
    pub fn ids(&self) -> (HashMap<String, u32>, u32) {
        (self.names.clone(), self.next_id)
    }

    /// A first set that keeps the ids a previous agent gave these names (an upgrade).
    pub fn inheriting(config: &Config, names: HashMap<String, u32>, next_id: u32) -> Self {
        let previous = Self {
            next_id: next_id.max(names.values().max().map_or(1, |m| m + 1)),
            names,
            ..Self::default()
        };
        Self::successor(config, Some(&previous))
    }

    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    /// The policy a kernel rule id stands for.
    pub fn by_rule(&self, rule_id: u32) -> Option<&Arc<Policy>> {
        self.by_id.get(&rule_id).map(|&i| &self.policies[i])
    }

    /// The policy of this set that covers `dst` by address or CIDR (the longest prefix, as
    /// the kernel's trie would choose), with `direct` as given: for a connection the kernel
    /// redirected under a rule a reload has just replaced (a policy renamed gets a new id).
    /// Policies naming a host are not found here: their addresses are the resolver's.
    pub fn covering(&self, dst: &std::net::SocketAddr, direct: bool) -> Option<&Arc<Policy>> {
        self.policies
            .iter()
            .filter(|p| {
                p.direct == direct
                    && p.destination.ports.contains(dst.port())
                    && p.destination.target.contains(&dst.ip())
            })
            .max_by_key(|p| p.destination.target.prefix_len())
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
        for (policy, &rule_id) in self.policies.iter().zip(&self.ids) {
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
                        fast_path: policy.fast_path_eligible(),
                        direct: policy.direct,
                        server_first: policy.protocol == crate::config::Protocol::Mysql,
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
    fn a_destination_finds_the_policy_that_covers_it_now() {
        // After a reload renamed `web` (new rule id), a connection redirected under the old
        // id is served by what covers its destination now: the longest prefix, the port in
        // range; a host policy is not found by address, nor a policy of the other mode.
        let yaml = format!(
            "{POLICIES}---\napiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: net}}\n\
             spec:\n  destination: {{cidr: 127.0.0.0/24, port: 8080}}\n  protocol: tcp\n"
        );
        let config = crate::config::load_str("p.yaml", &yaml).expect("valid policies");
        let set = PolicySet::new(&config);
        let at = |s: &str| {
            set.covering(&s.parse().unwrap(), false)
                .map(|p| p.name.clone())
        };
        assert_eq!(at("127.0.0.2:8080").as_deref(), Some("web"));
        assert_eq!(at("127.0.0.3:8080").as_deref(), Some("net"));
        assert_eq!(at("127.0.0.2:8081"), None);
        assert_eq!(
            at("127.0.0.1:9000"),
            None,
            "a host's addresses are the resolver's"
        );
        assert!(
            set.covering(&"127.0.0.2:8080".parse().unwrap(), true)
                .is_none()
        );
    }

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

    #[test]
    fn reload_keeps_ids_by_name_and_never_reuses_them() {
        let first = PolicySet::new(&crate::config::load_str("p.yaml", POLICIES).unwrap());
        // Reload without `web`, with a new policy `db`.
        let reloaded = POLICIES.replace("name: web", "name: db");
        let second = PolicySet::successor(
            &crate::config::load_str("p.yaml", &reloaded).unwrap(),
            Some(&first),
        );
        assert_eq!(second.by_rule(2).unwrap().name, "api", "api keeps its id");
        assert!(second.by_rule(1).is_none(), "web's id is not reused for db");
        assert_eq!(second.by_rule(3).unwrap().name, "db");
        // Bringing `web` back gives it its old id again.
        let third = PolicySet::successor(
            &crate::config::load_str("p.yaml", POLICIES).unwrap(),
            Some(&second),
        );
        assert_eq!(third.by_rule(1).unwrap().name, "web");
    }

    #[test]
    fn an_upgraded_agent_keeps_the_old_agents_ids() {
        // The old agent, after a reload: api 2, db 3 (web's 1 retired).
        let old = PolicySet::successor(
            &crate::config::load_str("p.yaml", &POLICIES.replace("name: web", "name: db")).unwrap(),
            Some(&PolicySet::new(
                &crate::config::load_str("p.yaml", POLICIES).unwrap(),
            )),
        );
        let (names, next) = old.ids();
        // The new agent loads the files in another order and a new policy.
        let files = POLICIES.replace("name: web", "name: cache");
        let new = PolicySet::inheriting(
            &crate::config::load_str("p.yaml", &files).unwrap(),
            names,
            next,
        );
        assert_eq!(new.by_rule(2).unwrap().name, "api");
        assert!(new.by_rule(1).is_none(), "web's id is not reused");
        assert!(new.by_rule(3).is_none(), "db's id is not reused");
        assert_eq!(new.by_rule(4).unwrap().name, "cache");
    }
}
