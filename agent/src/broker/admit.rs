//! Admission: the one step every connection takes, relayed or in direct mode, before its
//! protocol's connector runs — the kernel's record, the policy, the workload, the workload's
//! concurrency slot, the policy's decision, the audit record and the connection's span.
//!
//! Order matters: the slot is taken before the policy decides, so a workload flooding
//! connections its policy denies meets its own limit, not every other workload's.
//!
//! A pod's containers can connect before the pod watch has delivered the pod. When the
//! decision depends on the pod's metadata (Kubernetes selectors, `namespace: fromPod`) and the
//! cache does not have it, admission waits for it up to [`POD_WAIT`] (woken by the cache;
//! not at all while the watch is failing), holding only what the connection already holds:
//! its accept permit (`--max-connections`) and its workload's slot (`--max-per-workload`), so
//! a pod the API never describes ties up at most its own slots for that long. Still unknown:
//! fail mode `closed` denies it; `open` lets it through to its destination as a plain relay
//! without credentials ([`Verdict::Bypass`], audited `bypassed`), as if latch were not there.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::MapError;
use latch_common::ConnMeta;
use tracing::Instrument as _;

use super::{Origin, Shared, per_workload::Slot};
use crate::{
    audit::{self, Record},
    config::Policy,
    connector::refuse::Refusal,
    identity::Workload,
    metrics::RefusedReason,
    pods::Lookup,
    runtime::FailMode,
};

/// The longest admission waits for the metadata of a pod the cache does not have yet (less
/// when `--handshake-timeout` is shorter). A pod's metadata usually arrives within moments of
/// its containers starting.
pub const POD_WAIT: Duration = Duration::from_secs(1);

/// What admission decided for a connection that reached its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it with the policy's connector.
    Admit,
    /// The policy does not admit the workload (audited `denied`).
    Deny,
    /// A limit refuses it (audited `refused`).
    Refuse(Refusal),
    /// Fail mode `open`, and the connection's pod is still unknown after [`POD_WAIT`]: relay
    /// it to its destination unchanged, with no credentials (audited `bypassed`).
    Bypass,
}

/// A connection that reached its policy, with everything its connector and its audit record
/// need.
pub struct Admitted {
    pub id: u64,
    pub origin: Origin,
    pub policy: Arc<Policy>,
    pub verdict: Verdict,
    /// The audit record so far (outcome and reason set for a denial or a refusal).
    pub record: Record,
    pub started: Instant,
    /// The connection's one span.
    pub span: tracing::Span,
    /// The workload's concurrency slot, held for as long as the connection is latch's.
    pub slot: Option<Slot>,
}

/// Where a connection without a kernel record was seen, for its audit record.
pub struct Unrecorded {
    /// The address the application reached (the broker's own, for a connection nobody
    /// redirected).
    pub destination: String,
    /// Who it was (the peer address), for the reason.
    pub peer: String,
    /// The peer reset it before the broker accepted it: whoever it was is gone, and whatever
    /// it was is not worth a warning (a client that connects and aborts at once, as health
    /// checks with SO_LINGER 0 do, whose record went with its reset). Audited all the same.
    pub reset: bool,
}

