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

/// How long a stopping agent waits for a new agent that is taking over to be ready.
const UPGRADE_WAIT: Duration = Duration::from_secs(30);

pub async fn main(args: AgentArgs) -> anyhow::Result<ExitCode> {
    latch::upgrade::systemd::keep_ready_fd_private();
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
        fast_path: args.data.fast_path,
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
    // A running agent of this instance hands its sockets over: this start is an upgrade. If
    // this agent fails from here until it says ready, the running one carries on as it was.
    let upgrade_path = latch::upgrade::socket::path(&latch::ca::state_dir(), &opts.instance);
    let mut inherited = match latch::upgrade::handover::take_over(&upgrade_path) {
        Ok(Some(inherited)) => {
            tracing::info!(
                listeners = inherited.listeners.len(),
                "upgrading: the running agent handed its listeners over"
            );
            Some(inherited)
        }
        Ok(None) => None,
        Err(err) => return Err(err).context("taking over from the running agent"),
    };
    let running = Running::start_inheriting(&config, &opts, inherited.as_mut()).await?;
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
    // The old agent lets go once told; the connection stays open until it exits.
    let _previous = match inherited {
        Some(inherited) => {
            let conn = inherited
                .ready()
                .context("telling the running agent we are ready")?;
            // The old agent now parks its plain relays and sends them: carry them on.
            let resumer = running.resumer();
            let relays = std::thread::Builder::new()
                .name("latch-relays-in".into())
                .spawn(move || {
                    let received = latch::upgrade::handover::receive_relays(&conn, |batch| {
                        for parked in batch {
                            resumer.resume(parked);
                        }
                    });
                    match received {
                        Ok(n) => {
                            tracing::info!(relays = n, "carrying on the previous agent's relays")
                        }
                        Err(err) => tracing::warn!(%err, "receiving the previous agent's relays"),
                    }
                    conn
                });
            if let Err(err) = &relays {
                tracing::warn!(%err, "cannot receive the previous agent's relays");
            }
            let stop = stop_crs.clone();
            let shared = running.previous_map_forgetter();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(latch::upgrade::PREVIOUS_MAP_FOR) => shared(),
                    _ = stop.cancelled() => {}
                }
            });
            relays.ok()
        }
        None => None,
    };
    let mut upgrades = match latch::upgrade::listen(&upgrade_path) {
        Ok(listening) => Some(listening),
        Err(err) => {
            tracing::warn!(%err, path = %upgrade_path.display(), "cannot listen for upgrades: a second agent of this instance cannot take over");
            None
        }
    };
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &running).with_context(|| format!("writing {}", path.display()))?;
    }
    latch::upgrade::systemd::ready();
    type Conversation = Result<(std::os::fd::OwnedFd, bool), latch::upgrade::UpgradeError>;
    let mut pending: Option<tokio::task::JoinHandle<Conversation>> = None;
    // After a hand-over: the connection to send live relays on, if the new agent takes them.
    let mut relays_to = None;
    let mut hup = signal(SignalKind::hangup())?;
    let mut upgraded = false;
    loop {
        let cause = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            Some(conn) = async { match &mut upgrades { Some(l) => l.connections.recv().await, None => None } } => {
                if pending.is_some() {
                    tracing::warn!("an upgrade is already under way; refusing a second one");
                    continue;
                }
                match running.offer() {
                    Ok(offer) => {
                        tracing::info!("a new agent is taking over; serving until it is ready");
                        pending = Some(tokio::task::spawn_blocking(move || {
                            latch::upgrade::serve_one(conn, offer)
                        }));
                    }
                    Err(err) => tracing::error!(%err, "cannot hand the listeners over"),
                }
                continue;
            }
            done = async { match &mut pending { Some(h) => h.await, None => std::future::pending().await } } => {
                pending = None;
                match done {
                    Ok(Ok((conn, relays))) => {
                        tracing::info!("the new agent is ready: handing over and draining");
                        relays_to = relays.then_some(conn);
                        upgraded = true;
                        break;
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(%err, "upgrade abandoned; this agent carries on serving");
                    }
                    Err(err) => tracing::error!(%err, "upgrade conversation failed"),
                }
                continue;
            }
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
    // Told to stop while a new agent is taking over (a DaemonSet deleting the old pod as soon
    // as the new one looks ready): let the hand-over finish first, so it is not cut short.
    if let Some(handle) = pending.take() {
        tracing::info!("an upgrade is under way: waiting for the new agent before stopping");
        match tokio::time::timeout(UPGRADE_WAIT, handle).await {
            Ok(Ok(Ok((conn, relays)))) => {
                relays_to = relays.then_some(conn);
                upgraded = true;
            }
            Ok(Ok(Err(err))) => tracing::warn!(%err, "upgrade abandoned"),
            Ok(Err(err)) => tracing::error!(%err, "upgrade conversation failed"),
            Err(_) => tracing::warn!("the new agent was not ready in time; stopping"),
        }
    }
    stop_crs.cancel();
    let grace = Duration::from_secs(args.grace_period);
    let totals = if upgraded {
        running.hand_over(grace, relays_to).await
    } else {
        if let Some(listening) = &upgrades {
            listening.remove();
        }
        running.stop(grace).await
    };
    if upgraded && opts.node_name.is_some() {
        // In a pod, exiting now would have the kubelet start this container again, and that
        // agent would take over from the new one: wait for the pod's deletion instead.
        tracing::info!("drained after the upgrade; waiting for this pod to be deleted");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    tracing::info!(
        relayed = totals.relayed,
        refused = totals.refused,
        failed = totals.failed,
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
}
