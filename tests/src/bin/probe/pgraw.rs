//! `latch-probe pgraw ADDR SCENARIO`: hostile first packets toward a PostgreSQL port. Prints
//! `result=error code=<SQLSTATE> ms=<elapsed> message=<text>` when an ErrorResponse came back,
//! or `result=closed ms=<elapsed>` when the connection was closed without one.
//!
//! Scenarios: `oversized` (a 1 MB length prefix), `truncated` (20 bytes of a 100-byte packet,
//! then half-close), `garbage` (4 KiB of noise), `stall` (half a packet, then silence),
//! `badversion` (protocol 2.0), `ssl-then-data` (an SSLRequest with bytes after it).
//!
//! `late-reader DB`: a well-formed StartupMessage, then 1.5 s before reading the answers; then
//! one query. Prints `result=session tags=<message tags up to ReadyForQuery> user=<user>`.
//!
//! `session-pids DB`: a session whose BackendKeyData pid is compared with what the server says
//! of it: `pg_backend_pid()`, the sender pid a tokio-postgres listener receives for its NOTIFY,
//! and whether `pg_terminate_backend(<that pid>)` from the listener's session ends it. Prints
//! `key_pid=<> backend_pid=<> notify_pid=<> terminated=<t|f> then=<SQLSTATE or eof>`.
//!
//! `sleep-key DB`: prints `key pid=<> secret=<>` (the BackendKeyData it was given), runs
//! `select pg_sleep(20)` and prints `result=error code=<SQLSTATE>` or `result=done`.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

pub async fn run(addr: SocketAddr, scenario: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if let Some(db) = scenario.strip_prefix("late-reader ") {
        return late_reader(s, db).await;
    }
    if let Some(db) = scenario.strip_prefix("session-pids ") {
        return session_pids(s, addr, db).await;
    }
    if let Some(db) = scenario.strip_prefix("sleep-key ") {
        return sleep_key(s, db).await;
    }
    let started = Instant::now();
    let send = |b: Vec<u8>| b;
    let bytes = match scenario {
        "oversized" => {
            let mut b = 1_000_000i32.to_be_bytes().to_vec();
            b.extend_from_slice(&0x0003_0000u32.to_be_bytes());
            b.extend(std::iter::repeat_n(b'a', 20_000));
            send(b)
        }
        "truncated" | "stall" => {
            let mut b = 100i32.to_be_bytes().to_vec();
            b.extend_from_slice(&0x0003_0000u32.to_be_bytes());
            b.extend_from_slice(b"user\0");
            send(b)
        }
        "garbage" => {
            let mut x = 0x1234_5678_9abc_def0u64;
            send(
                (0..4096)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect(),
            )
        }
        "badversion" => {
            let mut b = Vec::new();
            let body = b"user\0x\0\0";
            b.extend_from_slice(&((8 + body.len()) as i32).to_be_bytes());
            b.extend_from_slice(&0x0002_0000u32.to_be_bytes());
            b.extend_from_slice(body);
            send(b)
        }
        "ssl-then-data" => {
            let mut b = 8i32.to_be_bytes().to_vec();
            b.extend_from_slice(&80_877_103u32.to_be_bytes());
            b.extend_from_slice(b"\0\0\0\x10\0\x03\0\0user\0x\0\0");
            send(b)
        }
        other => return Err(format!("unknown pgraw scenario {other:?}")),
    };
    // The broker may refuse before reading everything; a reset while writing is an answer too.
    let _ = s.write_all(&bytes).await;
    if scenario == "truncated" {
        let _ = s.shutdown().await;
    }
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => back.extend_from_slice(&buf[..n]),
            }
            if back.len() > 1 << 20 {
                return;
            }
        }
    })
    .await;
    if read.is_err() {
        return Err("the connection stayed open for 30s".into());
    }
    let ms = started.elapsed().as_millis();
    match parse_error(&back) {
        Some((code, message)) => println!("result=error code={code} ms={ms} message={message}"),
        None if back.is_empty() => println!("result=closed ms={ms}"),
        None => println!("result=other bytes={} ms={ms}", back.len()),
    }
    Ok(())
}

/// (SQLSTATE, message) of an ErrorResponse at the start of `b`.
fn parse_error(b: &[u8]) -> Option<(String, String)> {
    if b.first() != Some(&b'E') || b.len() < 5 {
        return None;
    }
    let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    let body = b.get(5..1 + len)?;
    let (mut code, mut msg) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&t, r)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let end = r.iter().position(|&c| c == 0)?;
        let text = String::from_utf8_lossy(&r[..end]).into_owned();
        match t {
            b'C' => code = text,
            b'M' => msg = text,
            _ => {}
        }
        rest = &r[end + 1..];
    }
    Some((code, msg))
}

