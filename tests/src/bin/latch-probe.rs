//! latch-probe: an ordinary TCP client for the end-to-end tests. It knows nothing of latch;
//! the tests run it inside an intercepted cgroup and check what it saw.
//!
//! * `latch-probe peer ADDR` — connect, print `peer=<getpeername> local=<getsockname>`.
//! * `latch-probe echo ADDR CONNS BYTES` — open CONNS connections at once; on each send BYTES
//!   bytes unique to that connection, half-close, read the echo to the end and compare; check
//!   that getpeername reports ADDR. Prints `ok=<n> failed=<n>`; exits 1 if anything differs.
//! * `latch-probe chunks ADDR CONNS BYTES` — as `echo`, but each connection sends in writes
//!   of 1 to 16384 bytes with a short pause every 16 writes (so a relay can change hands in
//!   the middle of the stream).
//! * `latch-probe hold ADDR CONNS MILLIS [BYTES]` — open CONNS connections at once; on each
//!   send BYTES bytes (default 1) and wait for their echo, then keep the connection open until
//!   MILLIS after the start.
//!   Prints `echoed=<n> refused=<n>` (refused: reset or closed before the echo); exits 0.
//! * `latch-probe abort ADDR CONNS` — as `hold` with no wait, then closes each connection
//!   with a reset (SO_LINGER 0) instead of a FIN.
//! * `latch-probe across ADDR CONNS BYTES GOFILE` — connections carrying data before and after
//!   an upgrade; see `probe/across.rs`.
//! * `latch-probe steady ADDR HELD MILLIS RATE` — held connections pinging and a steady
//!   stream of new ones; see `probe/steady.rs`.
//! * `latch-probe pg CONNSTR SCENARIO` — a tokio-postgres client; see `probe/pg.rs`.
//! * `latch-probe my URL SCENARIO` — a mysql_async client; see `probe/my.rs`.
//! * `latch-probe pgraw ADDR SCENARIO` — hostile PostgreSQL startup bytes; see `probe/pgraw.rs`.
//! * `latch-probe pgpre TARGET` — every path before a StartupMessage; see `probe/pgpre.rs`.
//! * `latch-probe h2 ADDR STREAMS PATH` — hyper's HTTP/2 client (h2c, prior knowledge):
//!   STREAMS concurrent GETs on one connection; see `probe/h2.rs`.
//! * `latch-probe mypre HOST:PORT [CASE]` — odd bytes before a MySQL handshake completes; see
//!   `probe/mypre.rs`.
//!
//! The modes below bind their client to 127.0.0.1:SRCPORT (SO_REUSEADDR) and print each line
//! as it happens (stdout flushed); see `probe/srcport.rs`.
//!
//! * `latch-probe squat BROKERPORT SRCPORT ADDR MILLIS` — try to listen on
//!   127.0.0.1:BROKERPORT: print `squat=yes` (and accept and hold connections in the
//!   background) or `squat=no`; connect from SRCPORT to ADDR, print `connected=yes` or
//!   `connected=no err=<error>`; at MILLIS after the start send `INJECT\n` 20 times 50 ms apart
//!   (errors ignored), print `sent`; exits 0.
//! * `latch-probe victim SRCPORT ADDR MILLIS` — connect from SRCPORT to ADDR, send `hello\n`,
//!   read 6 bytes: unless they are `hello\n` print `echo=bad` and exit 1; print `echo=ok`, read
//!   on until MILLIS after the start (or end of stream), print `extra=<bytes>` and
//!   `extra_text=<them, lossy UTF-8, newlines as \n>`; exits 0.
//! * `latch-probe from SRCPORT ADDR` — connect from SRCPORT to ADDR, send `hello\n`, wait up
//!   to 3 s for it back: print `echoed`, or `refused <why>` with why one of `refused`,
//!   `reset`, `closed`, `timeout`, `differs` or `errno=<n>`; exits 0.
//! * `latch-probe post SRCPORT ADDR TEXT` — connect from SRCPORT to ADDR, send TEXT and close
//!   at once (a fire-and-forget client), print `posted`; exits 0.
//! * `latch-probe rst ADDR` — connect to ADDR and close at once with a reset (SO_LINGER 0),
//!   sending nothing; print `reset`; exits 0.
//! * `latch-probe pgpaused SRCPORT HOST:PORT GOFILE CONNSTR` — connect from SRCPORT to
//!   HOST:PORT, print `connected`, wait (at most 20 s) until the file GOFILE exists, then run a
//!   tokio-postgres session (CONNSTR, no TLS) over that same socket: `SELECT 1`,
//!   `SELECT pg_backend_pid()`; prints `pg=ok` (exit 0) or `pg=err <error>` (exit 1).
//! * `latch-probe fakepg LISTENADDR SRCPORT MILLIS` — listen on LISTENADDR, connect to it from
//!   SRCPORT; the server side (if the connection reaches it) sends AuthenticationCleartextPassword
//!   (`R`, int32 8, int32 3); the client reads until MILLIS after the start and prints
//!   `client_got=<bytes>`; exits 0.
#[path = "probe/across.rs"]
mod across;
#[path = "probe/h2.rs"]
mod h2;
#[path = "probe/my.rs"]
mod my;
#[path = "probe/mypre.rs"]
mod mypre;
#[path = "probe/pg.rs"]
mod pg;
#[path = "probe/pgpre.rs"]
mod pgpre;
#[path = "probe/pgraw.rs"]
mod pgraw;
#[path = "probe/srcport.rs"]
mod srcport;
#[path = "probe/steady.rs"]
mod steady;

