//! `protocol: tcp` — connect to the original destination and relay bytes, nothing more.
use tokio::net::TcpStream;

use super::{ConnectError, connect_marked};
use crate::{
    broker::{Origin, Shared},
    relay::{self, Progress, Transferred},
};

pub async fn serve(
    app: TcpStream,
    origin: &Origin,
    shared: &Shared,
    progress: &Progress,
    handshake_done: impl FnOnce(),
) -> Result<Transferred, ConnectError> {
    let target = connect_marked(
        origin.dst,
        shared.mark,
        shared.limits.connect_timeout,
        origin.netns.as_deref(),
    )
    .await?;
    handshake_done();
    relay::splice_both(&app, &target, progress, shared.handover(origin, || Some(0)))
        .await
        .map_err(ConnectError::Relay)
}
