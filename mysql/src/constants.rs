//! Protocol constants. Capability and status flags are `mysql_common`'s bitflags (they name
//! every bit both MySQL and MariaDB define); values are built with `from_bits_retain` so bits a
//! newer peer sets survive a round trip through latch.
use mysql_common::constants::Command as C;
pub use mysql_common::constants::{CapabilityFlags, MariadbCapabilities, StatusFlags};

/// Largest payload one packet header can describe; a payload of this length is continued in
/// the next packet.
pub const MAX_CHUNK: usize = 0xFF_FFFF;

/// The protocol version byte HandshakeV10 starts with.
pub const PROTOCOL_VERSION: u8 = 10;

/// Scramble length of the MySQL 4.1+ plugins (native, caching_sha2) in the greeting.
pub const SCRAMBLE_LEN: usize = 20;
/// Nonce length of MariaDB's client_ed25519.
pub const ED25519_NONCE_LEN: usize = 32;

/// Command bytes (the first payload byte of a packet in the command phase).
pub const COM_QUIT: u8 = C::COM_QUIT as u8;
pub const COM_INIT_DB: u8 = C::COM_INIT_DB as u8;
pub const COM_QUERY: u8 = C::COM_QUERY as u8;
pub const COM_PING: u8 = C::COM_PING as u8;
pub const COM_STATISTICS: u8 = C::COM_STATISTICS as u8;
pub const COM_PROCESS_KILL: u8 = C::COM_PROCESS_KILL as u8;
pub const COM_CHANGE_USER: u8 = C::COM_CHANGE_USER as u8;
pub const COM_RESET_CONNECTION: u8 = C::COM_RESET_CONNECTION as u8;

/// Packet headers of the connection phase.
pub const OK_HEADER: u8 = 0x00;
pub const AUTH_MORE_DATA_HEADER: u8 = 0x01;
pub const AUTH_SWITCH_HEADER: u8 = 0xFE;
/// EOF in the text protocol; an OK in its place when CLIENT_DEPRECATE_EOF is on.
pub const EOF_HEADER: u8 = 0xFE;
pub const ERR_HEADER: u8 = 0xFF;

/// Authentication plugin names as they appear on the wire.
pub const MYSQL_NATIVE_PASSWORD: &str = "mysql_native_password";
pub const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";
pub const CLIENT_ED25519: &str = "client_ed25519";
pub const MYSQL_CLEAR_PASSWORD: &str = "mysql_clear_password";
pub const SHA256_PASSWORD: &str = "sha256_password";
pub const MYSQL_OLD_PASSWORD: &str = "mysql_old_password";

/// caching_sha2_password's one-byte messages (inside AuthMoreData, or sent alone).
pub const CACHING_SHA2_REQUEST_PUBLIC_KEY: u8 = 0x02;
pub const CACHING_SHA2_FAST_AUTH_SUCCESS: u8 = 0x03;
pub const CACHING_SHA2_PERFORM_FULL_AUTH: u8 = 0x04;

/// Character sets (collation ids, as the handshake carries them).
pub const UTF8MB4_GENERAL_CI: u8 = 45;
pub const LATIN1_SWEDISH_CI: u8 = 8;
pub const UTF8MB3_GENERAL_CI: u8 = 33;

/// Server error codes latch sends or reacts to, with the SQLSTATE the server pairs them with.
pub mod er {
    /// Too many connections.
    pub const CON_COUNT_ERROR: (u16, &str) = (1040, "08004");
    /// Out of memory / resources.
    pub const OUT_OF_RESOURCES: (u16, &str) = (1041, "08004");
    /// Can't get hostname for your address.
    pub const BAD_HOST_ERROR: (u16, &str) = (1042, "08S01");
    /// Bad handshake.
    pub const HANDSHAKE_ERROR: (u16, &str) = (1043, "08S01");
    /// Access denied for user to database.
    pub const DBACCESS_DENIED_ERROR: (u16, &str) = (1044, "42000");
    /// Access denied for user (using password: YES/NO).
    pub const ACCESS_DENIED_ERROR: (u16, &str) = (1045, "28000");
    /// Unknown command.
    pub const UNKNOWN_COM_ERROR: (u16, &str) = (1047, "08S01");
    /// Unknown database.
    pub const BAD_DB_ERROR: (u16, &str) = (1049, "42000");
    /// Server shutdown in progress.
    pub const SERVER_SHUTDOWN: (u16, &str) = (1053, "08S01");
    /// Host is not allowed to connect.
    pub const HOST_NOT_PRIVILEGED: (u16, &str) = (1130, "HY000");
    /// Got a packet bigger than 'max_allowed_packet' bytes.
    pub const NET_PACKET_TOO_LARGE: (u16, &str) = (1153, "08S01");
    /// Got an error reading communication packets.
    pub const NET_READ_ERROR: (u16, &str) = (1158, "08S01");
    /// Got packets out of order.
    pub const NET_PACKETS_OUT_OF_ORDER: (u16, &str) = (1156, "08S01");
    /// Client does not support authentication protocol requested by server.
    pub const NOT_SUPPORTED_AUTH_MODE: (u16, &str) = (1251, "08004");
    /// Access denied for user (no password, e.g. unix_socket).
    pub const ACCESS_DENIED_NO_PASSWORD_ERROR: (u16, &str) = (1698, "28000");
}
