//! Builds `latch-ebpf` for the BPF target with bpf-linker so the object can be embedded.
//!
//! aya-build builds into the directory it is given as `OUT_DIR`. Every profile and target the
//! agent is built for (check, dev, test, the static musl binary) has an `OUT_DIR` of its own,
//! so each used to build `core` and the programs from scratch (25–45 s each on two CPUs). They
//! all get the same object, so it is built once, in `<target>/ebpf`, under a lock, and copied
//! into each `OUT_DIR`.
use std::{fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The name of the object: latch-ebpf's binary.
const OBJECT: &str = "latch";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let shared = metadata.target_directory.join("ebpf").into_std_path_buf();
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "latch-ebpf")
        .ok_or_else(|| anyhow!("latch-ebpf package not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    fs::create_dir_all(&shared).with_context(|| format!("create {}", shared.display()))?;
    // Build scripts of different units run at once; the object is written and read under it.
    let lock = fs::File::create(shared.join(".lock")).context("create the eBPF build lock")?;
    lock.lock().context("take the eBPF build lock")?;
    // SAFETY: a build script's main thread, before it starts any other thread; aya-build reads
    // OUT_DIR to know where to build.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "latch-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )?;
    fs::copy(shared.join(OBJECT), out_dir.join(OBJECT))
        .with_context(|| format!("copy the eBPF object into {}", out_dir.display()))?;
    Ok(())
}
