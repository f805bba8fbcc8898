//! Live relays on the upgrade socket: what the old agent sends of each parked relay beside its
//! two sockets (the application's, the target's), so the new agent carries the session on and
//! writes its one audit record. Sans-IO: [`batches`] splits parked relays into messages within
//! the socket's bounds, [`check`] validates what arrived.
use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use super::socket::MAX_FDS;

/// Relays one message carries (two descriptors each).
pub const PER_MESSAGE: usize = MAX_FDS / 2;

/// Most bytes of relay state one message carries (the socket takes up to 256 KiB a message;
/// the rest is room for the envelope).
pub const MAX_BODY: usize = 192 << 10;

/// Largest state of one relay (its audit record names the workload, its labels and secret
/// references); a relay whose state is larger is drained by the old agent instead.
pub const MAX_STATE: usize = 16 << 10;

/// Most relays one hand-over carries.
pub const MAX_RELAYS: usize = 1 << 20;

/// What the new agent needs to carry a relay on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayState {
    /// The connection id its audit record has.
    pub conn: u64,
    pub policy: String,
    /// The workload's cgroup (its per-workload connection slot).
    pub cgroup_id: u64,
    pub destination: String,
    /// Milliseconds since admission, when parked.
    pub elapsed_ms: u64,
    /// Bytes relayed so far, kernel fast path included.
    pub to_target: u64,
    pub to_app: u64,
    /// The audit record so far (docs/audit.md, its own `v`): written once, by the agent that
    /// sees the session end, with the byte counts and duration of the whole session.
    pub audit: serde_json::Value,
    /// A PostgreSQL session's cancellation key, so CancelRequests for it still reach its
    /// server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelState>,
}

/// A PostgreSQL session's entry in the cancel map (its key is a secret of the session: never
/// in `Debug`).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelState {
    pub netns: u64,
    pub dst: std::net::SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

impl std::fmt::Debug for CancelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelState")
            .field("netns", &self.netns)
            .field("dst", &self.dst)
            .finish_non_exhaustive()
    }
}

