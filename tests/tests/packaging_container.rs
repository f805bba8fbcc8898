//! The container image (deploy/Containerfile) runs the way the DaemonSet
//! (deploy/kubernetes/daemonset.yaml) says, and brokers.
//!
//! No cluster runs here; podman stands in for the kubelet. The image is built with buildah
//! from the static (musl) `latch` that `cargo xtask test` builds with the dev profile
//! (`cargo build -p latch --bin latch --target x86_64-unknown-linux-musl`; see
//! `bins::latch_static`), stripped of debug info to keep the build short; a release image
//! (`cargo xtask image`) differs only in the profile. The container gets what the DaemonSet
//! asks for, read from daemonset.yaml: host PID and network namespaces, the capabilities it
//! adds (all others dropped, not privileged), no_new_privs, a read-only root, its hostPath
//! mounts (bpffs, cgroup fs, /run/netns; the state directory is a temporary directory instead
//! of the host's /var/lib/latch), the ConfigMap (/etc/latch/) and the Secret
//! (/var/run/latch/secrets/) as directories laid out the way the kubelet lays them out (a
//! world-writable root, `..data` and symlinks), its arguments (with `--cgroup` pointed at the test's own cgroup, never the
//! pods' or the root), and its readiness probe. latch inside the container then brokers psql,
//! a process on the host in the intercepted cgroup holding no password, to a real
//! PostgreSQL 15.
use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use latch_tests::{
    TempDir, TestCgroup, bins, container, http, leftovers,
    manifests::{self, deploy_dir},
    postgres::{PgCluster, SCRAM_USER, secrets_yaml},
    run_ok,
    servers::free_port,
    wait_for,
};
use serde_json::Value;

const PASSWORD: &str = "ct-Secret-5e21";
const IMAGE_REPO: &str = "localhost/latch-test-agent";

fn podman() -> Command {
    // As tests/src/container.rs: runc (crun refuses this host's hard limits), cgroupfs.
    let mut cmd = Command::new(bins::tool("podman", "the Debian package podman"));
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// The image built from deploy/Containerfile; removed on drop.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rmi", "--force", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A container by name; removed (no grace) on drop.
struct Running(String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn build_image() -> Image {
    let static_bin = bins::latch_static();
    let elf = std::fs::read(&static_bin).expect("read the static latch");
    assert!(
        container::is_static_elf(&elf),
        "{} is not a static executable",
        static_bin.display()
    );
    let ctx = TempDir::new("image-ctx");
    run_ok(
        Command::new(bins::tool("strip", "the Debian package binutils"))
            .arg("--strip-debug")
            .arg(&static_bin)
            .arg("-o")
            .arg(ctx.path().join("latch")),
    );
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        ctx.path().join("ca-certificates.crt"),
    )
    .expect("copy /etc/ssl/certs/ca-certificates.crt (Debian ca-certificates)");
    let image = Image(format!("{IMAGE_REPO}:{}", std::process::id()));
    let started = std::time::Instant::now();
    run_ok(
        Command::new(bins::tool("buildah", "the Debian package buildah"))
            .args(["bud", "--quiet", "--tag", &image.0, "--file"])
            .arg(deploy_dir().join("Containerfile"))
            .arg(ctx.path())
            .stdout(Stdio::null()),
    );
    eprintln!("image built in {:?}", started.elapsed());
    image
}

/// Fills `dir` the way the kubelet fills a ConfigMap or Secret volume (its atomic writer):
/// the files in a timestamped directory (0755) with mode `file_mode` (`defaultMode`), a
/// `..data` symlink to it, and a symlink per key to `..data/<key>`; the volume's root is
/// world-writable (0777), as the kubelet leaves it (kubernetes/kubernetes#133641).
fn kubelet_volume(dir: &Path, files: &[(&str, &str)], file_mode: u32) {
    use std::os::unix::fs::{PermissionsExt as _, symlink};
    let ts = "..2026_12_03_15_00_00.1234567890";
    let data = dir.join(ts);
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, text) in files {
        let f = data.join(name);
        std::fs::write(&f, text).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(file_mode)).unwrap();
        symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
    symlink(ts, dir.join("..data")).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// What the kubelet does when the ConfigMap or Secret changes: the new files in a new
/// timestamped directory, a `..data_tmp` symlink to it renamed over `..data`, the old
/// directory removed.
fn kubelet_update(dir: &Path, files: &[(&str, &str)], file_mode: u32) {
    use std::os::unix::fs::{PermissionsExt as _, symlink};
    let old = std::fs::read_link(dir.join("..data")).unwrap();
    let ts = "..2026_12_03_15_05_00.2345678901";
    let data = dir.join(ts);
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, text) in files {
        let f = data.join(name);
        std::fs::write(&f, text).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(file_mode)).unwrap();
    }
    symlink(ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(old)).unwrap();
}

