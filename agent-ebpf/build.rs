use which::which;

/// Rebuild when the bpf-linker binary changes: the build uses it without cargo knowing.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
