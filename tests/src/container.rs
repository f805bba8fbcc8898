//! One real container for end-to-end tests: podman (runtime runc) running Debian's static
//! busybox from an image built locally, in a network namespace the test made and in a cgroup
//! below the test's own [`TestCgroup`], so that latch attached to that cgroup sees the
//! container's connects as it would a pod's.
//!
//! What this needs on this kind of host (hybrid cgroups, no systemd as PID 1, no registry):
//! - `podman --runtime runc`: crun refuses with this host's low hard limits, and the
//!   `--ulimit nofile=1024:1024 --ulimit nproc=1024:1024` keep runc below them too.
//! - `--cgroup-manager cgroupfs --cgroup-parent /<test cgroup>`: the parent is a path from the
//!   root of *every* hierarchy. podman itself sees cgroup v1 here, but runc also makes the
//!   same path in the unified (v2) hierarchy and puts the container there, so its processes
//!   land in `<v2 root>/<test cgroup>/libpod-<64 hex id>` from their first instruction. (A
//!   relative parent would be resolved against podman's own cgroup in each hierarchy.)
//!   runc also leaves `<v1 mount>/<test cgroup>` directories behind in every v1 hierarchy;
//!   [`Container`]'s drop removes them once they are empty.
//! - `--cgroups no-conmon`: conmon stays in the caller's cgroups instead of a `conmon` cgroup
//!   next to the container's (outside the intercepted cgroup either way).
//! - `--network ns:/run/netns/<name>`: podman joins the namespace as it is; no bridge,
//!   netavark or iptables rules are involved.
//! - The image is `FROM scratch` with `/bin/busybox` and a symlink per applet, built with
//!   `buildah bud`; nothing is pulled. Debian's packages ship `/etc/containers/policy.json`
//!   and registries.conf, and storage defaults to overlay, so no configuration is written.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{TempDir, TestCgroup, bins, cgroup, run_ok};

/// The static busybox the image is made of (Debian's `busybox-static`).
const BUSYBOX: &str = "/bin/busybox";
/// Images are tagged `<IMAGE_REPO>:<pid>-<n>`.
const IMAGE_REPO: &str = "localhost/latch-test-busybox";

/// Panics (naming `cargo xtask setup`) unless podman, buildah, runc and a static busybox are
/// installed, and unless running as root.
pub fn require_podman() {
    crate::require_root();
    for tool in ["podman", "buildah", "runc"] {
        bins::tool(tool, &format!("the Debian package {tool}"));
    }
    let static_busybox = fs::read(BUSYBOX).is_ok_and(|elf| is_static_elf(&elf));
    assert!(
        static_busybox,
        "{BUSYBOX} is missing or not statically linked (a FROM-scratch image has no libc): \
         install the Debian package busybox-static (`cargo xtask setup` does)"
    );
}

