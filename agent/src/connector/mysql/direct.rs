//! Direct mode (`mysql: {direct: true}`; protocol in `latch_common::direct`): the
//! application's own connection goes to the server. latch authenticates on it with the policy's
//! credentials and takes itself out before its last authentication packet, so the server's OK
//! (or ERR) reaches the application on its plain TCP socket and the session then costs what a
//! direct connection costs. The PostgreSQL side is `connector::postgres::direct`; both run on
//! the same [`Leg`] (sock map entries, lobby, the broker's socket K, the duplicate of A).
//!
//! The server speaks first: its greeting reaches the lobby (see `latch_dir_skb`), and latch
//! passes it to the application with CLIENT_SSL cleared (the application's connection is the
//! session: no TLS toward it). Sequence ids stay exact because every server packet of the
//! authentication is mirrored to the application with the same id:
//!
//! | seq | server ↔ latch (on A) | latch ↔ application (K, lobby) |
//! |---|---|---|
//! | 0 | greeting → | greeting, CLIENT_SSL cleared → |
//! | 1 | ← response naming [`PROBE`] | ← the application's response |
//! | 2 | AuthSwitchRequest(plugin, nonce) → | AuthSwitchRequest(its own plugin, fresh nonce) → |
//! | 3 | ← latch's answer (after the hand-over) | ← the application's answer, dropped |
//! | 4 | OK or ERR, straight to the application | |
//!
//! The first response names a plugin no account uses, so the server always asks for the
//! account's own one: latch knows then that its answer is the last packet it sends
//! (mysql_native_password, client_ed25519, caching_sha2_password's fast path) and steps out
//! before writing it, at a moment when nothing can be queued (the application waits for packet
//! 4, the server for packet 3). When a (policy, user)'s account was seen on the plugin whose
//! data can go in the first response (the greeting's own, mysql_native_password on MariaDB),
//! the response carries it and is the last packet: one round trip fewer. A server ERR at any
//! point passes to the application as it is (its sequence id is the one the application
//! expects), see `latch_dir_skb`.
//!
//! With the server's RSA key pinned (`mysql.serverPublicKey: /path`) and a caching_sha2_password
//! greeting, the first response names that plugin with data that is no account's hash: the
//! server asks for full authentication (AuthMoreData 0x04) at 2, and latch's answer at 3, the
//! password encrypted with the pinned key, is answered by the OK alone at 4, whatever the
//! server's cache holds and whatever the application's client (docs/direct-mode.md).
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::Mutex,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use latch_common::direct::{FROM_TARGET, TO_BROKER};
use latch_mysql::{
    AuthStep, AuthSwitchRequest, CapabilityFlags, ClientAuth, ClientAuthOptions, ClientHello,
    Greeting, Packet, Sha2Path, Transport,
    constants::{
        AUTH_MORE_DATA_HEADER, AUTH_SWITCH_HEADER, CACHING_SHA2_PASSWORD,
        CACHING_SHA2_PERFORM_FULL_AUTH, ERR_HEADER, MYSQL_NATIVE_PASSWORD,
    },
    frame,
    greeting::random_scramble,
    response::AuthResponse,
};
use tokio::{io::AsyncWriteExt as _, time::Instant};
use zeroize::Zeroize as _;

use super::{APP_RESPONSE_TIMEOUT, failure::Failure, io::MAX_HANDSHAKE_PACKET, refusal::AppLeg};
use crate::{
    broker::Origin,
    config::Policy,
    connector::postgres::direct::{Ended, Leg, StepOut, send},
};

/// The plugin latch's first response names: no account uses it, so the server answers with an
/// AuthSwitchRequest for the account's own plugin (MariaDB and MySQL compare the names; an
/// unknown one is a mismatch like any other).
pub const PROBE: &str = "latch_direct_probe";

/// How long an account's plugin, as a server named it, is taken as known.
const PLUGIN_TTL: Duration = Duration::from_secs(300);

/// The plugins accounts were seen on, by policy and user: a connection for an account on the
/// greeting's own plugin answers in its first response.
#[derive(Default)]
pub struct Plugins(Mutex<HashMap<Account, (Vec<u8>, Instant)>>);

