//! `latch agent`.
use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use latch::runtime::{self, Options, Running};
use tokio::signal::unix::{SignalKind, signal};

use super::{AgentArgs, load_config, raise_nofile_limit};

/// Writes the bound addresses (useful with port 0) as JSON, atomically (temp file + rename).
fn write_ready_file(path: &std::path::Path, running: &Running) -> std::io::Result<()> {
    let body = serde_json::json!({
        "pid": std::process::id(),
        "admin": running.admin_addr().map(|a| a.to_string()),
        "listeners": running.listeners().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body.to_string())?;
    std::fs::rename(&tmp, path)
}

/// The custom resources the agent follows, if any.
struct Crs {
    resources: latch::crs::watch::Resources,
    api_store: Option<String>,
}

/// Loads the policy files again, merges the custom resources (each valid one; every one's
/// condition is written back) and applies them; an invalid file set is logged and ignored.
async fn reload(
    running: &Running,
    paths: &[std::path::PathBuf],
    allowed_exec: &[std::path::PathBuf],
    crs: Option<&Crs>,
    cause: &str,
) {
    let config = match latch::config::load_trusted(paths, allowed_exec)
        .and_then(|c| latch::config::require_named_workloads(&c).map(|()| c))
    {
        Ok(config) => config,
        Err(errors) => {
            for error in &errors.0 {
                tracing::error!(%error, "invalid configuration");
            }
            tracing::error!(
                cause,
                errors = errors.0.len(),
                "reload rejected; the running configuration stays"
            );
            return;
        }
    };
    for warning in &config.warnings {
        tracing::warn!(%warning, "configuration warning");
    }
    let config = match crs {
        Some(crs) => {
            let snapshot = crs.resources.snapshot();
            let merged = latch::crs::merge(config, &snapshot, crs.api_store.as_deref());
            for (key, cond) in merged.conditions.iter().filter(|(_, c)| !c.accepted) {
                tracing::error!(
                    resource = key.source(),
                    error = cond.message,
                    "invalid resource left out"
                );
            }
            crs.resources
                .write_conditions(&merged.conditions, &snapshot);
            merged.config
        }
        None => config,
    };
    match running.reload(&config).await {
        Ok(report) => tracing::info!(
            cause,
            policies = report.policies,
            rules = report.rules,
            stores_changed = report.stores_changed,
            "configuration reloaded"
        ),
        Err(err) => {
            tracing::error!(cause, %err, "reload failed partway; new connections may see a mix until the next reload")
        }
    }
}

pub async fn main(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = match load_config(&args.data.policies, &args.data.allow_exec, false) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let nofile = raise_nofile_limit();
    // Intercepting the whole host is something the operator says: `--cgroup /`.
    let cgroup = if args.cgroup == std::path::Path::new("/") {
        runtime::default_cgroup().context("finding the cgroup v2 root")?
    } else {
        args.cgroup
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
        limits: args.data.limits(nofile)?,
        secrets: args.data.secrets(),
        audit: args.data.audit(),
        fast_path: !args.data.no_fast_path,
        fail_mode: args.fail_mode,
        keep_interception: args.keep_interception,
        instance: args.instance,
        runtime_cgroup_roots: args.data.runtime_cgroup_roots,
        kernel_btf: args.data.kernel_btf,
        node_name: args
            .node_name
            .or_else(|| std::env::var("NODE_NAME").ok())
            .filter(|n| !n.is_empty()),
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Watch before starting, so no change made once we report ready can be missed.
    let mut changes = match latch::watch::watch(&args.data.policies) {
        Ok(rx) => Some(rx),
        Err(err) => {
            tracing::warn!(%err, "cannot watch policy files; reload with SIGHUP");
            None
        }
    };
    let running = Running::start(&config, &opts).await?;
    // The custom resources arrive after the start: their first list is a reload.
    let stop_crs = tokio_util::sync::CancellationToken::new();
    let (crs, mut crs_changes) = if opts.node_name.is_some() && !args.no_kubernetes_resources {
        let (resources, rx) = latch::crs::watch::start(stop_crs.clone()).await?;
        (
            Some(Crs {
                resources,
                api_store: args.kubernetes_api_store.clone(),
            }),
            Some(rx),
        )
    } else {
        (None, None)
    };
    // Attached and bound: from here on only what the running agent needs.
    let caps = latch::privileges::drop_to(
        &latch::privileges::agent_keeps(running.needs()),
        latch::privileges::Bounding::Shrink,
    )?;
    tracing::info!(
        kept = ?latch::privileges::names(&caps),
        "capabilities dropped"
    );
    tracing::info!(
        listeners = ?running.listeners(),
        admin = ?running.admin_addr(),
        "ready"
    );
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &running).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        let cause = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => "SIGHUP",
            Some(()) = async { match &mut changes { Some(rx) => rx.recv().await, None => None } } => "file change",
            Some(()) = async { match &mut crs_changes { Some(rx) => rx.recv().await, None => None } } => "resource change",
        };
        reload(
            &running,
            &args.data.policies,
            &args.data.allow_exec,
            crs.as_ref(),
            cause,
        )
        .await;
    }
    stop_crs.cancel();
    let totals = running.stop(Duration::from_secs(args.grace_period)).await;
    tracing::info!(
        relayed = totals.relayed,
        refused = totals.refused,
        failed = totals.failed,
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
}
