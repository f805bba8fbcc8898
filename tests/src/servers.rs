//! Real servers on loopback for the tests to reach: a TCP echo server and nginx.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{TempDir, bins};

/// A database server a test started, as [`wait_db_ready`] watches it.
pub trait DbServer {
    /// What it is, for messages.
    const NAME: &'static str;
    /// The signal that shuts it down quickly, and how long that may take before SIGKILL.
    const STOP_SIGNAL: i32 = libc::SIGTERM;
    const STOP_WITHIN: Duration = Duration::from_secs(10);
    /// Where it listens.
    fn addr(&self) -> SocketAddr;
    /// Its process, while it runs (the owner kills it on drop, also after a failed wait).
    fn child(&mut self) -> Option<&mut Child>;
    /// Whether its admin client gets an answer to `SELECT 1`.
    fn answers(&self) -> bool;
    /// Whether [`DbServer::addr`] can be reached from here (not when it listens in another
    /// network namespace: then an answer to the admin client is taken as ready).
    fn reachable(&self) -> bool {
        true
    }
    /// Its log so far.
    fn log(&self) -> String;
}

/// Stops `server`'s process (its owner's `Drop`): [`DbServer::STOP_SIGNAL`], SIGKILL past
/// [`DbServer::STOP_WITHIN`]; its log on stderr when a test is failing.
pub fn stop_db<S: DbServer>(server: &mut S) {
    let Some(child) = server.child() else {
        return;
    };
    // SAFETY: kill(2) on the child the test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, S::STOP_SIGNAL) };
    let deadline = Instant::now() + S::STOP_WITHIN;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    if std::thread::panicking() {
        eprintln!("--- {} log ---\n{}", S::NAME, server.log());
    }
}

/// Waits until `server` accepts TCP and answers; panics with its log if it exits or is not
/// ready within `within`.
pub fn wait_db_ready<S: DbServer>(server: &mut S, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if (!server.reachable()
            || TcpStream::connect_timeout(&server.addr(), Duration::from_millis(100)).is_ok())
            && server.answers()
        {
            return;
        }
        if let Some(status) = server.child().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("{} exited ({status}):\n{}", S::NAME, server.log());
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready after {within:?}:\n{}",
            S::NAME,
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port free on ``ip`` now, chosen below the kernel's ephemeral range
/// (net.ipv4.ip_local_port_range, 32768 and up by default), so the source port of some other
/// test's outgoing connection cannot take it between this check and the server's bind.
pub fn free_port(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Some servers also bind the next port (Vault/OpenBao's cluster port is api + 1).
    const STEP: u32 = 4;
    // Spread processes apart by pid; within a process, walk the range.
    let base = 20_000 + (std::process::id() % 600) * 20;
    for _ in 0..12_000 {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(STEP, Ordering::Relaxed)) % 12_000;
        if TcpListener::bind((ip, port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port below the ephemeral range on {ip}")
}

/// What an [`EchoServer`] does with each connection.
#[derive(Clone, Copy)]
enum Behavior {
    Echo,
    StoreAndForward(std::time::Duration),
    ResetAfter(usize),
    /// Reads this many bytes, waits, then resets (SO_LINGER 0) with nothing unread.
    ResetWhenIdle(usize, std::time::Duration),
}

/// Echoes every connection's bytes back until the client half-closes; counts connections.
pub struct EchoServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    /// Connections that ended with a reset from the client rather than its FIN.
    resets: Arc<AtomicU64>,
    /// Source addresses of the connections accepted, in order.
    peers: Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start(ip: &str) -> Self {
        Self::spawn(ip, Behavior::Echo)
    }

    /// A slow consumer: after each accept it waits `stall` before reading anything, then
    /// reads to end-of-stream and only then echoes it all. A client sending much meets full
    /// buffers and, until it has sent everything, gets nothing back.
    pub fn start_store_and_forward(ip: &str, stall: std::time::Duration) -> Self {
        Self::spawn(ip, Behavior::StoreAndForward(stall))
    }

    /// A server that reads `n` bytes of each connection, echoes nothing and closes with data
    /// still unread (so the kernel resets the connection).
    pub fn start_resetting_after(ip: &str, n: usize) -> Self {
        Self::spawn(ip, Behavior::ResetAfter(n))
    }

    /// Reads `n` bytes from each connection, sends nothing, and resets it after `pause`: a
    /// client blocked waiting for a reply meets the reset.
    pub fn start_resetting_when_idle(ip: &str, n: usize, pause: std::time::Duration) -> Self {
        Self::spawn(ip, Behavior::ResetWhenIdle(n, pause))
    }

    fn spawn(ip: &str, behavior: Behavior) -> Self {
        let listener = listen(ip).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let resets = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, r, s, p) = (
            accepted.clone(),
            resets.clone(),
            stop.clone(),
            peers.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                if let Ok(peer) = conn.peer_addr() {
                    p.lock().unwrap().push(peer.ip());
                }
                a.fetch_add(1, Ordering::Relaxed);
                let r = r.clone();
                std::thread::spawn(move || {
                    match behavior {
                        Behavior::Echo => {}
                        Behavior::StoreAndForward(stall) => {
                            std::thread::sleep(stall);
                            let mut all = Vec::new();
                            if conn.read_to_end(&mut all).is_ok() {
                                let _ = conn.write_all(&all);
                            }
                            let _ = conn.shutdown(std::net::Shutdown::Write);
                            return;
                        }
                        Behavior::ResetAfter(n) => {
                            let mut buf = vec![0u8; n];
                            let _ = conn.read_exact(&mut buf);
                            return;
                        }
                        Behavior::ResetWhenIdle(n, pause) => {
                            let mut buf = vec![0u8; n];
                            let _ = conn.read_exact(&mut buf);
                            std::thread::sleep(pause);
                            let _ = socket2::SockRef::from(&conn)
                                .set_linger(Some(std::time::Duration::ZERO));
                            return;
                        }
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match conn.read(&mut buf) {
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                                r.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self {
            addr,
            accepted,
            resets,
            peers,
            stop,
        }
    }

    /// Source addresses of the connections accepted so far (what the server saw).
    pub fn peers(&self) -> Vec<std::net::IpAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections (of `start`'s echo behaviour) the client ended with a reset.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
}

/// A listener on a free port of `ip` with an accept queue long enough for the tests' bursts of a thousand connects
/// (std's `TcpListener::bind` asks for 128; an overflowing queue drops handshakes and the
/// clients then see stalls and resets that are no fault of what is under test).
fn listen(ip: &str) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let ip: std::net::IpAddr = ip.parse().map_err(std::io::Error::other)?;
    let addr = SocketAddr::new(ip, 0);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// nginx serving a fixed body on `ip:port`, stopped by PID on drop.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

/// What the test nginx answers on `/`.
pub const NGINX_BODY: &str = "hello from nginx\n";

impl Nginx {
    pub fn start(ip: &str) -> Self {
        let nginx = bins::tool("nginx", "the Debian package nginx-light");
        let dir = TempDir::new("nginx");
        let port = free_port(ip);
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{\n    listen {host}:{port};\n    \
             location / {{ default_type text/plain; return 200 \"{}\"; }}\n  }}\n}}\n",
            NGINX_BODY.replace('\n', "\\n")
        );
        let conf_path = dir.write("nginx.conf", &conf);
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = format!("{host}:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// `http://addr/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
