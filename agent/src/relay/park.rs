//! Parking relays for an upgrade: the old agent asks every relay that can be handed over to
//! stop at a safe point — both directions waiting for data, nothing read and not yet written,
//! no pipe held — so its two sockets, with whatever the kernel has queued in them, can go to
//! the new agent. A relay whose directions do not both reach a safe point within the window
//! (one is blocked writing to a peer that does not read, or has already seen its end of
//! stream) carries on where it is and is drained as before.
use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The agent's request to park, shared by every parkable relay, and what they parked.
#[derive(Default)]
pub struct Parking {
    requested: CancellationToken,
    /// When relays stop trying to park (set with the request).
    window_end: Mutex<Option<Instant>>,
    /// Parkable relays that have not decided yet.
    live: AtomicUsize,
    /// Relays that decided to park and have not been collected yet.
    pending: AtomicUsize,
    parked: Mutex<Vec<crate::upgrade::relays::Parked>>,
}

impl Parking {
    /// Asks every parkable relay to park within `window`.
    pub fn request(&self, window: Duration) {
        *self.window_end.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + window);
        self.requested.cancel();
    }

    /// Whether parking was asked for (a relay that was asked and carried on, or a relay that
    /// starts after the request, is not parked).
    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    /// Adds a parked relay for the collector.
    pub fn submit(&self, parked: crate::upgrade::relays::Parked) {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(parked);
    }

    /// A relay that decided to park could not be submitted after all (its sockets are gone).
    pub fn lost(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes what was parked so far; `true` with it once nothing more can come: no relay that
    /// decided to park is left to take, and every parkable relay has decided or the window
    /// has closed (after it, none decides to park).
    pub fn collect(&self) -> (Vec<crate::upgrade::relays::Parked>, bool) {
        let taken = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        self.pending.fetch_sub(taken.len(), Ordering::AcqRel);
        let undecided = self.live.load(Ordering::Acquire) > 0 && Instant::now() < self.window_end();
        let done = !undecided && self.pending.load(Ordering::Acquire) == 0;
        (taken, done)
    }

    fn window_end(&self) -> Instant {
        self.window_end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(Instant::now)
    }
}

/// One relay's part in an upgrade: its decision, and the counts in [`Parking`] that follow
/// it. The relay (`super::splice::Splice`, both directions in one future) decides when both
/// directions are at their safe points after the request, or when the window closes.
pub(super) struct Gate<'p> {
    parking: &'p Parking,
    /// `Some(true)`: park; `Some(false)`: carry on (for good).
    decided: Option<bool>,
}

impl<'p> Gate<'p> {
    /// A gate for a relay starting now; `None` if parking was already asked for (the relay
    /// started too late to take part).
    pub(super) fn new(parking: &'p Parking) -> Option<Self> {
        parking.live.fetch_add(1, Ordering::AcqRel);
        let gate = Self {
            parking,
            decided: None,
        };
        (!parking.is_requested()).then_some(gate)
    }

    /// Resolves when parking is asked for.
    pub(super) fn requested(&self) -> tokio_util::sync::WaitForCancellationFuture<'p> {
        self.parking.requested.cancelled()
    }

    pub(super) fn is_requested(&self) -> bool {
        self.parking.is_requested()
    }

    pub(super) fn undecided(&self) -> bool {
        self.decided.is_none()
    }

    /// When the upgrade stops waiting for relays to park.
    pub(super) fn window_end(&self) -> Instant {
        self.parking.window_end()
    }

    /// Decides, once: later calls change nothing. Returns the decision.
    pub(super) fn decide(&mut self, park: bool) -> bool {
        if self.decided.is_none() {
            self.decided = Some(park);
            if park {
                self.parking.pending.fetch_add(1, Ordering::AcqRel);
            }
            self.parking.live.fetch_sub(1, Ordering::AcqRel);
        }
        self.decided == Some(true)
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        self.decide(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_counts_follow_each_relays_decision() {
        let parking = Parking::default();
        let mut parks = Gate::new(&parking).unwrap();
        let mut carries_on = Gate::new(&parking).unwrap();
        parking.request(Duration::from_millis(50));
        tokio::time::timeout(Duration::from_millis(20), parks.requested())
            .await
            .expect("the request wakes a relay");
        assert!(!parking.collect().1, "two relays undecided");
        assert!(parks.decide(true));
        assert!(!carries_on.decide(false));
        assert!(!carries_on.decide(true), "a decision is final");
        assert!(
            !parking.collect().1,
            "one relay parked and was not submitted"
        );
        parking.lost();
        assert!(parking.collect().1);
        // One starting after the request takes no part.
        assert!(Gate::new(&parking).is_none());
        drop((parks, carries_on));
        assert!(parking.collect().1);
    }

    #[tokio::test]
    async fn an_undecided_relay_holds_the_collection_until_the_window_closes() {
        let parking = Parking::default();
        let gate = Gate::new(&parking).unwrap();
        parking.request(Duration::from_millis(100));
        assert!(!parking.collect().1, "undecided within the window");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(parking.collect().1, "the window closed");
        drop(gate);
        assert!(parking.collect().1);
    }
}
