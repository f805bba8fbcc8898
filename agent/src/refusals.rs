//! Refusals under a storm: one log line and one audit record per reason per second, with a
//! count, instead of one per connection.
//!
//! The first refusal for a reason is logged at once, in full (the caller writes its own
//! detailed line: which workload, which limit). Further refusals for that reason only count,
//! and a flush a second later writes "refused 1177 connections in the last second: …" to the
//! log and a summary record (`count`) to the audit trail, then waits another second while
//! refusals keep coming. A second with none ends the storm; the next refusal is logged in
//! full again. Metrics count every refusal (the caller's `Metrics::refuse`).
//!
//! Nothing runs while nothing is refused: the flush is a task started by the first refusal
//! of a storm, which ends with it.
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
use std::time::Duration;

use crate::{audit, metrics::RefusedReason};

/// How long one summary covers.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Reasons summarised apart.
const REASONS: usize = 5;

fn index(reason: RefusedReason) -> usize {
    match reason {
        RefusedReason::not_redirected => 0,
        RefusedReason::no_policy => 1,
        RefusedReason::workload_limit => 2,
        RefusedReason::netns_unprepared => 3,
        RefusedReason::capacity => 4,
    }
}

/// A reason's words for the log and the audit trail.
fn words(reason: RefusedReason) -> &'static str {
    match reason {
        RefusedReason::not_redirected => "not redirected by the kernel",
        RefusedReason::no_policy => "no policy covers the destination",
        RefusedReason::workload_limit => "workload over its connection limit",
        RefusedReason::netns_unprepared => "network namespace not prepared yet",
        RefusedReason::capacity => "the broker is at --max-connections",
    }
}

#[derive(Default)]
struct Slot {
    /// Refusals since the last summary, not counting the one logged in full.
    count: AtomicU64,
    /// A flush is scheduled (the storm is on).
    storm: AtomicBool,
}

/// Per-reason counters; cheap to clone.
#[derive(Clone, Default)]
pub struct Refusals {
    slots: Arc<[Slot; REASONS]>,
}

impl Refusals {
    /// Counts a refusal. `true`: it is the first of a storm, and the caller logs it in full;
    /// `false`: it goes into the next summary. `audit` receives the summary records.
    pub fn note(&self, reason: RefusedReason, audit: &audit::Audit) -> bool {
        let i = index(reason);
        let slot = &self.slots[i];
        if slot.storm.swap(true, Ordering::AcqRel) {
            slot.count.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let this = self.clone();
                let audit = audit.clone();
                rt.spawn(async move { this.flush_until_calm(reason, &audit).await });
            }
            // No runtime to flush on (not the case in the agent): log each one.
            Err(_) => slot.storm.store(false, Ordering::Release),
        }
        true
    }

    async fn flush_until_calm(&self, reason: RefusedReason, audit: &audit::Audit) {
        let slot = &self.slots[index(reason)];
        loop {
            tokio::time::sleep(INTERVAL).await;
            let n = slot.count.swap(0, Ordering::AcqRel);
            if n > 0 {
                summarise(reason, n, audit);
                continue;
            }
            slot.storm.store(false, Ordering::Release);
            // A refusal between the swap and the store counted without being logged or
            // scheduling a flush: take the storm back and go on.
            if slot.count.load(Ordering::Acquire) == 0 || slot.storm.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

fn summarise(reason: RefusedReason, n: u64, audit: &audit::Audit) {
    let words = words(reason);
    let plural = if n == 1 { "" } else { "s" };
    tracing::warn!(
        ?reason,
        count = n,
        "refused {n} connection{plural} in the last second: {words}"
    );
    let mut record = audit::Record::new(0, audit::Outcome::Refused, String::new());
    record.reason = Some(words.to_owned());
    record.count = Some(n);
    audit.summary(&record);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_refusal_is_logged_the_rest_of_the_second_counted_then_calm_again() {
        let r = Refusals::default();
        let audit = audit::Audit::disabled();
        assert!(r.note(RefusedReason::capacity, &audit));
        for _ in 0..1000 {
            assert!(!r.note(RefusedReason::capacity, &audit));
        }
        // Another reason has its own storm.
        assert!(r.note(RefusedReason::no_policy, &audit));
        assert_eq!(
            r.slots[index(RefusedReason::capacity)]
                .count
                .load(Ordering::Relaxed),
            1000
        );

        // The flush takes the count (real time: a few seconds); the storm goes on while
        // refusals come.
        tokio::time::sleep(INTERVAL + Duration::from_millis(10)).await;
        assert_eq!(
            r.slots[index(RefusedReason::capacity)]
                .count
                .load(Ordering::Relaxed),
            0
        );
        assert!(!r.note(RefusedReason::capacity, &audit));

        // Two quiet intervals: the storm is over, the next refusal is logged in full.
        tokio::time::sleep(INTERVAL * 2 + Duration::from_millis(10)).await;
        assert!(r.note(RefusedReason::capacity, &audit));
    }
}
