//! A simulated Kubernetes pod: the cgroup a kubelet would give one container, a named network
//! namespace, and a veth pair to the host as a CNI would lay it out, all under a test's own
//! cgroup and removed on drop (also when the test panics).
//!
//! ```text
//! <test cgroup>/kubepods.slice/kubepods-besteffort.slice/
//!     kubepods-besteffort-pod<UID, '-' as '_'>.slice/cri-containerd-<64 hex>.scope
//! /run/netns/latch-pod-<test pid>-<n>      lo up, eth0 = 169.254.k.2/30, fd7a:7c00:<k>::2/64
//! host namespace: lp<pid % 10000><n>h      169.254.k.1/30, fd7a:7c00:<k>::1/64
//! ```
//!
//! Traffic stays on the veth pair: the pod's default routes point at the host side's
//! addresses, and nothing forwards beyond them.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{TestCgroup, bins, cgroup::v2_root};

/// Pods made by this process so far: numbers the namespace and veth names, and varies `k`.
static PODS: AtomicU32 = AtomicU32::new(0);

/// Serialises the choice of `k` (and the creation of the addresses) between all pods of all
/// test processes on this machine.
const LOCK_FILE: &str = "/run/lock/latch-test-pods.lock";

/// A pod of one container: its cgroup, network namespace and veth pair. See the module
/// documentation for the layout. Everything is removed by [`Pod::delete`] or on drop.
pub struct Pod {
    index: u8,
    uid: String,
    container_id: String,
    /// `<parent>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<…>.slice`.
    pod_slice: PathBuf,
    /// The container's `.scope` directory inside `pod_slice`.
    scope: PathBuf,
    netns: String,
    host_if: String,
    /// The third octet of the IPv4 addresses and the third group of the IPv6 ones; 0 until
    /// chosen.
    k: u8,
    /// What `new` made so far: cleanup removes only that (a name taken by someone else
    /// is never deleted).
    made_netns: bool,
    made_veth: bool,
    cleaned: bool,
}

