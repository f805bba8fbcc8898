//! latch's own limits told to a PostgreSQL client: a FATAL ErrorResponse with the SQLSTATE a
//! server would use (53300 too many connections, 08001 cannot connect).
use std::time::Duration;

use bytes::BytesMut;
use latch_pg::{
    backend::ERROR_RESPONSE,
    error_fields::{ErrorFields, SqlState},
    pre_startup::{PreStartup, Step},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{config::Policy, connector::Refusal};

/// How long a refused application gets to send its startup packet and take the answer.
const REFUSAL_IO: Duration = Duration::from_secs(2);

/// The SQLSTATE a PostgreSQL client is told for `why`.
pub fn sqlstate(why: &Refusal) -> SqlState {
    match why {
        Refusal::WorkloadLimit { .. } | Refusal::Busy { .. } => SqlState::TOO_MANY_CONNECTIONS,
        Refusal::HandshakeTimeout(_) => SqlState::UNABLE_TO_CONNECT,
    }
}

/// Refuses before anything was exchanged: the client's startup packet is read first
/// (encryption requests answered 'N'), so it takes the ErrorResponse as the answer.
pub async fn before_startup(mut app: TcpStream, policy: &Policy, why: Refusal) {
    let got = tokio::time::timeout(REFUSAL_IO, read_startup(&mut app)).await;
    if matches!(got, Ok(true)) {
        tell(app, policy, why).await;
    }
}

/// Tells the client `why` with a FATAL ErrorResponse (valid at any point of its startup).
pub async fn tell(mut app: TcpStream, policy: &Policy, why: Refusal) {
    let fields = ErrorFields::fatal(
        sqlstate(&why),
        format!("latch: policy \"{}\": {why}", policy.name),
    );
    let mut out = BytesMut::new();
    fields.encode(ERROR_RESPONSE, &mut out);
    crate::connector::refuse::tell_and_close(&mut app, Some(&out)).await;
}

/// Reads until a StartupMessage, answering every path before it as PostgreSQL 15 does (the
/// same codec as the connector's, [`latch_pg::pre_startup`]); `false` on anything else.
async fn read_startup(app: &mut TcpStream) -> bool {
    let mut buf = BytesMut::with_capacity(512);
    let mut pre = PreStartup::default();
    loop {
        let ending = match pre.next(&mut buf) {
            Step::Startup(_) => return true,
            Step::Cancel { .. } => return false,
            Step::Encryption(_) => {
                if app.write_all(b"N").await.is_err() {
                    return false;
                }
                continue;
            }
            Step::Close(ending) => ending,
            Step::Pending => match app.read_buf(&mut buf).await {
                Ok(0) | Err(_) => pre.closed(&buf),
                Ok(_) => continue,
            },
        };
        if !ending.reply.is_empty() {
            let _ = app.write_all(&ending.reply).await;
        }
        return false;
    }
}
