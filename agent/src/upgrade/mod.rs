//! Upgrades: a second `latch agent` with the same `--instance` takes over from the running
//! one without a connection refused or let past latch.
//!
//! | file | holds |
//! |---|---|
//! | [`socket`] | the root-only Unix socket in the state directory, messages with descriptors |
//! | [`handover`] | the conversation: listeners, admin listener, connection map, rule ids, `ready`, then live relays |
//! | [`relays`] | a parked relay's state on the wire, batching within the socket's bounds |
//! | [`systemd`] | `READY=1`/`MAINPID=` for `Type=notify`, the pipe `latch upgrade` waits on |
//!
//! The running agent listens at [`socket::path`]. A new one connects before it binds anything,
//! receives the listening sockets themselves (the same kernel sockets: their accept queues are
//! never closed), starts on them with its own programs attached beside the old ones, and says
//! `ready`. The old agent then stops accepting (and waits until its accept loops have ended),
//! detaches its programs, stops serving the admin endpoint, parks its plain relays and sends them with their sockets (the new agent carries
//! them on), and drains the rest for up to `--grace-period` before it exits. A
//! connection the old programs redirected just before they went is recorded in the old
//! connection map, which the new agent also reads for a while.
pub mod handover;
pub mod relays;
pub mod socket;
pub mod systemd;

use std::time::Duration;

pub use handover::{Inherited, Offer, UpgradeError};

/// How long the new agent also looks connections up in the old agent's map.
pub const PREVIOUS_MAP_FOR: Duration = Duration::from_secs(30);

/// How long the old agent's relays have to reach a safe point and park once the new agent
/// is ready; those that do not are drained.
pub const PARK_WINDOW: Duration = Duration::from_secs(3);

/// The conversation with a new agent, run on its own thread: once it is ready, the connection
/// and whether it takes live relays.
pub fn serve_one(
    conn: std::os::fd::OwnedFd,
    offer: Offer,
) -> Result<(std::os::fd::OwnedFd, bool), UpgradeError> {
    let relays = handover::offer(&conn, offer)?;
    Ok((conn, relays))
}

/// The upgrade socket of a running agent.
pub struct Listening {
    /// Each root peer's connection (a thread of its own accepts).
    pub connections: tokio::sync::mpsc::Receiver<std::os::fd::OwnedFd>,
    path: std::path::PathBuf,
    /// The socket file's inode when bound: a successor's socket at the same path is not ours.
    inode: u64,
}

impl Listening {
    /// Removes the socket file on a stop, unless a successor bound its own there since, and
    /// its directory when no other instance's socket is left in it.
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Listens on `path` for the next agent. Peers that are not root are refused and logged.
pub fn listen(path: &std::path::Path) -> std::io::Result<Listening> {
    use std::os::unix::fs::MetadataExt as _;
    let listener = socket::listen(path)?;
    let inode = std::fs::metadata(path)?.ino();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("latch-upgrade".into())
        .spawn(move || {
            loop {
                let conn = match socket::accept(&listener) {
                    Ok(c) => c,
                    Err(err) => {
                        tracing::warn!(%err, "upgrade socket: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if let Err(err) = socket::require_root_peer(&conn) {
                    tracing::warn!(%err, "upgrade socket: peer refused");
                    continue;
                }
                if tx.blocking_send(conn).is_err() {
                    return;
                }
            }
        })?;
    Ok(Listening {
        connections: rx,
        path: path.to_owned(),
        inode,
    })
}
