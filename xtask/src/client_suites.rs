//! Client libraries' own test suites, built for `tests/tests/client_suites.rs` to run through
//! latch (no password) and directly (with it).
//!
//! Rust: each suite is the library's published crate, the version `Cargo.lock` pins for our own
//! tests, copied out of cargo's registry into `target/client-suites/` and built there with the
//! crate's own `Cargo.lock` (`cargo test --lib --no-run --locked`). The test binary is copied
//! to `target/client-suites/<package>-tests`, and its path also goes to the tests in an
//! environment variable. Nothing is rebuilt when it is already current.
//!
//! Python: the source distribution of the installed version of the library (`pip download
//! --no-binary`), unpacked into `target/client-suites/<package>`; its tests run
//! against the installed library with the test tools `cargo xtask setup` installs. (MySQL
//! Connector/Python's runner builds and tests the source itself: its version is pinned here.)

use crate::proc::{self, run};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A library whose test binary the end-to-end tests run.
pub struct Suite {
    /// The package name in `Cargo.lock`.
    pub package: &'static str,
    /// Which of its test targets: `cargo test` arguments, and the target's name.
    pub select: &'static [&'static str],
    pub target: &'static str,
    /// The variable that tells the tests where the built binary is.
    pub env: &'static str,
}

pub const SUITES: &[Suite] = &[
    // Its tests live in the library (`#[cfg(test)]` modules). With rustls (ring), so that
    // its `SSL=1` mode runs.
    Suite {
        package: "mysql_async",
        select: &[
            "--lib",
            "--no-default-features",
            "--features",
            "default-rustls-ring",
        ],
        target: "mysql_async",
        env: "LATCH_SUITE_MYSQL_ASYNC",
    },
    // Its tests are the integration test `tests/test/main.rs`.
    Suite {
        package: "tokio-postgres",
        select: &["--test", "test"],
        target: "test",
        env: "LATCH_SUITE_TOKIO_POSTGRES",
    },
];

/// A Python library whose source distribution carries its tests.
pub struct PySuite {
    /// The distribution's name on PyPI, and the module it installs.
    pub package: &'static str,
    pub module: &'static str,
    /// The variable that tells the tests where the unpacked source is.
    pub env: &'static str,
    /// The version, for a suite that tests its own build from the source rather than the
    /// installed library (`None`: the installed library's version).
    pub version: Option<&'static str>,
}

pub const PY_SUITES: &[PySuite] = &[
    PySuite {
        package: "requests",
        module: "requests",
        env: "LATCH_SUITE_REQUESTS",
        version: None,
    },
    PySuite {
        package: "aiomysql",
        module: "aiomysql",
        env: "LATCH_SUITE_AIOMYSQL",
        version: None,
    },
    PySuite {
        package: "asyncpg",
        module: "asyncpg",
        env: "LATCH_SUITE_ASYNCPG",
        version: None,
    },
    PySuite {
        package: "httpx",
        module: "httpx",
        env: "LATCH_SUITE_HTTPX",
        version: None,
    },
    // The library is the psycopg2-binary wheel; its tests are in psycopg2's source.
    PySuite {
        package: "psycopg2",
        module: "psycopg2",
        env: "LATCH_SUITE_PSYCOPG2",
        version: None,
    },
    PySuite {
        package: "pg8000",
        module: "pg8000",
        env: "LATCH_SUITE_PG8000",
        version: None,
    },
    // MySQL Connector/Python: its runner (`unittests.py`) builds the library from the source
    // beside it and tests that build, so nothing is installed for it.
    PySuite {
        package: "mysql-connector-python",
        module: "mysql.connector",
        env: "LATCH_SUITE_MYSQL_CONNECTOR",
        version: Some("26.10.0"),
    },
];

/// Builds or fetches every suite; returns (variable, path) pairs for the test run.
pub fn build() -> Result<Vec<(&'static str, PathBuf)>> {
    let mut built = build_rust()?;
    let out = proc::target_dir().join("client-suites");
    for suite in PY_SUITES {
        built.push((suite.env, python_source(suite, &out)?));
    }
    Ok(built)
}

