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

/// How often a direction that reached its safe point looks whether the other has too.
const POLL: Duration = Duration::from_millis(2);

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

/// One relay's two directions meeting at their safe points.
pub(super) struct Gate<'p> {
    parking: &'p Parking,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    arrived: u8,
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
            state: Mutex::default(),
        };
        // Counted first: a collector that saw `live == 0` before this has already finished,
        // and the request it made is seen here.
        (!parking.is_requested()).then_some(gate)
    }

    fn decide(&self, st: &mut GateState, park: bool) -> bool {
        if st.decided.is_none() {
            st.decided = Some(park);
            if park {
                self.parking.pending.fetch_add(1, Ordering::AcqRel);
            }
            self.parking.live.fetch_sub(1, Ordering::AcqRel);
        }
        st.decided == Some(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns when parking is asked for, unless this relay has decided to carry on (then
    /// never). A relay that decided to park returns at once: a direction that was moving data
    /// when the other parked joins it at its next safe point.
    pub(super) async fn requested(&self) {
        if self.lock().decided == Some(false) {
            return std::future::pending().await;
        }
        self.parking.requested.cancelled().await;
    }

    /// A direction reached its safe point after the request: `true` once both have (park),
    /// `false` if the window closed first (carry on, and never ask again).
    pub(super) async fn arrive(&self) -> bool {
        let end = self.parking.window_end();
        {
            let mut st = self.lock();
            if let Some(d) = st.decided {
                return d;
            }
            if Instant::now() >= end {
                // Too late: nobody collects any more.
                return self.decide(&mut st, false);
            }
            st.arrived += 1;
            if st.arrived == 2 {
                return self.decide(&mut st, true);
            }
        }
        // Until a decision, this direction is counted as waiting at its safe point; if it
        // leaves undecided (data came first and this future is dropped), it is counted out
        // again, so the other direction cannot park alone by arriving twice.
        let _waiting = Waiting(self);
        loop {
            tokio::time::sleep(POLL).await;
            let mut st = self.lock();
            if let Some(d) = st.decided {
                return d;
            }
            if Instant::now() >= end {
                return self.decide(&mut st, false);
            }
        }
    }
}

/// A direction waiting at its safe point for the other (see [`Gate::arrive`]). A decision is
/// final, so once one is made dropping this changes nothing.
struct Waiting<'g, 'p>(&'g Gate<'p>);

impl Drop for Waiting<'_, '_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        if st.decided.is_none() {
            st.arrived -= 1;
        }
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut st = self.lock();
        self.decide(&mut st, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_directions_park_together_or_neither_does() {
        let parking = Parking::default();
        let both = Gate::new(&parking).unwrap();
        let one = Gate::new(&parking).unwrap();
        parking.request(Duration::from_millis(50));
        assert!(!parking.collect().1, "two relays undecided");
        let (a, b) = tokio::join!(both.arrive(), both.arrive());
        assert!(a && b, "both directions at their safe points park");
        assert!(!one.arrive().await, "the other direction never came");
        assert!(
            !parking.collect().1,
            "one relay parked and was not submitted"
        );
        parking.lost();
        assert!(parking.collect().1);
        // A relay that carried on is never asked again.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), one.requested())
                .await
                .is_err()
        );
        // One starting after the request takes no part.
        assert!(Gate::new(&parking).is_none());
        assert!(parking.collect().1);
    }

    #[tokio::test]
    async fn a_direction_that_leaves_its_safe_point_is_counted_out() {
        let parking = Parking::default();
        let gate = Gate::new(&parking).unwrap();
        parking.request(Duration::from_millis(200));
        // One direction waits, then data comes first and it leaves (its future dropped),
        // twice: the other direction never arrived, so nothing parks.
        for _ in 0..2 {
            let left = tokio::time::timeout(Duration::from_millis(10), gate.arrive()).await;
            assert!(left.is_err(), "one direction alone must not park");
        }
        assert_eq!(gate.lock().decided, None);
        // Both at their safe points together: park, and a direction that was moving data
        // when the other parked is still asked (it joins at its next safe point).
        let (a, b) = tokio::join!(gate.arrive(), gate.arrive());
        assert!(a && b);
        tokio::time::timeout(Duration::from_millis(20), gate.requested())
            .await
            .expect("a parked relay's other direction is asked at once");
    }
}
