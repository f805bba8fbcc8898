//! Who is behind a redirected connection: the workload, built from the kernel's record plus
//! what /proc and the cgroup hierarchy say about that process.
mod cgroup_paths;
pub mod exe;
pub mod seen;

use std::{fs, path::PathBuf};

use serde::Serialize;

use self::exe::{ExeMatch, ExeRecord};
use crate::{
    broker::Origin,
    config::WorkloadSelector,
    pods::{Lookup, PodCache, PodMeta},
};

/// The identity policies match on. Fields that could not be established are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Process name (of the thread group leader; the connecting thread's if the process is gone).
    pub comm: String,
    /// Executable path, read at accept time, for display only (a recycled pid yields `None`):
    /// the process may have exec'd another binary since it connected. `exe` selectors use
    /// `exe_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<PathBuf>,
    /// The executable's identity as the kernel recorded it at connect time.
    #[serde(flatten)]
    pub exe_id: ExeRecord,
    /// cgroup v2 path relative to the hierarchy root, e.g. `/system.slice/orders.service`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// What the Kubernetes API says about the pod (namespace, name, service account, labels),
    /// when the agent watches pods and has the pod's metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodMeta>,
    /// The cgroup names a pod, but the agent's pod cache has no metadata for it (not arrived
    /// yet, or not a pod of this node): Kubernetes selectors admit nothing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pod_unknown: bool,
}

impl Workload {
    /// Builds the identity for a connection the kernel recorded. `cgroups` gives the cgroup v2
    /// mount point, used to check that the cgroup path really is the recorded cgroup id, and
    /// where container ids and pod UIDs may be read from a path.
    ///
    /// When the kernel recorded the process's start time and name (see
    /// `latch_common::exe::LEADER`), a process or cgroup seen before costs no /proc read
    /// ([`seen`]); otherwise /proc is read for each connection.
    pub fn resolve(origin: &Origin, cgroups: &Cgroups) -> Self {
        let (exe, comm) = match &origin.leader {
            Some((start_ns, comm)) => (cgroups.seen.exe(origin.pid, *start_ns), comm.clone()),
            None => read_process(origin),
        };
        let (cgroup, owner) = cgroups
            .seen
            .cgroup(origin.pid, origin.cgroup_id, &cgroups.root)
            .unzip();
        let parsed = cgroup
            .as_deref()
            .map(|p| cgroups.info(p, owner == Some(0)))
            .unwrap_or_default();
        let (pod, pod_unknown) = match (&parsed.pod_uid, &cgroups.pods) {
            (Some(uid), Some(cache)) => match cache.lookup(uid) {
                Lookup::Known(meta) => (Some((*meta).clone()), false),
                Lookup::Unknown => (None, true),
            },
            _ => (None, false),
        };
        Self {
            pid: origin.pid,
            uid: origin.uid,
            gid: origin.gid,
            comm,
            exe,
            exe_id: origin.exe,
            cgroup,
            systemd_unit: parsed.systemd_unit,
            container_id: parsed.container_id,
            pod_uid: parsed.pod_uid,
            pod,
            pod_unknown,
        }
    }

