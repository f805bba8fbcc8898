//! `cargo xtask demo`: psql, unmodified, reaches a throw-away PostgreSQL 15 through latch.

use crate::pg::Postgres;
use crate::proc::{self, TempDir};
use anyhow::{Context, Result};
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

/// The "remote" database address (loopback alias, seen by the connect hooks like any other).
const DB_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const QUERY: &str = "select 'hello through latch' as greeting, current_user as authenticated_as, \
                     inet_server_addr(), now()";

pub fn run_demo() -> Result<i32> {
    proc::require_root("demo")?;
    crate::setup::run_setup()?;
    let latch = proc::latch_bin(false)?;

    // Declared before the server so it is removed after the server has stopped. The server's
    // directory belongs to the postgres user; latch's policy and secrets live in one of root's
    // (latch refuses policy files anyone else controls).
    let tmp = TempDir::new("latch-demo")?;
    let latch_dir = TempDir::new("latch-demo-policy")?;
    let mut pg = Postgres::start(tmp.path(), DB_ADDR)?;
    // The password exists in PostgreSQL and in latch's secret store — and nowhere else.
    let password = random_hex(16)?;
    pg.admin_sql(
        tmp.path(),
        &format!("create role orders_app login password '{password}'"),
    )?;
    let secrets = latch_dir.path().join("secrets.yaml");
    write_private(
        &secrets,
        &format!("orders-db:\n  username: orders_app\n  password: \"{password}\"\n"),
    )?;
    let policy = latch_dir.path().join("demo-postgres.yaml");
    // The one thing the demo relaxes, said where it is relaxed: its throw-away server has no
    // certificate, so the leg to it is plain text (a policy verifies the server by default).
    std::fs::write(
        &policy,
        crate::policy::postgres("demo-postgres", DB_ADDR, pg.port, &secrets)
            + crate::policy::DEMO_TLS,
    )
    .with_context(|| format!("writing {}", policy.display()))?;
    println!(
        "demo: secret store {} (mode 0600) holds the only copy of orders_app's password",
        secrets.display()
    );
    println!(
        "demo: policy {}: protocol postgres to {DB_ADDR}:{}, credentials from the store",
        policy.display(),
        pg.port
    );
    println!(
        "demo: relaxed for the demo: tls.mode disable (the throw-away server has no certificate; \
         policies verify the server by default)"
    );

    let (host, port) = (DB_ADDR.to_string(), pg.port.to_string());
    let mut cmd = Command::new(&latch);
    cmd.arg("run")
        .arg("--policy")
        .arg(&policy)
        .args([
            "--",
            "/usr/bin/psql",
            "-X",
            "-w",
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            "nobody_in_particular",
            "-d",
            "postgres",
        ])
        .args(["-c", QUERY])
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .env("PGCONNECT_TIMEOUT", "5");
    println!(
        "demo: {} run --policy {} -- psql -w -h {host} -p {port} -U nobody_in_particular -c \"{QUERY}\"\n      \
         (psql has no password and -w forbids prompting; LATCH_LOG=info shows the broker's side)\n",
        latch.display(),
        policy.display()
    );
    let status = proc::wait_child(
        cmd.spawn()
            .with_context(|| format!("starting {}", latch.display()))?,
        Some(Duration::from_secs(60)),
    )
    .context("latch run")?;
    let code = proc::exit_code(status);
    println!();
    if status.success() {
        println!("demo: psql exited 0 inside `latch run`, authenticated by latch as orders_app");
    } else {
        println!(
            "demo: latch run / psql failed ({status}); postgres log:\n{}",
            pg.log_text()
        );
    }
    pg.stop();
    drop(tmp);
    println!("demo: postgres stopped, temp dir removed");
    Ok(code)
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a file only its owner can read (latch refuses group- or world-readable stores).
fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}
