//! The sans-IO PostgreSQL code's cost per connection and per byte: parsing a startup packet
//! and rewriting it, framing a stream of DataRows, and a whole SCRAM-SHA-256 login replayed
//! from the captured PostgreSQL 15 exchange (dominated by PBKDF2 with 4096 iterations).
use bytes::{BufMut as _, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use latch_pg::{
    auth::{ClientAuth, TargetTls},
    frame,
    handshake::{Event, TargetHandshake},
    startup::{self, Initial, MAX_STARTUP_LEN},
};

const PSQL_STARTUP: &[u8] = b"\0\0\0\x4f\0\x03\0\0user\0alice\0database\0orders\0application_name\0psql\0client_encoding\0UTF8\0\0";

fn server_messages() -> Vec<Vec<u8>> {
    include_str!("../src/testdata/scram_pg15.txt")
        .lines()
        .filter(|l| l.starts_with("S "))
        .map(|l| {
            let h = &l[2..];
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    c.bench_function("pg_startup_parse_and_rewrite", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(PSQL_STARTUP);
            let Some(Initial::Startup(s)) = startup::parse(&mut buf, MAX_STARTUP_LEN).unwrap()
            else {
                unreachable!()
            };
            startup::rewrite(&s, Some("orders_rw")).unwrap()
        })
    });

    // 1 MiB of 100-byte DataRows.
    let mut rows = BytesMut::new();
    while rows.len() < 1 << 20 {
        rows.put_u8(b'D');
        rows.put_i32(99);
        rows.put_bytes(b'x', 95);
    }
    let mut g = c.benchmark_group("pg_frame");
    g.throughput(Throughput::Bytes(rows.len() as u64));
    g.bench_function("parse_1MiB_of_DataRows", |b| {
        b.iter(|| {
            let mut buf = rows.clone();
            let mut n = 0;
            while let Some(_f) = frame::parse(&mut buf, 1 << 20).unwrap() {
                n += 1;
            }
            n
        })
    });
    g.finish();

    let msgs = server_messages();
    c.bench_function("pg_scram_login_replay", |b| {
        b.iter(|| {
            let auth = ClientAuth::new("vector_user", Some("pencil"), TargetTls::Plain)
                .with_nonce("rOprNGfwEbeRWgbNEkqOlatch");
            let mut hs = TargetHandshake::new(auth);
            for m in &msgs {
                let mut buf = BytesMut::from(&m[..]);
                let f = frame::parse(&mut buf, 1 << 16).unwrap().unwrap();
                if let Event::Ready(_) = hs.on_frame(f).unwrap() {
                    break;
                }
            }
            hs.is_done()
        })
    });
}

/// What one SCRAM login costs latch on the client side: PBKDF2 (4096 rounds, PostgreSQL's
/// default) when the keys must be derived, a lookup when the cache has them.
fn scram_keys(c: &mut Criterion) {
    use latch_pg::{scram::ScramKeys, scram_cache::ScramKeyCache};
    let salt = b"0123456789abcdef";
    let mut g = c.benchmark_group("scram_keys");
    g.bench_function("derive_4096", |b| {
        b.iter(|| ScramKeys::derive(std::hint::black_box(b"s3cret"), salt, 4096))
    });
    let cache = ScramKeyCache::default();
    cache.keys("127.0.0.2:5432/app", b"s3cret", salt, 4096);
    g.bench_function("cached_4096", |b| {
        b.iter(|| {
            cache.keys(
                "127.0.0.2:5432/app",
                std::hint::black_box(b"s3cret"),
                salt,
                4096,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench, scram_keys);
criterion_main!(benches);