    /// Whether `selector` admits this workload: every field it sets must match. Kubernetes
    /// fields (`namespace`, `serviceAccount`, `labels`) match the pod's metadata from the API;
    /// without it (no pod, no pod watch, or a pod whose metadata has not arrived) an entry
    /// using them admits nothing (deny by default). `exe` compares the executable the kernel
    /// recorded at connect time with the file the selector names as it is now (`stat()` at
    /// every match, so a binary replaced by an upgrade is the new file); nothing recorded
    /// matches nothing.
    pub fn matches(&self, selector: &WorkloadSelector) -> bool {
        if selector.uses_kubernetes()
            && !self.pod.as_ref().is_some_and(|p| pod_matches(selector, p))
        {
            return false;
        }
        selector.uid.is_none_or(|u| u == self.uid)
            && selector.gid.is_none_or(|g| g == self.gid)
            && selector.comm.as_deref().is_none_or(|c| c == self.comm)
            && selector
                .exe
                .as_deref()
                .is_none_or(|e| matches!(self.exe_id.compare(e), ExeMatch::Same))
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

    /// For a denial: why the Kubernetes fields of `selectors` could not match, if any uses
    /// them and the workload has no pod metadata.
    pub fn pod_verdict(&self, selectors: &[WorkloadSelector]) -> Option<String> {
        if self.pod.is_some() || !selectors.iter().any(WorkloadSelector::uses_kubernetes) {
            return None;
        }
        Some(match (&self.pod_uid, self.pod_unknown) {
            (Some(uid), true) => format!(
                "pod {uid}: no metadata from the Kubernetes API yet (not arrived, or not a pod of this node); refused (fail closed)"
            ),
            (Some(uid), false) => {
                format!("pod {uid}: the agent does not watch pods (no --node-name)")
            }
            (None, _) => "not in a pod (no pod UID in its cgroup)".into(),
        })
    }

    /// The details of a denial: the pod verdict and the `exe` verdicts, joined with "; ".
    pub fn denial_details(&self, selectors: &[WorkloadSelector]) -> Option<String> {
        let parts: Vec<String> = [self.pod_verdict(selectors), self.exe_verdicts(selectors)]
            .into_iter()
            .flatten()
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// For a denial: how the executable compared with each `exe` the selectors name, e.g.
    /// `exe /usr/bin/psql: a different executable (...)`, joined with "; ". `None` if no
    /// selector names one.
    pub fn exe_verdicts(&self, selectors: &[WorkloadSelector]) -> Option<String> {
        let mut seen = Vec::new();
        let verdicts: Vec<String> = selectors
            .iter()
            .filter_map(|s| s.exe.as_deref())
            .filter(|e| {
                let new = !seen.contains(e);
                seen.push(e);
                new
            })
            .map(|e| format!("exe {}: {}", e.display(), self.exe_id.compare(e)))
            .collect();
        (!verdicts.is_empty()).then(|| verdicts.join("; "))
    }
}

/// Whether the pod's metadata has every Kubernetes field `selector` sets.
fn pod_matches(selector: &WorkloadSelector, pod: &PodMeta) -> bool {
    selector
        .namespace
        .as_deref()
        .is_none_or(|n| n == pod.namespace)
        && selector
            .service_account
            .as_deref()
            .is_none_or(|s| s == pod.service_account)
        && selector
            .labels
            .iter()
            .all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// The agent is not in the host's PID namespace: the process ids the kernel records are the
/// host's, and /proc here would show other processes under them.
#[derive(Debug, thiserror::Error)]
#[error(
    "latch must run in the host's PID namespace (the kernel records host process ids, and \
     /proc must show the same processes): this process is pid {inner} in a nested namespace \
     ({chain}). Run it on the host, or in a container with the host's PID namespace \
     (Kubernetes: hostPID: true; podman/docker: --pid=host)"
)]
pub struct PidNamespaceError {
    inner: u32,
    chain: String,
}

/// Checks that this process sees process ids as the kernel's root PID namespace does: its
/// `NSpid` in /proc/self/status has one entry only.
pub fn require_host_pid_namespace() -> Result<(), PidNamespaceError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    check_nspid(&status)
}

/// The agent could not join the host's cgroup namespace.
#[derive(Debug, thiserror::Error)]
#[error(
    "this process is in a cgroup namespace of its own and could not join the node's \
     (PID 1's, or its parent's): {source}. Workload cgroups read from /proc/<pid>/cgroup would be \
     relative to this container's and say nothing. Grant CAP_SYS_ADMIN (the DaemonSet does) \
     or run in the host's cgroup namespace (podman/docker: --cgroupns=host)"
)]
pub struct CgroupNamespaceError {
    #[source]
    source: std::io::Error,
}

