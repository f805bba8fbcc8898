//! The container harness on its own (no latch): a busybox container in a network namespace the
//! test made reaches a server on the host side of its veth, runs in a cgroup below the test's
//! cgroup, and leaves no container, image, namespace or cgroup behind.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use latch_tests::{
    TestCgroup,
    cgroup::v2_root,
    container::{self, Container, ContainerNet},
    run_ok,
    servers::EchoServer,
};

fn podman_lines(args: &[&str]) -> Vec<String> {
    let out = run_ok(Command::new("podman").args(args));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_busybox_container_reaches_the_host_side_from_below_the_test_cgroup() {
    container::require_podman();
    let cg = TestCgroup::new();
    let cg_rel = format!("/{}", cg.path().strip_prefix(v2_root()).unwrap().display());
    let net = ContainerNet::new();
    let echo = EchoServer::start(&net.host_ip().to_string());
    let (names, image, cgroup_dir);
    {
        // One-shot: busybox nc half-closes on stdin's end and prints the echo.
        let started = Instant::now();
        let nc = Container::run(
            &cg,
            &net.path(),
            &[
                "sh",
                "-c",
                &format!(
                    "echo hello | nc -w 5 {} {}",
                    net.host_ip(),
                    echo.addr.port()
                ),
            ],
        );
        eprintln!(
            "image (if built) and first container start: {:?}",
            started.elapsed()
        );
        assert_eq!(nc.id().len(), 64);
        let code = nc.wait(Duration::from_secs(30));
        let logs = nc.logs();
        assert_eq!(code, 0, "nc in the container failed; logs:\n{logs}");
        assert!(logs.contains("hello"), "no echo in the logs:\n{logs}");
        assert_eq!(echo.accepted(), 1);

        // Long-running: where its processes are, and an exec'd one's too.
        let started = Instant::now();
        let sleeper = Container::run(&cg, &net.path(), &["sleep", "60"]);
        eprintln!("second container start: {:?}", started.elapsed());
        let rel = sleeper.cgroup_relative();
        assert_eq!(rel, sleeper.expected_cgroup());
        assert_eq!(rel, format!("{cg_rel}/libpod-{}", sleeper.id()));
        assert!(
            rel.starts_with(&format!("{cg_rel}/")),
            "{rel} not below {cg_rel}"
        );
        let exec = sleeper.exec(&["cat", "/proc/self/cgroup"]);
        let exec_out = String::from_utf8_lossy(&exec.stdout);
        assert!(
            exec_out.lines().any(|l| l == format!("0::{rel}")),
            "exec'd process is not in {rel}:\n{exec_out}"
        );
        let exec = sleeper.exec(&["ip", "-o", "-4", "addr", "show", "eth0"]);
        let exec_out = String::from_utf8_lossy(&exec.stdout);
        assert!(
            exec_out.contains(&format!("inet {}/30", net.container_ip())),
            "the container is not in the test's namespace:\n{exec_out}"
        );

        names = [nc.name().to_owned(), sleeper.name().to_owned()];
        image = sleeper.image().to_owned();
        cgroup_dir = v2_root().join(rel.trim_start_matches('/'));
        assert!(cgroup_dir.is_dir());
        let started = Instant::now();
        drop(sleeper);
        eprintln!("removing a running container: {:?}", started.elapsed());
    }

    let all = podman_lines(&["ps", "--all", "--format", "{{.Names}}"]);
    for name in &names {
        assert!(!all.contains(name), "container {name} left behind");
    }
    let images = podman_lines(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(!images.contains(&image), "image {image} left behind");
    assert!(!cgroup_dir.exists(), "{} left behind", cgroup_dir.display());
    for v1 in container::v1_mounts() {
        let dir = v1.join(cg_rel.trim_start_matches('/'));
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    let (netns, host_if) = (net.path(), net.host_if().to_owned());
    drop(echo);
    drop(net);
    assert!(!netns.exists(), "{} left behind", netns.display());
    assert!(
        !Path::new("/sys/class/net").join(&host_if).exists(),
        "veth {host_if} left behind"
    );
}
