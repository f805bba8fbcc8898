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