/// Whether `elf` is a 64-bit little-endian ELF file without a program interpreter.
pub fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum as usize).all(|i| {
        let at = phoff as usize + i * phentsize as usize;
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

/// `podman` with the global options every call uses (the same on each call, so that podman
/// never mixes cgroup managers or runtimes for one container).
fn podman() -> Command {
    let mut cmd = Command::new(bins::tool("podman", "the Debian package podman"));
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A per-process counter for unique names.
fn next() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The busybox image, shared by the containers alive at the same time and removed with the
/// last of them: each build gets a fresh tag, so a build never races a removal.
struct Image {
    tag: String,
}

impl Image {
    /// The current image, built if no container holds one.
    fn get() -> Arc<Image> {
        static CURRENT: Mutex<Weak<Image>> = Mutex::new(Weak::new());
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(image) = current.upgrade() {
            return image;
        }
        let image = Arc::new(Image::build());
        *current = Arc::downgrade(&image);
        image
    }

    fn build() -> Image {
        remove_stale_images();
        let ctx = TempDir::new("container-image");
        let bin = ctx.path().join("bin");
        fs::create_dir(&bin).expect("create image context");
        fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox into the image context");
        let list = run_ok(Command::new(BUSYBOX).arg("--list"));
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" && !applet.contains('/') {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("symlink applet");
            }
        }
        let containerfile = ctx.write(
            "Containerfile",
            "FROM scratch\nCOPY bin/ /bin/\nENV PATH=/bin\nENTRYPOINT [\"/bin/busybox\"]\n",
        );
        // The image owns its tag from here on: a failed build still gets `rmi` on drop.
        let image = Image {
            tag: format!("{IMAGE_REPO}:{}-{}", std::process::id(), next()),
        };
        run_ok(
            Command::new(bins::tool("buildah", "the Debian package buildah"))
                .args(["bud", "--quiet", "--tag", &image.tag, "--file"])
                .arg(&containerfile)
                .arg(ctx.path())
                .stdout(Stdio::null()),
        );
        image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rmi", &self.tag])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes images of this harness whose test process is gone (killed before its drops ran).
fn remove_stale_images() {
    let Ok(out) = podman()
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .args(["--filter", &format!("reference={IMAGE_REPO}")])
        .output()
    else {
        return;
    };
    for tag in String::from_utf8_lossy(&out.stdout).lines() {
        let pid = tag.rsplit(':').next().and_then(|t| t.split('-').next());
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = podman()
                .args(["rmi", tag])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A network namespace `latch-ct-<pid>-<n>` with a veth pair: `host_if()` on the host side
/// with 169.254.k.1/30, `eth0` inside with 169.254.k.2/30 and a default route to the host side,
/// k in 200..=250 and not on any host interface. Removed on drop.
pub struct ContainerNet {
    name: String,
    host_if: String,
    k: u8,
}

impl ContainerNet {
    pub fn new() -> Self {
        crate::require_root();
        let pid = std::process::id();
        let n = next();
        let mut net = ContainerNet {
            name: format!("latch-ct-{pid}-{n}"),
            // At most 15 bytes (IFNAMSIZ - 1): "lc" + pid (up to 7 digits) + "-" + n + "h".
            host_if: format!("lc{pid}-{}h", n % 1000),
            k: 0,
        };
        let ip = |args: &[&str]| {
            run_ok(Command::new(bins::tool("ip", "the Debian package iproute2")).args(args))
        };
        // From here on the drop removes whatever exists of the namespace and the pair.
        ip(&["netns", "add", &net.name]);
        let used = stdout(&ip(&["-o", "-4", "addr", "show"]));
        let start = (pid as usize + n as usize) % 51;
        net.k = (0..51)
            .map(|i| 200 + ((start + i) % 51) as u8)
            .find(|k| !used.contains(&format!(" 169.254.{k}.")))
            .expect("every 169.254.200-250.0/30 is taken on the host: leftover veths?");
        let (host, inside) = (
            format!("{}/30", net.host_ip()),
            format!("{}/30", net.container_ip()),
        );
        let (ns, hif) = (net.name.as_str(), net.host_if.as_str());
        ip(&[
            "link", "add", hif, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&["addr", "add", &host, "dev", hif]);
        ip(&["link", "set", hif, "up"]);
        ip(&["-n", ns, "addr", "add", &inside, "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        let gateway = net.host_ip().to_string();
        ip(&["-n", ns, "route", "add", "default", "via", &gateway]);
        net
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `podman run --network ns:<path>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The host side's interface name.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// 169.254.k.1, the host side: bind servers the container should reach here.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(169, 254, self.k, 1)
    }

    /// 169.254.k.2, the container's address (its connects come from here).
    pub fn container_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(169, 254, self.k, 2)
    }
}

impl Default for ContainerNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ContainerNet {
    fn drop(&mut self) {
        let ip = bins::tool("ip", "the Debian package iproute2");
        let quiet = |args: &[&str]| {
            let _ = Command::new(&ip)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        // Deleting the namespace deletes its end of the pair and with it the host end; the
        // second command is for a pair whose inner end never got into the namespace.
        quiet(&["netns", "del", &self.name]);
        quiet(&["link", "del", &self.host_if]);
    }
}

/// A running busybox container (`podman run -d`), named `latch-test-<pid>-<n>`; removed
/// (`podman rm -f`, no stop grace) on drop, before the [`TestCgroup`] it lives under can go.
pub struct Container<'a> {
    name: String,
    id: String,
    /// The parent cgroup's path from the hierarchy roots, `/latch-test-…`.
    parent: String,
    _cgroup: &'a TestCgroup,
    image: Arc<Image>,
}

impl<'a> Container<'a> {
    /// Starts `/bin/busybox <args…>` detached in a cgroup below `parent`, in the network
    /// namespace at `netns_path` (e.g. [`ContainerNet::path`]).
    pub fn run(parent: &'a TestCgroup, netns_path: &Path, args: &[&str]) -> Self {
        let rel = parent
            .path()
            .strip_prefix(cgroup::v2_root())
            .expect("the test cgroup is below the cgroup v2 root");
        assert!(
            rel.components().next().is_some(),
            "never put a container's cgroup at the cgroup v2 root"
        );
        let mut container = Container {
            name: format!("latch-test-{}-{}", std::process::id(), next()),
            id: String::new(),
            parent: format!("/{}", rel.display()),
            _cgroup: parent,
            image: Image::get(),
        };
        let mut cmd = podman();
        cmd.args([
            "run",
            "--detach",
            "--pull",
            "never",
            "--name",
            &container.name,
        ])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args([
            "--cgroups",
            "no-conmon",
            "--cgroup-parent",
            &container.parent,
        ])
        .arg(format!("--network=ns:{}", netns_path.display()))
        .arg(&container.image.tag)
        .args(args);
        let out = cmd.output().expect("run podman");
        // `container` is dropped (and the half-made container removed) if this panics.
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let id = stdout(&out);
        assert!(
            id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "podman run printed {id:?}, not a container id"
        );
        container.id = id;
        container
    }

    /// The container's id, 64 hex digits.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's name, `latch-test-<pid>-<n>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image it runs (removed when the last container using it is dropped).
    pub fn image(&self) -> &str {
        &self.image.tag
    }

    /// The host PID of its main process, `None` once it has exited.
    pub fn pid(&self) -> Option<u32> {
        let out = run_ok(podman().args(["inspect", "--format", "{{.State.Pid}}", &self.id]));
        stdout(&out).parse().ok().filter(|&p| p != 0)
    }

    /// The cgroup v2 path (from the v2 root) where podman and runc put it:
    /// `<test cgroup>/libpod-<id>`.
    pub fn expected_cgroup(&self) -> String {
        format!("{}/libpod-{}", self.parent, self.id)
    }

    /// The cgroup v2 path of its main process, the `0::` line of `/proc/<pid>/cgroup`.
    /// Panics if the container is no longer running.
    pub fn cgroup_relative(&self) -> String {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("container {} is not running", self.name));
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("no cgroup v2 line in /proc/<pid>/cgroup")
            .to_owned()
    }

    /// Runs `/bin/busybox <args…>` inside the running container (`podman exec`); its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        podman()
            .args(["exec", &self.id, "/bin/busybox"])
            .args(args)
            .output()
            .expect("run podman exec")
    }

    /// What it wrote so far, stdout then stderr.
    pub fn logs(&self) -> String {
        let out = run_ok(podman().args(["logs", &self.id]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits for it to exit and returns its exit code; panics (with its logs) after `timeout`.
    pub fn wait(&self, timeout: Duration) -> i32 {
        let mut child = podman()
            .args(["wait", &self.id])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run podman wait");
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait().expect("wait for podman wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "container {} still runs after {timeout:?}; logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("podman wait output");
        stdout(&out)
            .parse()
            .unwrap_or_else(|_| panic!("podman wait printed {:?}", stdout(&out)))
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let removed = podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !removed.is_ok_and(|s| s.success()) {
            eprintln!("warning: could not remove container {}", self.name);
        }
        // runc removed the container's cgroups but left their parents in the v1 hierarchies;
        // these fail (and stay) while another container still uses them.
        for dir in v1_mounts() {
            let _ = fs::remove_dir(dir.join(self.parent.trim_start_matches('/')));
        }
    }
}

/// The mount points of the cgroup v1 hierarchies (none on a pure cgroup v2 host).
pub fn v1_mounts() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}
