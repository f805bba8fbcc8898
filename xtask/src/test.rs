//! `cargo xtask test`: setup, lint, build the binaries the tests spawn, run the whole suite.

use crate::proc::{self, run};
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and clippy (quick local loops).
    #[arg(long)]
    no_lint: bool,
    /// Passed to `cargo test` (e.g. a test name filter, then `-- --nocapture`); with any, the
    /// test binaries run as `cargo test` runs them, one after another.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// The eBPF crate only builds for the bpf target (agent/build.rs does that); keep it out of host commands.
const EXCLUDE: [&str; 3] = ["--workspace", "--exclude", "latch-ebpf"];

pub fn run_tests(args: &Args) -> Result<()> {
    proc::require_root("test")?;
    crate::setup::run_setup()?;
    if !args.no_lint {
        banner("format");
        run(proc::cargo().args(["fmt", "--all", "--", "--check"]))?;
        banner("clippy");
        run(proc::cargo().arg("clippy").args(EXCLUDE).args([
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    let bin = proc::target_dir().join("debug");
    if !args.cargo_test_args.is_empty() {
        // A filtered `cargo test` may not build the binaries the tests spawn; the whole run
        // does (they are bin targets of packages with integration tests), with the tests'
        // features, so building them here first would build part of the graph twice.
        banner("build binaries");
        run(proc::cargo().args(["build", "-p", "latch", "-p", "latch-tests", "--bins"]))?;
        check_binaries(&bin);
    }
    // The container image's static binary (tests/tests/packaging_container.rs), dev profile:
    // a second build of the workspace for the musl target, incremental after the first.
    banner("build the static binary (musl)");
    let static_target = crate::setup::STATIC_TARGET;
    run(proc::cargo().args([
        "build",
        "-p",
        "latch",
        "--bin",
        "latch",
        "--target",
        static_target,
    ]))?;
    let static_bin = proc::target_dir()
        .join(static_target)
        .join("debug")
        .join("latch");
    // Client libraries' own test suites (tests/tests/client_suites.rs).
    banner("build client libraries' test suites");
    let suites = crate::client_suites::build()?;
    banner("test");
    let mut envs: Vec<(String, std::path::PathBuf)> =
        suites.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    envs.push(("LATCH_BIN".into(), bin.join("latch")));
    envs.push(("LATCH_STATIC_BIN".into(), static_bin));
    envs.push(("LATCH_PROBE_BIN".into(), bin.join("latch-probe")));
    if args.cargo_test_args.is_empty() {
        // Every test binary, three at a time (xtask/src/test_run.rs), then the doc tests.
        let plan = crate::test_run::build(&[&["test"][..], &EXCLUDE].concat())?;
        check_binaries(&bin);
        plan.run(&envs)?;
        run(proc::cargo().arg("test").args(EXCLUDE).arg("--doc"))?;
    } else {
        run(proc::cargo()
            .envs(envs)
            .arg("test")
            .args(EXCLUDE)
            .arg("--no-fail-fast")
            .args(&args.cargo_test_args))?;
    }
    banner("all tests passed");
    Ok(())
}

/// Warns about a binary the tests spawn that is missing.
fn check_binaries(bin: &std::path::Path) {
    for b in ["latch", "latch-probe"] {
        if !bin.join(b).is_file() {
            println!(
                "xtask: warning: {} was not built; tests that spawn it will fail",
                bin.join(b).display()
            );
        }
    }
}

fn banner(what: &str) {
    println!("\n==> {what}");
}
