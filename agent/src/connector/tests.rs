//! Connectors run as the broker runs them, without root or eBPF: an [`Env`] made here, an
//! application socket from a loopback pair, a target on loopback.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::BytesMut;
use latch_common::ConnMeta;
use latch_pg::{backend::ERROR_RESPONSE, error_fields::ErrorFields, frame, startup};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::{config::Policy, metrics::Metrics, secrets::Resolver};

fn env() -> Env {
    let resolver = Resolver::new(&[], Default::default()).expect("a resolver without stores");
    Env::new(
        crate::secrets::Secrets::new(resolver, Arc::new(Metrics::new())),
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
}

fn policy(protocol: &str, dst: SocketAddr) -> Policy {
    let text = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: local}}\n\
         spec: {{env: {{}}}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: unit}}\nspec:\n  \
         destination: {{address: {}, port: {}}}\n  protocol: {protocol}\n  \
         workloads: [{{uid: 1}}]\n{}{}",
        dst.ip(),
        dst.port(),
        if protocol == "http" {
            "  http: {inject: bearer}\n"
        } else {
            ""
        },
        if protocol == "tcp" {
            ""
        } else {
            "  tls: {mode: disable}\n  credentials:\n    store: local\n    \
             password: {path: UNIT_PW}\n"
        }
    );
    let config = crate::config::load_str("unit.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    config.policies[0].clone()
}

fn origin(dst: SocketAddr) -> Origin {
    let mut o = Origin::from(&ConnMeta::default());
    o.dst = dst;
    o.conn = 1;
    o
}

/// An application socket as the broker would hold it, and the application's end.
async fn app_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (broker_side, _) = l.accept().await.unwrap();
    (broker_side, client)
}

#[tokio::test]
async fn the_tcp_connector_relays_both_ways_and_reports_its_handshake_and_bytes() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dst = target.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = target.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"world!").await.unwrap();
    });
    let (env, policy, origin) = (env(), policy("tcp", dst), origin(dst));
    let session = Session::new(Instant::now());
    let cx = Context {
        origin: &origin,
        policy: &policy,
        env: &env,
        session: &session,
    };
    let connectors = Connectors::default();
    let tcp = connectors.get(Protocol::Tcp).unwrap();
    let (app, mut client) = app_pair().await;
    let app_side = async {
        client.write_all(b"hello").await.unwrap();
        // Half-closed, as a client that has said everything: the relay ends when both have.
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        got
    };
    let (served, got) = tokio::join!(tcp.serve(app, cx), app_side);
    assert_eq!(got, b"world!");
    let t = served.expect("relayed");
    assert_eq!((t.to_target, t.to_app), (5, 6));
    assert!(session.handshake_took().is_some());
}

#[tokio::test]
async fn the_postgres_connector_denies_with_fatal_28000_and_never_contacts_the_target() {
    // Nothing listens at the target: a denial must not need it.
    let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (env, policy, origin) = (env(), policy("postgres", dst), origin(dst));
    let session = Session::new(Instant::now());
    let cx = Context {
        origin: &origin,
        policy: &policy,
        env: &env,
        session: &session,
    };
    let connectors = Connectors::default();
    let pg = connectors.get(Protocol::Postgres).unwrap();
    let (app, mut client) = app_pair().await;
    let app_side = async {
        let mut out = BytesMut::new();
        startup::encode_startup([("user", "alice"), ("database", "orders")], &mut out);
        client.write_all(&out).await.unwrap();
        let mut got = BytesMut::new();
        while client.read_buf(&mut got).await.unwrap() > 0 {}
        got
    };
    let ((), mut got) = tokio::join!(pg.deny(app, cx), app_side);
    let reply = frame::parse(&mut got, 1 << 16)
        .unwrap()
        .expect("one message");
    assert_eq!(reply.tag, ERROR_RESPONSE);
    let fields = ErrorFields::decode(&reply.body).unwrap();
    assert_eq!(
        (fields.severity.as_str(), fields.code.as_str()),
        ("FATAL", "28000")
    );
    assert!(
        fields.message.contains("policy \"unit\""),
        "{}",
        fields.message
    );
    assert!(session.handshake_took().is_none());
}

#[tokio::test]
async fn the_http_connector_answers_a_malformed_request_400_without_the_target() {
    let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (env, policy, origin) = (env(), policy("http", dst), origin(dst));
    let session = Session::new(Instant::now());
    let cx = Context {
        origin: &origin,
        policy: &policy,
        env: &env,
        session: &session,
    };
    let connectors = Connectors::default();
    let http = connectors.get(Protocol::Http).unwrap();
    for (raw, want) in [
        (
            &b"GARBAGE\r\n\r\n"[..],
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\n",
        ),
    ] {
        let (app, mut client) = app_pair().await;
        let app_side = async {
            client.write_all(raw).await.unwrap();
            let mut got = Vec::new();
            let _ = client.read_to_end(&mut got).await;
            got
        };
        let (_served, got) = tokio::join!(http.serve(app, cx), app_side);
        let responses = String::from_utf8_lossy(&got).matches("HTTP/1.1").count();
        assert!(
            got.starts_with(want) && responses == 1,
            "{:?} -> {:?}",
            String::from_utf8_lossy(raw),
            String::from_utf8_lossy(&got)
        );
    }
}

