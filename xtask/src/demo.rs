//! `cargo xtask demo`: psql, unmodified, reaches a throw-away PostgreSQL 15 through latch.

use crate::pg::Postgres;
use crate::proc::{self, TempDir};
use anyhow::{Context, Result};
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

/// The "remote" database address (loopback alias, seen by the connect hooks like any other).
const DB_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const QUERY: &str = "select 'hello through latch' as greeting, inet_server_addr(), now()";

pub fn run_demo() -> Result<i32> {
    proc::require_root("demo")?;
    crate::setup::run_setup()?;
    let latch = proc::latch_bin(false)?;

    // Declared before the server so it is removed after the server has stopped.
    let tmp = TempDir::new("latch-demo")?;
    let mut pg = Postgres::start(tmp.path(), DB_ADDR)?;
    let policy = crate::policy::write_tcp(tmp.path(), "demo-postgres", DB_ADDR, pg.port)?;
    println!(
        "demo: policy {} (protocol tcp: latch relays {DB_ADDR}:{}; trust auth until the postgres connector lands)",
        policy.display(),
        pg.port
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
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            "postgres",
        ])
        .args(["-c", QUERY])
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "5");
    println!(
        "demo: {} run --policy {} -- psql -h {host} -p {port} -U postgres -c \"{QUERY}\"\n      (LATCH_LOG=info shows the broker's side)\n",
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
        println!("demo: psql exited 0 inside `latch run`");
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
