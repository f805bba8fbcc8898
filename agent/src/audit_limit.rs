//! How many refusal and denial records one workload may put in the audit trail: a token bucket
//! per workload (its cgroup), so that a workload hammering the broker with connections it may
//! not make cannot fill the trail (or the writer's queue) and push other records out. What it
//! does not write is counted and reported on its next record (`suppressed`).
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Records per second one workload may add, and the burst.
pub const RATE: f64 = 10.0;
pub const BURST: f64 = 50.0;
/// Workloads tracked at most; past it, buckets idle for a while are forgotten.
const MAX_KEYS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

/// Token buckets by workload key.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<String, Bucket>,
}

impl Limiter {
    /// Whether a record for `key` may be written at `now`; if so, how many were suppressed
    /// since the last one written.
    pub fn allow(&mut self, key: &str, now: Instant) -> Option<u64> {
        if self.buckets.len() >= MAX_KEYS && !self.buckets.contains_key(key) {
            self.buckets
                .retain(|_, b| now.duration_since(b.at) < Duration::from_secs(60));
            if self.buckets.len() >= MAX_KEYS {
                // Every tracked workload is active: this one shares the fate of the rest.
                return None;
            }
        }
        let b = self.buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: BURST,
            at: now,
            suppressed: 0,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * RATE).min(BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_the_suppressed_count_on_the_next_record() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let written = (0..1000).filter(|_| l.allow("/w", t0).is_some()).count();
        assert_eq!(written, BURST as usize);
        // Another workload is not affected.
        assert_eq!(l.allow("/other", t0), Some(0));
        // A second later, RATE more are allowed; the first carries the count.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.allow("/w", t1), Some(1000 - BURST as u64));
        let more = (0..100).filter(|_| l.allow("/w", t1).is_some()).count();
        assert_eq!(more, RATE as usize - 1);
    }
}
