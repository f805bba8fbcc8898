//! The simulated-pod harness itself (no latch agent): each pod gets a kubelet-shaped cgroup, a
//! network namespace of its own and a veth to the host; its processes reach the host side over
//! IPv4 and IPv6, its loopback is its own, and deleting it leaves nothing behind.
use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use latch_tests::{
    Killed, TestCgroup, bins, eventually, pod::Pod, run_within, servers::EchoServer,
};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn probe(mut cmd: Command, args: &[&str]) -> Output {
    run_within(cmd.args(args), Duration::from_secs(20))
}

#[test]
fn pods_reach_the_host_side_keep_their_loopback_and_leave_nothing_behind() {
    latch_tests::require_root();
    let cg = TestCgroup::new();
    let cg_path = cg.path().to_owned();
    let pod1 = Pod::new(&cg, 1);
    let pod2 = Pod::new(&cg, 2);

    // Kubernetes shapes.
    for pod in [&pod1, &pod2] {
        assert_eq!(pod.uid().len(), 36, "{}", pod.uid());
        assert_eq!(pod.container_id().len(), 64, "{}", pod.container_id());
        let rel = pod.cgroup_relative();
        assert!(rel.starts_with('/'), "{rel}");
        assert!(
            rel.contains(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
                 cri-containerd-{}.scope",
                pod.uid().replace('-', "_"),
                pod.container_id()
            )),
            "{rel}"
        );
        assert!(pod.cgroup_path().is_dir());
        assert!(pod.netns_path().exists(), "{}", pod.netns_path().display());
    }
    assert_ne!(pod1.host_ip4(), pod2.host_ip4());
    assert_ne!(pod1.host_ip6(), pod2.host_ip6());

    // The pod reaches its veth's host side, IPv4 and IPv6.
    let v4 = EchoServer::start(&pod1.host_ip4().to_string());
    let v6 = EchoServer::start(&pod1.host_ip6().to_string());
    for addr in [v4.addr, v6.addr] {
        let out = probe(
            pod1.command(bins::probe()),
            &["echo", &addr.to_string(), "2", "1000"],
        );
        assert!(
            out.status.success() && stdout(&out).contains("ok=2 failed=0"),
            "echo to {addr} from pod 1: {out:?}"
        );
    }
    assert_eq!(v4.accepted(), 2);
    assert_eq!(v6.accepted(), 2);

    // A process of the pod is in the container's cgroup (and in the pod's namespace).
    let holder = Killed(
        pod1.command(bins::probe())
            .args(["hold", &v4.addr.to_string(), "1", "3000"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn probe"),
    );
    let cgroup_file = PathBuf::from(format!("/proc/{}/cgroup", holder.0.id()));
    let want = format!("0::{}", pod1.cgroup_relative());
    let cgroup = std::fs::read_to_string(&cgroup_file).expect("read /proc/PID/cgroup");
    assert!(
        cgroup.lines().any(|l| l == want),
        "{}: {cgroup}\nexpected the line {want}",
        cgroup_file.display()
    );
    let netns = std::fs::read_link(format!("/proc/{}/ns/net", holder.0.id())).unwrap();
    let host_netns = std::fs::read_link(format!("/proc/{}/ns/net", std::process::id())).unwrap();
    assert_ne!(
        netns, host_netns,
        "the pod's process is in the host's namespace"
    );
    drop(holder);

    // A server on pod 1's own loopback, outside the pod's cgroup: pod 1 reaches it, pod 2
    // (same address and port, its own loopback) does not.
    let socat = bins::tool("socat", "the Debian package socat");
    let server = Killed(
        pod1.netns_command(&socat)
            .args(["TCP-LISTEN:7000,bind=127.0.0.1,reuseaddr,fork", "PIPE"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socat"),
    );
    let server_cgroup =
        std::fs::read_to_string(format!("/proc/{}/cgroup", server.0.id())).unwrap_or_default();
    assert!(
        !server_cgroup.contains("kubepods"),
        "netns_command put the server in a pod cgroup: {server_cgroup}"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let out = probe(
                pod1.command(bins::probe()),
                &["from", "7101", "127.0.0.1:7000"],
            );
            stdout(&out).trim() == "echoed"
        }),
        "pod 1 never reached the server on its loopback"
    );
    let out = probe(
        pod2.command(bins::probe()),
        &["from", "7102", "127.0.0.1:7000"],
    );
    assert_eq!(
        stdout(&out).trim(),
        "refused refused",
        "pod 2 reached pod 1's loopback: {out:?}"
    );
    drop(server);

    // Nothing of the pods is left once they are gone, nor of the test cgroup after it.
    let leftovers: Vec<(String, String, PathBuf, PathBuf)> = [&pod1, &pod2]
        .iter()
        .map(|p| {
            (
                p.netns_name().to_owned(),
                p.host_interface().to_owned(),
                p.cgroup_path().to_owned(),
                p.cgroup_path().parent().unwrap().to_owned(),
            )
        })
        .collect();
    pod1.delete();
    drop(pod2);
    for (netns, veth, scope, slice) in &leftovers {
        assert!(
            !PathBuf::from("/run/netns").join(netns).exists(),
            "netns {netns} left"
        );
        assert!(
            !PathBuf::from("/sys/class/net").join(veth).exists(),
            "veth {veth} left"
        );
        assert!(!scope.exists(), "{} left", scope.display());
        assert!(!slice.exists(), "{} left", slice.display());
    }
    let ours = format!("latch-pod-{}-", std::process::id());
    let netns_left: Vec<_> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&ours))
        .collect();
    assert!(netns_left.is_empty(), "namespaces left: {netns_left:?}");
    drop(cg);
    assert!(!cg_path.exists(), "{} left", cg_path.display());
}
