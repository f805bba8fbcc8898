//! Messages latch writes as a server, toward the application.
use bytes::{BufMut as _, BytesMut};

use super::{
    backend::{AUTHENTICATION, BACKEND_KEY_DATA, NEGOTIATE_PROTOCOL_VERSION},
    frame::{put_cstr, write_msg},
};

/// AuthenticationOk.
pub fn authentication_ok(out: &mut BytesMut) {
    write_msg(out, AUTHENTICATION, |b| b.put_i32(0));
}

/// BackendKeyData: the server's process id and secret key, as the server sent them.
pub fn backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    write_msg(out, BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

/// NegotiateProtocolVersion: latch speaks 3.0 and none of `unrecognized`.
pub fn negotiate_protocol_version(unrecognized: &[String], out: &mut BytesMut) {
    write_msg(out, NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(0);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            put_cstr(b, o);
        }
    });
}
