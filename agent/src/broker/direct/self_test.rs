//! The kernel self-test: direct mode's steps on a loopback pair of the agent's own.
use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    time::Duration,
};

use bytes::BytesMut;
use latch_common::{
    TupleKey,
    direct::{FROM_TARGET, GREETING, HEADER_LEN, KIND_SKB, MYSQL, SKB_HEAD_LEN, TO_BROKER},
};

use super::{
    Direct,
    lobby::Framer,
    pair,
    sockets::{fionread, socket_cookie_of},
};

impl Direct {
    /// Runs direct mode's kernel steps on a loopback pair of the agent's own: a message the
    /// "application" sends reaches the lobby behind its header, what the "server" sends
    /// reaches the side socket, what the broker writes there reaches the application's receive
    /// queue (and FIONREAD counts it), and once the socket has left the sock map the server's
    /// next bytes arrive as plain TCP. Kernels whose sockmap loses or misplaces bytes on the
    /// way fail it, and direct mode is not used there.
    pub fn self_test(&self) -> io::Result<()> {
        self.self_test_client_first()?;
        self.self_test_server_first()
    }

    fn self_test_client_first(&self) -> io::Result<()> {
        let timeout = Some(Duration::from_secs(2));
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let (mut app, mut server) = pair(&listener)?;
        let cookie = socket_cookie_of(&app)?;
        let key = crate::ebpf::tuple_key(
            crate::netns::cookie_of(std::os::fd::AsFd::as_fd(&app))?,
            app.local_addr()?,
            app.peer_addr()?,
        );
        let (mut side, _side_peer) = self.side_std(cookie)?;
        let result = (|| {
            self.maps
                .set(&key, cookie, TO_BROKER | FROM_TARGET)
                .map_err(io::Error::other)?;
            self.maps
                .add_socket(cookie, &app)
                .map_err(io::Error::other)?;
            let mut lobby_guard = self.lobby.lock().unwrap_or_else(|e| e.into_inner());
            let lobby = lobby_guard
                .as_mut()
                .ok_or_else(|| io::Error::other("the lobby is in use"))?;
            lobby.set_read_timeout(timeout)?;
            app.write_all(b"startup")?;
            let mut got = vec![0u8; HEADER_LEN + 7];
            lobby.read_exact(&mut got)?;
            let mut buf = BytesMut::from(&got[..]);
            let piece = Framer::default()
                .next(&mut buf)
                .filter(|p| p.first && buf.is_empty())
                .ok_or_else(|| io::Error::other("lobby: no whole message"))?;
            let header = piece.header;
            expect("lobby message", &piece.body, b"startup")?;
            if header.cookie != cookie || header.key != key {
                return Err(io::Error::other("lobby: the header names another socket"));
            }
            self.maps
                .set(&key, cookie, FROM_TARGET)
                .map_err(io::Error::other)?;
            server.write_all(b"challenge")?;
            side.set_read_timeout(timeout)?;
            let mut got = [0u8; 9];
            side.read_exact(&mut got)?;
            expect("server to side socket", &got, b"challenge")?;
            side.write_all(b"welcome")?;
            let mut queued = 0;
            for _ in 0..200 {
                queued = fionread(&app)?;
                if queued == 7 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if queued != 7 {
                return Err(io::Error::other(format!(
                    "FIONREAD counted {queued} of 7 injected bytes"
                )));
            }
            app.set_read_timeout(timeout)?;
            let mut got = [0u8; 7];
            app.read_exact(&mut got)?;
            expect("side socket to application", &got, b"welcome")?;
            self.plain_after_removal(&key, cookie, &mut app, &mut server, timeout)
        })();
        let _ = self.maps.remove_socket(cookie);
        self.maps.forget(&key, cookie);
        self.drop_side(cookie, &side);
        result
    }
}

impl Direct {
    /// Takes the socket out of the sock map and its entries out of the maps, then checks that
    /// plain TCP carries bytes both ways.
    fn plain_after_removal(
        &self,
        key: &TupleKey,
        cookie: u64,
        app: &mut TcpStream,
        server: &mut TcpStream,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        self.maps.remove_socket(cookie).map_err(io::Error::other)?;
        self.maps.forget(key, cookie);
        server.write_all(b"ready")?;
        let mut got = [0u8; 5];
        app.read_exact(&mut got)?;
        expect("server to application after the hand-over", &got, b"ready")?;
        app.write_all(b"query")?;
        server.set_read_timeout(timeout)?;
        let mut got = [0u8; 5];
        server.read_exact(&mut got)?;
        expect("application to server after the hand-over", &got, b"query")
    }
}

fn expect(what: &str, got: &[u8], want: &[u8]) -> io::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: got {got:?}, expected {want:?}"
        )))
    }
}

