//! Who is behind a redirected connection: the workload, built from the kernel's record plus
//! what /proc and the cgroup hierarchy say about that process.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{broker::Origin, config::WorkloadSelector};

/// The identity policies match on. Fields that could not be established are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Process name (of the thread group leader; the connecting thread's if the process is gone).
    pub comm: String,
    /// Executable path, read at accept time and trusted only if the process started before the
    /// connect (a recycled pid yields `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<PathBuf>,
    /// cgroup v2 path relative to the hierarchy root, e.g. `/system.slice/orders.service`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl Workload {
    /// Builds the identity for a connection the kernel recorded. `cgroup_root` is the cgroup v2
    /// mount point, used to check that the cgroup path really is the recorded cgroup id.
    pub fn resolve(origin: &Origin, cgroup_root: &Path) -> Self {
        let alive = process_predates(origin.pid, origin.ktime_ns);
        let exe = alive
            .then(|| fs::read_link(format!("/proc/{}/exe", origin.pid)).ok())
            .flatten();
        let cgroup = cgroup_of(origin.pid, origin.cgroup_id, cgroup_root);
        let parsed = cgroup.as_deref().map(CgroupInfo::parse).unwrap_or_default();
        // The kernel recorded the connecting *thread's* name; policies mean the process's
        // (the thread group leader's), which /proc has while the process lives.
        let comm = alive
            .then(|| fs::read_to_string(format!("/proc/{}/comm", origin.pid)).ok())
            .flatten()
            .map(|c| c.trim_end_matches('\n').to_owned())
            .unwrap_or_else(|| origin.comm.clone());
        Self {
            pid: origin.pid,
            uid: origin.uid,
            gid: origin.gid,
            comm,
            exe,
            cgroup,
            systemd_unit: parsed.systemd_unit,
            container_id: parsed.container_id,
            pod_uid: parsed.pod_uid,
        }
    }

    /// Whether `selector` admits this workload: every field it sets must match. Kubernetes
    /// fields need pod metadata the agent does not have yet, so an entry using them admits
    /// nothing (deny by default).
    pub fn matches(&self, selector: &WorkloadSelector) -> bool {
        if selector.uses_kubernetes() {
            return false;
        }
        selector.uid.is_none_or(|u| u == self.uid)
            && selector.gid.is_none_or(|g| g == self.gid)
            && selector.comm.as_deref().is_none_or(|c| c == self.comm)
            && selector
                .exe
                .as_deref()
                .is_none_or(|e| self.exe.as_deref() == Some(e))
            && (selector.cgroup.is_none()
                || self
                    .cgroup
                    .as_deref()
                    .is_some_and(|c| selector.cgroup_matches(c)))
    }

    /// Whether any of `selectors` admits this workload; an empty list admits everyone.
    pub fn admitted_by(&self, selectors: &[WorkloadSelector]) -> bool {
        selectors.is_empty() || selectors.iter().any(|s| self.matches(s))
    }
}

/// True when process `pid` exists and started no later than `connect_ns` (monotonic clock,
/// as `bpf_ktime_get_ns`), i.e. it is the process that connected, not a successor that got
/// the same pid.
fn process_predates(pid: u32, connect_ns: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 22 (starttime, clock ticks since boot) comes after the parenthesised comm, which
    // may itself contain spaces and parentheses.
    let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let Some(start_ticks) = after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return false;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let start_ns = start_ticks.saturating_mul(1_000_000_000 / hz);
    // One tick of slack: starttime is rounded to ticks.
    start_ns <= connect_ns.saturating_add(1_000_000_000 / hz)
}

/// The process's cgroup path, accepted only if that directory's inode is the cgroup id the
/// kernel recorded (so a recycled pid or a moved process cannot lend another identity).
fn cgroup_of(pid: u32, cgroup_id: u64, root: &Path) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
    let dir = root.join(path.trim_start_matches('/'));
    let ino = fs::metadata(&dir).ok()?.ino();
    (ino == cgroup_id).then_some(path)
}

/// What a cgroup path says about systemd units, containers and pods.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    pub systemd_unit: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

impl CgroupInfo {
    /// Parses the layouts of systemd, containerd (cgroupfs and systemd drivers), CRI-O and
    /// docker, e.g.
    /// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`,
    /// `/kubepods/burstable/pod<uid>/<id>`, `/system.slice/docker-<id>.scope`.
    pub fn parse(path: &str) -> Self {
        let mut info = Self::default();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if let Some(uid) = pod_uid(part) {
                info.pod_uid = Some(uid);
                continue;
            }
            if let Some(id) = container_id(part) {
                info.container_id = Some(id);
                continue;
            }
            if part.ends_with(".service")
                || (part.ends_with(".scope") && info.container_id.is_none())
            {
                info.systemd_unit = Some(part.to_owned());
            }
        }
        // A bare 64-hex leaf under a pod directory is the container (cgroupfs driver).
        if info.container_id.is_none()
            && info.pod_uid.is_some()
            && let Some(leaf) = path.rsplit('/').next().filter(|l| is_hex_id(l))
        {
            info.container_id = Some(leaf.to_owned());
        }
        info
    }
}