/// Sends a StartupMessage for `db` as the application's user (no password).
async fn send_startup(s: &mut TcpStream, db: &str) -> Result<(), String> {
    let mut body = 0x0003_0000u32.to_be_bytes().to_vec();
    for (k, v) in [("user", "app_without_password"), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    s.write_all(&packet).await.map_err(|e| format!("send: {e}"))
}

/// The (pid, secret) of the BackendKeyData among `msgs`.
fn key(msgs: &[(u8, Vec<u8>)]) -> Result<(i32, i32), String> {
    let (_, b) = msgs
        .iter()
        .find(|(t, b)| *t == b'K' && b.len() == 8)
        .ok_or_else(|| format!("no BackendKeyData in {msgs:?}"))?;
    Ok((
        i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    ))
}

/// Sends one simple query.
async fn send_query(s: &mut TcpStream, sql: &str) -> Result<(), String> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    s.write_all(&q).await.map_err(|e| format!("send: {e}"))
}

/// The first column of the first row of a simple query's reply.
async fn query_value(s: &mut TcpStream, sql: &str) -> Result<String, String> {
    send_query(s, sql).await?;
    let reply = read_until_ready(s).await?;
    reply
        .iter()
        .find(|(t, _)| *t == b'D')
        .and_then(|(_, b)| b.get(6..))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .ok_or_else(|| format!("no row in the reply: {reply:?}"))
}

/// See the module documentation.
async fn session_pids(mut s: TcpStream, addr: SocketAddr, db: &str) -> Result<(), String> {
    send_startup(&mut s, db).await?;
    let (key_pid, _) = key(&read_until_ready(&mut s).await?)?;
    let backend_pid = query_value(&mut s, "select pg_backend_pid()").await?;
    let connstr = format!(
        "host={} port={} user=app_without_password dbname={db} connect_timeout=20",
        addr.ip(),
        addr.port()
    );
    let (listener, mut notes) = crate::pg::connect(&connstr).await?;
    listener
        .batch_execute("listen latch_pids")
        .await
        .map_err(|e| format!("listen: {e}"))?;
    send_query(&mut s, "notify latch_pids, 'hi'").await?;
    read_until_ready(&mut s).await?;
    let note = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .map_err(|_| "no notification within 5 s".to_string())?
        .ok_or("the listener's connection closed")?;
    let terminated: bool = listener
        .query_one("select pg_terminate_backend($1)", &[&key_pid])
        .await
        .map_err(|e| format!("pg_terminate_backend: {}", crate::pg::describe(&e)))?
        .get(0);
    // The terminated session gets FATAL 57P01, then the end of the stream.
    let then = match tokio::time::timeout(Duration::from_secs(5), read_until_ready(&mut s)).await {
        Ok(Err(e)) if e.contains("57P01") => "57P01".to_owned(),
        Ok(Err(e)) if e.contains("read:") => "eof".to_owned(),
        Ok(other) => format!("{other:?}"),
        Err(_) => "still-open".to_owned(),
    };
    println!(
        "key_pid={key_pid} backend_pid={backend_pid} notify_pid={} terminated={} then={then}",
        note.process_id(),
        if terminated { "t" } else { "f" }
    );
    Ok(())
}

/// See the module documentation.
async fn sleep_key(mut s: TcpStream, db: &str) -> Result<(), String> {
    send_startup(&mut s, db).await?;
    let (pid, secret) = key(&read_until_ready(&mut s).await?)?;
    println!("key pid={pid} secret={secret}");
    send_query(&mut s, "select pg_sleep(20)").await?;
    match tokio::time::timeout(Duration::from_secs(30), read_until_ready(&mut s)).await {
        Ok(Ok(_)) => println!("result=done"),
        Ok(Err(e)) => println!("result=error {e}"),
        Err(_) => println!("result=timeout"),
    }
    Ok(())
}

/// See the module documentation.
async fn late_reader(mut s: TcpStream, db: &str) -> Result<(), String> {
    send_startup(&mut s, db).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tags: String = read_until_ready(&mut s)
        .await?
        .iter()
        .map(|(t, _)| *t as char)
        .collect();
    let sql = b"select current_user\0";
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
    q.extend_from_slice(sql);
    s.write_all(&q).await.map_err(|e| format!("send: {e}"))?;
    let reply = read_until_ready(&mut s).await?;
    // DataRow: field count (2), then the first field's length (4) and bytes.
    let user = reply
        .iter()
        .find(|(t, _)| *t == b'D')
        .and_then(|(_, b)| b.get(6..))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .ok_or_else(|| format!("no row in the reply: {reply:?}"))?;
    println!("result=session tags={tags} user={user}");
    Ok(())
}

/// Messages (tag, body) up to and including ReadyForQuery; an ErrorResponse is an error.
async fn read_until_ready(s: &mut TcpStream) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut head))
            .await
            .map_err(|_| format!("no answer within 20 s after {out:?}"))?
            .map_err(|e| format!("read: {e}"))?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if head[0] == b'E' {
            let mut whole = head.to_vec();
            whole.extend_from_slice(&body);
            return Err(format!("server error: {:?}", parse_error(&whole)));
        }
        out.push((head[0], body));
        if head[0] == b'Z' {
            return Ok(out);
        }
    }
}