use std::{net::SocketAddr, process::ExitCode};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Thousands of concurrent connections need more than the usual 1024 descriptors.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = match args.get(1).map(String::as_str) {
        Some("peer") => rt.block_on(peer(parse_addr(&args, 2))),
        Some("echo") => rt.block_on(echo(
            parse_addr(&args, 2),
            parse_num(&args, 3),
            parse_num(&args, 4),
            false,
        )),
        Some("chunks") => rt.block_on(echo(
            parse_addr(&args, 2),
            parse_num(&args, 3),
            parse_num(&args, 4),
            true,
        )),
        Some("hold") => rt.block_on(hold(
            parse_addr(&args, 2),
            parse_num(&args, 3),
            parse_num(&args, 4),
            if args.len() > 5 { parse_num(&args, 5) } else { 1 },
            false,
        )),
        Some("abort") => rt.block_on(hold(parse_addr(&args, 2), parse_num(&args, 3), 0, 1, true)),
        Some("across") => rt.block_on(across::run(
            parse_addr(&args, 2),
            parse_num(&args, 3),
            parse_num(&args, 4),
            std::path::Path::new(args.get(5).map(String::as_str).unwrap_or_default()),
        )),
        Some("steady") => rt.block_on(steady::run(
            parse_addr(&args, 2),
            parse_num(&args, 3),
            parse_num(&args, 4) as u64,
            parse_num(&args, 5) as u64,
        )),
        Some("my") => rt.block_on(my::run(
            args.get(2).map(String::as_str).unwrap_or_default(),
            args.get(3).map(String::as_str).unwrap_or("whoami"),
        )),
        Some("pg") => rt.block_on(pg::run(
            args.get(2).map(String::as_str).unwrap_or_default(),
            args.get(3).map(String::as_str).unwrap_or("whoami"),
        )),
        Some("h2") => rt.block_on(h2::run(
            parse_addr(&args, 2),
            parse_num(&args, 3),
            args.get(4).map(String::as_str).unwrap_or("/"),
        )),
        Some("pgpre") if args.len() == 3 => rt.block_on(pgpre::run(&args[2])),
        Some("mypre") if args.len() == 3 || args.len() == 4 => {
            rt.block_on(mypre::run(&args[2], args.get(3).map(String::as_str)))
        }
        Some("pgraw") => rt.block_on(pgraw::run(
            parse_addr(&args, 2),
            args.get(3).map(String::as_str).unwrap_or_default(),
        )),
        Some("squat") => srcport::squat(
            parse_port(&args, 2),
            parse_port(&args, 3),
            parse_addr(&args, 4),
            parse_num(&args, 5) as u64,
        ),
        Some("victim") => srcport::victim(
            parse_port(&args, 2),
            parse_addr(&args, 3),
            parse_num(&args, 4) as u64,
        ),
        Some("from") => srcport::from(parse_port(&args, 2), parse_addr(&args, 3)),
        Some("post") => srcport::post(
            parse_port(&args, 2),
            parse_addr(&args, 3),
            args.get(4).map(String::as_str).unwrap_or_default(),
        ),
        Some("rst") => srcport::rst(parse_addr(&args, 2)),
        Some("pgpaused") => rt.block_on(srcport::pgpaused(
            parse_port(&args, 2),
            parse_addr(&args, 3),
            std::path::Path::new(args.get(4).map(String::as_str).unwrap_or_default()),
            args.get(5).map(String::as_str).unwrap_or_default(),
        )),
        Some("fakepg") => srcport::fakepg(
            parse_addr(&args, 2),
            parse_port(&args, 3),
            parse_num(&args, 4) as u64,
        ),
        _ => Err("usage: latch-probe peer ADDR | echo ADDR CONNS BYTES | chunks ADDR CONNS BYTES | hold ADDR CONNS MILLIS [BYTES] | abort ADDR CONNS | pg CONNSTR SCENARIO | pgraw ADDR SCENARIO | pgpre TARGET | h2 ADDR STREAMS PATH | mypre HOST:PORT [CASE] | squat BROKERPORT SRCPORT ADDR MILLIS | victim SRCPORT ADDR MILLIS | from SRCPORT ADDR | post SRCPORT ADDR TEXT | rst ADDR | pgpaused SRCPORT HOST:PORT GOFILE CONNSTR | fakepg LISTENADDR SRCPORT MILLIS".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("latch-probe: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn parse_addr(args: &[String], i: usize) -> SocketAddr {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} must be a socket address"))
}

