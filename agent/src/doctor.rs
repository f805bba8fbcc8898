//! `latch doctor`: can latch run on this machine, and if not, what to do about it.
use std::{fmt, fs, path::Path};

use aya::programs::ProgramType;

pub mod stores;

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok(String),
    /// latch works, but something is missing that some feature needs.
    Warn {
        found: String,
        fix: String,
    },
    /// latch cannot run.
    Fail {
        found: String,
        fix: String,
    },
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Ok(found) => write!(f, "ok    {:<22} {found}", self.name),
            Verdict::Warn { found, fix } => {
                write!(f, "warn  {:<22} {found}\n      fix: {fix}", self.name)
            }
            Verdict::Fail { found, fix } => {
                write!(f, "FAIL  {:<22} {found}\n      fix: {fix}", self.name)
            }
        }
    }
}

/// Minimum kernel: cgroup getpeername hooks arrived in 5.8.
const MIN_KERNEL: (u32, u32) = (5, 8);

/// Runs every check. latch can run when none is `Fail`.
pub fn run() -> Vec<Check> {
    let mut checks = vec![
        kernel(),
        btf(),
        capabilities(),
        cgroup_v2(),
        bpffs(),
        open_files(),
    ];
    for (name, ty) in [
        ("prog cgroup_sock_addr", ProgramType::CgroupSockAddr),
        ("prog sock_ops", ProgramType::SockOps),
        ("prog sk_msg", ProgramType::SkMsg),
    ] {
        checks.push(program_type(name, ty));
    }
    checks.extend(load_object());
    checks
}

pub fn all_ok(checks: &[Check]) -> bool {
    !checks
        .iter()
        .any(|c| matches!(c.verdict, Verdict::Fail { .. }))
}

fn check(name: &'static str, verdict: Verdict) -> Check {
    Check { name, verdict }
}

fn kernel() -> Check {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    let minor = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    if (major, minor) >= MIN_KERNEL {
        check(
            "kernel",
            Verdict::Ok(format!(
                "{release} (need >= {}.{})",
                MIN_KERNEL.0, MIN_KERNEL.1
            )),
        )
    } else {
        check(
            "kernel",
            Verdict::Fail {
                found: release.to_string(),
                fix: format!("run on Linux {}.{} or newer", MIN_KERNEL.0, MIN_KERNEL.1),
            },
        )
    }
}

fn btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        check("btf", Verdict::Ok("/sys/kernel/btf/vmlinux".into()))
    } else {
        check(
            "btf",
            Verdict::Warn {
                found: "no /sys/kernel/btf/vmlinux".into(),
                fix:
                    "a kernel built with CONFIG_DEBUG_INFO_BTF=y gives better verifier diagnostics"
                        .into(),
            },
        )
    }
}

/// Effective capabilities from /proc/self/status.
/// Whether the default limits fit the open-file limit the agent would raise itself to.
fn open_files() -> Check {
    use nix::sys::resource::{Resource, getrlimit};
    let hard = getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(_, hard)| hard);
    let limits = crate::broker::Limits::default();
    let need = limits.descriptors_needed();
    if hard >= need {
        check(
            "open files",
            Verdict::Ok(format!(
                "limit {hard} (the default limits need up to {need})"
            )),
        )
    } else {
        check(
            "open files",
            Verdict::Warn {
                found: format!(
                    "limit {hard}: the default limits need up to {need}; the agent fits \
                     --max-connections to about {}",
                    limits.connections_fitting(hard)
                ),
                fix: format!("raise LimitNOFILE (ulimit -Hn) to {need} or more"),
            },
        )
    }
}

fn capabilities() -> Check {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    let net = has(CAP_NET_ADMIN);
    if bpf && net && has(CAP_SYS_ADMIN) {
        check(
            "capabilities",
            Verdict::Ok("CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN".into()),
        )
    } else if bpf && net {
        check(
            "capabilities",
            Verdict::Warn {
                found: "CAP_BPF and CAP_NET_ADMIN, no CAP_SYS_ADMIN".into(),
                fix: "`latch run` moves processes between cgroups: run it as root".into(),
            },
        )
    } else {
        check(
            "capabilities",
            Verdict::Fail {
                found: format!(
                    "effective set {eff:#x} lacks CAP_BPF/CAP_SYS_ADMIN or CAP_NET_ADMIN"
                ),
                fix: "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN".into(),
            },
        )
    }
}

fn cgroup_v2() -> Check {
    match crate::cgroup::v2_mount() {
        Ok(path) => check("cgroup v2", Verdict::Ok(path.display().to_string())),
        Err(err) => check(
            "cgroup v2",
            Verdict::Fail {
                found: err.to_string(),
                fix: "mount -t cgroup2 none /sys/fs/cgroup (or boot with systemd.unified_cgroup_hierarchy=1)".into(),
            },
        ),
    }
}

fn bpffs() -> Check {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    match mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("bpf"))
        .and_then(|l| l.split_whitespace().nth(1))
    {
        Some(dir) => check("bpffs", Verdict::Ok(dir.to_owned())),
        None => check(
            "bpffs",
            Verdict::Warn {
                found: "not mounted".into(),
                fix: "mount -t bpf bpf /sys/fs/bpf (needed only to keep interception across agent restarts)".into(),
            },
        ),
    }
}

fn program_type(name: &'static str, ty: ProgramType) -> Check {
    match aya::sys::is_program_supported(ty) {
        Ok(true) => check(name, Verdict::Ok("supported".into())),
        Ok(false) => check(
            name,
            Verdict::Fail {
                found: "not supported by this kernel".into(),
                fix: "use a kernel built with CONFIG_CGROUP_BPF=y and CONFIG_BPF_SYSCALL=y".into(),
            },
        ),
        Err(err) => check(
            name,
            Verdict::Fail {
                found: format!("probe failed: {err}"),
                fix: "run as root (CAP_BPF) so the kernel can be probed".into(),
            },
        ),
    }
}

/// The real test: load latch's own programs through the verifier (not attached anywhere),
/// and whether they record the connecting task's executable (what `exe` selectors need).
fn load_object() -> Vec<Check> {
    match crate::ebpf::Interceptor::load(std::path::Path::new(crate::ebpf::btf_offsets::VMLINUX)) {
        Ok(loaded) => vec![
            check(
                "latch programs",
                Verdict::Ok("verified and loaded (then unloaded)".into()),
            ),
            exe_identity(loaded.exe_identity()),
        ],
        Err(err) => vec![check(
            "latch programs",
            Verdict::Fail {
                found: format!("{err:#}"),
                fix: "see the verifier message above; check the kernel version and capabilities"
                    .into(),
            },
        )],
    }
}

fn exe_identity(state: &crate::ebpf::ExeIdentity) -> Check {
    match state {
        crate::ebpf::ExeIdentity::Recorded => check(
            "exe identity",
            Verdict::Ok("the connect hooks record the executable (device, inode)".into()),
        ),
        crate::ebpf::ExeIdentity::Unavailable(why) => check(
            "exe identity",
            Verdict::Warn {
                found: format!("not recorded at connect: {why}"),
                fix: "policies with `exe` selectors admit nothing: use a kernel with \
                      CONFIG_DEBUG_INFO_BTF and run with CAP_PERFMON (or CAP_SYS_ADMIN)"
                    .into(),
            },
        ),
    }
}
