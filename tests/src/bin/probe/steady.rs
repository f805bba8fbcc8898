//! `latch-probe steady ADDR HELD MILLIS RATE`: load across an upgrade. Opens HELD connections
//! and on each sends 8 bytes unique to it every 50 ms and checks their echo; meanwhile opens
//! RATE new connections a second, each sending 16 bytes and checking the echo before closing.
//! At MILLIS after the start prints `new_ok=<n> new_failed=<n> held_ok=<n> held_failed=<n>
//! pings=<n>`, then up to 10 lines `error <what>`; exits 0.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::{Instant, timeout},
};

#[derive(Default)]
struct Counts {
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    pings: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Counts {
    fn error(&self, what: String) {
        let mut e = self.errors.lock().unwrap();
        if e.len() < 10 {
            e.push(what);
        }
    }
}

async fn exchange(s: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    s.write_all(bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; bytes.len()];
    match timeout(Duration::from_secs(5), s.read_exact(&mut back)).await {
        Err(_) => return Err("echo timed out".into()),
        Ok(Err(e)) => return Err(format!("read: {e}")),
        Ok(Ok(_)) => {}
    }
    if back != bytes {
        return Err("echo differs".into());
    }
    Ok(())
}

async fn held(addr: SocketAddr, i: usize, until: Instant, counts: Arc<Counts>) -> bool {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            counts.error(format!("held {i}: connect: {e}"));
            return false;
        }
    };
    let mut n: u32 = 0;
    while Instant::now() < until {
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&(i as u32).to_be_bytes());
        msg[4..].copy_from_slice(&n.to_be_bytes());
        if let Err(e) = exchange(&mut s, &msg).await {
            counts.error(format!("held {i} after {n} pings: {e}"));
            return false;
        }
        counts.pings.fetch_add(1, Ordering::Relaxed);
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

async fn one_new(addr: SocketAddr, i: u64, counts: Arc<Counts>) {
    let res = async {
        let mut s = timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&i.to_be_bytes());
        exchange(&mut s, &msg).await
    }
    .await;
    match res {
        Ok(()) => counts.new_ok.fetch_add(1, Ordering::Relaxed),
        Err(e) => {
            counts.error(format!("new {i}: {e}"));
            counts.new_failed.fetch_add(1, Ordering::Relaxed)
        }
    };
}

pub async fn run(addr: SocketAddr, held_n: usize, millis: u64, rate: u64) -> Result<(), String> {
    let until = Instant::now() + Duration::from_millis(millis);
    let counts = Arc::new(Counts::default());
    let held_tasks: Vec<_> = (0..held_n)
        .map(|i| tokio::spawn(held(addr, i, until, counts.clone())))
        .collect();
    let mut news = Vec::new();
    let every = Duration::from_micros(1_000_000 / rate.max(1));
    let mut next = Instant::now();
    let mut i = 0;
    while next < until {
        news.push(tokio::spawn(one_new(addr, i, counts.clone())));
        i += 1;
        next += every;
        tokio::time::sleep_until(next).await;
    }
    let (mut held_ok, mut held_failed) = (0, 0);
    for t in held_tasks {
        if t.await.unwrap_or(false) {
            held_ok += 1;
        } else {
            held_failed += 1;
        }
    }
    for t in news {
        let _ = t.await;
    }
    println!(
        "new_ok={} new_failed={} held_ok={held_ok} held_failed={held_failed} pings={}",
        counts.new_ok.load(Ordering::Relaxed),
        counts.new_failed.load(Ordering::Relaxed),
        counts.pings.load(Ordering::Relaxed),
    );
    for e in counts.errors.lock().unwrap().iter() {
        println!("error {e}");
    }
    Ok(())
}