/// Joins the node's cgroup namespace when this process has one of its own (a container
/// runtime on a cgroup v2 host gives every container a private one, containerd and the
/// kubelet included). `/proc/<pid>/cgroup` shows paths relative to the *reader's* cgroup
/// namespace, so only in the node's do workload cgroup paths (selectors, container ids, pod
/// UIDs) read as the kernel and the runtime named them. The node's is PID 1's or, where PID
/// 1's cannot be read, that of this process's parent (the runtime's shim, which stays in the
/// node's namespaces when the agent is the container's entry point). Must run before any
/// other thread exists: `setns` changes the calling thread, and threads inherit it when they
/// are made. Returns whether it switched. Outside the host PID namespace it does nothing
/// (PID 1 is not the node's init there; the agent refuses to start anyway).
pub fn join_host_cgroup_namespace() -> Result<bool, CgroupNamespaceError> {
    use std::os::unix::fs::MetadataExt as _;
    if require_host_pid_namespace().is_err() {
        return Ok(false);
    }
    let id = |p: &str| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(own) = id("/proc/self/ns/cgroup") else {
        return Ok(false); // no cgroup namespaces in this kernel
    };
    let parent = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|p| p.trim().parse::<u32>().ok())
        })
        .filter(|&p| p > 1);
    let node = std::iter::once(1)
        .chain(parent)
        .map(|pid| format!("/proc/{pid}/ns/cgroup"))
        .find_map(|path| id(&path).map(|ns| (path, ns)));
    let Some((path, ns)) = node else {
        return Ok(false);
    };
    if ns == own {
        return Ok(false);
    }
    let file = fs::File::open(&path).map_err(|source| CgroupNamespaceError { source })?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| CgroupNamespaceError { source: e.into() })?;
    Ok(true)
}

fn check_nspid(status: &str) -> Result<(), PidNamespaceError> {
    let Some(line) = status.lines().find_map(|l| l.strip_prefix("NSpid:")) else {
        // Kernels before 4.1 have no NSpid; latch needs far newer ones anyway.
        return Ok(());
    };
    let ids: Vec<&str> = line.split_whitespace().collect();
    if ids.len() <= 1 {
        return Ok(());
    }
    Err(PidNamespaceError {
        inner: ids.last().and_then(|p| p.parse().ok()).unwrap_or(0),
        chain: format!("NSpid: {}", ids.join(" ")),
    })
}

/// The executable path and the process's name from /proc, for a kernel that did not record
/// the process's start time and name.
fn read_process(origin: &Origin) -> (Option<PathBuf>, String) {
    let alive = process_predates(origin.pid, origin.ktime_ns);
    let exe = alive
        .then(|| fs::read_link(format!("/proc/{}/exe", origin.pid)).ok())
        .flatten();
    // The kernel recorded the connecting *thread's* name; policies mean the process's (the
    // thread group leader's), which /proc has while the process lives.
    let comm = alive
        .then(|| fs::read_to_string(format!("/proc/{}/comm", origin.pid)).ok())
        .flatten()
        .map(|c| c.trim_end_matches('\n').to_owned())
        .unwrap_or_else(|| origin.comm.clone());
    (exe, comm)
}

/// True when process `pid` exists and started no later than `connect_ns` (monotonic clock,
/// as `bpf_ktime_get_ns`), i.e. it is the process that connected, not a successor that got
/// the same pid.
fn process_predates(pid: u32, connect_ns: u64) -> bool {
    let Some(start_ticks) = seen::start_ticks(pid) else {
        return false;
    };
    let tick = seen::tick_ns();
    // One tick of slack: starttime is rounded to ticks.
    start_ticks.saturating_mul(tick) <= connect_ns.saturating_add(tick)
}

/// Cgroups under which container runtimes make their cgroups, by default.
pub const DEFAULT_RUNTIME_ROOTS: &[&str] = &[
    "/kubepods.slice",
    "/kubepods",
    "/system.slice",
    "/machine.slice",
    "/libpod_parent",
    "/docker",
];

/// The cgroup v2 hierarchy as the identity of a workload reads it: where it is mounted, and
/// below which cgroups the names a container runtime gives (container ids, pod UIDs) are
/// trusted. Anyone with a delegated subtree (a user's systemd manager, a rootless container
/// engine) can name cgroups `kubepods-pod<uid>.slice/cri-containerd-<id>.scope`; those are not
/// below a runtime root, or not owned by root, and say nothing about pods or containers.
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub root: PathBuf,
    runtime_roots: Vec<String>,
    /// Processes and cgroups seen before (shared by the clones).
    pub seen: std::sync::Arc<seen::Seen>,
    /// This node's pods from the Kubernetes API (`None`: the agent does not watch pods).
    pub pods: Option<PodCache>,
}

