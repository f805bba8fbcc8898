//! The paths before a StartupMessage, with what PostgreSQL 15 sent on each (captured from
//! Debian's 15 over TCP, SSL off, by a client that sent these bytes in these writes). GSS rows
//! were captured over the server's Unix socket, where it declines GSSAPI encryption as latch
//! always does (over TCP, a server built with GSSAPI answers `G`).
use super::*;

const SSL: u32 = SSL_REQUEST_CODE;
const GSS: u32 = GSSENC_REQUEST_CODE;
const CANCEL: u32 = CANCEL_REQUEST_CODE;
const V3: u32 = 3 << 16;

fn packet(len: i32, code: u32, body: &[u8]) -> Vec<u8> {
    let mut p = len.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(body);
    p
}

fn pkt(code: u32, body: &[u8]) -> Vec<u8> {
    packet(8 + body.len() as i32, code, body)
}

/// How the exchange ended, seen from the application.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The server closed the connection.
    Closed,
    /// The server waits for more.
    Open,
    /// The server goes on to authentication.
    Startup,
}

/// One row: the case, the application's writes, whether it half-closes after them,
/// PostgreSQL's bytes and how it ended.
type Row = (&'static str, Vec<Vec<u8>>, bool, Vec<u8>, End);

/// Feeds `writes` one read each, answering encryption requests `N`, then end of stream when
/// `eof`. Returns everything sent to the application and how it ended.
fn drive(writes: &[Vec<u8>], eof: bool) -> (Vec<u8>, End) {
    let mut pre = PreStartup::default();
    let mut buf = BytesMut::new();
    let mut sent = Vec::new();
    let mut writes = writes.iter();
    loop {
        match pre.next(&mut buf) {
            Step::Pending => match writes.next() {
                Some(w) => buf.extend_from_slice(w),
                None if eof => {
                    sent.extend_from_slice(&pre.closed(&buf).reply);
                    return (sent, End::Closed);
                }
                None => return (sent, End::Open),
            },
            Step::Encryption(_) => sent.push(b'N'),
            Step::Close(e) => {
                sent.extend_from_slice(&e.reply);
                return (sent, End::Closed);
            }
            // The broker passes the request on and closes, saying nothing.
            Step::Cancel { .. } => return (sent, End::Closed),
            Step::Startup(_) => return (sent, End::Startup),
        }
    }
}

/// `bytes` with the source location fields (`F`, `L`, `R`) taken out of every v3
/// ErrorResponse: latch does not pretend to be postmaster.c.
fn without_location(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = bytes.split_first() {
        if tag != b'E' || rest.len() < 4 || rest[0] != 0 {
            out.push(tag);
            bytes = rest;
            continue;
        }
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let mut fields = &rest[4..len];
        let mut body = Vec::new();
        while let Some((&t, r)) = fields.split_first() {
            if t == 0 {
                break;
            }
            let end = r.iter().position(|&b| b == 0).unwrap();
            if !matches!(t, b'F' | b'L' | b'R') {
                body.push(t);
                body.extend_from_slice(&r[..=end]);
            }
            fields = &r[end + 1..];
        }
        body.push(0);
        out.push(b'E');
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(&body);
        bytes = &rest[len..];
    }
    out
}

#[test]
fn pre_startup_paths_answer_as_postgresql_15_does() {
    let terminate = b"X\0\0\0\x04".to_vec();
    let user_x = b"user\0x\0\0";
    let unsupported_1234_5679: &[u8] = b"E\x00\x00\x00\x89SFATAL\x00VFATAL\x00C0A000\x00Munsupported frontend protocol 1234.5679: server supports 3.0 to 3.0\x00Fpostmaster.c\x00L2222\x00RProcessStartupPacket\x00\x00";
    let no_user: &[u8] = b"E\x00\x00\x00ySFATAL\x00VFATAL\x00C28000\x00Mno PostgreSQL user name specified in startup packet\x00Fpostmaster.c\x00L2351\x00RProcessStartupPacket\x00\x00";
    let layout: &[u8] = b"E\x00\x00\x00\x85SFATAL\x00VFATAL\x00C08P01\x00Minvalid startup packet layout: expected terminator as last byte\x00Fpostmaster.c\x00L2334\x00RProcessStartupPacket\x00\x00";
    let n_then = |rest: &[u8]| [b"N", rest].concat();
    let table: Vec<Row> = vec![
        ("close at once", vec![], true, vec![], End::Closed),
        ("Terminate first", vec![terminate.clone()], true, vec![], End::Closed),
        ("Terminate first, left open", vec![terminate.clone()], false, vec![], End::Closed),
        ("partial length word", vec![b"\0\0".to_vec()], true, vec![], End::Closed),
        ("length 4", vec![packet(4, 0, b"")], true, vec![], End::Closed),
        ("length 7", vec![packet(7, 0, b"")], true, vec![], End::Closed),
        ("negative length", vec![packet(-1, 0, b"")], true, vec![], End::Closed),
        ("length 10005", vec![packet(10005, V3, user_x)], true, vec![], End::Closed),
        ("length 1 MB", vec![packet(1_000_000, V3, &[b'a'; 20_000])], false, vec![], End::Closed),
        ("body cut short", vec![packet(100, V3, b"user\0")], true, vec![], End::Closed),
        ("stall in the body", vec![packet(100, V3, b"user\0")], false, vec![], End::Open),
        (
            "unknown code",
            vec![pkt(0x1234_5678, b"")],
            false,
            b"E\x00\x00\x00\x8aSFATAL\x00VFATAL\x00C0A000\x00Munsupported frontend protocol 4660.22136: server supports 3.0 to 3.0\x00Fpostmaster.c\x00L2222\x00RProcessStartupPacket\x00\x00".to_vec(),
            End::Closed,
        ),
        (
            "protocol 2.0",
            vec![pkt(0x0002_0000, user_x)],
            false,
            b"EFATAL:  unsupported frontend protocol 2.0: server supports 3.0 to 3.0\n\x00".to_vec(),
            End::Closed,
        ),
        (
            "protocol 4.0",
            vec![pkt(0x0004_0000, user_x)],
            false,
            b"E\x00\x00\x00\x83SFATAL\x00VFATAL\x00C0A000\x00Munsupported frontend protocol 4.0: server supports 3.0 to 3.0\x00Fpostmaster.c\x00L2222\x00RProcessStartupPacket\x00\x00".to_vec(),
            End::Closed,
        ),
        ("SSLRequest then close", vec![pkt(SSL, b"")], true, b"N".to_vec(), End::Closed),
        ("SSLRequest then Terminate", vec![pkt(SSL, b""), terminate.clone()], false, b"N".to_vec(), End::Closed),
        ("SSLRequest of 12 bytes", vec![packet(12, SSL, b"\0\0\0\0")], true, b"N".to_vec(), End::Closed),
        ("SSLRequest twice", vec![pkt(SSL, b""), pkt(SSL, b"")], false, n_then(unsupported_1234_5679), End::Closed),
        (
            "SSLRequest with a StartupMessage behind it",
            vec![[pkt(SSL, b""), pkt(V3, user_x)].concat()],
            false,
            b"NE\x00\x00\x00\xd3SFATAL\x00VFATAL\x00C08P01\x00Mreceived unencrypted data after SSL request\x00DThis could be either a client-software bug or evidence of an attempted man-in-the-middle attack.\x00Fpostmaster.c\x00L2136\x00RProcessStartupPacket\x00\x00".to_vec(),
            End::Closed,
        ),
        ("GSSENCRequest then close", vec![pkt(GSS, b"")], true, b"N".to_vec(), End::Closed),
        (
            "GSSENCRequest twice",
            vec![pkt(GSS, b""), pkt(GSS, b"")],
            false,
            b"NE\x00\x00\x00\x89SFATAL\x00VFATAL\x00C0A000\x00Munsupported frontend protocol 1234.5680: server supports 3.0 to 3.0\x00Fpostmaster.c\x00L2222\x00RProcessStartupPacket\x00\x00".to_vec(),
            End::Closed,
        ),
        (
            "GSSENCRequest with a StartupMessage behind it",
            vec![[pkt(GSS, b""), pkt(V3, user_x)].concat()],
            false,
            b"NE\x00\x00\x00\xe1SFATAL\x00VFATAL\x00C08P01\x00Mreceived unencrypted data after GSSAPI encryption request\x00DThis could be either a client-software bug or evidence of an attempted man-in-the-middle attack.\x00Fpostmaster.c\x00L2189\x00RProcessStartupPacket\x00\x00".to_vec(),
            End::Closed,
        ),
        ("SSLRequest, GSSENCRequest, close", vec![pkt(SSL, b""), pkt(GSS, b"")], true, b"NN".to_vec(), End::Closed),
        ("GSSENCRequest, SSLRequest, close", vec![pkt(GSS, b""), pkt(SSL, b"")], true, b"NN".to_vec(), End::Closed),
        (
            "SSLRequest, GSSENCRequest, SSLRequest",
            vec![pkt(SSL, b""), pkt(GSS, b""), pkt(SSL, b"")],
            false,
            [b"NN", unsupported_1234_5679].concat(),
            End::Closed,
        ),
        ("CancelRequest with an unknown key", vec![pkt(CANCEL, &[0, 0, 0, 1, 0, 0, 0, 2])], false, vec![], End::Closed),
        ("CancelRequest of 12 bytes", vec![pkt(CANCEL, &[0, 0, 0, 1])], false, vec![], End::Closed),
        ("CancelRequest of 20 bytes", vec![pkt(CANCEL, &[0; 12])], false, vec![], End::Closed),
        ("StartupMessage without user", vec![pkt(V3, b"database\0x\0\0")], false, no_user.to_vec(), End::Closed),
        ("StartupMessage without parameters", vec![pkt(V3, b"\0")], false, no_user.to_vec(), End::Closed),
        ("StartupMessage without terminator", vec![pkt(V3, b"user\0x\0")], false, layout.to_vec(), End::Closed),
        ("StartupMessage with a name and no value", vec![pkt(V3, b"user\0")], false, layout.to_vec(), End::Closed),
        ("StartupMessage of the version alone", vec![pkt(V3, b"")], false, layout.to_vec(), End::Closed),
        ("StartupMessage with a user", vec![pkt(V3, user_x)], false, vec![], End::Startup),
    ];
    let mut wrong = Vec::new();
    for (case, writes, eof, postgres, end) in table {
        let want = (without_location(&postgres), end);
        let got = drive(&writes, eof);
        if got != want {
            wrong.push(format!("{case}: latch {got:?}, PostgreSQL {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_huge_length_is_refused_before_anything_is_buffered() {
    let mut buf = BytesMut::from(&b"\x7f\xff\xff\xff"[..]);
    assert!(matches!(
        PreStartup::default().next(&mut buf),
        Step::Close(Ending {
            reason: Reason::InvalidLength,
            ..
        })
    ));
    assert!(buf.capacity() < 1 << 16);
}

#[test]
fn a_startup_message_yields_its_parameters_in_order_and_tls_forbids_gss_after() {
    let mut pre = PreStartup::default();
    let mut buf = BytesMut::from(&pkt(SSL, b"")[..]);
    assert_eq!(pre.next(&mut buf), Step::Encryption(Encryption::Ssl));
    pre.tls_started();
    buf.extend_from_slice(&pkt(GSS, b""));
    assert!(matches!(
        pre.next(&mut buf),
        Step::Close(Ending {
            reason: Reason::UnsupportedProtocol,
            ..
        })
    ));
    let mut buf = BytesMut::from(&pkt(0x0003_0002, b"user\0u\0_pq_.x\0y\0database\0d\0\0")[..]);
    let Step::Startup(s) = PreStartup::default().next(&mut buf) else {
        panic!("no startup")
    };
    assert_eq!((s.major, s.minor), (3, 2));
    assert_eq!(s.get("database"), Some("d"));
    assert_eq!(s.params.len(), 3);
    // Without a user, a newer minor version is negotiated first, as PostgreSQL does.
    let mut buf = BytesMut::from(&pkt(0x0003_0001, b"_pq_.x\0y\0\0")[..]);
    let Step::Close(e) = PreStartup::default().next(&mut buf) else {
        panic!("not refused")
    };
    assert_eq!(e.reason, Reason::NoUser);
    assert_eq!(&e.reply[..1], b"v");
}
