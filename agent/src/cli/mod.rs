//! Command-line interface: argument definitions and the glue from each command to the library.
mod agent;
mod ca;
mod run;
mod status;
mod upgrade;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use latch::{
    broker::Limits,
    config::{self, Config},
    runtime::DEFAULT_MARK,
    telemetry::{self, LogFormat},
};

/// Exit status for invalid configuration (EX_USAGE-style "data format error": sysexits' 65 is
/// EX_DATAERR; we use 64, EX_USAGE, as documented).
pub const EXIT_CONFIG: u8 = 64;

/// latch — hands credentials to unmodified applications' connections, so the applications
/// never hold them.
#[derive(Debug, Parser)]
#[command(name = "latch", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "plain")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the long-lived agent: intercept connections from a cgroup and broker them.
    Agent(AgentArgs),
    /// Run one command with its connections intercepted: a temporary cgroup is created,
    /// CMD runs inside it, and everything is removed when CMD exits. Exits with CMD's status.
    Run(RunArgs),
    /// Check whether this machine can run latch, and say how to fix what is missing; with
    /// --policy, also which identity the agent will use with each secret store, and whether
    /// it works.
    Doctor {
        /// Policy files or directories: check their secret stores (logging in as the agent
        /// would).
        #[arg(long)]
        policy: Vec<PathBuf>,
    },
    /// Show a running agent's connections, policies and eBPF state (from its admin endpoint).
    Status {
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:952")]
        admin: SocketAddr,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print the CustomResourceDefinitions of Policy, ClusterPolicy and SecretStore (their spec
    /// schemas generated from the policy file format); deploy/kubernetes/crds.yaml is this output.
    Crds,
    /// The node-local CA that issues certificates for TLS toward applications (appTls).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Replace a running agent without a gap: start this binary with agent PID's arguments;
    /// it takes the listeners and programs over and PID drains and exits. Exits 0 once the new
    /// agent serves, 1 if it failed (PID then carries on). The systemd unit's ExecReload.
    Upgrade {
        /// The running agent (systemd: $MAINPID).
        #[arg(long)]
        pid: u32,
    },
    /// Remove what latch may have left behind: an instance's pinned links (ending its
    /// interception) and the cgroups of `latch run` processes that died.
    Cleanup {
        /// The agent instance whose pinned links to remove.
        #[arg(long, default_value = "default")]
        instance: String,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate policy and secret store files; print every error with file, line and column.
    Check {
        /// Files or directories of YAML resources.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Options shared by `agent` and `run`.
#[derive(Debug, Args)]
struct DataPathArgs {
    /// Policy and secret store resources: a YAML file or a directory of them (repeatable).
    #[arg(long = "policy", short = 'p', required = true)]
    policies: Vec<PathBuf>,
    /// SO_MARK carried by the broker's own outbound sockets (they are never intercepted).
    #[arg(long, default_value_t = DEFAULT_MARK, value_parser = parse_u32)]
    mark: u32,
    /// Most connections brokered at once. A value whose descriptors (see --max-pipes and
    /// --max-namespaces) cannot fit the open-file limit is refused at start.
    /// [default: 10000, or as many as fit the open-file limit]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most pipes the relay splices through at once (each is two descriptors, held only while
    /// data is in flight); past it a connection copies through a buffer instead.
    /// [default: a quarter of --max-connections]
    #[arg(long)]
    max_pipes: Option<usize>,
    /// How long reaching a target may take, in seconds.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Most connections one workload (one cgroup) may have brokered at once; more are refused
    /// (reset, or an ErrorResponse for PostgreSQL) and audited.
    #[arg(long, default_value_t = 1_000)]
    max_per_workload: usize,
    /// Most network namespaces the broker listens in at once (its own included; each costs
    /// two listening sockets and a namespace descriptor). Matching connects from namespaces
    /// past it fail closed (or go direct with --fail-mode open) and are audited. At most 16384.
    #[arg(long, default_value_t = 4_096)]
    max_namespaces: usize,
    /// Most direct-mode startups run at once (each holds a thread until the hand-over, at most
    /// 10 s); past it a connection gets SQLSTATE 53300.
    #[arg(long, default_value_t = 128)]
    max_direct_startups: usize,
    /// How long a connection's handshake (target connect, protocol startup and
    /// authentication) may take, in seconds; then it fails.
    #[arg(long, default_value_t = 30)]
    handshake_timeout: u64,
    /// Development only: allow `literal` secret stores (values written in the policy files).
    #[arg(long)]
    allow_literal_secrets: bool,
    /// Append one JSON line per connection, denial and refusal to this file (rotated by size).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Rotate the audit log past this many bytes.
    #[arg(long, default_value_t = 100 << 20)]
    audit_max_bytes: u64,
    /// Rotated audit logs to keep.
    #[arg(long, default_value_t = 5)]
    audit_keep: u32,
    /// Also write audit lines to standard output.
    #[arg(long)]
    audit_stdout: bool,
    /// Where latch keeps state: the node-local CA for appTls in DIR/ca/
    /// [default: $LATCH_STATE_DIR, else /var/lib/latch]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Let the kernel carry an application's bulk sends straight to the target once the
    /// broker's handshake is done (the fast path; see docs/internals/decisions.md). Off by
    /// default: it puts the application's socket in a BPF sockmap, where Linux answers a
    /// blocking read woken by the server's reset with EAGAIN instead of ECONNRESET.
    #[arg(long, conflicts_with = "no_fast_path")]
    fast_path: bool,
    /// Keep every byte in the broker (the default; kept for older command lines).
    #[arg(long, hide = true)]
    no_fast_path: bool,
    /// A cgroup (path from the cgroup v2 root) under which only a container runtime creates
    /// cgroups: container ids and pod UIDs are read from cgroup paths below these only, and
    /// only from root-owned cgroups. Repeat for several; added to the defaults (/kubepods.slice,
    /// /kubepods, /system.slice, /machine.slice, /libpod_parent, /docker).
    #[arg(long = "runtime-cgroup-root", value_name = "PATH")]
    runtime_cgroup_roots: Vec<String>,
    /// A command `exec` secret stores may run (they run it as root). Repeat for several; an
    /// exec store whose command is not allowed is refused at load.
    #[arg(long = "allow-exec", value_name = "PATH")]
    allow_exec: Vec<PathBuf>,
    /// The kernel's BTF, from which the connect hooks get the field offsets to record the
    /// connecting executable (what `exe` selectors compare). Without it `exe` admits nothing.
    #[arg(long, value_name = "FILE", default_value = latch::ebpf::btf_offsets::VMLINUX)]
    kernel_btf: PathBuf,
}

#[derive(Debug, Args)]
struct AgentArgs {
    #[command(flatten)]
    data: DataPathArgs,
    /// cgroup v2 directory whose processes are intercepted, e.g. /sys/fs/cgroup/kubepods.slice;
    /// `/` means the root of the hierarchy, i.e. every process on the host (said explicitly).
    #[arg(long, required = true)]
    cgroup: PathBuf,
    /// Broker listen addresses, loopback only: one IPv4 and optionally one IPv6 (port 0 picks
    /// a free port).
    #[arg(long, default_values_t = [
        "127.0.0.1:951".parse::<SocketAddr>().unwrap(),
        "[::1]:951".parse::<SocketAddr>().unwrap(),
    ])]
    listen: Vec<SocketAddr>,
    /// Admin HTTP address (/healthz, /readyz, /metrics, /status).
    #[arg(long, default_value = "127.0.0.1:952")]
    admin: SocketAddr,
    /// On SIGTERM/SIGINT, how long live connections may finish, in seconds.
    #[arg(long, default_value_t = 10)]
    grace_period: u64,
    /// While latch cannot broker (shutting down, or down with --keep-interception):
    /// `closed` makes intercepted connections fail, `open` lets them go direct.
    #[arg(long, value_enum, default_value = "closed")]
    fail_mode: latch::runtime::FailMode,
    /// Pin the eBPF links so interception survives agent restarts and crashes (connections
    /// fail while no agent runs). The next agent with the same --instance takes them over;
    /// `latch cleanup` removes them.
    #[arg(long)]
    keep_interception: bool,
    /// Once ready, write the bound addresses (admin, listeners; handy with port 0) as JSON here.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Name of this agent's pin directory under <bpffs>/latch/.
    #[arg(long, default_value = "default")]
    instance: String,
    /// This node's Kubernetes name [default: $NODE_NAME]: watch the pods of this node (from
    /// the API server of the kubeconfig, else in-cluster) so that the `namespace`,
    /// `serviceAccount` and `labels` selectors can match. Without it they admit nothing.
    #[arg(long, value_name = "NODE")]
    node_name: Option<String>,
    /// Do not watch latch's custom resources (Policy, ClusterPolicy, SecretStore). They are
    /// watched, and merged with the files, whenever a node name is set.
    #[arg(long)]
    no_kubernetes_resources: bool,
    /// A `kubernetes` SecretStore of the files whose apiServer, tokenFile and caFile the
    /// namespaced SecretStore resources use [default: in-cluster, the agent's service account].
    #[arg(long, value_name = "STORE")]
    kubernetes_api_store: Option<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    data: DataPathArgs,
    /// Admin HTTP address for the duration of the run (off by default).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// The command to run, and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<std::ffi::OsString>,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?}: {e}"))
}

impl DataPathArgs {
    fn secrets(&self) -> latch::secrets::ResolverOptions {
        if self.allow_literal_secrets {
            tracing::warn!(
                "literal secret stores allowed: secret values sit in the policy files (development only)"
            );
        }
        latch::secrets::ResolverOptions {
            allow_literal: self.allow_literal_secrets,
            ..Default::default()
        }
    }

    fn audit(&self) -> latch::audit::AuditOptions {
        latch::audit::AuditOptions {
            file: self.audit_log.clone(),
            max_bytes: self.audit_max_bytes,
            keep: self.audit_keep,
            stdout: self.audit_stdout,
        }
    }

    /// The limits, fitted to `nofile` (the open-file limit): defaults shrink to fit it; a value
    /// given that cannot fit is an error naming the numbers.
    fn limits(&self, nofile: u64) -> anyhow::Result<Limits> {
        let mut limits = self.limits_as_given(DEFAULT_MAX_CONNECTIONS);
        if self.max_connections.is_none() && limits.descriptors_needed() > nofile {
            let fit = limits.connections_fitting(nofile).max(1);
            tracing::info!(
                max_connections = fit,
                nofile,
                "--max-connections fitted to the open-file limit"
            );
            limits = self.limits_as_given(fit);
        }
        let need = limits.descriptors_needed();
        anyhow::ensure!(
            need <= nofile,
            "these limits can need {need} descriptors ({} connections × 2, {} pipes × 2, {} \
             namespaces × 3, {} for the agent) but the open-file limit is {nofile}: raise \
             LimitNOFILE (ulimit -n) or lower --max-connections, --max-pipes or --max-namespaces",
            limits.max_connections,
            limits.max_pipes,
            limits.max_namespaces,
            latch::broker::DESCRIPTOR_RESERVE,
        );
        Ok(limits)
    }

    fn limits_as_given(&self, default_connections: usize) -> Limits {
        let max_connections = self.max_connections.unwrap_or(default_connections).max(1);
        Limits {
            max_connections,
            max_pipes: self.max_pipes.unwrap_or(max_connections / 4),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            max_per_workload: self.max_per_workload.max(1),
            max_namespaces: self
                .max_namespaces
                .clamp(1, latch_common::MAX_NAMESPACES as usize),
            max_direct_startups: self.max_direct_startups.max(1),
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
        }
    }
}

pub fn main(cli: Cli) -> ExitCode {
    if matches!(cli.command, Command::Agent(_) | Command::Run(_)) {
        harden();
    }
    if let Command::Agent(AgentArgs { data, .. }) | Command::Run(RunArgs { data, .. }) =
        &cli.command
        && let Some(dir) = &data.state_dir
    {
        latch::ca::set_state_dir(dir.clone());
    }
    match cli.command {
        Command::Agent(args) => {
            telemetry::init(cli.log_format, "info");
            // Before the runtime's threads exist: they inherit the namespace.
            match latch::identity::join_host_cgroup_namespace() {
                Ok(true) => tracing::info!("joined the node's cgroup namespace"),
                Ok(false) => {}
                Err(err) => {
                    eprintln!("latch: {err}");
                    return ExitCode::FAILURE;
                }
            }
            with_runtime(agent::main(args))
        }
        Command::Run(args) => {
            telemetry::init(cli.log_format, "warn");
            with_runtime(run::main(args))
        }
        Command::Doctor { policy } => doctor(&policy),
        Command::Cleanup { instance } => cleanup(&instance),
        Command::Upgrade { pid } => match upgrade::main(pid) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("latch: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Status { admin, json } => match status::main(admin, json) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("latch: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Policy(PolicyCommand::Check { paths }) => policy_check(&paths),
        Command::Ca(command) => ca::main(command),
        Command::Crds => {
            print!("{}", latch::crs::crd::manifests());
            ExitCode::SUCCESS
        }
    }
}

fn with_runtime(fut: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(err) => {
            eprintln!("latch: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("latch: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads and validates configuration; on error prints every diagnostic. `scoped_to_command`:
/// `latch run`'s cgroup holds only the command it runs, so "admits every workload in the
/// attached cgroups" is what the user asked for and not worth a warning.
fn load_config(
    paths: &[PathBuf],
    allowed_exec: &[PathBuf],
    scoped_to_command: bool,
) -> Result<Config, ExitCode> {
    match config::load_trusted(paths, allowed_exec).and_then(|c| {
        if !scoped_to_command {
            config::require_named_workloads(&c)?;
        }
        Ok(c)
    }) {
        Ok(config) => {
            for warning in &config.warnings {
                if scoped_to_command && warning.message.contains("names no workloads") {
                    continue;
                }
                tracing::warn!("{warning}");
            }
            Ok(config)
        }
        Err(errors) => {
            eprintln!("latch: invalid configuration:\n{errors}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

fn cleanup(instance: &str) -> ExitCode {
    let mut ok = true;
    if let Some(bpffs) = latch::ebpf::pins::bpffs() {
        let dir = latch::ebpf::pins::pin_dir(&bpffs, instance);
        match latch::ebpf::pins::remove(&dir) {
            Ok(0) => println!("no pinned links for instance {instance:?}"),
            Ok(n) => println!(
                "removed {n} pinned links of instance {instance:?} ({})",
                dir.display()
            ),
            Err(err) => {
                eprintln!("latch: removing {}: {err}", dir.display());
                ok = false;
            }
        }
    }
    if let Ok(root) = latch::cgroup::v2_mount() {
        for path in latch::cgroup::remove_stale_runs(&root) {
            println!("removed {}", path.display());
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn doctor(policy: &[PathBuf]) -> ExitCode {
    let checks = latch::doctor::run();
    for check in &checks {
        println!("{check}");
    }
    let stores_ok = policy.is_empty() || doctor_stores(policy);
    if latch::doctor::all_ok(&checks) && stores_ok {
        println!("latch can run here.");
        ExitCode::SUCCESS
    } else {
        println!("latch cannot run here: fix the FAIL lines above.");
        ExitCode::FAILURE
    }
}

/// The stores of the configuration at `paths`: who the agent is to each. Whether all work.
fn doctor_stores(paths: &[PathBuf]) -> bool {
    let config = match config::load(paths) {
        Ok(c) => c,
        Err(errors) => {
            println!("FAIL  policy                 {errors}");
            return false;
        }
    };
    let run = async {
        let resolver = latch::secrets::Resolver::new(&config.stores, Default::default())?;
        let checks = latch::doctor::stores::check(&resolver).await;
        resolver.shutdown().await;
        anyhow::Ok(checks)
    };
    let checks = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run))
    {
        Ok(c) => c,
        Err(err) => {
            println!("FAIL  secret stores          {err:#}");
            return false;
        }
    };
    for check in &checks {
        println!("{check}");
    }
    !checks
        .iter()
        .any(|c| matches!(c.verdict, latch::doctor::Verdict::Fail { .. }))
}

fn policy_check(paths: &[PathBuf]) -> ExitCode {
    match config::load(paths) {
        Ok(config) => {
            for warning in &config.warnings {
                println!("warning: {warning}");
            }
            println!(
                "ok: {} policies, {} secret stores",
                config.policies.len(),
                config.stores.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            println!("{errors}");
            ExitCode::FAILURE
        }
    }
}

/// Makes this process non-dumpable: no core dumps, and no ptrace or /proc/<pid>/mem reads by
/// other users' processes, so secrets in memory stay there.
fn harden() {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) has no memory-safety preconditions.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!("could not make the process non-dumpable");
    }
}

/// Raises the open-file soft limit to the hard limit (each relayed connection holds two
/// sockets, and a pipe pair while data is in flight); returns the limit now in force.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// `--max-connections` when neither it nor the open-file limit says otherwise.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
