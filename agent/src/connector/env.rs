//! What a connector may use of the agent: the services every protocol shares, and nothing of
//! the broker's own state (kernel maps, the policy set, workload slots, the audit log). A
//! connector can be run against an [`Env`] made in a unit test, without root or eBPF.
use std::time::Duration;

use crate::{ca::NodeCa, ebpf::FastPath, origin::Origin, relay::Handover, secrets::Secrets};

pub struct Env {
    /// Resolves the credentials a policy names, at connection time.
    pub secrets: Secrets,
    /// SO_MARK of the broker's outbound sockets (skipped by the connect hooks).
    pub mark: u32,
    /// How long opening a connection to a target may take.
    pub connect_timeout: Duration,
    /// How long a connector's whole pre-relay phase may take (`--handshake-timeout`); the
    /// broker enforces it, a connector may bound its own steps by it.
    pub handshake_timeout: Duration,
    /// The node-local CA, for TLS toward applications.
    pub app_ca: NodeCa,
    /// The kernel side of the application-to-target fast path, if available.
    pub fast_path: Option<FastPath>,
    /// Where an upgrade asks relays to park (plain relays that take part hand their sockets
    /// to the next agent).
    pub parking: std::sync::Arc<crate::relay::park::Parking>,
}

impl Env {
    /// An environment with these secrets and defaults for the rest: no fast path, the default
    /// (not yet loaded) node CA, mark 0.
    pub fn new(secrets: Secrets, connect_timeout: Duration, handshake_timeout: Duration) -> Self {
        Self {
            secrets,
            mark: 0,
            connect_timeout,
            handshake_timeout,
            app_ca: NodeCa::default(),
            fast_path: None,
            parking: Default::default(),
        }
    }

    /// Opens a connection to the target from the broker's marked socket, in the application's
    /// namespace, bounded by the connect timeout.
    pub async fn dial(
        &self,
        origin: &Origin,
    ) -> Result<tokio::net::TcpStream, super::dial::DialError> {
        self.dial_within(origin, self.connect_timeout).await
    }

    /// As [`Env::dial`], giving up after `limit` if that is shorter than `--connect-timeout`.
    pub async fn dial_within(
        &self,
        origin: &Origin,
        limit: Duration,
    ) -> Result<tokio::net::TcpStream, super::dial::DialError> {
        super::dial::connect_marked(
            origin.dst,
            self.mark,
            self.connect_timeout.min(limit),
            origin.netns.as_deref(),
        )
        .await
    }

    /// How a relay may hand the application's direction of this connection to the kernel.
    /// `taken` (bytes already read from the application) is asked only when it may.
    pub fn handover(
        &self,
        origin: &Origin,
        taken: impl FnOnce() -> Option<u64>,
    ) -> Option<Handover<'_>> {
        let fast = self.fast_path.as_ref().filter(|_| origin.fast_path)?;
        Some(Handover {
            fast,
            cookie: origin.socket_cookie,
            taken: taken()?,
        })
    }
}
