//! `cargo xtask`: set up a machine, run the test suite, the demo and the benchmarks.

mod bench;
mod bench_conns;
mod bench_cpu;
mod bench_http;
mod bench_my;
mod bench_netns;
mod bench_pg;
mod client_suites;
mod demo;
mod image;
mod pg;
mod policy;
mod proc;
mod setup;
mod setup_mysql;
mod test;
mod test_run;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "latch development tasks (run as root)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything a fresh machine needs (idempotent; fast when done before).
    Setup,
    /// Setup, fmt, clippy, build and run the whole (privileged) test suite.
    Test(test::Args),
    /// Relay psql through latch to a throw-away PostgreSQL 15.
    Demo,
    /// Throughput of one TCP connection (direct vs latch vs HAProxy vs socat) and PostgreSQL
    /// (pgbench, COPY: direct vs latch vs pgbouncer).
    Bench(bench::Args),
    /// Build the container image (deploy/Containerfile) from a static release `latch`.
    Image(image::Args),
}

fn main() {
    proc::install_signal_handlers();
    let cli = Cli::parse();
    let result: Result<i32> = match cli.cmd {
        Cmd::Setup => setup::run_setup().map(|()| 0),
        Cmd::Test(args) => test::run_tests(&args).map(|()| 0),
        Cmd::Demo => demo::run_demo(),
        Cmd::Bench(args) => bench::run_bench(&args).map(|()| 0),
        Cmd::Image(args) => image::run_image(&args).map(|()| 0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::exit(1);
        }
    }
}