impl Cgroups {
    /// The defaults plus `extra` runtime roots (paths from the hierarchy's root).
    pub fn new(root: PathBuf, extra: &[String]) -> Self {
        let mut runtime_roots: Vec<String> = DEFAULT_RUNTIME_ROOTS
            .iter()
            .map(|r| (*r).to_owned())
            .chain(extra.iter().map(|r| format!("/{}", r.trim_matches('/'))))
            .collect();
        runtime_roots.sort();
        runtime_roots.dedup();
        Self {
            root,
            runtime_roots,
            seen: Default::default(),
            pods: None,
        }
    }

    /// What `path` says about systemd units, containers and pods. Container ids and pod UIDs
    /// come only from below a runtime root, and only when the cgroup is owned by root.
    pub fn info(&self, path: &str, root_owned: bool) -> CgroupInfo {
        let below = self
            .runtime_roots
            .iter()
            .filter_map(|r| {
                path.strip_prefix(r.as_str())
                    .filter(|rest| rest.starts_with('/'))
            })
            .min_by_key(|rest| rest.len());
        let mut info = CgroupInfo::parse(path);
        match below {
            Some(rest) if root_owned => {
                let trusted = CgroupInfo::parse(rest);
                info.container_id = trusted.container_id;
                info.pod_uid = trusted.pod_uid;
            }
            _ => {
                info.container_id = None;
                info.pod_uid = None;
            }
        }
        info
    }
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
    #[test]
    fn container_ids_and_pod_uids_only_below_a_runtime_root_and_from_root_owned_cgroups() {
        let cg = Cgroups::new(
            "/sys/fs/cgroup".into(),
            &["/latch-test-1/kubepods.slice".into()],
        );
        let pod = format!(
            "/kubepods-besteffort.slice/\
             kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/\
             cri-containerd-{ID}.scope"
        );
        for root in ["/kubepods.slice", "/latch-test-1/kubepods.slice"] {
            let info = cg.info(&format!("{root}{pod}"), true);
            assert_eq!(info.container_id.as_deref(), Some(ID), "{root}");
            assert!(info.pod_uid.is_some(), "{root}");
            let user_made = cg.info(&format!("{root}{pod}"), false);
            assert_eq!(user_made.container_id, None, "not root-owned: {root}");
            assert_eq!(user_made.pod_uid, None);
        }
        // A user's delegated subtree can spell the same names.
        let spoof = format!("/user.slice/user-1000.slice/user@1000.service/kubepods.slice{pod}");
        let info = cg.info(&spoof, true);
        assert_eq!((info.container_id, info.pod_uid), (None, None));
        // A prefix that is not a whole path component is no root.
        let info = cg.info(&format!("/kubepods.slicex{pod}"), true);
        assert_eq!(info.container_id, None);
        let docker = cg.info(&format!("/system.slice/docker-{ID}.scope"), true);
        assert_eq!(docker.container_id.as_deref(), Some(ID));
    }