fn pod_uid(part: &str) -> Option<String> {
    // systemd driver: kubepods-besteffort-pod<uid with _>.slice; cgroupfs: pod<uid>
    let rest = part
        .strip_suffix(".slice")
        .and_then(|p| p.rsplit_once("-pod").map(|(_, uid)| uid))
        .or_else(|| part.strip_prefix("pod"))?;
    let uid = rest.replace('_', "-");
    (uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(uid)
}

fn container_id(part: &str) -> Option<String> {
    let stem = part.strip_suffix(".scope").unwrap_or(part);
    for prefix in [
        "cri-containerd-",
        "crio-",
        "docker-",
        "containerd-",
        "libpod-",
    ] {
        if let Some(id) = stem.strip_prefix(prefix).filter(|id| is_hex_id(id)) {
            return Some(id.to_owned());
        }
    }
    None
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c0e7a9b2d3c4e5f60718293a4b5c6d7e8f90112233445566778899aabbccd";

    #[test]
    fn containerd_with_systemd_driver() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/cri-containerd-{ID}.scope"
        );
        let info = CgroupInfo::parse(&path);
        assert_eq!(
            info.pod_uid.as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(info.systemd_unit, None);
    }

    #[test]
    fn cgroupfs_driver_and_crio() {
        let info = CgroupInfo::parse(&format!(
            "/kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/{ID}"
        ));
        assert_eq!(
            info.pod_uid.as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(info.container_id.as_deref(), Some(ID));
        let crio = CgroupInfo::parse(&format!(
            "/kubepods.slice/kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/crio-{ID}.scope"
        ));
        assert_eq!(crio.container_id.as_deref(), Some(ID));
    }

    #[test]
    fn docker_and_systemd_units() {
        let docker = CgroupInfo::parse(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(docker.container_id.as_deref(), Some(ID));
        assert_eq!(docker.pod_uid, None);
        let unit = CgroupInfo::parse("/system.slice/orders.service");
        assert_eq!(unit.systemd_unit.as_deref(), Some("orders.service"));
        assert_eq!(unit.container_id, None);
    }

    fn workload() -> Workload {
        Workload {
            pid: 10,
            uid: 1001,
            gid: 1001,
            comm: "psql".into(),
            exe: Some("/usr/bin/psql".into()),
            cgroup: Some("/system.slice/orders.service".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_selector_admits_when_all_its_fields_match() {
        let w = workload();
        let sel = |f: fn(&mut WorkloadSelector)| {
            let mut s = WorkloadSelector::default();
            f(&mut s);
            s
        };
        assert!(w.matches(&sel(|s| s.uid = Some(1001))));
        assert!(!w.matches(&sel(|s| s.uid = Some(0))));
        assert!(w.matches(&sel(|s| {
            s.uid = Some(1001);
            s.exe = Some("/usr/bin/psql".into());
            s.cgroup = Some("/system.slice".into());
        })));
        assert!(!w.matches(&sel(|s| {
            s.uid = Some(1001);
            s.comm = Some("bash".into());
        })));
        assert!(!w.matches(&sel(|s| s.cgroup = Some("/system.slice/orders".into()))));
        assert!(
            !w.matches(&sel(|s| s.namespace = Some("prod".into()))),
            "k8s fields deny for now"
        );
        assert!(w.admitted_by(&[]));
        assert!(w.admitted_by(&[sel(|s| s.uid = Some(0)), sel(|s| s.gid = Some(1001))]));
    }

    #[test]
    fn unknown_exe_never_matches_an_exe_selector() {
        let mut w = workload();
        w.exe = None;
        let s = WorkloadSelector {
            exe: Some("/usr/bin/psql".into()),
            ..Default::default()
        };
        assert!(!w.matches(&s));
    }

    #[test]
    fn this_process_predates_now_and_a_future_start_does_not() {
        let me = std::process::id();
        let now = {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid out-pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        };
        assert!(process_predates(me, now));
        assert!(
            !process_predates(me, 0),
            "a connect before this process started"
        );
        assert!(!process_predates(u32::MAX, now), "no such process");
    }
}
