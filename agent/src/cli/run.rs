//! `latch run -- CMD`: intercept one command's connections for as long as it runs.
use std::{os::unix::process::CommandExt as _, process::ExitCode, time::Duration};

use anyhow::Context as _;
use latch::{
    cgroup::{self, OwnedCgroup, RUN_PREFIX},
    runtime::{Options, Running},
};
use tokio::signal::unix::{SignalKind, signal};

use super::{RunArgs, load_config, raise_nofile_limit};

/// How long connections may finish after CMD exits.
const GRACE: Duration = Duration::from_secs(2);

pub async fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = match load_config(&args.data.policies, &args.data.allow_exec, true) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let nofile = raise_nofile_limit();
    let root = cgroup::v2_mount()?;
    for stale in cgroup::remove_stale_runs(&root) {
        tracing::info!(path = %stale.display(), "removed a cgroup left by a latch run that died");
    }
    let cg = OwnedCgroup::create(&root, &format!("{RUN_PREFIX}{}", std::process::id()))?;
    let opts = Options {
        cgroup: cg.path().to_owned(),
        listen: vec![
            "127.0.0.1:0".parse().expect("literal address"),
            "[::1]:0".parse().expect("literal address"),
        ],
        admin: args.admin,
        mark: args.data.mark,
        limits: args.data.limits(nofile)?,
        secrets: args.data.secrets(),
        audit: args.data.audit(),
        fast_path: args.data.fast_path,
        fail_mode: Default::default(),
        keep_interception: false,
        instance: format!("run-{}", std::process::id()),
        runtime_cgroup_roots: args.data.runtime_cgroup_roots,
        kernel_btf: args.data.kernel_btf,
        node_name: None,
    };
    let running = Running::start(&config, &opts).await?;
    // CMD still gets root's usual capabilities (the bounding set stays); latch itself keeps
    // what brokering and removing its cgroup need.
    let caps = latch::privileges::drop_to(
        &latch::privileges::run_keeps(running.needs()),
        latch::privileges::Bounding::Keep,
    )?;
    tracing::debug!(kept = ?latch::privileges::names(&caps), "capabilities dropped");
    // CMD keeps its user's environment, less what the configuration reads secrets from.
    let scrub = latch::secrets::child_env::Scrub::of(&config);
    let status = run_child(&args.command, &cg, &scrub).await;
    let totals = running.stop(GRACE).await;
    tracing::info!(
        relayed = totals.relayed,
        refused = totals.refused,
        failed = totals.failed,
        "session ended"
    );
    cg.remove()?;
    let status = status?;
    Ok(ExitCode::from(exit_code(status)))
}

/// Starts CMD inside the cgroup and waits for it, passing SIGTERM and SIGHUP on. (SIGINT from
/// a terminal already reaches CMD through the process group, so latch only waits.)
async fn run_child(
    command: &[std::ffi::OsString],
    cg: &OwnedCgroup,
    scrub: &latch::secrets::child_env::Scrub,
) -> anyhow::Result<std::process::ExitStatus> {
    let procs = cg.procs_handle()?;
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    scrub.apply(&mut cmd);
    // SAFETY: the closure only calls write(2) on an fd opened before fork.
    unsafe {
        cmd.as_std_mut()
            .pre_exec(move || cgroup::enter_from_child(&procs));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", command[0]))?;
    let pid = child.id().map(|p| p as i32);
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let forward = tokio::select! {
            status = child.wait() => return Ok(status?),
            _ = term.recv() => Some(libc::SIGTERM),
            _ = hup.recv() => Some(libc::SIGHUP),
            _ = int.recv() => None,
        };
        if let (Some(sig), Some(pid)) = (forward, pid) {
            // SAFETY: plain kill(2) on the child we started and have not yet reaped.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        _ => 1,
    }
}
