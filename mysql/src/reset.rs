//! Making a finished session fit for another application connection (the connector keeps
//! such sessions open for the next connection of the same workload).
//!
//! When the application sends COM_QUIT, latch sends the server three commands at once:
//! COM_RESET_CONNECTION (the session's state goes: an open transaction is rolled back;
//! temporary tables, user variables, prepared statements and locks are dropped; session
//! variables return to their defaults and the character set to the one the session was opened
//! with), COM_INIT_DB back to the database the session was opened with (the application may
//! have left it with USE), and COM_STATISTICS. Each is answered with a single packet of sequence
//! id 1: OK, OK, then the server's status line ("Uptime: …"), which no other reply resembles.
//! The status line marks the end of what the server sends: a reply the application left unread
//! comes first and puts the three out of line, and the session is then closed, not kept.
use bytes::BytesMut;

use crate::constants::{COM_INIT_DB, COM_RESET_CONNECTION, COM_STATISTICS, OK_HEADER};
use crate::frame::{self, Packet};

/// How the status line COM_STATISTICS answers with begins (MySQL and MariaDB alike).
const STATUS_LINE: &[u8] = b"Uptime: ";

/// The three commands, for the session opened with `database`.
pub fn encode(database: &[u8], out: &mut BytesMut) {
    frame::encode(&[COM_RESET_CONNECTION], 0, out);
    let mut init = Vec::with_capacity(1 + database.len());
    init.push(COM_INIT_DB);
    init.extend_from_slice(database);
    frame::encode(&init, 0, out);
    frame::encode(&[COM_STATISTICS], 0, out);
}

/// The server's replies, read one packet at a time.
#[derive(Debug, Default)]
pub struct Replies {
    got: u8,
}

/// What the replies so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Another packet is due.
    More,
    /// All three came as expected: the session is as it was opened.
    Fit,
    /// The session cannot be kept (why, for the log).
    Unfit(&'static str),
}

impl Replies {
    pub fn on_packet(&mut self, packet: &Packet) -> Step {
        if packet.seq != 1 {
            return Step::Unfit("a reply out of sequence");
        }
        self.got += 1;
        match self.got {
            1 | 2 if packet.first_byte() == Some(OK_HEADER) => Step::More,
            1 => Step::Unfit("COM_RESET_CONNECTION was not answered with OK"),
            2 => Step::Unfit("COM_INIT_DB was not answered with OK"),
            _ if packet.payload.starts_with(STATUS_LINE) => Step::Fit,
            _ => Step::Unfit("COM_STATISTICS was not answered with the status line"),
        }
    }
}
