//! `latch-probe across ADDR CONNS BYTES GOFILE`: connections held across an upgrade. Opens
//! CONNS connections; on each sends BYTES bytes unique to it and checks their echo; prints
//! `before ok=<n> failed=<n>` (stdout flushed); waits (at most 60 s) until the file GOFILE
//! exists; then on the same connections sends BYTES more, checks the echo, half-closes and
//! reads to the end; prints `after ok=<n> failed=<n>`, then up to 10 lines `error <what>`;
//! exits 0.
use std::{io::Write as _, net::SocketAddr, path::Path, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

fn payload(conn: usize, round: u8, bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| (i as u64 * 31 + conn as u64 * 7 + u64::from(round) * 13) as u8)
        .collect()
}

async fn exchange(s: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    let (mut r, mut w) = s.split();
    let send = async { w.write_all(bytes).await.map_err(|e| format!("write: {e}")) };
    let recv = async {
        let mut back = vec![0u8; bytes.len()];
        match timeout(Duration::from_secs(10), r.read_exact(&mut back)).await {
            Err(_) => Err("echo timed out".to_string()),
            Ok(Err(e)) => Err(format!("read: {e}")),
            Ok(Ok(_)) if back != bytes => Err("echo differs".to_string()),
            Ok(Ok(_)) => Ok(()),
        }
    };
    let (a, b) = tokio::join!(send, recv);
    a.and(b)
}

fn report(stage: &str, results: &[Result<(), String>]) {
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!("{stage} ok={ok} failed={}", results.len() - ok);
    for e in results.iter().filter_map(|r| r.as_ref().err()).take(10) {
        println!("error {stage}: {e}");
    }
    let _ = std::io::stdout().flush();
}

pub async fn run(addr: SocketAddr, conns: usize, bytes: usize, go: &Path) -> Result<(), String> {
    let mut streams = Vec::new();
    let mut before = Vec::new();
    for i in 0..conns {
        let r = async {
            let mut s = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            exchange(&mut s, &payload(i, 0, bytes)).await?;
            Ok::<_, String>(s)
        }
        .await;
        match r {
            Ok(s) => {
                streams.push((i, s));
                before.push(Ok(()));
            }
            Err(e) => before.push(Err(format!("conn {i}: {e}"))),
        }
    }
    report("before", &before);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !go.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|(i, mut s)| {
            tokio::spawn(async move {
                exchange(&mut s, &payload(i, 1, bytes))
                    .await
                    .map_err(|e| format!("conn {i}: {e}"))?;
                s.shutdown()
                    .await
                    .map_err(|e| format!("conn {i}: shutdown: {e}"))?;
                let mut rest = Vec::new();
                match timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await {
                    Ok(Ok(0)) => Ok(()),
                    Ok(Ok(n)) => Err(format!("conn {i}: {n} bytes after the echo")),
                    Ok(Err(e)) => Err(format!("conn {i}: reading the end: {e}")),
                    Err(_) => Err(format!("conn {i}: no end of stream")),
                }
            })
        })
        .collect();
    let mut after = Vec::new();
    for t in tasks {
        after.push(t.await.unwrap_or_else(|e| Err(e.to_string())));
    }
    report("after", &after);
    Ok(())
}