/// A policy's name and the user latch authenticates as.
type Account = (String, Vec<u8>);

impl Plugins {
    fn get(&self, policy: &str, user: &[u8]) -> Option<Vec<u8>> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(policy.to_owned(), user.to_vec()))
            .filter(|(_, at)| at.elapsed() < PLUGIN_TTL)
            .map(|(p, _)| p.clone())
    }

    fn put(&self, policy: &str, user: &[u8], plugin: &[u8]) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, (_, at)| at.elapsed() < PLUGIN_TTL);
        }
        map.insert(
            (policy.to_owned(), user.to_vec()),
            (plugin.to_vec(), Instant::now()),
        );
    }

    fn forget(&self, policy: &str, user: &[u8]) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(policy.to_owned(), user.to_vec()));
    }
}

/// Serves the authentication of one direct-mode MySQL connection, whose first message in
/// `leg.from_app` is the server's greeting. `refusal` (the workload is not admitted, or over
/// its limit) is told in place of the greeting. `app` follows the sequence id the application
/// expects, for an ERR told before the hand-over.
pub async fn serve(
    leg: &mut Leg<'_>,
    origin: &Origin,
    policy: &Policy,
    refusal: Option<Failure>,
    app: &mut AppLeg,
) -> Result<Ended, Failure> {
    let addr = origin.dst;
    let mut lobby = BytesMut::new();
    let greeting = next_packet(leg, &mut lobby, leg.deadline)
        .await
        .map_err(|_| Failure::TargetClosed { addr })?;
    if greeting.first_byte() == Some(ERR_HEADER) {
        // Too many connections, host blocked: the server's own words, as they came.
        let mut raw = BytesMut::new();
        greeting.encode(&mut raw);
        leg.side.write_all(&raw).await.map_err(Failure::AppIo)?;
        let error = latch_mysql::ErrPacket::parse(&greeting.payload)
            .map_err(|source| Failure::TargetProtocol { addr, source })?
            .to_server_error();
        return Err(Failure::ServerRefused { addr, error });
    }
    let parsed = Greeting::parse(&greeting.payload)
        .map_err(|source| Failure::TargetProtocol { addr, source })?;
    if let Some(f) = refusal {
        return Err(f);
    }
    let mut out = BytesMut::new();
    frame::encode(&without_ssl(&greeting.payload), 0, &mut out);
    leg.side.write_all(&out).await.map_err(Failure::AppIo)?;
    *app = AppLeg {
        seq: 1,
        caps: Some(CapabilityFlags::CLIENT_PROTOCOL_41),
    };

    let deadline = (Instant::now() + APP_RESPONSE_TIMEOUT).min(leg.deadline);
    let packet = next_packet(leg, &mut lobby, deadline)
        .await
        .map_err(|e| e.app(APP_RESPONSE_TIMEOUT))?;
    if packet.seq != 1 {
        return Err(Failure::AppOutOfOrder {
            got: packet.seq,
            expected: 1,
        });
    }
    app.seq = 2;
    let response = match ClientHello::parse(&packet.payload).map_err(Failure::AppProtocol)? {
        ClientHello::Response(r) => r,
        // The greeting offered no TLS: a client that insists is refused, as by a server
        // without TLS.
        ClientHello::SslRequest(_) => return Err(Failure::AppTls),
    };
    app.caps = Some(response.capabilities);
    if !response
        .capabilities
        .contains(CapabilityFlags::CLIENT_PLUGIN_AUTH)
    {
        return Err(Failure::DirectUnsupported(
            "the client does not support authentication plugins",
        ));
    }
    // The application's socket, from its process (one walk of its descriptors per connection).
    let app_sock = leg.app_socket().map_err(Failure::HandOver)?;
    let local = socket2::SockRef::from(&app_sock)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.ip().to_canonical());
    let host = match local {
        Some(ip) if ip.is_loopback() => "localhost".to_owned(),
        Some(ip) => ip.to_string(),
        None => String::new(),
    };
    let with_password = !response.auth_response.expose().is_empty();
    let role = super::role_for(&response.username, policy, with_password, || host)?;
    let creds = leg
        .resolve(policy, role, false)
        .await
        .map_err(Failure::HandOver)?
        .map_err(Failure::Secrets)?;
    let user = match &creds.username {
        Some(u) => u.expose().as_bytes().to_vec(),
        None => response.username.clone(),
    };
    let password = creds
        .password
        .as_ref()
        .map(|p| p.expose().as_bytes())
        .unwrap_or_default();

    // latch's response: the application's, with the policy's user, no TLS, and the plugin and
    // authentication data latch chooses.
    let mut mine = response.clone();
    mine.username = user.clone();
    mine.capabilities.remove(CapabilityFlags::CLIENT_SSL);
    // The server's RSA key, pinned by the policy: caching_sha2_password's full
    // authentication can then be done on this connection (see `full_rsa` below). The file is
    // read only for a greeting that names that plugin; asking for the key is never done here
    // (it would take two packets no client's exchange has).
    let options = if parsed.auth_plugin.as_deref() == Some(CACHING_SHA2_PASSWORD.as_bytes()) {
        ClientAuthOptions {
            request_public_key: false,
            ..super::target::auth_options(policy, false)
        }
    } else {
        ClientAuthOptions::default()
    };
    let full_rsa = options.server_public_key.is_some();
    let mut auth = ClientAuth::new(&parsed, password, options);
    let mut first = BytesMut::new();
    let result = auth.start(&mut mine, Transport::Plain, &mut first);
    let direct_plugin = mine.auth_plugin.clone().unwrap_or_default();
    let known = leg.my().plugins.get(&policy.name, &user);
    // The application waits for the server's answer: what is sent on its socket from now on
    // is latch's.
    leg.set(FROM_TARGET).map_err(Failure::HandOver)?;
    if result.is_ok() && !full_rsa && known.as_deref() == Some(&direct_plugin[..]) {
        // The account is on the plugin the first response can answer for: it is the last
        // packet.
        let r = step_out_and_send(leg, &lobby, &app_sock, &first).await;
        first.zeroize();
        return r.map(|()| Ended::HandedOver);
    }
    first.zeroize();
    if full_rsa {
        // caching_sha2_password's first message with data that is no account's hash: the
        // server takes it for a cache miss (not a failed login) and asks for full
        // authentication (AuthMoreData 0x04), whose answer, the password encrypted with the
        // pinned key, is latch's last packet and is answered by the OK alone. An account on
        // another plugin gets a switch to it, as for the probe below. Either way the server's
        // side is as long as a client's mysql_native_password exchange, whatever the
        // application, and nothing depends on the server's cache.
        mine.auth_plugin = Some(CACHING_SHA2_PASSWORD.as_bytes().to_vec());
        mine.auth_response = AuthResponse::new(vec![0; 32]);
    } else {
        mine.auth_plugin = Some(PROBE.as_bytes().to_vec());
        mine.auth_response = AuthResponse::default();
    }
    let mut payload = BytesMut::new();
    mine.encode(&mut payload)
        .map_err(|e| Failure::HandOver(io::Error::other(e.to_string())))?;
    let mut probe = BytesMut::new();
    frame::encode(&payload, 1, &mut probe);
    send(&app_sock, &probe).map_err(|source| Failure::TargetIo { addr, source })?;

    // The server's answer: an AuthSwitchRequest (an ERR went to the application).
    let mut from_server = BytesMut::new();
    let switch = tokio::select! {
        p = super::io::read_packet(&mut leg.side, &mut from_server) => {
            p.map_err(|_| Failure::TargetClosed { addr })?
        }
        () = closed(&app_sock) => {
            // The server said why to the application and closed the connection.
            leg.my().plugins.forget(&policy.name, &user);
            return Err(Failure::ServerEnded { addr });
        }
    };
    let full_auth = full_rsa
        && switch.first_byte() == Some(AUTH_MORE_DATA_HEADER)
        && switch.payload.get(1) == Some(&CACHING_SHA2_PERFORM_FULL_AUTH);
    if switch.seq != 2 || !(full_auth || switch.first_byte() == Some(AUTH_SWITCH_HEADER)) {
        return Err(Failure::DirectUnsupported(
            "the server did not ask for the account's authentication plugin",
        ));
    }
    let switched_to = if full_auth {
        None
    } else {
        let request = AuthSwitchRequest::parse(&switch.payload)
            .map_err(|source| Failure::TargetProtocol { addr, source })?;
        leg.my().plugins.put(&policy.name, &user, &request.plugin);
        Some(request.plugin)
    };
    // ClientAuth wants its own first response to have gone out: it did, in spirit (the probe);
    // its answer to the switch is computed over the switch's data.
    let mut answer = BytesMut::new();
    let step = match result {
        Ok(()) => auth.on_packet(&switch, &mut answer),
        Err(e) => Err(e),
    };
    match step {
        Ok(AuthStep::Continue) if !answer.is_empty() => {
            tracing::debug!(
                plugin = auth.plugin(),
                caching_sha2 = auth.caching_sha2_path().map(Sha2Path::as_str),
                "direct mode: latch's last authentication packet is ready"
            );
        }
        Ok(_) => {
            return Err(Failure::DirectUnsupported(
                "the server's authentication switch needs no answer",
            ));
        }
        Err(source) => return Err(Failure::Auth { addr, source }),
    }

    // Mirrored to the application: a switch of its own, to a plugin every client has (or
    // caching_sha2_password for its fast path, so that it reads the fast-authentication
    // status that precedes the server's OK), with a nonce of latch's.
    let plugin = if switched_to.as_deref() == Some(CACHING_SHA2_PASSWORD.as_bytes()) {
        CACHING_SHA2_PASSWORD
    } else {
        MYSQL_NATIVE_PASSWORD
    };
    let nonce =
        random_scramble().map_err(|e| Failure::HandOver(io::Error::other(e.to_string())))?;
    let mut data = nonce.to_vec();
    data.push(0);
    let mirror = AuthSwitchRequest {
        plugin: plugin.as_bytes().to_vec(),
        data,
    };
    let mut payload = BytesMut::new();
    mirror
        .encode(&mut payload)
        .map_err(|e| Failure::HandOver(io::Error::other(e.to_string())))?;
    let mut out = BytesMut::new();
    frame::encode(&payload, 2, &mut out);
    leg.set(TO_BROKER | FROM_TARGET)
        .map_err(Failure::HandOver)?;
    leg.side.write_all(&out).await.map_err(Failure::AppIo)?;
    app.seq = 3;
    let deadline = (Instant::now() + APP_RESPONSE_TIMEOUT).min(leg.deadline);
    let dropped = next_packet(leg, &mut lobby, deadline)
        .await
        .map_err(|e| e.app(APP_RESPONSE_TIMEOUT))?;
    if dropped.seq != 3 {
        return Err(Failure::AppOutOfOrder {
            got: dropped.seq,
            expected: 3,
        });
    }
    // The application's answer holds nothing of use (it has no password): dropped unread.
    drop(dropped);
    app.seq = 4;
    leg.set(FROM_TARGET).map_err(Failure::HandOver)?;
    let r = step_out_and_send(leg, &lobby, &app_sock, &answer).await;
    answer.zeroize();
    r.map(|()| Ended::HandedOver)
}

