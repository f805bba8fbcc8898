//! Dropping capabilities once the programs are attached and the listeners bound — in every
//! thread of the process (capabilities are per thread; see [`drop_to`]).
//!
//! Loading programs, creating maps, attaching links and binding sockets need CAP_BPF,
//! CAP_SYS_ADMIN, CAP_NET_ADMIN and friends — but only at start. What the running agent still
//! does, and what that needs (kernel 6.x):
//!
//! | kept | why |
//! |---|---|
//! | `CAP_NET_ADMIN` | `SO_MARK` on every outbound socket the broker opens (or CAP_NET_RAW) |
//! | `CAP_SYS_ADMIN` | `setns(2)` into an application's network namespace: the broker listens in every namespace it serves (prepared as pods and containers appear) and opens each target socket in the application's namespace, so the target sees the pod's address |
//! | `CAP_IPC_LOCK` | `mlock` of secret buffers past `RLIMIT_MEMLOCK` |
//! | `CAP_SYS_PTRACE` | opening `/proc/<pid>/ns/net` of the processes under the cgroup (the sweep, and the namespaces the kernel reports): a process whose capabilities exceed the agent's (any root workload) is out of ptrace reach without it, so its namespace could not be prepared; reading `/proc/<pid>/exe` of another user's process for the audit; `pidfd_getfd(2)` of an application's socket in direct mode |
//! | `CAP_NET_BIND_SERVICE` | only when a broker port is below 1024 (the default, so that no local user can hold it): binding it in each namespace prepared later |
//! | `CAP_DAC_OVERRIDE` | `latch run` only: removing its cgroup from a cgroup root that is mode 0555 |
//!
//! Not kept: updating eBPF maps through an fd the agent already holds (rule tries on reload,
//! the broker config on stop) needs no capability since Linux 6.5 moved the unprivileged-BPF
//! checks to map creation and program load; closing links needs none either. The e2e test
//! `capabilities` proves it by reloading policies and brokering after the drop.
mod threads;

use caps::{CapSet, Capability, CapsHashSet};

/// What the running data path needs beyond the capabilities it always keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// A broker port is below 1024: binding it in namespaces prepared later.
    pub privileged_port: bool,
}

/// What the long-lived agent keeps.
pub fn agent_keeps(needs: Needs) -> Vec<Capability> {
    let mut keep = vec![
        Capability::CAP_NET_ADMIN,
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_IPC_LOCK,
        Capability::CAP_SYS_PTRACE,
    ];
    if needs.privileged_port {
        keep.push(Capability::CAP_NET_BIND_SERVICE);
    }
    keep
}

/// What `latch run` keeps: the agent's set, plus removing its own cgroup at the end.
pub fn run_keeps(needs: Needs) -> Vec<Capability> {
    let mut keep = agent_keeps(needs);
    keep.push(Capability::CAP_DAC_OVERRIDE);
    keep
}

#[derive(Debug, thiserror::Error)]
#[error("dropping capabilities ({what}): {source}")]
pub struct PrivilegeError {
    what: &'static str,
    #[source]
    source: caps::errors::CapsError,
}

/// How far to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bounding {
    /// Also shrink the bounding set: nothing this process executes regains the rest (the agent:
    /// its `exec` secret-store helpers run with at most the kept set).
    Shrink,
    /// Leave the bounding set alone, so a command run as root gets root's usual capabilities
    /// (`latch run`: CMD must behave as if started without latch).
    Keep,
}

/// Reduces the effective and permitted sets (and optionally the bounding set) to `keep` ∩ what
/// the process has now; clears the inheritable and ambient sets — in **every thread** of the
/// process. Returns the effective set left.
///
/// Capabilities are per thread: capset(2) and PR_CAPBSET_DROP change only the calling thread,
/// and the agent's runtime and connection threads exist before the drop. So each thread is
/// made to drop its own (a real-time signal whose handler makes the same system calls, the way
/// libcap's psx does), and the drop is checked in `/proc/self/task/*/status`.
pub fn drop_to(keep: &[Capability], bounding: Bounding) -> Result<CapsHashSet, PrivilegeError> {
    let err = |what| move |source| PrivilegeError { what, source };
    let permitted = caps::read(None, CapSet::Permitted).map_err(err("read permitted"))?;
    let kept: CapsHashSet = keep
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    let mask = kept.iter().fold(0u64, |m, c| m | 1 << c.index());
    let shrink = bounding == Bounding::Shrink && permitted.contains(&Capability::CAP_SETPCAP);
    threads::drop_in_other_threads(mask, shrink).map_err(|source| PrivilegeError {
        what: "drop in every thread",
        source: caps::errors::CapsError::from(source.to_string()),
    })?;
    caps::clear(None, CapSet::Ambient).map_err(err("clear ambient"))?;
    if bounding == Bounding::Shrink && permitted.contains(&Capability::CAP_SETPCAP) {
        // Needs CAP_SETPCAP, so before the permitted set loses it. (Without it — e.g. a
        // systemd unit whose CapabilityBoundingSet already excludes it — the bounding set was
        // limited by whoever started us.)
        let all = caps::read(None, CapSet::Bounding).map_err(err("read bounding"))?;
        for cap in all.difference(&kept) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(err("shrink bounding"))?;
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(err("clear inheritable"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(err("set effective"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err("set permitted"))?;
    caps::read(None, CapSet::Effective).map_err(err("read effective"))
}

/// The capability names in `set`, sorted (for logs).
pub fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    v.sort();
    v
}
