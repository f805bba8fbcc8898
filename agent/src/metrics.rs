//! Prometheus metrics. Labels carry policy names and outcomes only — never a secret.
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// How a brokered connection ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Relayed to the target until one side closed.
    relayed,
    /// Could not be brokered (target unreachable, handshake failed, ...).
    failed,
    /// The handshake took longer than `--handshake-timeout` (counted as failed in totals).
    timed_out,
    /// Let through to its destination without latch (fail mode `open`: a pod whose metadata
    /// never arrived); not in the totals, which count what latch brokered or refused.
    bypassed,
}

/// Why a connection was refused before any policy applied.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusedReason {
    /// The kernel did not redirect it (someone connected to the broker's port directly).
    not_redirected,
    /// Redirected, but no loaded policy covers the destination any more.
    no_policy,
    /// The workload already has `--max-per-workload` connections open.
    workload_limit,
    /// A matching connect from a network namespace the broker did not listen in yet (the
    /// kernel refused it, or let it through with the fail mode `open`).
    netns_unprepared,
    /// The broker already serves `--max-connections` connections.
    capacity,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    to_target,
    to_app,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub policy: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: RefusedReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreRefreshLabels {
    pub store: String,
    /// `ok` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    pub store: String,
    /// `SecretError::code()`: store_unreachable, store_auth_failed, not_found, …
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub connections: Family<ConnLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub denied: Family<PolicyLabels, Counter>,
    /// Credentials fetched anew after a target rejected them, by policy.
    pub refreshes: Family<PolicyLabels, Counter>,
    pub active: Gauge<i64, AtomicI64>,
    pub bytes: Family<BytesLabels, Counter<u64, AtomicU64>>,
    pub handshake_seconds: Family<PolicyLabels, Histogram>,
    pub ebpf_redirected: Gauge<i64, AtomicI64>,
    pub ebpf_map_errors: Gauge<i64, AtomicI64>,
    pub rules: Gauge<i64, AtomicI64>,
    pub secret_seconds: Family<StoreLabels, Histogram>,
    pub secret_errors: Family<StoreErrorLabels, Counter>,
    pub map_entries: Family<MapLabels, Gauge<i64, AtomicI64>>,
    /// 1 when the latest probe reached the store, 0 when not.
    pub store_up: Family<StoreLabels, Gauge<i64, AtomicI64>>,
    /// The stores' own credentials obtained or renewed since start, by result.
    pub store_credential_refreshes: Family<StoreRefreshLabels, Gauge<i64, AtomicI64>>,
    /// Secret buffers mlocked / refused a lock since start.
    pub secret_mlock_locked: Gauge<i64, AtomicI64>,
    pub secret_mlock_failed: Gauge<i64, AtomicI64>,
    /// Pipes the relay holds (in flight or idle in its pool).
    pub relay_pipes: Gauge<i64, AtomicI64>,
    /// Target connections kept for the next application connection, by protocol.
    pub kept_connections: Family<ProtocolLabels, Gauge<i64, AtomicI64>>,
    /// Connections whose application-to-target direction the kernel carried (fast path).
    pub fast_path: Counter,
    /// Direct-mode connections handed over to the kernel after latch's startup.
    pub direct: Counter,
    /// relayed, failed, refused, denied.
    totals: [AtomicU64; 4],
}