/// Admits connection `id`: `meta` is the kernel's record of it (taken by the caller, which
/// needs it early), `netns` the namespace it was accepted in (`None`: read from the record
/// later, as direct mode does). `None`: nothing to serve (no kernel record, or no policy for
/// its destination any more); it is counted, logged and audited, and the caller closes it.
pub async fn admit(
    shared: &Shared,
    id: u64,
    meta: Result<Option<ConnMeta>, MapError>,
    netns: Option<crate::netns::Handle>,
    unrecorded: impl FnOnce() -> Unrecorded,
    direct: bool,
) -> Option<Admitted> {
    let started = Instant::now();
    let meta = match meta {
        Ok(Some(meta)) => meta,
        Ok(None) => {
            // Nothing reaches credentials unless the kernel redirected it.
            let seen = unrecorded();
            let mut record = Record::new(id, audit::Outcome::Refused, seen.destination.clone());
            if seen.reset {
                tracing::debug!(conn = id, peer = %seen.peer, at = %seen.destination, "a connection reset before it was accepted, with no kernel record");
                record.reason = Some(format!(
                    "reset by its peer before latch accepted it; no kernel record (peer {})",
                    seen.peer
                ));
            } else {
                if shared.refuse(RefusedReason::not_redirected) {
                    tracing::warn!(conn = id, peer = %seen.peer, at = %seen.destination, direct, "refused a connection the kernel did not redirect");
                }
                record.reason = Some(format!("not redirected by the kernel (peer {})", seen.peer));
            }
            record.direct = direct;
            shared.audit.record(&record);
            return None;
        }
        Err(err) => {
            shared.refuse(RefusedReason::not_redirected);
            tracing::error!(conn = id, %err, direct, "kernel connection map lookup failed; refusing");
            return None;
        }
    };
    let mut origin = Origin::from(&meta);
    // Target sockets are opened in the application's namespace.
    origin.netns = netns;
    origin.conn = id;
    let policies = shared.policies();
    // A rule of the set before a reload (its policy renamed, or replaced by another that
    // covers the destination): the current set decides.
    let current = policies
        .by_rule(origin.rule_id)
        .or_else(|| policies.covering(&origin.dst, direct));
    let Some(mut policy) = current.cloned() else {
        if shared.refuse(RefusedReason::no_policy) {
            tracing::warn!(conn = id, %origin, direct, "no policy for this destination any more; refusing");
        }
        let mut record = Record::new(id, audit::Outcome::Refused, origin.dst.to_string());
        record.reason = Some("no policy covers this destination".into());
        record.workload = Some(Workload::resolve(&origin, &shared.cgroups).into());
        record.direct = direct;
        shared.audit.record(&record);
        return None;
    };
    let mut workload = Workload::resolve(&origin, &shared.cgroups);
    let span = span(id, &policy.name, &origin, direct);
    let mut record =
        Record::new(id, audit::Outcome::Relayed, origin.dst.to_string()).with_policy(&policy);
    record.direct = direct;
    let mut slot = shared.per_workload.try_acquire(origin.cgroup_id);
    if slot.is_none()
        && let Some(d) = &shared.direct
    {
        // Handed-over direct-mode sessions give their slots back when their sockets are seen
        // closed, every couple of seconds; a workload opening hundreds of short direct-mode
        // connections a second would otherwise be refused for slots of sessions long gone.
        d.release_closed();
        slot = shared.per_workload.try_acquire(origin.cgroup_id);
    }
    if slot.is_some() {
        await_pod(shared, &mut workload, &policy)
            .instrument(span.clone())
            .await;
    }
    let bypass = |record: &mut Record, workload: &Workload, policy: &Policy| {
        if shared.fail_mode != FailMode::Open || !pod_decides(workload, policy) {
            return None;
        }
        if direct {
            // The application's socket is connected to the target already and its startup
            // is in latch's hands: there is no plain relay to fall back to.
            return Some(false);
        }
        crate::warn_throttled!(
            pod_uid = ?workload.pod_uid,
            "let through without credentials: no metadata for the pod (fail mode open)"
        );
        record.outcome = audit::Outcome::Bypassed;
        record.reason = Some(format!(
            "pod {}: no metadata from the Kubernetes API within {:?}: let through to its \
             destination without credentials (fail mode open)",
            workload.pod_uid.as_deref().unwrap_or("?"),
            pod_wait(shared)
        ));
        Some(true)
    };
    let verdict = span.in_scope(|| {
        if slot.is_none() {
            let why = Refusal::WorkloadLimit {
                max: shared.per_workload.max(),
            };
            if shared.refuse(RefusedReason::workload_limit) {
                tracing::warn!(
                    limit = shared.per_workload.max(),
                    "refused: workload over its connection limit"
                );
            }
            record.outcome = audit::Outcome::Refused;
            record.reason = Some(why.to_string());
            Verdict::Refuse(why)
        } else if !workload.admitted_by(&policy.workloads) {
            let direct_note = match bypass(&mut record, &workload, &policy) {
                Some(true) => return Verdict::Bypass,
                Some(false) => Some(DIRECT_CLOSED.to_owned()),
                None => None,
            };
            shared.metrics.deny(&policy.name);
            let exe_verdicts = workload.denial_details(&policy.workloads);
            crate::warn_throttled!(
                exe = ?workload.exe,
                exe_verdicts,
                cgroup = ?workload.cgroup,
                "denied: the policy does not admit this workload"
            );
            let details = [exe_verdicts, direct_note].into_iter().flatten();
            let details: Vec<String> = details.collect();
            record.outcome = audit::Outcome::Denied;
            record.reason = Some(denial_reason(
                &policy.name,
                (!details.is_empty()).then(|| details.join("; ")),
            ));
            Verdict::Deny
        } else if policy.reads_pod_namespace() {
            // The policy's Secrets are in the pod's own namespace: a connection of a pod whose
            // namespace the Kubernetes API gave. Anyone else (a host process, a pod not yet
            // described) gets nothing.
            match workload.pod.as_ref().map(|p| p.namespace.as_str()) {
                Some(ns) => {
                    policy = Arc::new(policy.in_pod_namespace(ns));
                    Verdict::Admit
                }
                None => {
                    let direct_note = match bypass(&mut record, &workload, &policy) {
                        Some(true) => return Verdict::Bypass,
                        Some(false) => format!("; {DIRECT_CLOSED}"),
                        None => String::new(),
                    };
                    shared.metrics.deny(&policy.name);
                    crate::warn_throttled!(
                        cgroup = ?workload.cgroup,
                        "denied: the policy reads Secrets of the pod's namespace, and this connection is not from a pod latch knows"
                    );
                    record.outcome = audit::Outcome::Denied;
                    record.reason = Some(format!(
                        "policy {:?} reads Secrets of the connecting pod's namespace (namespace: fromPod); this workload is not a pod whose namespace latch knows{direct_note}",
                        policy.name
                    ));
                    Verdict::Deny
                }
            }
        } else {
            Verdict::Admit
        }
    });
    record.workload = Some(shared.cgroups.seen.share(workload));
    Some(Admitted {
        id,
        origin,
        policy,
        verdict,
        record,
        started,
        span,
        slot,
    })
}