/// A parked relay: its state and its two sockets.
#[derive(Debug)]
pub struct Parked {
    pub state: RelayState,
    pub app: OwnedFd,
    pub target: OwnedFd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelaysError {
    #[error("{states} relay states but {fds} descriptors")]
    Mismatch { states: usize, fds: usize },
    #[error("{0} relays in one message, at most {PER_MESSAGE}")]
    TooMany(usize),
    #[error("more than {MAX_RELAYS} relays handed over")]
    TooManyInAll,
}

/// Bytes of `state` on the wire (its JSON).
pub fn state_len(state: &RelayState) -> usize {
    serde_json::to_vec(state).map_or(usize::MAX, |v| v.len())
}

/// Splits `parked` into messages of at most [`PER_MESSAGE`] relays and about [`MAX_BODY`]
/// bytes of state. States over [`MAX_STATE`] are returned apart (not sendable).
pub fn batches(parked: Vec<Parked>) -> (Vec<Vec<Parked>>, Vec<Parked>) {
    let mut out: Vec<Vec<Parked>> = Vec::new();
    let mut too_big = Vec::new();
    let mut size = 0;
    for p in parked {
        let len = state_len(&p.state);
        if len > MAX_STATE {
            too_big.push(p);
            continue;
        }
        match out.last_mut() {
            Some(last) if last.len() < PER_MESSAGE && size + len <= MAX_BODY => {
                size += len;
                last.push(p);
            }
            _ => {
                size = len;
                out.push(vec![p]);
            }
        }
    }
    (out, too_big)
}

/// Splits a message's relays into states and descriptors, in order (application, target).
pub fn split(batch: Vec<Parked>) -> (Vec<RelayState>, Vec<OwnedFd>) {
    let mut fds = Vec::with_capacity(batch.len() * 2);
    let states = batch
        .into_iter()
        .map(|p| {
            fds.push(p.app);
            fds.push(p.target);
            p.state
        })
        .collect();
    (states, fds)
}

/// Pairs what arrived in one message: two descriptors per state, at most [`PER_MESSAGE`];
/// `received` (relays taken so far) stays within [`MAX_RELAYS`].
pub fn check(
    states: Vec<RelayState>,
    fds: Vec<OwnedFd>,
    received: usize,
) -> Result<Vec<Parked>, RelaysError> {
    if states.len() > PER_MESSAGE {
        return Err(RelaysError::TooMany(states.len()));
    }
    if fds.len() != 2 * states.len() {
        return Err(RelaysError::Mismatch {
            states: states.len(),
            fds: fds.len(),
        });
    }
    if received + states.len() > MAX_RELAYS {
        return Err(RelaysError::TooManyInAll);
    }
    let mut fds = fds.into_iter();
    Ok(states
        .into_iter()
        .filter_map(|state| {
            Some(Parked {
                state,
                app: fds.next()?,
                target: fds.next()?,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        std::fs::File::open("/proc/self/stat").unwrap().into()
    }

    fn state(conn: u64, pad: usize) -> RelayState {
        RelayState {
            conn,
            policy: "echo".into(),
            cgroup_id: 7,
            destination: "127.0.0.2:5432".into(),
            elapsed_ms: 1500,
            to_target: 100,
            to_app: 200,
            audit: serde_json::json!({"v": 1, "conn": conn, "pad": "x".repeat(pad)}),
            cancel: None,
        }
    }

    fn parked(conn: u64, pad: usize) -> Parked {
        Parked {
            state: state(conn, pad),
            app: fd(),
            target: fd(),
        }
    }

    #[test]
    fn a_state_round_trips_and_its_cancel_key_stays_out_of_debug() {
        let mut s = state(3, 10);
        let json = serde_json::to_vec(&s).unwrap();
        let back: RelayState = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, s);
        s.cancel = Some(CancelState {
            netns: 4,
            dst: "127.0.0.2:5432".parse().unwrap(),
            pid: 4242,
            secret: 987_654_321,
        });
        let back: RelayState = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("987654321") && !debug.contains("4242"),
            "{debug}"
        );
    }

    #[test]
    fn batches_keep_to_the_descriptor_and_size_bounds() {
        let (b, big) = batches((0..250).map(|i| parked(i, 10)).collect());
        assert!(big.is_empty());
        assert_eq!(
            b.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![100, 100, 50]
        );
        assert_eq!(b[2][49].state.conn, 249, "order kept");
        // 15 KiB states: 12 fit 192 KiB.
        let (b, _) = batches((0..30).map(|i| parked(i, 15 << 10)).collect());
        assert!(b.iter().all(|m| m.len() <= 12), "{:?}", b.len());
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 30);
        for m in &b {
            let (states, fds) = split(m.iter().map(|p| parked(p.state.conn, 15 << 10)).collect());
            assert!(serde_json::to_vec(&states).unwrap().len() <= MAX_BODY + 1024);
            assert!(fds.len() <= MAX_FDS);
        }
        let (b, big) = batches(vec![parked(1, 20 << 10), parked(2, 1)]);
        assert_eq!(big.len(), 1);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn check_pairs_descriptors_and_refuses_what_does_not_fit() {
        let (states, fds) = split(vec![parked(1, 0), parked(2, 0)]);
        let got = check(states.clone(), fds, 0).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].state.conn, 2);
        assert_eq!(
            check(states.clone(), vec![fd()], 0).unwrap_err(),
            RelaysError::Mismatch { states: 2, fds: 1 }
        );
        assert_eq!(
            check(states.clone(), vec![fd(), fd(), fd(), fd()], MAX_RELAYS - 1).unwrap_err(),
            RelaysError::TooManyInAll
        );
        let many: Vec<RelayState> = (0..101).map(|i| state(i, 0)).collect();
        assert_eq!(
            check(many, Vec::new(), 0).unwrap_err(),
            RelaysError::TooMany(101)
        );
    }
}
