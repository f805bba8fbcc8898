//! Where the binaries under test are.
use std::path::PathBuf;

/// The workspace's target directory (`CARGO_TARGET_DIR`, else `target/` at the root).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn find(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let path = target_dir().join("debug").join(name);
    if !path.exists() {
        panic!(
            "{} not found: build it first (`cargo xtask test` does), or set {env}",
            path.display()
        );
    }
    path
}

/// The `latch` binary.
pub fn latch() -> PathBuf {
    find("LATCH_BIN", "latch")
}

/// The `latch-probe` test client.
pub fn probe() -> PathBuf {
    find("LATCH_PROBE_BIN", "latch-probe")
}

/// An external program the tests need, found on PATH (or in `extra` directories).
pub fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` not found: install {package} (`cargo xtask setup` does)")
}

/// The static (musl) `latch` that deploy/Containerfile puts in the image. `cargo xtask test`
/// builds it (`cargo build -p latch --bin latch --target x86_64-unknown-linux-musl`, the dev
/// profile) and sets `LATCH_STATIC_BIN`.
pub fn latch_static() -> PathBuf {
    if let Some(p) = std::env::var_os("LATCH_STATIC_BIN") {
        return PathBuf::from(p);
    }
    let path = target_dir().join("x86_64-unknown-linux-musl/debug/latch");
    if !path.exists() {
        panic!(
            "{} not found: build it first (`cargo build -p latch --bin latch --target \
             x86_64-unknown-linux-musl`; `cargo xtask test` does), or set LATCH_STATIC_BIN",
            path.display()
        );
    }
    path
}
