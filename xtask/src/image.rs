//! `cargo xtask image`: the container image of deploy/Containerfile, built locally with buildah
//! from a static (musl) release `latch` (no registry, no builder image: see the Containerfile).

use crate::proc::{self, run};
use crate::setup::STATIC_TARGET;
use anyhow::{Context, Result};
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// The image's name and tag.
    #[arg(long, default_value = "localhost/latch:dev")]
    tag: String,
}

pub fn run_image(args: &Args) -> Result<()> {
    run(proc::cargo().args([
        "build",
        "--release",
        "-p",
        "latch",
        "--bin",
        "latch",
        "--target",
        STATIC_TARGET,
    ]))?;
    let bin = proc::target_dir()
        .join(STATIC_TARGET)
        .join("release")
        .join("latch");
    let ctx = proc::target_dir().join("image-context");
    std::fs::create_dir_all(&ctx).with_context(|| format!("creating {}", ctx.display()))?;
    std::fs::copy(&bin, ctx.join("latch")).with_context(|| format!("copying {}", bin.display()))?;
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        ctx.join("ca-certificates.crt"),
    )
    .context("copying /etc/ssl/certs/ca-certificates.crt (Debian ca-certificates)")?;
    run(Command::new("buildah")
        .args(["bud", "--tag", &args.tag, "--file"])
        .arg(proc::root().join("deploy/Containerfile"))
        .arg(&ctx))?;
    println!(
        "xtask: built {} (load it into kind with: podman save {0} -o latch.tar && kind load image-archive latch.tar)",
        args.tag
    );
    Ok(())
}
