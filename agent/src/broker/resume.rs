//! Relays carried across an upgrade: what the old agent records of a relay it parked, and the
//! new agent carrying it on with the same relay code, as a connection of its own (counted,
//! drained, parked again on the next upgrade). The session keeps one audit record: the agent
//! that sees it end writes it, with the byte counts and duration of the whole session.
use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::{Shared, admit::ms, workers::Workers};
use crate::{
    audit::Record,
    metrics::{Direction, Outcome},
    relay::Progress,
    upgrade::relays::{Parked, RelayState},
};

/// A parked relay's state: its audit record so far and the counts in it.
pub(super) fn state(
    conn: u64,
    policy: &str,
    cgroup_id: u64,
    started: Instant,
    record: &Record,
) -> RelayState {
    RelayState {
        conn,
        policy: policy.to_owned(),
        cgroup_id,
        destination: record.destination.clone(),
        elapsed_ms: started.elapsed().as_millis() as u64,
        to_target: record.bytes_to_target,
        to_app: record.bytes_to_app,
        audit: serde_json::to_value(record).unwrap_or_default(),
        cancel: None,
    }
}

/// Carries relays an old agent handed over on this agent's connection threads.
#[derive(Clone)]
pub struct Resumer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) tracker: TaskTracker,
    pub(crate) abort: CancellationToken,
    pub(crate) workers: Arc<Workers>,
    pub(crate) slots: Arc<Semaphore>,
}

impl Resumer {
    /// Carries `parked` on. It takes a connection slot if one is free, and its workload's
    /// slot likewise: a relay already open is never cut for a limit.
    pub fn resume(&self, parked: Parked) {
        let permit = self.slots.clone().try_acquire_owned().ok();
        let shared = self.shared.clone();
        let abort = self.abort.clone();
        self.workers
            .next()
            .spawn(self.tracker.track_future(async move {
                let _permit = permit;
                tokio::select! {
                    _ = carry_on(parked, &shared) => {}
                    _ = abort.cancelled() => {}
                }
            }));
    }
}

fn stream(fd: std::os::fd::OwnedFd) -> std::io::Result<TcpStream> {
    let s = std::net::TcpStream::from(fd);
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
}

async fn carry_on(parked: Parked, shared: &Shared) {
    let Parked { state, app, target } = parked;
    let span = tracing::info_span!(
        "conn",
        id = state.conn,
        policy = %state.policy,
        dst = %state.destination,
        handed_over = true,
    );
    run(state, app, target, shared).instrument(span).await
}

async fn run(
    mut state: RelayState,
    app: std::os::fd::OwnedFd,
    target: std::os::fd::OwnedFd,
    shared: &Shared,
) {
    let started = Instant::now()
        .checked_sub(Duration::from_millis(state.elapsed_ms))
        .unwrap_or_else(Instant::now);
    let (app, target) = match (stream(app), stream(target)) {
        (Ok(a), Ok(t)) => (a, t),
        (Err(err), _) | (_, Err(err)) => {
            tracing::warn!(%err, "cannot carry on a relay handed over");
            return write_record(shared, &state, started, Some(err.to_string()));
        }
    };
    let _slot = shared.per_workload.try_acquire(state.cgroup_id);
    // A PostgreSQL session's CancelRequests reach its server through this agent now.
    let pg = shared
        .connectors
        .find::<crate::connector::postgres::Postgres>();
    let _cancel = state.cancel.zip(pg).and_then(|(c, pg)| {
        let key = crate::connector::postgres::CancelKey {
            netns: c.netns,
            dst: c.dst,
            pid: c.pid,
            secret: c.secret,
        };
        pg.cancels.register(key, &state.policy)
    });
    let metrics = &shared.metrics;
    metrics.active.inc();
    tracing::debug!(
        to_target = state.to_target,
        to_app = state.to_app,
        "carrying on a relay handed over"
    );
    let progress = Progress::default();
    let parking = Some(&*shared.env.parking);
    // A PostgreSQL session (it has a cancellation key) ends with its server, as it did in the
    // agent that started it.
    let ends = if state.cancel.is_some() {
        crate::relay::Ends::WithTarget
    } else {
        crate::relay::Ends::EachWay
    };
    let result = crate::relay::splice_parkable(&app, &target, &progress, None, parking, ends).await;
    metrics.active.dec();
    let to_target = progress.to_target.load(Ordering::Relaxed);
    let to_app = progress.to_app.load(Ordering::Relaxed);
    metrics.add_bytes(Direction::to_target, to_target);
    metrics.add_bytes(Direction::to_app, to_app);
    state.to_target += to_target;
    state.to_app += to_app;
    match result {
        Ok(None) => {
            // Parked again, for the agent after this one.
            let (app, target) = match (app.into_std(), target.into_std()) {
                (Ok(a), Ok(t)) => (a, t),
                (Err(err), _) | (_, Err(err)) => {
                    shared.env.parking.lost();
                    return write_record(shared, &state, started, Some(err.to_string()));
                }
            };
            state.elapsed_ms = started.elapsed().as_millis() as u64;
            tracing::info!(
                to_target = state.to_target,
                to_app = state.to_app,
                "parked for the next agent"
            );
            shared.env.parking.submit(Parked {
                state,
                app: app.into(),
                target: target.into(),
            });
        }
        Ok(Some(_)) | Err(_) => {
            if let Err(err) = &result {
                tracing::debug!(%err, "relay ended by an error");
            }
            tracing::info!(
                to_target = state.to_target,
                to_app = state.to_app,
                ms = started.elapsed().as_millis() as u64,
                "closed"
            );
            write_record(shared, &state, started, None);
        }
    }
}

/// The session's one audit record: the record the first agent began, with the whole
/// session's counts and duration. A relay that could not be carried on is `failed`.
fn write_record(shared: &Shared, state: &RelayState, started: Instant, failed: Option<String>) {
    let outcome = if failed.is_some() {
        Outcome::failed
    } else {
        Outcome::relayed
    };
    shared.metrics.connection(&state.policy, outcome);
    let mut record = state.audit.clone();
    if let Some(r) = record.as_object_mut() {
        r.insert("bytes_to_target".into(), state.to_target.into());
        r.insert("bytes_to_app".into(), state.to_app.into());
        r.insert("duration_ms".into(), ms(started.elapsed()).into());
        if let Some(why) = failed {
            r.insert("outcome".into(), "failed".into());
            r.insert("reason".into(), why.into());
        }
    }
    shared.audit.record_value(&record);
}
