//! Protocol connectors: given an admitted connection and its policy, reach the target and
//! carry the application's traffic. `tcp` relays bytes; the protocol-aware connectors
//! (PostgreSQL, MySQL and HTTP today; SSH next) authenticate to the target first.
//!
//! A connector implements [`Connector`] and registers in [`registry`]; the broker looks it up
//! by the policy's protocol and never names a protocol itself. What a connector gets is a
//! [`Context`]: the connection's origin and policy, the agent services in [`Env`], and the
//! [`Session`] it reports progress to. Protocol-neutral pieces live here too: [`dial`] (the
//! broker's marked outbound sockets), [`stream`] (plain or TLS legs), [`target_tls`] (rustls
//! toward the target), [`app_tls`] (TLS toward applications from the node-local CA); the copy
//! loops are in [`crate::relay`].
pub mod app_tls;
pub mod dial;
mod env;
pub mod http;
pub mod kept;
pub mod mysql;
pub mod postgres;
pub mod refuse;
pub mod registry;
pub mod stream;
pub mod target_tls;
pub mod tcp;
#[cfg(test)]
mod tests;

use std::{
    any::Any,
    future::Future,
    io,
    pin::Pin,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::Notify};

pub use dial::{DialError, connect_marked};
pub use env::Env;
pub use refuse::Refusal;
pub use registry::{Connectors, Support};

use crate::{
    config::{Policy, Protocol},
    origin::Origin,
    relay::{Progress, Transferred},
};

/// A connector's answer to [`Connector::serve`].
pub type Served<'a> = Pin<Box<dyn Future<Output = Result<Transferred, ConnectError>> + Send + 'a>>;
/// A connector's answer to a connection it refuses.
pub type Answered<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// One protocol's broker. Implementations keep their own caches (keys, TLS configurations,
/// cancel maps) as fields; everything else they use comes through the [`Context`].
pub trait Connector: Any + Send + Sync {
    /// The protocol it speaks.
    fn protocol(&self) -> Protocol;

    /// Serves an admitted connection: reach the target, authenticate, relay until either side
    /// closes. Calls [`Context::handshake_done`] once the application's session is set up (the
    /// broker's handshake deadline ends there). A failure is told to the application in the
    /// protocol's own terms before this returns.
    fn serve<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Served<'a>;

    /// The policy does not admit this workload: say so in the protocol's terms, without
    /// resolving anything or contacting the target. The default resets the connection.
    fn deny<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Answered<'a> {
        let _ = cx;
        Box::pin(async move { refuse::reset(app) })
    }

    /// A limit refuses the connection before anything was exchanged. The default resets it.
    fn refuse<'a>(&'a self, app: TcpStream, policy: &'a Policy, why: Refusal) -> Answered<'a> {
        let _ = (policy, why);
        Box::pin(async move { refuse::reset(app) })
    }

    /// The handshake was cut short (`why`): the application may be anywhere in its startup
    /// (what the connector noted in `cx.session` says where). The default resets the
    /// connection.
    fn abort<'a>(&'a self, app: TcpStream, cx: Context<'a>, why: Refusal) -> Answered<'a> {
        let _ = (cx, why);
        Box::pin(async move { refuse::reset(app) })
    }

    /// The agent is stopping, or policies changed: close the target connections kept between
    /// application connections ([`kept`]) under the policies `changed` names (a changed one
    /// may name other credentials, TLS or users). The default keeps none.
    fn close_idle(&self, changed: &dyn Fn(&str) -> bool) {
        let _ = changed;
    }

    /// How many target connections it keeps now (`None`: it never keeps any).
    fn kept(&self) -> Option<usize> {
        None
    }
}

/// What a connector gets for one connection.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub origin: &'a Origin,
    pub policy: &'a Policy,
    pub env: &'a Env,
    pub session: &'a Session,
}

impl Context<'_> {
    /// The application's session is set up: the handshake deadline no longer applies.
    pub fn handshake_done(&self) {
        self.session.handshake_done();
    }

    /// Bytes moved so far, both ways (the broker reads them for metrics and the audit record).
    pub fn progress(&self) -> &Progress {
        &self.session.progress
    }
}

/// The broker's view of a connection a connector is serving: the bytes it moved and when its
/// handshake ended.
pub struct Session {
    pub progress: Progress,
    started: Instant,
    handshake: OnceLock<Duration>,
    done: Notify,
    /// The connector's own note of how far the application's handshake got, for
    /// [`Connector::abort`] (opaque to the broker).
    stage: AtomicU64,
    /// The relay parked for an upgrade: its sockets (application, target), for the broker to
    /// hand over.
    parked: std::sync::Mutex<Option<ParkedRelay>>,
}

/// A relay a connector parked for an upgrade: its two sockets and what else the next agent
/// needs of the connector.
pub struct ParkedRelay {
    pub app: std::os::fd::OwnedFd,
    pub target: std::os::fd::OwnedFd,
    pub cancel: Option<crate::upgrade::relays::CancelState>,
}

impl Session {
    /// A session whose handshake time counts from `started` (admission).
    pub fn new(started: Instant) -> Self {
        Self {
            progress: Progress::default(),
            started,
            handshake: OnceLock::new(),
            done: Notify::new(),
            stage: AtomicU64::new(0),
            parked: Default::default(),
        }
    }

    /// When `--handshake-timeout` (`limit`) runs out for this session: it counts from
    /// admission.
    pub fn deadline(&self, limit: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started) + limit
    }

    /// The relay parked for an upgrade (see [`crate::relay::park`]): the connector gives its
    /// two sockets, out of its runtime, to the broker.
    pub fn park(
        &self,
        app: TcpStream,
        target: TcpStream,
        cancel: Option<crate::upgrade::relays::CancelState>,
    ) -> io::Result<()> {
        let app = app.into_std()?.into();
        let target = target.into_std()?.into();
        *self.parked.lock().unwrap_or_else(|e| e.into_inner()) = Some(ParkedRelay {
            app,
            target,
            cancel,
        });
        Ok(())
    }

    /// The sockets of a parked relay, once.
    pub fn take_parked(&self) -> Option<ParkedRelay> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Notes how far the application's handshake got (the connector's own encoding).
    pub fn set_stage(&self, stage: u64) {
        self.stage.store(stage, Ordering::Relaxed);
    }

    /// What the connector noted last (0 before anything).
    pub fn stage(&self) -> u64 {
        self.stage.load(Ordering::Relaxed)
    }

    fn handshake_done(&self) {
        if self.handshake.set(self.started.elapsed()).is_ok() {
            self.done.notify_one();
        }
    }

    /// Waits until the connector says the handshake is done.
    pub async fn handshake(&self) {
        if self.handshake.get().is_none() {
            self.done.notified().await;
        }
    }

    /// How long the handshake took, once it is done.
    pub fn handshake_took(&self) -> Option<Duration> {
        self.handshake.get().copied()
    }
}

/// Why a connection could not be brokered. Messages name what failed, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("protocol {0} is not supported by this build of latch yet")]
    Unsupported(&'static str),
    /// Either side reset the connection while it was relayed (not a broker failure).
    #[error("relay: {0}")]
    Relay(#[source] io::Error),
    /// The protocol's own failure, already told to the application in the protocol's terms.
    #[error("{protocol}: {source}")]
    Protocol {
        protocol: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