/// Connection totals, as `latch status` and `latch run`'s summary show them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub relayed: u64,
    pub failed: u64,
    pub refused: u64,
    pub denied: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("latch");
        let connections = Family::<ConnLabels, Counter>::default();
        registry.register(
            "connections",
            "Brokered connections by policy and outcome",
            connections.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused: not redirected, no policy, or over a limit",
            refused.clone(),
        );
        let denied = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "connections_denied",
            "Connections a policy covers but whose workload it does not admit",
            denied.clone(),
        );
        let refreshes = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "credential_refreshes",
            "Credentials fetched anew after a target rejected them (at most one a second per policy)",
            refreshes.clone(),
        );
        let active = Gauge::<i64, AtomicI64>::default();
        registry.register("connections_active", "Connections open now", active.clone());
        let bytes = Family::<BytesLabels, Counter<u64, AtomicU64>>::default();
        registry.register("relay_bytes", "Bytes relayed", bytes.clone());
        let handshake_seconds = Family::<PolicyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ])
        });
        registry.register(
            "handshake_seconds",
            "Time from accept to relaying (target connect and authentication)",
            handshake_seconds.clone(),
        );
        let ebpf_redirected = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "ebpf_redirected",
            "connect() calls the eBPF hooks redirected to the broker",
            ebpf_redirected.clone(),
        );
        let ebpf_map_errors = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "ebpf_map_errors",
            "eBPF map updates that failed (connections left unredirected)",
            ebpf_map_errors.clone(),
        );
        let rules = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "ebpf_rules",
            "Interception rule entries installed",
            rules.clone(),
        );
        let store_up = Family::<StoreLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "store_up",
            "Whether the latest reachability probe reached the secret store (1) or not (0)",
            store_up.clone(),
        );
        let store_credential_refreshes =
            Family::<StoreRefreshLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "store_credential_refreshes",
            "Times each store's own credential was obtained or renewed since start (AWS temporary credentials, Vault logins and token renewals), by result",
            store_credential_refreshes.clone(),
        );
        let secret_mlock_locked = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "secret_mlock_locked",
            "Secret buffers locked in memory (mlock) since start",
            secret_mlock_locked.clone(),
        );
        let relay_pipes = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "relay_pipes",
            "Pipes the relay holds for splice: in use while data is in flight, or idle in its pool",
            relay_pipes.clone(),
        );
        let kept_connections = Family::<ProtocolLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "kept_connections",
            "Target connections kept idle for the next application connection (HTTP/1.1 \
             connections, MySQL sessions)",
            kept_connections.clone(),
        );
        let secret_mlock_failed = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "secret_mlock_failed",
            "Secret buffers whose mlock failed since start (RLIMIT_MEMLOCK without CAP_IPC_LOCK)",
            secret_mlock_failed.clone(),
        );
        let fast_path = Counter::default();
        registry.register(
            "fast_path_handovers",
            "Connections whose application-to-target bytes the kernel carried after the handshake",
            fast_path.clone(),
        );
        let direct = Counter::default();
        registry.register(
            "direct_handovers",
            "Direct-mode connections left to the kernel once latch had authenticated them",
            direct.clone(),
        );
        let secret_seconds = Family::<StoreLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.00001, 0.0001, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
            ])
        });
        registry.register(
            "secret_resolve_seconds",
            "Time to resolve a connection's credentials (cache hits included), by store",
            secret_seconds.clone(),
        );
        let secret_errors = Family::<StoreErrorLabels, Counter>::default();
        registry.register(
            "secret_errors",
            "Credential resolutions that failed, by store and error kind",
            secret_errors.clone(),
        );
        let map_entries = Family::<MapLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "ebpf_map_entries",
            "Entries in the eBPF connection maps (LRU, 65536 each)",
            map_entries.clone(),
        );
        Self {
            registry,
            refreshes,
            secret_seconds,
            secret_errors,
            map_entries,
            store_up,
            store_credential_refreshes,
            secret_mlock_locked,
            secret_mlock_failed,
            relay_pipes,
            kept_connections,
            fast_path,
            direct,
            connections,
            refused,
            denied,
            active,
            bytes,
            handshake_seconds,
            ebpf_redirected,
            ebpf_map_errors,
            rules,
            totals: Default::default(),
        }
    }

    pub fn connection(&self, policy: &str, outcome: Outcome) {
        self.connections
            .get_or_create(&ConnLabels {
                policy: policy.to_owned(),
                outcome,
            })
            .inc();
        let slot = match outcome {
            Outcome::relayed => 0,
            Outcome::failed | Outcome::timed_out => 1,
            Outcome::bypassed => return,
        };
        self.totals[slot].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refuse(&self, reason: RefusedReason) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
        self.totals[2].fetch_add(1, Ordering::Relaxed);
    }

    pub fn deny(&self, policy: &str) {
        self.denied
            .get_or_create(&PolicyLabels {
                policy: policy.to_owned(),
            })
            .inc();
        self.totals[3].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one credential resolution for `policy` (its first store names the series).
    pub fn secret_resolution(
        &self,
        policy: &crate::config::Policy,
        took: std::time::Duration,
        error: Option<&crate::secrets::SecretError>,
    ) {
        let store = policy
            .credential_blocks()
            .next()
            .and_then(|c| c.stores().first().map(|s| s.to_string()))
            .unwrap_or_default();
        self.secret_seconds
            .get_or_create(&StoreLabels {
                store: store.clone(),
            })
            .observe(took.as_secs_f64());
        if let Some(err) = error {
            self.secret_errors
                .get_or_create(&StoreErrorLabels {
                    store,
                    error: err.code(),
                })
                .inc();
        }
    }

    pub fn add_bytes(&self, direction: Direction, n: u64) {
        self.bytes
            .get_or_create(&BytesLabels { direction })
            .inc_by(n);
    }

    /// Totals over all policies and reasons.
    pub fn totals(&self) -> Totals {
        Totals {
            relayed: self.totals[0].load(Ordering::Relaxed),
            failed: self.totals[1].load(Ordering::Relaxed),
            refused: self.totals[2].load(Ordering::Relaxed),
            denied: self.totals[3].load(Ordering::Relaxed),
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_outcomes_and_refusals() {
        let m = Metrics::new();
        m.connection("web", Outcome::relayed);
        m.connection("web", Outcome::relayed);
        m.connection("db", Outcome::failed);
        m.refuse(RefusedReason::not_redirected);
        assert_eq!(
            m.totals(),
            Totals {
                relayed: 2,
                failed: 1,
                refused: 1,
                denied: 0,
            }
        );
        let text = m.encode();
        assert!(text.contains("latch_connections_total{policy=\"web\",outcome=\"relayed\"} 2"));
    }
}