/// Steps out at the quiet moment (the application waits for the server's next packet, the
/// server for latch's) and sends latch's last packet on the application's own connection.
/// `lobby`: what the application sent and latch has not read yet (nothing, in turn).
async fn step_out_and_send(
    leg: &mut Leg<'_>,
    lobby: &BytesMut,
    app: &OwnedFd,
    last: &[u8],
) -> Result<(), Failure> {
    let spoke = Err(Failure::DirectUnsupported(
        "the application sent a packet out of turn during authentication",
    ));
    if !lobby.is_empty() {
        return spoke;
    }
    match leg.step_out(app).await {
        Ok(()) => {}
        Err(StepOut::Io(e)) => return Err(Failure::HandOver(e)),
        Err(StepOut::AppSpoke) => return spoke,
    }
    send(app, last).map_err(Failure::HandOver)
}

/// Tells the application why, in its receive queue, with the sequence id it expects; then
/// ends the server's side of the handshake. The application socket stays in the sock map (the
/// message would be lost if it left now); it leaves when the application closes it.
pub async fn refuse(leg: &mut Leg<'_>, policy: &Policy, conn: u64, app: AppLeg, failure: &Failure) {
    if let Some(err) = failure.to_app(&policy.name, conn) {
        let mut out = BytesMut::new();
        super::failure::encode(&err, app.seq, app.caps, &mut out);
        let _ = leg.set(TO_BROKER | FROM_TARGET);
        let _ = tokio::time::timeout(Duration::from_secs(2), leg.side.write_all(&out)).await;
        // The server closes once it reads the shutdown below, and the application sees the
        // end of the stream as soon as it arrives: the ERR must be read first.
        if let Ok(a) = leg.app_socket() {
            let until = Instant::now() + Duration::from_secs(2);
            while crate::broker::direct::fionread(&a).is_ok_and(|n| n > 0) && Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    if let Ok(a) = leg.app_socket() {
        // SAFETY: plain shutdown(2) on a descriptor we own.
        unsafe { libc::shutdown(a.as_raw_fd(), libc::SHUT_WR) };
    }
}

/// The greeting's payload with CLIENT_SSL cleared: the application's connection carries the
/// session as it is, without TLS.
fn without_ssl(payload: &[u8]) -> Bytes {
    let mut p = payload.to_vec();
    // protocol version, server version (NUL-terminated), connection id (4), scramble part 1
    // (8), filler (1): then the low two bytes of the capabilities.
    if let Some(nul) = p.iter().skip(1).position(|&b| b == 0) {
        let caps = 1 + nul + 1 + 4 + 8 + 1;
        if let Some(b) = p.get_mut(caps + 1) {
            *b &= !((CapabilityFlags::CLIENT_SSL.bits() >> 8) as u8);
        }
    }
    Bytes::from(p)
}

/// Why no packet came from the lobby.
enum LobbyEnd {
    Closed,
    Timeout,
}

impl LobbyEnd {
    fn app(self, after: Duration) -> Failure {
        match self {
            LobbyEnd::Closed => Failure::AppClosed,
            LobbyEnd::Timeout => Failure::AppTimeout(after),
        }
    }
}

/// The next whole packet from the lobby (the server's greeting first, then the application's
/// packets).
async fn next_packet(
    leg: &mut Leg<'_>,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<Packet, LobbyEnd> {
    loop {
        match frame::parse(buf, MAX_HANDSHAKE_PACKET) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(_) => return Err(LobbyEnd::Closed),
        }
        match tokio::time::timeout_at(deadline, leg.from_app.recv()).await {
            Ok(Some(b)) => buf.extend_from_slice(&b),
            Ok(None) => return Err(LobbyEnd::Closed),
            Err(_) => return Err(LobbyEnd::Timeout),
        }
    }
}

/// Resolves once the server has closed the application's connection (it sent an ERR, which
/// passed to the application, then hung up).
async fn closed(app: &OwnedFd) {
    loop {
        let mut p = libc::pollfd {
            fd: app.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid descriptor, without waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

impl Leg<'_> {
    /// The MySQL connector (its plugin cache).
    fn my(&self) -> &super::Mysql {
        self.shared
            .connectors
            .find::<super::Mysql>()
            .expect("the mysql connector is registered")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_greeting_loses_client_ssl_and_nothing_else() {
        let g = Greeting {
            server_version: b"5.5.5-10.11.6-MariaDB".to_vec(),
            connection_id: 42,
            scramble: b"abcdefghijklmnopqrst".to_vec(),
            capabilities: CapabilityFlags::CLIENT_PROTOCOL_41
                | CapabilityFlags::CLIENT_SSL
                | CapabilityFlags::CLIENT_SECURE_CONNECTION
                | CapabilityFlags::CLIENT_PLUGIN_AUTH,
            mariadb_capabilities: Default::default(),
            charset: 45,
            status: Default::default(),
            auth_plugin: Some(MYSQL_NATIVE_PASSWORD.as_bytes().to_vec()),
        };
        let mut payload = BytesMut::new();
        g.encode(&mut payload).unwrap();
        let cleared = Greeting::parse(&without_ssl(&payload)).unwrap();
        assert_eq!(
            cleared,
            Greeting {
                capabilities: g.capabilities - CapabilityFlags::CLIENT_SSL,
                ..g.clone()
            }
        );
    }
}
