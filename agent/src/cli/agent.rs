//! `latch agent`.
use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use latch::runtime::{self, Options, Running};
use tokio::signal::unix::{SignalKind, signal};

use super::{AgentArgs, load_config, raise_nofile_limit};

pub async fn main(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = match load_config(&args.data.policies) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    raise_nofile_limit();
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => runtime::default_cgroup().context("finding the cgroup v2 root")?,
    };
    anyhow::ensure!(
        runtime::is_cgroup_dir(&cgroup),
        "{} is not a cgroup v2 directory",
        cgroup.display()
    );
    let opts = Options {
        cgroup,
        listen: args.listen,
        admin: Some(args.admin),
        mark: args.data.mark,
        limits: args.data.limits(),
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = Running::start(&config, &opts).await?;
    tracing::info!(
        listeners = ?running.listeners(),
        admin = ?running.admin_addr(),
        "ready"
    );
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let totals = running.stop(Duration::from_secs(args.grace_period)).await;
    tracing::info!(
        relayed = totals.relayed,
        refused = totals.refused,
        failed = totals.failed,
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
}