fn parse_port(args: &[String], i: usize) -> u16 {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} must be a port number"))
}

fn parse_num(args: &[String], i: usize) -> usize {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} must be a number"))
}

async fn peer(addr: SocketAddr) -> Result<(), String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let peer = s.peer_addr().map_err(|e| e.to_string())?;
    let local = s.local_addr().map_err(|e| e.to_string())?;
    println!("peer={peer} local={local}");
    Ok(())
}

/// `hold`, and with `reset` the `abort` mode.
async fn hold(
    addr: SocketAddr,
    conns: usize,
    millis: usize,
    bytes: usize,
    reset: bool,
) -> Result<(), String> {
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(millis as u64);
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.ok()?;
                let sent = payload(i, bytes.max(1));
                s.write_all(&sent).await.ok()?;
                let mut back = vec![0u8; sent.len()];
                tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut back))
                    .await
                    .ok()?
                    .ok()?;
                (back == sent).then_some(())?;
                tokio::time::sleep_until(until).await;
                Some(s)
            })
        })
        .collect();
    let (mut echoed, mut refused) = (0, 0);
    let mut open = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Some(s)) => {
                echoed += 1;
                open.push(s);
            }
            _ => refused += 1,
        }
    }
    println!("echoed={echoed} refused={refused}");
    if reset {
        for s in &open {
            socket2::SockRef::from(s)
                .set_linger(Some(std::time::Duration::ZERO))
                .map_err(|e| format!("SO_LINGER: {e}"))?;
        }
    }
    Ok(())
}

/// Deterministic bytes unique to connection `conn`.
fn payload(conn: usize, len: usize) -> Vec<u8> {
    let mut x = (conn as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn echo(addr: SocketAddr, conns: usize, bytes: usize, chunked: bool) -> Result<(), String> {
    let tasks: Vec<_> = (0..conns)
        .map(|i| tokio::spawn(echo_one(addr, i, bytes, chunked)))
        .collect();
    let mut ok = 0;
    let mut failed = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => failed.push(format!("conn {i}: {e}")),
            Err(e) => failed.push(format!("conn {i}: task: {e}")),
        }
    }
    println!("ok={ok} failed={}", failed.len());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

async fn echo_one(
    addr: SocketAddr,
    conn: usize,
    bytes: usize,
    chunked: bool,
) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let peer = s.peer_addr().map_err(|e| e.to_string())?;
    if peer != addr {
        return Err(format!("getpeername says {peer}, expected {addr}"));
    }
    let data = payload(conn, bytes);
    let (mut r, mut w) = s.split();
    let send = async {
        if chunked {
            // Write sizes from the payload itself: deterministic, varied, 1..=16384.
            let mut at = 0;
            let mut writes = 0u32;
            while at < data.len() {
                let size = 1 + ((usize::from(data[at]) << 6) | (at % 64));
                let end = (at + size).min(data.len());
                w.write_all(&data[at..end]).await?;
                at = end;
                writes += 1;
                if writes.is_multiple_of(16) {
                    tokio::time::sleep(std::time::Duration::from_micros(300)).await;
                }
            }
        } else {
            w.write_all(&data).await?;
        }
        w.shutdown().await
    };
    let recv = async {
        let mut back = Vec::with_capacity(bytes);
        r.read_to_end(&mut back).await.map(|_| back)
    };
    let (sent, back) = tokio::join!(send, recv);
    sent.map_err(|e| format!("send: {e}"))?;
    let back = back.map_err(|e| format!("receive: {e}"))?;
    if back != data {
        return Err(format!(
            "echo differs: sent {} bytes, got {} back",
            data.len(),
            back.len()
        ));
    }
    Ok(())
}
