//! `latch upgrade --pid PID`: start the latch binary on disk with the running agent's own
//! arguments; it takes over from PID (see `latch::upgrade`). Waits until the new agent is ready
//! (exit 0) or has failed (exit 1; the running agent carries on). systemd's `ExecReload`.
use std::{
    ffi::OsString,
    io::Read as _,
    os::{fd::AsRawFd as _, unix::ffi::OsStringExt as _, unix::process::CommandExt as _},
    process::{Command, ExitCode},
};

use anyhow::Context as _;

pub fn main(pid: u32) -> anyhow::Result<ExitCode> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("reading the command line of process {pid}"))?;
    let args: Vec<OsString> = cmdline
        .split(|b| *b == 0)
        .skip(1)
        .filter(|a| !a.is_empty())
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    anyhow::ensure!(
        args.first().is_some_and(|a| a == "agent"),
        "process {pid} is not a latch agent"
    );
    let exe = std::env::current_exe().context("finding this executable")?;
    let (read, write) = nix::unistd::pipe().context("pipe")?;
    nix::fcntl::fcntl(
        &read,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("fcntl")?;
    let mut cmd = Command::new(&exe);
    cmd.args(&args).env(
        latch::upgrade::systemd::READY_FD_ENV,
        write.as_raw_fd().to_string(),
    );
    // SAFETY: setsid is async-signal-safe; the new agent outlives this command in a session
    // of its own.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    drop(write);
    let mut byte = [0u8; 1];
    let mut read = std::fs::File::from(read);
    match read.read(&mut byte) {
        Ok(1) => {
            println!("agent {} took over from {pid}", child.id());
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            let status = child.wait().context("waiting for the new agent")?;
            eprintln!("latch: the new agent failed to start ({status}); agent {pid} carries on");
            Ok(ExitCode::FAILURE)
        }
    }
}