impl Direct {
    /// The server-first steps (MySQL): the server's first bytes reach the lobby behind a
    /// header that took the place of their first bytes (saved in `LATCH_DIR_FIRST`), later
    /// ones the side socket, an ERR packet the application; once the socket has left the sock
    /// map, plain TCP both ways (a kernel that counted the lobby's bytes wrongly in the
    /// socket's received sequence fails here).
    fn self_test_server_first(&self) -> io::Result<()> {
        let timeout = Some(Duration::from_secs(2));
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let (mut app, mut server) = pair(&listener)?;
        let cookie = socket_cookie_of(&app)?;
        let key = crate::ebpf::tuple_key(
            crate::netns::cookie_of(std::os::fd::AsFd::as_fd(&app))?,
            app.local_addr()?,
            app.peer_addr()?,
        );
        let (mut side, _side_peer) = self.side_std(cookie)?;
        let result = (|| {
            self.maps
                .set_first(cookie, &key)
                .map_err(io::Error::other)?;
            self.maps
                .set(&key, cookie, TO_BROKER | FROM_TARGET | GREETING | MYSQL)
                .map_err(io::Error::other)?;
            self.maps
                .add_socket(cookie, &app)
                .map_err(io::Error::other)?;
            let mut lobby_guard = self.lobby.lock().unwrap_or_else(|e| e.into_inner());
            let lobby = lobby_guard
                .as_mut()
                .ok_or_else(|| io::Error::other("the lobby is in use"))?;
            lobby.set_read_timeout(timeout)?;
            let greeting = b"greeting-0123456789abcdef";
            server.write_all(greeting)?;
            let mut got = vec![0u8; greeting.len()];
            lobby.read_exact(&mut got)?;
            let mut buf = BytesMut::from(&got[..]);
            let piece = Framer::default()
                .next(&mut buf)
                .filter(|p| p.first && buf.is_empty())
                .ok_or_else(|| io::Error::other("lobby: no whole greeting"))?;
            if piece.header.kind != KIND_SKB || piece.header.cookie != cookie {
                return Err(io::Error::other("lobby: the greeting's header is wrong"));
            }
            expect("greeting's rest", &piece.body, &greeting[SKB_HEAD_LEN..])?;
            let saved = self
                .maps
                .first(cookie)
                .ok_or_else(|| io::Error::other("no saved greeting head"))?;
            expect("greeting's head", &saved.head, &greeting[..SKB_HEAD_LEN])?;
            if saved.key != key {
                return Err(io::Error::other("the saved 4-tuple is another socket's"));
            }
            drop(lobby_guard);
            server.write_all(b"\x04\x00\x00\x02\xfemore")?;
            side.set_read_timeout(timeout)?;
            let mut got = [0u8; 9];
            side.read_exact(&mut got)?;
            expect("server to side socket", &got, b"\x04\x00\x00\x02\xfemore")?;
            server.write_all(b"\x03\x00\x00\x04\xff\x15\x04")?;
            app.set_read_timeout(timeout)?;
            let mut got = [0u8; 7];
            app.read_exact(&mut got)?;
            expect(
                "an ERR to the application",
                &got,
                b"\x03\x00\x00\x04\xff\x15\x04",
            )?;
            if fionread(&app)? != 0 {
                return Err(io::Error::other("bytes left in the application's queue"));
            }
            self.plain_after_removal(&key, cookie, &mut app, &mut server, timeout)
        })();
        let _ = self.maps.remove_socket(cookie);
        self.maps.forget(&key, cookie);
        self.drop_side(cookie, &side);
        result
    }
}
