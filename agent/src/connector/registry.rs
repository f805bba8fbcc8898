//! The connectors this build has: the one place a protocol registers ([`BUILT`]), what each
//! supports (asked by config validation), and the agent's instances (asked by the broker).
use std::sync::Arc;

use super::{Connector, http, mysql, postgres, tcp};
use crate::config::Protocol;

/// What a protocol's connector can do, so that a policy asking for more is refused at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// It needs credentials (`tcp` does not: it only relays).
    pub credentials: bool,
    /// latch makes TLS toward the target (`tls.mode` other than `disable`).
    pub target_tls: bool,
    /// The protocol asks for TLS in-band, so `tls.mode: prefer` can fall back to plain text.
    pub negotiates_tls: bool,
    /// It terminates TLS from applications with the node-local CA (`appTls`).
    pub app_tls: bool,
    /// It can authenticate on the application's own connection and step out (`direct`).
    pub direct: bool,
    /// Once the handshake is done both legs can be plain TCP that the kernel may carry (the
    /// fast path), when neither leg is TLS.
    pub fast_path: bool,
    /// It keeps `--handshake-timeout` itself ([`crate::connector::Session::deadline`]) and
    /// answers the application when it expires, so the broker sets no watchdog (no timer, no
    /// second descriptor of the application's socket): `tcp`, whose handshake is a connect
    /// and at most a TLS handshake.
    pub bounds_handshake: bool,
}

/// One registered protocol.
pub struct Entry {
    pub protocol: Protocol,
    pub support: Support,
    /// Makes the agent's instance (with empty caches).
    pub make: fn() -> Arc<dyn Connector>,
}

/// Every connector this build brokers. Adding a protocol adds a line here.
pub const BUILT: &[Entry] = &[
    Entry {
        protocol: Protocol::Tcp,
        support: tcp::SUPPORT,
        make: || Arc::new(tcp::Tcp::default()),
    },
    Entry {
        protocol: Protocol::Postgres,
        support: postgres::SUPPORT,
        make: || Arc::new(postgres::Postgres::default()),
    },
    Entry {
        protocol: Protocol::Mysql,
        support: mysql::SUPPORT,
        make: || Arc::new(mysql::Mysql::default()),
    },
    Entry {
        protocol: Protocol::Http,
        support: http::SUPPORT,
        make: || Arc::new(http::Http::default()),
    },
];

/// What `protocol`'s connector supports; `None`: this build has none.
pub fn supports(protocol: Protocol) -> Option<Support> {
    BUILT
        .iter()
        .find(|e| e.protocol == protocol)
        .map(|e| e.support)
}

/// The names of the protocols this build brokers, for messages.
pub fn built_names() -> Vec<&'static str> {
    BUILT.iter().map(|e| e.protocol.as_str()).collect()
}

/// The protocols whose connector has what `want` asks for, for messages ("postgres, mysql").
pub fn names_where(want: impl Fn(&Support) -> bool) -> String {
    BUILT
        .iter()
        .filter(|e| want(&e.support))
        .map(|e| e.protocol.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The agent's connectors, one per built protocol, each with its own caches.
pub struct Connectors {
    all: Vec<Arc<dyn Connector>>,
}

impl Default for Connectors {
    fn default() -> Self {
        Self {
            all: BUILT.iter().map(|e| (e.make)()).collect(),
        }
    }
}

impl Connectors {
    /// The connector for `protocol`, if this build has one.
    pub fn get(&self, protocol: Protocol) -> Option<&dyn Connector> {
        self.all
            .iter()
            .find(|c| c.protocol() == protocol)
            .map(|c| c.as_ref())
    }

    /// Closes every connector's kept target connections made under the policies `changed`
    /// names (all when the agent is stopping; the changed ones at a reload).
    pub fn close_idle(&self, changed: &dyn Fn(&str) -> bool) {
        self.all.iter().for_each(|c| c.close_idle(changed));
    }

    /// The target connections each connector that keeps any keeps now, by protocol name.
    pub fn kept(&self) -> impl Iterator<Item = (&'static str, usize)> + '_ {
        self.all
            .iter()
            .filter_map(|c| Some((c.protocol().as_str(), c.kept()?)))
    }

    /// The connector of type `C` (for paths that belong to one protocol, like PostgreSQL's
    /// direct mode).
    pub fn find<C: Connector>(&self) -> Option<&C> {
        self.all
            .iter()
            .find_map(|c| (c.as_ref() as &dyn std::any::Any).downcast_ref::<C>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_connector_speaks_the_protocol_it_is_registered_for() {
        let all = Connectors::default();
        for e in BUILT {
            assert_eq!(all.get(e.protocol).map(|c| c.protocol()), Some(e.protocol));
        }
        assert!(all.find::<postgres::Postgres>().is_some());
        assert!(all.find::<mysql::Mysql>().is_some());
        assert!(all.find::<http::Http>().is_some());
        assert!(supports(Protocol::Ssh).is_none());
    }
}
