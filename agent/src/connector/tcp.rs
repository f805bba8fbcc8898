//! `protocol: tcp` — connect to the original destination and relay bytes, nothing more.
use tokio::net::TcpStream;

use super::{ConnectError, Connector, Context, Served, Support};
use crate::{config::Protocol, relay};

pub const SUPPORT: Support = Support {
    credentials: false,
    target_tls: false,
    negotiates_tls: false,
    app_tls: false,
    direct: false,
    fast_path: true,
};

/// The plain relay. Refusals are resets: there is no protocol to say them in.
pub struct Tcp;

impl Connector for Tcp {
    fn protocol(&self) -> Protocol {
        Protocol::Tcp
    }

    fn serve<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Served<'a> {
        Box::pin(async move {
            let target = cx.env.dial(cx.origin).await?;
            cx.handshake_done();
            let handover = cx.env.handover(cx.origin, || Some(0));
            relay::splice_both(&app, &target, cx.progress(), handover)
                .await
                .map_err(ConnectError::Relay)
        })
    }
}
