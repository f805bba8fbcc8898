//! `latch-probe h2 ADDR STREAMS PATH` — hyper's HTTP/2 client with prior knowledge (h2c) on
//! one TCP connection to ADDR: STREAMS concurrent `GET PATH?n=<i>` (i from 1), no
//! credentials. Prints one line per response, `n=<i> status=<code> body=<first line>`, in the
//! order they complete, then `done ok=<2xx count> failed=<other>`; exits 1 if the connection
//! failed.
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{StreamExt as _, stream::FuturesUnordered};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

pub async fn run(addr: SocketAddr, streams: usize, path: &str) -> Result<(), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection: {e}");
        }
    });
    let mut pending = FuturesUnordered::new();
    for n in 1..=streams {
        let mut send = send.clone();
        let uri = format!("http://{addr}{path}?n={n}");
        pending.push(async move {
            let req = http::Request::get(uri)
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let text = String::from_utf8_lossy(&body);
            Ok::<_, String>((n, status, text.lines().next().unwrap_or("").to_owned()))
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = pending.next().await {
        match r {
            Ok((n, status, body)) => {
                println!("n={n} status={status} body={body}");
                if (200..300).contains(&status) {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            Err(e) => {
                println!("error={e}");
                failed += 1;
            }
        }
    }
    println!("done ok={ok} failed={failed}");
    Ok(())
}