impl Pod {
    /// Creates pod number `index` of a test under `parent`: the cgroup directories (sharing
    /// the `kubepods*.slice` parents with the test's other pods), the network namespace with
    /// `lo` up, and the veth pair with addresses and default routes. Panics with context if a
    /// step fails, after undoing the steps already done.
    ///
    /// `index` only labels the pod (see [`Pod::index`]); the names of the namespace and of
    /// the veth use a process-wide counter, since tests in one process run in parallel.
    pub fn new(parent: &TestCgroup, index: u8) -> Pod {
        crate::require_root();
        let n = PODS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let uid = random_uuid();
        let container_id = hex(&random_bytes(32));
        let pod_slice = parent
            .path()
            .join("kubepods.slice")
            .join("kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ));
        let scope = pod_slice.join(format!("cri-containerd-{container_id}.scope"));
        let mut pod = Pod {
            index,
            uid,
            container_id,
            pod_slice,
            scope,
            netns: format!("latch-pod-{pid}-{n}"),
            host_if: format!("lp{:04}{:03}h", pid % 10_000, n % 1000),
            k: 0,
            made_netns: false,
            made_veth: false,
            cleaned: false,
        };
        // From here on a panic drops `pod`, which removes whatever was made.
        fs::create_dir_all(&pod.scope)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", pod.scope.display()));
        ip(&["netns", "add", &pod.netns]);
        pod.made_netns = true;
        ip(&["-n", &pod.netns, "link", "set", "lo", "up"]);
        pod.make_veth(pid, n);
        pod.wait_not_tentative();
        pod
    }

    /// Creates the veth pair and its addresses under the machine-wide lock, choosing `k` so
    /// that no interface of the host namespace has an address or route in its subnets.
    fn make_veth(&mut self, pid: u32, n: u32) {
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap_or_else(|e| panic!("open {LOCK_FILE}: {e}"));
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            panic!("flock {LOCK_FILE}: {}", std::io::Error::last_os_error());
        }
        // `pid % 10000` can coincide with another test process's: on a name taken, try the
        // next number of this process.
        for attempt in 0.. {
            let out = ip_output(&[
                "link",
                "add",
                &self.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &self.netns,
            ]);
            if out.status.success() {
                self.made_veth = true;
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                attempt < 20 && err.contains("exists"),
                "create veth {} (peer eth0 in {}): {err}",
                self.host_if,
                self.netns,
            );
            let next = PODS.fetch_add(1, Ordering::Relaxed);
            self.host_if = format!("lp{:04}{:03}h", pid % 10_000, next % 1000);
        }
        let start = (pid.wrapping_mul(7).wrapping_add(n)) % 250;
        let mut chosen = None;
        for step in 0..250 {
            let k = ((start + step) % 250 + 1) as u8;
            if in_use(k) {
                continue;
            }
            let out = ip_output(&[
                "addr",
                "add",
                &format!("169.254.{k}.1/30"),
                "dev",
                &self.host_if,
            ]);
            if out.status.success() {
                chosen = Some(k);
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("exists"),
                "add 169.254.{k}.1/30 to {}: {err}",
                self.host_if
            );
        }
        let k = chosen.unwrap_or_else(|| panic!("no free 169.254.k.0/30 (k in 1..=250)"));
        self.k = k;
        let (h4, p4, h6, p6) = (
            self.host_ip4().to_string(),
            self.pod_ip4().to_string(),
            self.host_ip6().to_string(),
            self.pod_ip6().to_string(),
        );
        let ns = self.netns.as_str();
        let host = self.host_if.as_str();
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{h6}/64"),
            "dev",
            host,
            "nodad",
        ]);
        ip(&["link", "set", host, "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{p4}/30"), "dev", "eth0"]);
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{p6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "route", "add", "default", "via", &h4]);
        ip(&["-n", ns, "-6", "route", "add", "default", "via", &h6]);
        drop(lock);
    }

    /// Waits until neither side's `fd7a:` address is tentative (they are added with
    /// `nodad`, so this normally holds at once).
    fn wait_not_tentative(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let host = ip_output(&[
                "-6",
                "-o",
                "addr",
                "show",
                "dev",
                &self.host_if,
                "tentative",
            ]);
            let pod = ip_output(&[
                "-n",
                &self.netns,
                "-6",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
                "tentative",
            ]);
            let tentative = |o: &std::process::Output| {
                !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("fd7a:")
            };
            if !tentative(&host) && !tentative(&pod) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "IPv6 addresses of pod {} still tentative after 10 s",
                self.netns
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `index` passed to [`Pod::new`].
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The pod UID: a random version-4 UUID, 36 characters, lowercase.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The container id: 64 lowercase hex digits.
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// The network namespace's name, `latch-pod-<test pid>-<n>`.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// The container's `cri-containerd-<id>.scope` cgroup directory.
    pub fn cgroup_path(&self) -> &Path {
        &self.scope
    }

    /// The scope's path relative to the cgroup v2 root, starting with `/` (as in
    /// `/proc/<pid>/cgroup`).
    pub fn cgroup_relative(&self) -> String {
        let rel = self
            .scope
            .strip_prefix(v2_root())
            .expect("pod cgroup lies under the cgroup v2 root");
        format!("/{}", rel.display())
    }

    /// The name of the veth's host-side end.
    pub fn host_interface(&self) -> &str {
        &self.host_if
    }

    /// The host side's IPv4 address, `169.254.k.1`.
    pub fn host_ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(169, 254, self.k, 1)
    }

    /// The pod's IPv4 address on `eth0`, `169.254.k.2`.
    pub fn pod_ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(169, 254, self.k, 2)
    }

    /// The host side's IPv6 address, `fd7a:7c00:<k>::1`.
    pub fn host_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7a, 0x7c00, self.k.into(), 0, 0, 0, 0, 1)
    }

    /// The pod's IPv6 address on `eth0`, `fd7a:7c00:<k>::2`.
    pub fn pod_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7a, 0x7c00, self.k.into(), 0, 0, 0, 0, 2)
    }

    /// A command that, between fork and exec, moves itself into the container's cgroup and
    /// then into the pod's network namespace: a process of the pod's container.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.scope.join("cgroup.procs"))
            .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", self.scope.display()));
        let netns = self.open_netns();
        let mut cmd = Command::new(program);
        // SAFETY: only write(2) and setns(2) on descriptors opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// A command that joins the pod's network namespace between fork and exec but stays in
    /// the caller's cgroup: for servers on the pod's own loopback that nothing should
    /// intercept. The caller owns (and must kill) the process: deleting the pod does not.
    pub fn netns_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let netns = self.open_netns();
        let mut cmd = Command::new(program);
        // SAFETY: only setns(2) on a descriptor opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    fn open_netns(&self) -> fs::File {
        fs::File::open(self.netns_path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.netns_path().display()))
    }

    /// Kills everything in the container's cgroup and removes the pod; panics (unless
    /// already panicking) if something could not be removed. Dropping a pod does the same
    /// but only warns.
    pub fn delete(mut self) {
        let failures = self.cleanup();
        if !failures.is_empty() && !std::thread::panicking() {
            panic!("deleting pod {}: {}", self.netns, failures.join("; "));
        }
    }

    /// Undoes what `new` did, in reverse; idempotent. Returns what could not be removed.
    fn cleanup(&mut self) -> Vec<String> {
        if self.cleaned {
            return Vec::new();
        }
        self.cleaned = true;
        let mut failures = Vec::new();
        let _ = fs::OpenOptions::new()
            .write(true)
            .open(self.scope.join("cgroup.kill"))
            .and_then(|mut f| f.write_all(b"1"));
        for dir in [&self.scope, &self.pod_slice] {
            if !remove_cgroup_dir(dir) {
                failures.push(format!("cgroup {} not removed", dir.display()));
            }
        }
        // Deleting one end of a veth pair deletes both.
        if self.made_veth {
            let out = ip_output(&["link", "del", &self.host_if]);
            if !out.status.success() && link_exists(&self.host_if) {
                failures.push(format!(
                    "veth {}: {}",
                    self.host_if,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        if self.made_netns {
            let out = ip_output(&["netns", "del", &self.netns]);
            if !out.status.success() && self.netns_path().exists() {
                failures.push(format!(
                    "netns {}: {}",
                    self.netns,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        failures
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for f in self.cleanup() {
            eprintln!("warning: pod {}: {f}", self.netns);
        }
    }
}

/// Removes an (empty but for exiting processes) cgroup directory, retrying for up to five
/// seconds while killed processes exit. True when it is gone.
pub(crate) fn remove_cgroup_dir(dir: &Path) -> bool {
    for _ in 0..250 {
        match fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

/// Whether an address or route of the host namespace lies in `169.254.k.0/30` or
/// `fd7a:7c00:<k>::/64`.
fn in_use(k: u8) -> bool {
    let v4 = format!("169.254.{k}.");
    let v6 = format!("fd7a:7c00:{k:x}:");
    [
        ip_output(&["-o", "addr", "show"]),
        ip_output(&["route", "show"]),
        ip_output(&["-6", "route", "show"]),
    ]
    .iter()
    .any(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .any(|t| t.starts_with(&v4) || t.starts_with(&v6))
    })
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Runs `ip ARGS`; panics with its output unless it succeeded.
fn ip(args: &[&str]) {
    crate::run_ok(Command::new(ip_path()).args(args));
}

/// Runs `ip ARGS` and returns its output, whatever the status.
fn ip_output(args: &[&str]) -> std::process::Output {
    Command::new(ip_path())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"))
}

fn ip_path() -> PathBuf {
    bins::tool("ip", "the Debian package iproute2")
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random version-4 UUID in its 8-4-4-4-12 lowercase form.
fn random_uuid() -> String {
    let mut b = random_bytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_and_container_id_have_the_kubernetes_shapes() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.matches('-').count(), 4);
        assert_eq!(&u[14..15], "4");
        assert!(
            u.chars()
                .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        let id = hex(&random_bytes(32));
        assert_eq!(id.len(), 64);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        let name = format!("lp{:04}{:03}h", 4_194_303 % 10_000, 4_000_000_000u32 % 1000);
        assert!(name.len() <= 15, "{name}");
    }
}