/// The unpacked source distribution of `suite`'s library: its pinned version, else the
/// installed one.
fn python_source(suite: &PySuite, out: &Path) -> Result<PathBuf> {
    let version = match suite.version {
        Some(v) => v.to_owned(),
        None => proc::output(Command::new("python3").args([
            "-c",
            &format!("import {0}; print({0}.__version__)", suite.module),
        ]))?,
    };
    // psycopg2 appends its build options ("2.9.13 (dt dec pq3 ext lo64)").
    let version = version.split_whitespace().next().unwrap_or_default();
    let dir = out.join(suite.package);
    let stamp = dir.join(".unpacked");
    if std::fs::read_to_string(&stamp).is_ok_and(|v| v == version) {
        return Ok(dir);
    }
    let download = out.join("downloads");
    std::fs::create_dir_all(&download)?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-binary", ":all:", "--no-deps", "--dest"])
        .arg(&download)
        .arg(format!("{}=={version}", suite.package)))?;
    let archive = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().is_some_and(|n| {
                // Newer source distributions spell the name with '_' (PEP 625).
                let n = n.to_string_lossy().to_lowercase().replace('_', "-");
                n.starts_with(&format!("{}-{version}", suite.package)) && n.ends_with(".tar.gz")
            })
        })
        .with_context(|| format!("pip downloaded no source archive of {}", suite.package))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .args(["--strip-components=1", "-C"])
        .arg(&dir))?;
    // The library's own source, beside the tests, would shadow the installed library (pytest
    // puts the tree on `sys.path`), and a compiled one (asyncpg) does not import from source.
    let source = dir.join(suite.module);
    if source.is_dir() {
        std::fs::remove_dir_all(&source)?;
    }
    std::fs::write(stamp, version)?;
    Ok(dir)
}

/// Builds every Rust suite; returns (variable, binary) pairs.
fn build_rust() -> Result<Vec<(&'static str, PathBuf)>> {
    let metadata =
        proc::output(proc::cargo().args(["metadata", "--format-version", "1", "--locked"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("parse `cargo metadata`")?;
    let out = proc::target_dir().join("client-suites");
    let mut built = Vec::new();
    for suite in SUITES {
        let (version, manifest) = package(&metadata, suite.package)?;
        let src = manifest.parent().context("a manifest has a directory")?;
        let dir = out.join(format!("{}-{version}", suite.package));
        copy_once(src, &dir)?;
        let bin = build_tests(&dir, &out.join("target"), suite)?;
        // A stable name, where the tests look when the variable is not set.
        let stable = out.join(format!("{}-tests", suite.package));
        std::fs::copy(&bin, &stable)
            .with_context(|| format!("copy {} to {}", bin.display(), stable.display()))?;
        built.push((suite.env, stable));
    }
    Ok(built)
}

/// The version and manifest path of `name` in the workspace's dependency graph.
fn package(metadata: &serde_json::Value, name: &str) -> Result<(String, PathBuf)> {
    let packages = metadata["packages"]
        .as_array()
        .context("`cargo metadata` has no packages")?;
    let found: Vec<_> = packages.iter().filter(|p| p["name"] == name).collect();
    let [p] = found.as_slice() else {
        bail!(
            "expected one `{name}` in the workspace's dependencies, found {}",
            found.len()
        );
    };
    let version = p["version"].as_str().context("a package has a version")?;
    let manifest = p["manifest_path"]
        .as_str()
        .context("a package has a manifest path")?;
    Ok((version.to_owned(), PathBuf::from(manifest)))
}

/// Copies the crate's sources to `dir` unless an earlier run did. The copy gets an empty
/// `[workspace]`: it lies under our target directory, and cargo would otherwise take it for a
/// member of our workspace.
fn copy_once(src: &Path, dir: &Path) -> Result<()> {
    if dir.join(".copied").exists() {
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.parent().context("a directory has a parent")?)?;
    run(Command::new("cp").arg("-r").arg(src).arg(dir))?;
    let manifest = dir.join("Cargo.toml");
    let mut text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    text.push_str("\n[workspace]\n");
    std::fs::write(&manifest, text)?;
    std::fs::write(dir.join(".copied"), "")?;
    Ok(())
}

/// `cargo test --no-run` of the suite's target in `dir`: the path of its test binary.
fn build_tests(dir: &Path, target: &Path, suite: &Suite) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .arg("test")
        .args(suite.select)
        .args(["--no-run", "--locked"])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit());
    println!(
        "+ (in {}) cargo test {} --no-run --locked",
        dir.display(),
        suite.select.join(" ")
    );
    let out = cmd.output().context("run cargo")?;
    let package = suite.package;
    if !out.status.success() {
        bail!("building {package}'s tests failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["profile"]["test"] == true
                && m["target"]["name"] == suite.target
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo named no test binary for {package}"))
}