impl Admitted {
    /// Refuses for a limit found after admission (direct mode's startup threads): counted,
    /// logged and set on the audit record like the limits admission applies itself.
    pub fn refuse(&mut self, shared: &Shared, why: Refusal, reason: RefusedReason) {
        if shared.refuse(reason) {
            self.span
                .in_scope(|| tracing::warn!(%why, "refused: {}", why.reason()));
        }
        self.record.outcome = audit::Outcome::Refused;
        self.record.reason = Some(why.to_string());
        self.verdict = Verdict::Refuse(why);
    }

    /// When the handshake must be done: `--handshake-timeout` after admission began, for
    /// relayed and direct-mode connections alike. Returns the bound too (for the refusal).
    pub fn handshake_deadline(&self, shared: &Shared) -> (tokio::time::Instant, Duration) {
        let timeout = shared.limits.handshake_timeout;
        (
            tokio::time::Instant::from_std(self.started) + timeout,
            timeout,
        )
    }

    /// Writes the audit record, with the time since admission began.
    pub fn audit(&mut self, shared: &Shared) {
        self.record.duration_ms = ms(self.started.elapsed());
        shared.audit.record(&self.record);
    }
}

/// The denial note of a direct-mode connection of an unknown pod under fail mode `open`.
const DIRECT_CLOSED: &str =
    "direct mode fails closed: fail mode open cannot let a direct-mode connection through";

