//! Fail mode `open` for a connection admission could not decide ([`Verdict::Bypass`]: its pod's
//! metadata never arrived): the application's bytes go to the destination the kernel recorded
//! and back, unchanged, as if latch were not there. No connector runs, so no credential is
//! resolved or sent, whatever the policy's protocol; no fast path, no TLS.
//!
//! [`Verdict::Bypass`]: super::admit::Verdict::Bypass
use tokio::net::TcpStream;

use super::{Shared, admit::Admitted};
use crate::{connector::refuse, metrics::Outcome, relay};

/// Relays `app` to its destination until either side closes, then writes the audit record
/// (outcome `bypassed`, set by admission) with the bytes moved.
pub(super) async fn relay(app: TcpStream, mut admitted: Admitted, shared: &Shared) {
    let metrics = &shared.metrics;
    metrics.active.inc();
    let progress = relay::Progress::default();
    let target = shared.env.dial(&admitted.origin).await;
    let ended = match &target {
        Ok(target) => relay::splice_both(&app, target, &progress, None)
            .await
            .err()
            .map(|e| e.to_string()),
        Err(err) => Some(err.to_string()),
    };
    metrics.active.dec();
    metrics.connection(&admitted.policy.name, Outcome::bypassed);
    let record = &mut admitted.record;
    record.bytes_to_target = progress
        .to_target
        .load(std::sync::atomic::Ordering::Relaxed);
    record.bytes_to_app = progress.to_app.load(std::sync::atomic::Ordering::Relaxed);
    metrics.add_bytes(crate::metrics::Direction::to_target, record.bytes_to_target);
    metrics.add_bytes(crate::metrics::Direction::to_app, record.bytes_to_app);
    if let (Err(err), Some(reason)) = (&target, record.reason.as_mut()) {
        // As without latch, the application learns that the destination is unreachable
        // (a reset, where the kernel would have refused its connect).
        reason.push_str(&format!("; the destination could not be reached: {err}"));
    } else if let Some(err) = &ended {
        tracing::debug!(%err, "pass-through relay ended by an error");
    }
    if target.is_err() {
        refuse::reset(app);
    }
    tracing::info!(
        to_target = record.bytes_to_target,
        to_app = record.bytes_to_app,
        "closed (let through without latch)"
    );
    admitted.audit(shared);
}