/// The audit records among a container's log lines.
fn audit_records(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("outcome").is_some())
        .collect()
}

#[test]
fn the_image_runs_as_the_daemonset_says_and_brokers_psql_without_a_password() {
    container::require_podman();
    let image = build_image();
    let (pod, spec) = manifests::daemonset();

    // A server whose password only the secrets file holds.
    let pg = PgCluster::start("127.0.0.2", PASSWORD, "unused-md5", "unused-plain");
    let cg = TestCgroup::new();

    // The ConfigMap latch-policies and the Secret latch-secrets, laid out as the kubelet
    // lays out their volumes (see [`kubelet_volume`]).
    let etc = TempDir::new("ct-etc");
    let policy = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: local}}\n\
         spec: {{file: {{path: /var/run/latch/secrets/secrets.yaml}}}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: orders-db}}\n\
         spec:\n  destination: {{address: \"{}\", port: {}}}\n  workloads: all\n  \
         protocol: postgres\n  tls: {{mode: disable}}\n  credentials:\n    store: local\n    \
         username: {{path: db, field: username}}\n    password: {{path: db, field: password}}\n",
        pg.addr.ip(),
        pg.addr.port()
    );
    kubelet_volume(etc.path(), &[("orders-db.yaml", &policy)], 0o644);
    let secrets = TempDir::new("ct-secrets");
    kubelet_volume(
        secrets.path(),
        &[("secrets.yaml", &secrets_yaml(SCRAM_USER, PASSWORD))],
        0o400,
    );
    let state = TempDir::new("ct-state");
    // The Kubernetes API the DaemonSet's agent watches (its node's pods, the latch.dev
    // resources): the test server, over the host network, named by a kubeconfig in place of
    // the in-cluster service account.
    let api = latch_tests::kube_api::KubeApi::start();
    let kube = TempDir::new("ct-kube");
    kube.write("config", &api.kubeconfig());

    let name = format!("latch-test-agent-{}", std::process::id());
    let mut cmd = podman();
    // Descriptors: a kubelet's container gets the runtime's limit (see the DaemonSet); here the
    // most this process may grant. (nproc as in tests/src/container.rs, for runc.)
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    cmd.args(["run", "--detach", "--pull", "never", "--name", &name])
        .args(["--ulimit", &format!("nofile={hard}:{hard}")])
        .args(["--ulimit", "nproc=1024:1024"])
        .args(["--cgroups", "no-conmon"])
        // A cgroup namespace of its own, as containerd gives every container on a cgroup v2
        // node (podman on this hybrid host would share the host's): the agent joins the
        // host's at start, or the workload cgroups it reads would be relative to its own.
        .arg("--cgroupns=private");
    // Host namespaces.
    assert_eq!(
        pod["hostPID"], true,
        "the agent needs the host PID namespace"
    );
    cmd.arg("--pid=host");
    if pod["hostNetwork"] == true {
        cmd.arg("--network=host");
    }
    // The DaemonSet's security context.
    let sc = &spec["securityContext"];
    assert_eq!(sc["privileged"], false);
    cmd.arg("--cap-drop=all");
    for cap in manifests::daemonset_capabilities() {
        cmd.arg(format!("--cap-add={cap}"));
    }
    if sc["allowPrivilegeEscalation"] == false {
        cmd.arg("--security-opt=no-new-privileges");
    }
    if sc["readOnlyRootFilesystem"] == true {
        cmd.arg("--read-only");
    }
    if sc["appArmorProfile"]["type"] == "Unconfined" {
        cmd.arg("--security-opt=apparmor=unconfined");
    }
    // Its mounts.
    let volumes = pod["volumes"].as_array().unwrap();
    for m in spec["volumeMounts"].as_array().unwrap() {
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume {}", m["name"]));
        let target = m["mountPath"].as_str().unwrap();
        let source = if v["configMap"].is_object() {
            etc.path().display().to_string()
        } else if v["secret"].is_object() {
            secrets.path().display().to_string()
        } else {
            let host = v["hostPath"]["path"]
                .as_str()
                .expect("hostPath or configMap");
            if host == "/var/lib/latch" {
                state.path().display().to_string()
            } else {
                host.to_owned()
            }
        };
        assert!(Path::new(&source).exists(), "{source} missing on this host");
        let mut opts = vec![if m["readOnly"] == true { "ro" } else { "rw" }];
        if m["mountPropagation"] == "HostToContainer" {
            opts.push("rslave");
        }
        cmd.arg(format!("--volume={source}:{target}:{}", opts.join(",")));
    }
    for e in spec["env"].as_array().unwrap() {
        let value = e["value"].as_str().unwrap_or("test-node");
        cmd.arg(format!("--env={}={value}", e["name"].as_str().unwrap()));
    }
    cmd.arg(format!(
        "--volume={}:/var/run/latch/kube:ro",
        kube.path().display()
    ))
    .arg("--env=KUBECONFIG=/var/run/latch/kube/config");
    cmd.arg(&image.0);
    // Its arguments, with the attach point, the admin port and the pin directory made the
    // test's own. The broker keeps the DaemonSet's default port, 951 (below 1024: the agent
    // keeps NET_BIND_SERVICE, checked below).
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let instance = format!("test-ct-{}", std::process::id());
    let mut saw_cgroup = false;
    for a in spec["args"].as_array().unwrap() {
        let a = a.as_str().unwrap();
        if a.starts_with("--cgroup=") {
            saw_cgroup = true;
            cmd.arg(format!("--cgroup={}", cg.path().display()));
        } else {
            cmd.arg(a);
        }
    }
    assert!(saw_cgroup, "the DaemonSet's args name no --cgroup");
    cmd.args(["--admin", &admin.to_string()])
        .args(["--instance", &instance]);
    let out = cmd.output().expect("run podman");
    let running = Running(name.clone());
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = || {
        let out = podman().args(["logs", &name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };

    // The readiness probe, as the kubelet would send it (its host and path; the port is the
    // test's).
    let probe = &spec["readinessProbe"]["httpGet"];
    assert_eq!(probe["host"], "127.0.0.1");
    let path = probe["path"].as_str().unwrap();
    let state = |what: &str| {
        String::from_utf8_lossy(&run_ok(podman().args(["inspect", "--format", what, &name])).stdout)
            .trim()
            .to_owned()
    };
    let ready = wait_for(Duration::from_secs(30), || {
        assert_eq!(
            state("{{.State.Status}}"),
            "running",
            "the agent exited:\n{}",
            logs()
        );
        matches!(http::get(admin, path), Ok((200, _))).then_some(())
    });
    assert!(ready.is_some(), "never ready:\n{}", logs());
    assert!(
        logs().contains("joined the node's cgroup namespace"),
        "the agent stayed in the container's cgroup namespace:\n{}",
        logs()
    );
    let live = spec["livenessProbe"]["httpGet"]["path"].as_str().unwrap();
    assert!(matches!(http::get(admin, live), Ok((200, _))));

    // The agent in the container is the one in the host PID namespace that dropped to its
    // running set: NET_BIND_SERVICE, NET_ADMIN, IPC_LOCK, SYS_PTRACE, SYS_ADMIN.
    let pid = state("{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let want = (1u64 << 10) | (1 << 12) | (1 << 14) | (1 << 19) | (1 << 21);
    assert_eq!(eff, want, "CapEff of the agent in the container");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");

    // psql on the host, in the intercepted cgroup, with no password.
    let out = run_ok(&mut pg.psql_in(&cg, "whoever", "postgres", "select current_user"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), SCRAM_USER);
    let records = wait_for(Duration::from_secs(5), || {
        Some(audit_records(&logs())).filter(|r| !r.is_empty())
    })
    .unwrap_or_else(|| panic!("no audit record on the container's stdout:\n{}", logs()));
    assert_eq!(records[0]["outcome"], "relayed", "{}", records[0]);
    assert_eq!(records[0]["policy"], "orders-db", "{}", records[0]);
    // The workload's cgroup as the agent in the container read it: the host's path.
    let rel = cg
        .path()
        .strip_prefix(latch_tests::cgroup::v2_root())
        .unwrap();
    assert_eq!(
        records[0]["workload"]["cgroup"],
        format!("/{}", rel.display()),
        "{}",
        records[0]
    );
    assert!(!logs().contains(PASSWORD), "the password reached the log");

    // `kubectl apply` of a changed ConfigMap: the kubelet writes a new timestamped directory
    // and swaps `..data` to it with a rename. The agent reloads without a restart.
    let renamed = policy.replace("name: orders-db}", "name: orders-db-v2}");
    assert_ne!(renamed, policy);
    kubelet_update(etc.path(), &[("orders-db.yaml", &renamed)], 0o644);
    let reloaded = wait_for(Duration::from_secs(10), || {
        let out = pg
            .psql_in(&cg, "whoever", "postgres", "select 1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}\n{}", logs());
        audit_records(&logs())
            .iter()
            .any(|r| r["policy"] == "orders-db-v2")
            .then_some(())
    });
    assert!(
        reloaded.is_some(),
        "the ConfigMap update was not picked up:\n{}",
        logs()
    );

    // The kubelet stops a pod with SIGTERM: the agent drains, detaches and exits 0.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    run_ok(podman().args(["stop", "--time", &grace.to_string(), &name]));
    let code = state("{{.State.ExitCode}}");
    assert_eq!(code, "0", "exit status after SIGTERM:\n{}", logs());
    drop(running);
    leftovers::assert_none(cg.id(), None);
    assert!(
        !Path::new("/sys/fs/bpf/latch").join(&instance).exists(),
        "the instance's pin directory was left"
    );
    drop(image);
}
