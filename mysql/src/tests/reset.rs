//! Making a session fit for the next connection, on the replies MariaDB 10.11 sent to
//! COM_RESET_CONNECTION, COM_INIT_DB `bench` and COM_STATISTICS sent together (captured on
//! loopback from a session that had changed its database, character set and transaction).
use bytes::BytesMut;

use crate::frame;
use crate::reset::{self, Replies, Step};

const REPLIES: &str = "0700000100000002000000070000010000000200000070000001557074696d653a20392020\
546872656164733a203120205175657374696f6e733a2032322020536c6f7720717565726965733a203020204f706\
56e733a20323220204f70656e207461626c65733a20313320205175657269657320706572207365636f6e64206176\
673a20322e343434";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Feeds `bytes` packet by packet; the step after the last packet read.
fn run(bytes: &[u8]) -> Step {
    let mut buf = BytesMut::from(bytes);
    let mut replies = Replies::default();
    loop {
        let packet = frame::parse(&mut buf, 1 << 20)
            .unwrap()
            .expect("a whole packet");
        match replies.on_packet(&packet) {
            Step::More => continue,
            done => return done,
        }
    }
}

#[test]
fn the_three_commands_go_out_as_one_write_each_a_command_of_its_own() {
    let mut out = BytesMut::new();
    reset::encode(b"bench", &mut out);
    assert_eq!(
        &out[..],
        b"\x01\x00\x00\x00\x1f\x06\x00\x00\x00\x02bench\x01\x00\x00\x00\x09"
    );
}

#[test]
fn the_servers_ok_ok_and_status_line_make_the_session_fit() {
    assert_eq!(run(&hex(REPLIES)), Step::Fit);
}

#[test]
fn a_reply_the_application_left_unread_before_them_makes_it_unfit() {
    // An OK the application never read (its last command's), then the three replies: the
    // third packet read is then the second OK, not the status line.
    let mut bytes = hex("0700000100000002000000");
    bytes.extend(hex(REPLIES));
    assert!(matches!(run(&bytes), Step::Unfit(_)));
    // A result set left unread: its column count comes first.
    let mut bytes = hex("0100000101");
    bytes.extend(hex(REPLIES));
    assert!(matches!(run(&bytes), Step::Unfit(_)));
}

#[test]
fn a_server_without_com_reset_connection_makes_it_unfit() {
    // MariaDB before 10.2.4 (and MySQL before 5.7.3): ERR 1047 Unknown command.
    let err = hex("18000001ff1704233038533031556e6b6e6f776e20636f6d6d616e64");
    assert!(matches!(run(&err), Step::Unfit(_)));
}
