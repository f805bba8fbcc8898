//! The conversation on the upgrade socket (see [`super::socket`]):
//!
//! 1. new → old: `hello`.
//! 2. old → new: `fds` messages (each listener with its namespace's inode, the admin listener,
//!    the connection map), then `end` with the policies' rule ids.
//! 3. The new agent starts with them (its programs attached beside the old ones) and says
//!    `ready`; only then does the old one stop accepting, detach its programs and drain. If the
//!    new agent fails before that, the old one sees the end of the stream and carries on.
//! 4. (version 2) old → new: `relays` messages, each with up to 100 parked relays' states and
//!    their two sockets apiece (see [`super::relays`]), then `relays_end`. The new agent
//!    carries them on; what the old one could not park it drains.
use std::{collections::HashMap, io, os::fd::OwnedFd, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use super::socket;

/// Version of this conversation: 2 adds live relays after `ready`. A new agent speaking 1 is
/// served without them (its relays are drained); any other version is refused.
const VERSION: u32 = 2;

/// How long the new agent waits for each of the old one's messages.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade socket: {0}")]
    Io(#[from] io::Error),
    #[error("upgrade protocol: {0}")]
    Protocol(String),
    #[error("the new agent went away before it was ready")]
    Abandoned,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    Hello {
        version: u32,
    },
    Fds {
        items: Vec<Item>,
    },
    End {
        policy_ids: HashMap<String, u32>,
        next_rule_id: u32,
        /// The old agent's next connection id (the new one counts on from well past it, so
        /// the ids of relays it carries on stay unique).
        #[serde(default)]
        next_conn_id: u64,
    },
    Ready,
    Relays {
        relays: Vec<super::relays::RelayState>,
    },
    RelaysEnd,
}

/// What one attached descriptor is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
enum Item {
    /// A broker listener in the network namespace with this nsfs inode.
    Listener { inode: u64 },
    /// The admin endpoint's listener.
    Admin,
    /// The kernel's connection map (`LATCH_CONNS`).
    Conns,
}

/// What a running agent hands over.
#[derive(Debug, Default)]
pub struct Offer {
    pub listeners: Vec<(u64, OwnedFd)>,
    pub admin: Option<OwnedFd>,
    pub conns: Option<OwnedFd>,
    pub policy_ids: HashMap<String, u32>,
    pub next_rule_id: u32,
    pub next_conn_id: u64,
}

/// What the new agent received; [`Inherited::ready`] tells the old one to let go.
#[derive(Debug)]
pub struct Inherited {
    pub listeners: Vec<(u64, std::net::TcpListener)>,
    pub admin: Option<std::net::TcpListener>,
    pub conns: Option<OwnedFd>,
    pub policy_ids: HashMap<String, u32>,
    pub next_rule_id: u32,
    pub next_conn_id: u64,
    conn: OwnedFd,
}

fn send(conn: &OwnedFd, msg: &Message, fds: &[OwnedFd]) -> Result<(), UpgradeError> {
    let body = serde_json::to_vec(msg).map_err(|e| UpgradeError::Protocol(e.to_string()))?;
    Ok(socket::send(conn, &body, fds)?)
}

fn recv(conn: &OwnedFd) -> Result<Option<(Message, Vec<OwnedFd>)>, UpgradeError> {
    let Some((body, fds)) = socket::recv(conn)? else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(&body).map_err(|e| UpgradeError::Protocol(e.to_string()))?;
    Ok(Some((msg, fds)))
}

/// Asks the agent listening at `path` for its sockets and state. `None`: no agent runs there,
/// this is a plain start.
pub fn take_over(path: &Path) -> Result<Option<Inherited>, UpgradeError> {
    let Some(conn) = socket::connect(path)? else {
        return Ok(None);
    };
    socket::set_timeout(&conn, REPLY_TIMEOUT)?;
    send(&conn, &Message::Hello { version: VERSION }, &[])?;
    let mut listeners = Vec::new();
    let mut admin = None;
    let mut conns = None;
    loop {
        let (msg, fds) = recv(&conn)?.ok_or_else(|| {
            UpgradeError::Protocol("the running agent closed the upgrade socket".into())
        })?;
        match msg {
            Message::Fds { items } => {
                if items.len() != fds.len() {
                    return Err(UpgradeError::Protocol(format!(
                        "{} items, {} descriptors",
                        items.len(),
                        fds.len()
                    )));
                }
                for (item, fd) in items.into_iter().zip(fds) {
                    match item {
                        Item::Listener { inode } => {
                            listeners.push((inode, std::net::TcpListener::from(fd)))
                        }
                        Item::Admin => admin = Some(std::net::TcpListener::from(fd)),
                        Item::Conns => conns = Some(fd),
                    }
                }
            }
            Message::End {
                policy_ids,
                next_rule_id,
                next_conn_id,
            } => {
                return Ok(Some(Inherited {
                    listeners,
                    admin,
                    conns,
                    policy_ids,
                    next_rule_id,
                    next_conn_id,
                    conn,
                }));
            }
            other => {
                return Err(UpgradeError::Protocol(format!(
                    "unexpected message {other:?}"
                )));
            }
        }
    }
}

impl Inherited {
    /// Tells the old agent this one serves now: it stops accepting, detaches its programs,
    /// hands its live relays over ([`receive_relays`] on the connection returned) and drains
    /// the rest.
    pub fn ready(self) -> Result<OwnedFd, UpgradeError> {
        send(&self.conn, &Message::Ready, &[])?;
        Ok(self.conn)
    }
}

/// The new agent's side after `ready` (blocking): passes each message's relays to `take` until
/// `relays_end`, or the end of the stream (an old agent of version 1, or one that exited).
/// Returns how many arrived.
pub fn receive_relays(
    conn: &OwnedFd,
    mut take: impl FnMut(Vec<super::relays::Parked>),
) -> Result<usize, UpgradeError> {
    let mut received = 0;
    loop {
        let Some((msg, fds)) = recv(conn)? else {
            return Ok(received);
        };
        match msg {
            Message::Relays { relays } => {
                let parked = super::relays::check(relays, fds, received)
                    .map_err(|e| UpgradeError::Protocol(e.to_string()))?;
                received += parked.len();
                take(parked);
            }
            Message::RelaysEnd => return Ok(received),
            other => {
                return Err(UpgradeError::Protocol(format!(
                    "unexpected message {other:?}"
                )));
            }
        }
    }
}

/// The old agent's side: sends parked relays, at most one message's worth at a time (see
/// [`super::relays::batches`]). Returns the relays whose state is too large to send; on an
/// error, every relay not sent. Either way the caller carries those on itself.
pub fn send_relays(
    conn: &OwnedFd,
    parked: Vec<super::relays::Parked>,
) -> Result<Vec<super::relays::Parked>, (UpgradeError, Vec<super::relays::Parked>)> {
    let (batches, mut too_big) = super::relays::batches(parked);
    let mut batches = batches.into_iter();
    while let Some(batch) = batches.next() {
        let (states, fds) = super::relays::split(batch);
        // One message is sent whole or not at all (SOCK_SEQPACKET).
        if let Err(err) = send(
            conn,
            &Message::Relays {
                relays: states.clone(),
            },
            &fds,
        ) {
            let mut fds = fds.into_iter();
            too_big.extend(states.into_iter().filter_map(|state| {
                Some(super::relays::Parked {
                    state,
                    app: fds.next()?,
                    target: fds.next()?,
                })
            }));
            too_big.extend(batches.flatten());
            return Err((err, too_big));
        }
    }
    Ok(too_big)
}

/// Tells the new agent no more relays come.
pub fn end_relays(conn: &OwnedFd) -> Result<(), UpgradeError> {
    send(conn, &Message::RelaysEnd, &[])
}

/// The old agent's side, on an accepted connection (blocking): waits for `hello`, sends
/// `offer`, and returns once the new agent is ready, with whether it takes live relays; an
/// error (the new agent failed to start, or went away) means the old one carries on.
pub fn offer(conn: &OwnedFd, offer: Offer) -> Result<bool, UpgradeError> {
    let version = match recv(conn)? {
        Some((Message::Hello { version }, _)) if version == 1 || version == VERSION => version,
        Some((Message::Hello { version }, _)) => {
            return Err(UpgradeError::Protocol(format!(
                "the new agent speaks version {version}, this one {VERSION}"
            )));
        }
        Some((other, _)) => {
            return Err(UpgradeError::Protocol(format!(
                "expected hello, got {other:?}"
            )));
        }
        None => return Err(UpgradeError::Abandoned),
    };
    let mut items: Vec<(Item, OwnedFd)> = offer
        .listeners
        .into_iter()
        .map(|(inode, fd)| (Item::Listener { inode }, fd))
        .collect();
    items.extend(offer.admin.map(|fd| (Item::Admin, fd)));
    items.extend(offer.conns.map(|fd| (Item::Conns, fd)));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        let (kinds, fds): (Vec<Item>, Vec<OwnedFd>) = items.by_ref().take(socket::MAX_FDS).unzip();
        send(conn, &Message::Fds { items: kinds }, &fds)?;
    }
    send(
        conn,
        &Message::End {
            policy_ids: offer.policy_ids,
            next_rule_id: offer.next_rule_id,
            next_conn_id: offer.next_conn_id,
        },
        &[],
    )?;
    match recv(conn)? {
        Some((Message::Ready, _)) => Ok(version >= 2),
        Some((other, _)) => Err(UpgradeError::Protocol(format!(
            "expected ready, got {other:?}"
        ))),
        None => Err(UpgradeError::Abandoned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    #[test]
    fn listeners_and_ids_cross_and_the_old_side_waits_for_ready() {
        let dir = std::env::temp_dir().join(format!("latch-handover-{}", std::process::id()));
        let path = socket::path(&dir, "t");
        let listener = socket::listen(&path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let old = std::thread::spawn(move || {
            let conn = socket::accept(&listener).unwrap();
            let listeners: Vec<(u64, OwnedFd)> = (0..250)
                .map(|i| (i, OwnedFd::from(tcp.try_clone().unwrap())))
                .collect();
            offer(
                &conn,
                Offer {
                    listeners,
                    policy_ids: [("pg".to_string(), 3)].into(),
                    next_rule_id: 4,
                    ..Offer::default()
                },
            )
        });
        let inherited = take_over(&path).unwrap().expect("an agent runs");
        assert_eq!(inherited.listeners.len(), 250);
        assert_eq!(inherited.listeners[249].0, 249);
        assert_eq!(inherited.listeners[0].1.local_addr().unwrap(), addr);
        assert_eq!(inherited.policy_ids["pg"], 3);
        assert_eq!(inherited.next_rule_id, 4);
        let _conn = inherited.ready().unwrap();
        old.join().unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_agent_that_goes_away_leaves_the_old_one_as_it_was() {
        let (old, new) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        send(&new, &Message::Hello { version: VERSION }, &[]).unwrap();
        let t = std::thread::spawn(move || offer(&old, Offer::default()));
        // The offer arrives; the new agent then fails to start and exits.
        assert!(matches!(
            recv(&new).unwrap(),
            Some((Message::End { .. }, _))
        ));
        drop(new);
        assert!(matches!(t.join().unwrap(), Err(UpgradeError::Abandoned)));
    }

    #[test]
    fn relays_cross_with_their_sockets_after_ready() {
        use super::super::relays::{Parked, RelayState};
        let (old, new) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        send(&new, &Message::Hello { version: VERSION }, &[]).unwrap();
        let relay = |conn: u64| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            Parked {
                state: RelayState {
                    conn,
                    policy: "echo".into(),
                    cgroup_id: 1,
                    destination: "127.0.0.2:1".into(),
                    elapsed_ms: 10,
                    to_target: conn,
                    to_app: 2 * conn,
                    audit: serde_json::json!({"conn": conn}),
                    cancel: None,
                },
                app: a.into(),
                target: l.accept().unwrap().0.into(),
            }
        };
        let t = std::thread::spawn(move || {
            assert!(
                offer(&old, Offer::default()).unwrap(),
                "version 2 takes relays"
            );
            assert!(
                send_relays(&old, (1..=150).map(relay).collect())
                    .unwrap()
                    .is_empty()
            );
            end_relays(&old).unwrap();
        });
        assert!(matches!(
            recv(&new).unwrap(),
            Some((Message::End { .. }, _))
        ));
        send(&new, &Message::Ready, &[]).unwrap();
        let mut got = Vec::new();
        let n = receive_relays(&new, |batch| got.extend(batch)).unwrap();
        t.join().unwrap();
        assert_eq!(n, 150);
        assert_eq!(got[149].state.to_app, 300);
        let peer = std::net::TcpStream::from(got.pop().unwrap().app);
        assert!(peer.peer_addr().is_ok(), "a live socket crossed");
    }

    #[test]
    fn a_version_1_agent_takes_no_relays() {
        let (old, new) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        send(&new, &Message::Hello { version: 1 }, &[]).unwrap();
        let t = std::thread::spawn(move || offer(&old, Offer::default()));
        assert!(matches!(
            recv(&new).unwrap(),
            Some((Message::End { .. }, _))
        ));
        send(&new, &Message::Ready, &[]).unwrap();
        assert!(!t.join().unwrap().unwrap());
    }
}