/// One HTTP/2 frame: 9-byte header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// Reads one HTTP/2 frame's (type, flags, stream id).
async fn read_h2_frame(s: &mut TcpStream) -> Option<(u8, u8, u32)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream))
}

/// A target's first HTTP/2 connection, written frame by frame: stream 1 is answered 200 and
/// stays open; then GOAWAY (last stream 1, NO_ERROR), as a server closing a connection
/// gracefully (gRPC's `max_connection_age`) while a stream is still running; then a DATA
/// frame on stream 1, so the application knows latch has read the GOAWAY when it gets it.
/// Reports the stream ids of every later HEADERS frame (requests sent after the GOAWAY).
async fn going_away_target(mut s: TcpStream, late: tokio::sync::mpsc::UnboundedSender<u32>) {
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await.unwrap();
    s.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    loop {
        match read_h2_frame(&mut s).await {
            Some((4, 0, 0)) => s.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap(),
            Some((1, _, 1)) => break,
            Some(_) => {}
            None => return,
        }
    }
    let mut out = h2_frame(1, 0x4, 1, &[0x88]); // HEADERS :status 200, END_HEADERS
    out.extend(h2_frame(7, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0])); // GOAWAY last 1, NO_ERROR
    out.extend(h2_frame(0, 0, 1, b"x")); // DATA on stream 1, not the end
    s.write_all(&out).await.unwrap();
    while let Some((kind, _, stream)) = read_h2_frame(&mut s).await {
        if kind == 1 {
            let _ = late.send(stream);
        }
    }
}

#[tokio::test]
async fn an_http2_request_the_closing_target_connection_never_sent_goes_on_a_new_one() {
    use http_body_util::{BodyExt as _, Full, StreamBody};
    use hyper::body::Frame;

    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dst = target.local_addr().unwrap();
    let (late_tx, mut late) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (first, _) = target.accept().await.unwrap();
        tokio::spawn(going_away_target(first, late_tx));
        // Every later connection: hyper's HTTP/2 server, answering with the request body and
        // trailers when latch's bearer token came along.
        loop {
            let (s, _) = target.accept().await.unwrap();
            let service = hyper::service::service_fn(
                |req: ::http::Request<hyper::body::Incoming>| async move {
                    let authorized = req.headers().get("authorization").map(|v| v.as_bytes())
                        == Some(b"Bearer tok-unit".as_slice());
                    let body = req.into_body().collect().await?.to_bytes();
                    let mut trailers = ::http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    trailers.insert("x-checksum", "c0ffee".parse().unwrap());
                    let frames: Vec<Result<Frame<bytes::Bytes>, hyper::Error>> = vec![
                        Ok(Frame::data(bytes::Bytes::from(
                            [b"echo:".as_slice(), &body].concat(),
                        ))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let mut resp =
                        ::http::Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                    if !authorized {
                        *resp.status_mut() = ::http::StatusCode::UNAUTHORIZED;
                    }
                    Ok::<_, hyper::Error>(resp)
                },
            );
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service),
            );
        }
    });

    let text = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: dev}}\n\
         spec: {{literal: {{values: {{token: tok-unit}}}}}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: unit}}\nspec:\n  \
         destination: {{address: {}, port: {}}}\n  protocol: http\n  workloads: [{{uid: 1}}]\n  \
         http: {{inject: bearer}}\n  tls: {{mode: disable}}\n  credentials:\n    store: dev\n    \
         password: {{path: token}}\n",
        dst.ip(),
        dst.port()
    );
    let config = crate::config::load_str("unit.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let resolver = Resolver::new(
        &config.stores,
        crate::secrets::ResolverOptions {
            allow_literal: true,
            ..Default::default()
        },
    )
    .unwrap();
    let env = Env::new(
        crate::secrets::Secrets::new(resolver, Arc::new(Metrics::new())),
        Duration::from_secs(2),
        Duration::from_secs(5),
    );
    let (policy, origin) = (config.policies[0].clone(), origin(dst));
    let session = Session::new(Instant::now());
    let cx = Context {
        origin: &origin,
        policy: &policy,
        env: &env,
        session: &session,
    };
    let connectors = Connectors::default();
    let http = connectors.get(Protocol::Http).unwrap();
    let (app, client) = app_pair().await;
    let app_side = async {
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(client),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let first = send
            .send_request(
                ::http::Request::get(format!("http://{dst}/stream"))
                    .body(Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(first.status(), 200);
        let mut first = first.into_body();
        let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(chunk, "x", "the DATA after the GOAWAY");
        // The target's first connection has said GOAWAY and still runs stream 1: a POST
        // with a body, which latch must not lose.
        let resp = send
            .send_request(
                ::http::Request::post(format!("http://{dst}/latch.test.Echo/Say"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(bytes::Bytes::from_static(b"hello")))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        drop((send, first));
        conn.abort();
        (status, body, trailers)
    };
    let (_served, (status, body, trailers)) = tokio::join!(http.serve(app, cx), app_side);
    assert_eq!(
        (status.as_u16(), String::from_utf8_lossy(&body).as_ref()),
        (200, "echo:hello"),
        "the POST goes on a new target connection, with the token"
    );
    let trailers = trailers.expect("the target's trailers");
    assert_eq!(trailers.len(), 2, "{trailers:?}");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-checksum"], "c0ffee");
    assert!(
        late.try_recv().is_err(),
        "nothing was sent on the connection after its GOAWAY"
    );
}