/// Whether the metadata of the workload's pod could change the decision: the cache does not
/// have the pod, and either the policy admits the workload but reads Secrets of the pod's
/// namespace, or a selector with Kubernetes fields matches the workload in all its other
/// fields. (A workload no selector could admit is denied without waiting, in either fail mode.)
fn pod_decides(workload: &Workload, policy: &Policy) -> bool {
    if !workload.pod_unknown {
        return false;
    }
    if workload.admitted_by(&policy.workloads) {
        return policy.reads_pod_namespace();
    }
    policy.workloads.iter().any(|s| {
        s.uses_kubernetes() && {
            let mut rest = s.clone();
            rest.namespace = None;
            rest.service_account = None;
            rest.labels.clear();
            workload.matches(&rest)
        }
    })
}

/// How long admission waits for a pod's metadata: [`POD_WAIT`], or the handshake timeout if
/// shorter (the wait counts toward it).
fn pod_wait(shared: &Shared) -> Duration {
    POD_WAIT.min(shared.limits.handshake_timeout)
}

/// Waits (up to [`pod_wait`]) for the metadata of the workload's pod when the cache does not
/// have it and the policy's decision needs it; fills it in if it arrives.
async fn await_pod(shared: &Shared, workload: &mut Workload, policy: &Policy) {
    let waits = pod_decides(workload, policy);
    let (true, Some(uid), Some(cache)) = (waits, &workload.pod_uid, &shared.cgroups.pods) else {
        return;
    };
    let started = Instant::now();
    let found = cache.wait_for(uid, pod_wait(shared)).await;
    let waited = started.elapsed();
    match found {
        Lookup::Known(meta) => {
            tracing::debug!(?waited, "the pod's metadata arrived while admission waited");
            workload.pod = Some((*meta).clone());
            workload.pod_unknown = false;
        }
        Lookup::Unknown => {
            tracing::debug!(
                ?waited,
                failing = cache.failing(),
                "no metadata for the pod"
            );
        }
    }
}

/// The one span of a connection (`direct` marks direct-mode connections).
fn span(id: u64, policy: &str, origin: &Origin, direct: bool) -> tracing::Span {
    tracing::info_span!(
        "conn",
        id,
        policy,
        dst = %origin.dst,
        pid = origin.pid,
        uid = origin.uid,
        comm = %origin.comm,
        cgroup_id = origin.cgroup_id,
        direct = direct.then_some(true),
    )
}

/// The audit reason of a denial; with `exe` selectors, how the executable compared with each.
fn denial_reason(policy: &str, exe_verdicts: Option<String>) -> String {
    match exe_verdicts {
        Some(v) => format!("policy {policy:?} does not admit this workload ({v})"),
        None => format!("policy {policy:?} does not admit this workload"),
    }
}

/// Milliseconds, to the microsecond (audit records).
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(workloads: &str) -> Policy {
        let text = format!(
            "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: p\nspec:\n  \
             destination: {{address: 127.0.0.1, port: 5432}}\n  workloads:\n{workloads}"
        );
        let config = crate::config::load_str("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        config.policies[0].clone()
    }

    fn unknown_pod(uid: u32) -> Workload {
        Workload {
            uid,
            pod_uid: Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427".into()),
            pod_unknown: true,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_pod_whose_metadata_could_change_the_decision_waits_or_is_let_through() {
        let kube = policy("    - namespace: shop\n      uid: 1000\n");
        assert!(pod_decides(&unknown_pod(1000), &kube));
        assert!(
            !pod_decides(&unknown_pod(0), &kube),
            "denied by its uid whatever the pod's namespace"
        );
        let mut known = unknown_pod(1000);
        known.pod_unknown = false;
        assert!(!pod_decides(&known, &kube));
        let by_uid = policy("    - uid: 1000\n");
        assert!(
            !pod_decides(&unknown_pod(1000), &by_uid),
            "admitted without pod metadata"
        );
        assert!(!pod_decides(&unknown_pod(0), &by_uid));
        let either = policy("    - uid: 1000\n    - labels: {app: orders}\n");
        assert!(!pod_decides(&unknown_pod(1000), &either));
        assert!(pod_decides(&unknown_pod(0), &either));
    }
}
