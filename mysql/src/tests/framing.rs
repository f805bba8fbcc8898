//! Framing: chunking at 0xFFFFFF, bounds, sequence ids.
use bytes::BytesMut;

use crate::constants::MAX_CHUNK;
use crate::error::FrameError;
use crate::frame::{self, Packet, Seq};

#[test]
fn small_packet_round_trips_and_waits_for_more() {
    let mut out = BytesMut::new();
    assert_eq!(frame::encode(b"\x03SELECT 1", 0, &mut out), 1);
    assert_eq!(&out[..], b"\x09\x00\x00\x00\x03SELECT 1");
    // Every strict prefix is "need more", and consumes nothing.
    for n in 0..out.len() {
        let mut part = BytesMut::from(&out[..n]);
        assert_eq!(frame::parse(&mut part, 1024).unwrap(), None, "prefix {n}");
        assert_eq!(part.len(), n);
    }
    let mut buf = out.clone();
    buf.extend_from_slice(b"\x01\x00\x00\x01\x0e");
    let p = frame::parse(&mut buf, 1024).unwrap().unwrap();
    assert_eq!((p.seq, &p.payload[..]), (0, &b"\x03SELECT 1"[..]));
    let p2 = frame::parse(&mut buf, 1024).unwrap().unwrap();
    assert_eq!((p2.seq, &p2.payload[..]), (1, &b"\x0e"[..]));
    assert!(buf.is_empty());
}

#[test]
fn empty_payload_is_one_empty_chunk() {
    let mut out = BytesMut::new();
    assert_eq!(frame::encode(b"", 5, &mut out), 6);
    assert_eq!(&out[..], b"\x00\x00\x00\x05");
    let p = frame::parse(&mut out, 0).unwrap().unwrap();
    assert!(p.payload.is_empty());
    assert_eq!(p.next_seq(), 6);
}

#[test]
fn payload_of_exactly_0xffffff_ends_with_an_empty_chunk() {
    let payload = vec![0xAB; MAX_CHUNK];
    let mut out = BytesMut::new();
    assert_eq!(
        frame::encode(&payload, 254, &mut out),
        0,
        "two chunks, wrapping 255 -> 0"
    );
    assert_eq!(out.len(), 4 + MAX_CHUNK + 4);
    assert_eq!(&out[..4], b"\xff\xff\xff\xfe");
    assert_eq!(&out[4 + MAX_CHUNK..], b"\x00\x00\x00\xff");
    let p = frame::parse(&mut out, 1 << 25).unwrap().unwrap();
    assert_eq!(
        (p.seq, p.payload.len(), p.chunks(), p.next_seq()),
        (254, MAX_CHUNK, 2, 0)
    );
    assert!(p.payload == payload);
    assert!(out.is_empty());
}

#[test]
fn long_payload_is_split_and_joined() {
    let payload: Vec<u8> = (0..MAX_CHUNK + 10).map(|i| i as u8).collect();
    let mut out = BytesMut::new();
    assert_eq!(frame::encode(&payload, 0, &mut out), 2);
    assert_eq!(&out[4 + MAX_CHUNK..4 + MAX_CHUNK + 4], b"\x0a\x00\x00\x01");
    // Before the last chunk is complete: need more.
    let mut part = BytesMut::from(&out[..out.len() - 1]);
    assert_eq!(frame::parse(&mut part, 1 << 25).unwrap(), None);
    let p = frame::parse(&mut out, 1 << 25).unwrap().unwrap();
    assert!(p.payload == payload);
    let mut seq = Seq::new();
    seq.check(&p).unwrap();
    assert_eq!(seq.next(), 2);
}

#[test]
fn oversized_length_is_refused_before_buffering() {
    // A header announcing 16 MiB - 1 with a 1 KiB limit: refused at once, nothing reserved.
    let mut buf = BytesMut::from(&b"\xff\xff\xff\x00"[..]);
    let cap = buf.capacity();
    assert_eq!(
        frame::parse(&mut buf, 1024).unwrap_err(),
        FrameError::TooLarge {
            len: MAX_CHUNK,
            max: 1024
        }
    );
    assert_eq!(
        buf.capacity(),
        cap,
        "no reservation for the announced length"
    );
    // The total of continuation chunks counts: the second header tips it over.
    let mut buf = BytesMut::new();
    buf.extend_from_slice(b"\xff\xff\xff\x00");
    buf.extend_from_slice(&vec![0; MAX_CHUNK]);
    buf.extend_from_slice(b"\x02\x00\x00\x01");
    assert_eq!(
        frame::parse(&mut buf, MAX_CHUNK + 1).unwrap_err(),
        FrameError::TooLarge {
            len: MAX_CHUNK + 2,
            max: MAX_CHUNK + 1
        }
    );
}

#[test]
fn incomplete_packet_reserves_only_what_it_announced() {
    let mut buf = BytesMut::from(&b"\x10\x00\x00\x00abc"[..]);
    assert_eq!(frame::parse(&mut buf, 1024).unwrap(), None);
    assert!(
        buf.capacity() >= 20 && buf.capacity() < 1024,
        "{}",
        buf.capacity()
    );
}

#[test]
fn continuation_with_a_wrong_sequence_id_is_refused() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(b"\xff\xff\xff\x07");
    buf.extend_from_slice(&vec![0; MAX_CHUNK]);
    buf.extend_from_slice(b"\x00\x00\x00\x09");
    assert_eq!(
        frame::parse(&mut buf, 1 << 25).unwrap_err(),
        FrameError::Sequence {
            expected: 8,
            got: 9
        }
    );
}

#[test]
fn seq_refuses_out_of_order_packets_and_writes_in_order() {
    let mut seq = Seq::new();
    let p = |seq, payload: &'static [u8]| Packet {
        seq,
        payload: payload.into(),
    };
    seq.check(&p(0, b"greeting")).unwrap();
    let mut out = BytesMut::new();
    seq.write(b"response", &mut out);
    assert_eq!(out[3], 1);
    assert_eq!(
        seq.check(&p(3, b"ok")).unwrap_err(),
        FrameError::Sequence {
            expected: 2,
            got: 3
        }
    );
    seq.check(&p(2, b"ok")).unwrap();
    seq.reset();
    assert_eq!(seq.next(), 0);
    // Wraps after 255.
    seq.set(255);
    seq.check(&p(255, b"x")).unwrap();
    assert_eq!(seq.next(), 0);
}
