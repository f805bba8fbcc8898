//! The modes whose client binds a chosen source port on 127.0.0.1 (with SO_REUSEADDR), for
//! the tests of attacks that guess or reuse the 4-tuple a broker will see: `squat`, `victim`,
//! `from`, `post`, `pgpaused` and `fakepg`. Their output is documented in `latch-probe.rs`.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    str::FromStr as _,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

/// Prints `line` and flushes, so a test reading the output line by line sees it at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A TCP socket bound to 127.0.0.1:`port` with SO_REUSEADDR.
fn bound(port: u16) -> Result<Socket, String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    socket
        .set_reuse_address(true)
        .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    socket
        .bind(&local.into())
        .map_err(|e| format!("bind {local}: {e}"))?;
    Ok(socket)
}

/// Connects from 127.0.0.1:`port` to `addr`, giving up after `limit`.
fn connect_from(port: u16, addr: SocketAddr, limit: Duration) -> Result<TcpStream, String> {
    let socket = bound(port)?;
    socket
        .connect_timeout(&addr.into(), limit)
        .map_err(|e| e.to_string())?;
    Ok(socket.into())
}

/// Reads until `until` or end of stream; returns the bytes read.
fn read_until(s: &mut TcpStream, until: Instant) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return got;
        }
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return got,
        }
    }
}

/// `squat BROKERPORT SRCPORT ADDR MILLIS`.
pub fn squat(broker_port: u16, src_port: u16, addr: SocketAddr, millis: u64) -> Result<(), String> {
    let start = Instant::now();
    match TcpListener::bind(("127.0.0.1", broker_port)) {
        Ok(listener) => {
            say("squat=yes");
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for conn in listener.incoming().flatten() {
                    held.push(conn);
                }
            });
        }
        Err(_) => say("squat=no"),
    }
    let mut conn = match connect_from(src_port, addr, Duration::from_secs(5)) {
        Ok(s) => {
            say("connected=yes");
            Some(s)
        }
        Err(e) => {
            say(&format!("connected=no err={e}"));
            None
        }
    };
    std::thread::sleep(
        (start + Duration::from_millis(millis)).saturating_duration_since(Instant::now()),
    );
    for i in 0..20 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(s) = conn.as_mut() {
            let _ = s.write_all(b"INJECT\n");
        }
    }
    say("sent");
    Ok(())
}

/// `victim SRCPORT ADDR MILLIS`.
pub fn victim(src_port: u16, addr: SocketAddr, millis: u64) -> Result<(), String> {
    let until = Instant::now() + Duration::from_millis(millis);
    let bad = |why: String| {
        say("echo=bad");
        why
    };
    let mut s = connect_from(src_port, addr, Duration::from_secs(5))
        .map_err(|e| bad(format!("connect {addr}: {e}")))?;
    s.write_all(b"hello\n")
        .map_err(|e| bad(format!("send: {e}")))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| bad(e.to_string()))?;
    let mut back = [0u8; 6];
    s.read_exact(&mut back)
        .map_err(|e| bad(format!("read the echo: {e}")))?;
    if &back != b"hello\n" {
        return Err(bad(format!(
            "echo was {:?}",
            String::from_utf8_lossy(&back)
        )));
    }
    say("echo=ok");
    let extra = read_until(&mut s, until);
    say(&format!("extra={}", extra.len()));
    say(&format!(
        "extra_text={}",
        String::from_utf8_lossy(&extra).replace('\n', "\\n")
    ));
    Ok(())
}

/// `from SRCPORT ADDR`.
pub fn from(src_port: u16, addr: SocketAddr) -> Result<(), String> {
    let limit = Duration::from_secs(3);
    let socket = bound(src_port)?;
    let why = |e: &std::io::Error| match e.kind() {
        ErrorKind::ConnectionRefused => "refused".to_owned(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "reset".to_owned()
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".to_owned(),
        ErrorKind::UnexpectedEof => "closed".to_owned(),
        _ => format!("errno={}", e.raw_os_error().unwrap_or(0)),
    };
    if let Err(e) = socket.connect_timeout(&addr.into(), limit) {
        say(&format!("refused {}", why(&e)));
        return Ok(());
    }
    let mut s: TcpStream = socket.into();
    let outcome = s
        .write_all(b"hello\n")
        .and_then(|()| s.set_read_timeout(Some(limit)))
        .and_then(|()| {
            let mut back = [0u8; 6];
            s.read_exact(&mut back).map(|()| back)
        });
    match outcome {
        Ok(back) if &back == b"hello\n" => say("echoed"),
        Ok(_) => say("refused differs"),
        Err(e) => say(&format!("refused {}", why(&e))),
    }
    Ok(())
}

/// `post SRCPORT ADDR TEXT`.
pub fn post(src_port: u16, addr: SocketAddr, text: &str) -> Result<(), String> {
    let mut s = connect_from(src_port, addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(text.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    drop(s);
    say("posted");
    Ok(())
}

/// `rst HOST:PORT`: connects and at once closes with a reset (SO_LINGER 0), sending nothing:
/// what a health check that aborts its probe does.
pub fn rst(addr: SocketAddr) -> Result<(), String> {
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    drop(s);
    say("reset");
    Ok(())
}

/// `pgpaused SRCPORT HOST:PORT GOFILE CONNSTR`.
pub async fn pgpaused(
    src_port: u16,
    addr: SocketAddr,
    gofile: &Path,
    connstr: &str,
) -> Result<(), String> {
    let result = async {
        let stream = connect_from(src_port, addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        say("connected");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !gofile.exists() {
            if Instant::now() > deadline {
                return Err(format!("{} did not appear within 20 s", gofile.display()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stream = tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())?;
        let config = tokio_postgres::Config::from_str(connstr).map_err(|e| e.to_string())?;
        let (client, connection) = config
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .map_err(|e| super::pg::describe(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("connection: {e}");
            }
        });
        client
            .query_one("SELECT 1", &[])
            .await
            .map_err(|e| super::pg::describe(&e))?;
        client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|e| super::pg::describe(&e))?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            say("pg=ok");
            Ok(())
        }
        Err(e) => {
            say(&format!("pg=err {e}"));
            Err(e)
        }
    }
}

/// `fakepg LISTENADDR SRCPORT MILLIS`.
pub fn fakepg(listen: SocketAddr, src_port: u16, millis: u64) -> Result<(), String> {
    let until = Instant::now() + Duration::from_millis(millis);
    let listener = TcpListener::bind(listen).map_err(|e| format!("listen on {listen}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    // The server side: accept (if the connection reaches this listener at all, which it does
    // not when something redirects it), send the message and hold the connection until the end.
    let server = std::thread::spawn(move || {
        while Instant::now() < until {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    // AuthenticationCleartextPassword: 'R', length 8, code 3.
                    let _ = conn.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let got = match connect_from(src_port, listen, Duration::from_secs(5)) {
        Ok(mut client) => read_until(&mut client, until),
        Err(e) => {
            eprintln!("connect {listen}: {e}");
            Vec::new()
        }
    };
    say(&format!("client_got={}", got.len()));
    let _ = server.join();
    Ok(())
}