    #[test]
    fn a_nested_pid_namespace_is_refused_with_both_ids() {
        let err = check_nspid("Name:\tlatch\nNSpid:\t4242\t7\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("pid 7 in a nested namespace"), "{msg}");
        assert!(msg.contains("NSpid: 4242 7"), "{msg}");
        assert!(check_nspid("NSpid:\t4242\n").is_ok());
    }

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

    /// A workload that ran this test binary when it connected.
    fn workload() -> Workload {
        let me = std::env::current_exe().unwrap();
        Workload {
            pid: 10,
            uid: 1001,
            gid: 1001,
            comm: "psql".into(),
            exe_id: ExeRecord::Recorded(exe::ExeId::of_path(&me).unwrap()),
            exe: Some(me),
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
        let mut all = sel(|s| {
            s.uid = Some(1001);
            s.cgroup = Some("/system.slice".into());
        });
        all.exe = Some(std::env::current_exe().unwrap());
        assert!(w.matches(&all));
        assert!(!w.matches(&sel(|s| {
            s.uid = Some(1001);
            s.comm = Some("bash".into());
        })));
        assert!(!w.matches(&sel(|s| s.cgroup = Some("/system.slice/orders".into()))));
        assert!(
            !w.matches(&sel(|s| s.namespace = Some("prod".into()))),
            "k8s fields admit nothing without pod metadata"
        );
        assert!(w.admitted_by(&[]));
        assert!(w.admitted_by(&[sel(|s| s.uid = Some(0)), sel(|s| s.gid = Some(1001))]));
    }

    #[test]
    fn kubernetes_fields_match_the_pods_metadata() {
        let sel = |f: fn(&mut WorkloadSelector)| {
            let mut s = WorkloadSelector::default();
            f(&mut s);
            s
        };
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let mut w = workload();
        w.pod_uid = Some(uid.into());
        w.pod = Some(PodMeta {
            namespace: "shop".into(),
            name: "orders-1".into(),
            service_account: "orders".into(),
            labels: [("app", "orders"), ("tier", "db")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        });
        assert!(w.matches(&sel(|s| s.namespace = Some("shop".into()))));
        assert!(!w.matches(&sel(|s| s.namespace = Some("shop2".into()))));
        assert!(w.matches(&sel(|s| s.service_account = Some("orders".into()))));
        assert!(!w.matches(&sel(|s| s.service_account = Some("default".into()))));
        let mut labels = sel(|s| s.namespace = Some("shop".into()));
        labels.labels.insert("app".into(), "orders".into());
        assert!(w.matches(&labels));
        labels.labels.insert("tier".into(), "web".into());
        assert!(!w.matches(&labels), "every label must match");
        labels.labels.insert("tier".into(), "db".into());
        labels.uid = Some(0);
        assert!(!w.matches(&labels), "the other fields still count");
        assert_eq!(w.pod_verdict(&[labels.clone()]), None);

        // The same pod before its metadata arrived.
        w.pod = None;
        w.pod_unknown = true;
        labels.uid = None;
        assert!(!w.matches(&labels));
        let why = w.denial_details(&[labels.clone()]).unwrap();
        assert!(why.contains(&format!("pod {uid}: no metadata")), "{why}");
        // Not in a pod at all.
        w.pod_uid = None;
        w.pod_unknown = false;
        assert_eq!(
            w.pod_verdict(&[labels]).as_deref(),
            Some("not in a pod (no pod UID in its cgroup)")
        );
        assert_eq!(w.pod_verdict(&[sel(|s| s.uid = Some(1))]), None);
    }

    #[test]
    fn exe_is_decided_by_the_kernels_record_not_the_path_the_process_runs_now() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        let other = dir.path().join("other");
        std::fs::write(&allowed, b"allowed").unwrap();
        std::fs::write(&other, b"other").unwrap();
        let sel = WorkloadSelector {
            exe: Some(allowed.clone()),
            ..Default::default()
        };
        // Connected as `other`, then exec'd `allowed`: /proc says `allowed`, the kernel's
        // record says `other`.
        let mut w = workload();
        w.exe = Some(allowed.clone());
        w.exe_id = ExeRecord::Recorded(exe::ExeId::of_path(&other).unwrap());
        assert!(!w.matches(&sel));
        let why = w.exe_verdicts(std::slice::from_ref(&sel)).unwrap();
        assert!(why.contains("a different executable"), "{why}");
        assert!(why.contains(&allowed.display().to_string()), "{why}");
        // Nothing recorded: never, whatever /proc says.
        w.exe_id = ExeRecord::Unrecorded(exe::Unrecorded::NoOffsets);
        assert!(!w.matches(&sel));
        let why = w.exe_verdicts(std::slice::from_ref(&sel)).unwrap();
        assert!(why.contains("no executable recorded"), "{why}");
        // Recorded as `allowed`: admitted, even with no path from /proc (process gone).
        w.exe = None;
        w.exe_id = ExeRecord::Recorded(exe::ExeId::of_path(&allowed).unwrap());
        assert!(w.matches(&sel));
        assert_eq!(w.exe_verdicts(&[WorkloadSelector::default()]), None);
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
