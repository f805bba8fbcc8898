//! The operator-facing commands: `latch policy check`, `latch status`, startup validation.
use std::process::Command;

use latch_tests::{Agent, TempDir, TestCgroup, bins, require_root, tcp_policy};

/// `latch agent` with `policy` for `cg`, which must refuse the configuration (exit 64) before
/// attaching anything; returns its stderr.
fn agent_refuses(policy: &std::path::Path, cg: &latch_tests::TestCgroup) -> String {
    let out = Command::new(bins::latch())
        .args(["agent", "--policy"])
        .arg(policy)
        .arg("--cgroup")
        .arg(cg.path())
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    stderr
}

#[test]
fn policy_check_reports_every_error_with_its_location() {
    let dir = TempDir::new("check");
    let good = dir.write("good.yaml", &tcp_policy("web", "127.0.0.2", 80));
    let out = Command::new(bins::latch())
        .args(["policy", "check"])
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok: 1 policies, 0 secret stores"), "{text}");
    assert!(!text.contains("names no workloads"), "{text}");
    // Without `workloads`, policy check warns that the agent refuses it; the agent does.
    let open = dir.write(
        "open.yaml",
        &tcp_policy("web", "127.0.0.2", 80).replace("  workloads: all\n", ""),
    );
    let out = Command::new(bins::latch())
        .args(["policy", "check"])
        .arg(&open)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("names no workloads: the agent refuses it"),
        "the admit-all warning is missing: {text}"
    );
    let cg = latch_tests::TestCgroup::new();
    let stderr = agent_refuses(&open, &cg);
    assert!(stderr.contains("say `workloads: all`"), "{stderr}");
    // Nor does the agent pick the whole host by itself.
    let out = Command::new(bins::latch())
        .args(["agent", "--policy"])
        .arg(&good)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--cgroup"), "{stderr}");

    let bad = dir.write(
        "bad.yaml",
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {name: db}\nspec:\n  \
         destination: {cidr: 10.0.3.0/33, port: 5432}\n  protocol: postgres\n  \
         credentials:\n    store: local\n    pasword: {path: x}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {name: db2}\nspec:\n  \
         destination: {address: 10.0.3.9, port: 5432}\n  protocol: postgres\n  \
         credentials:\n    store: vautl\n    password: {path: x}\n",
    );
    let out = Command::new(bins::latch())
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let path = bad.display();
    for expected in [
        format!("{path}:5:"),
        "10.0.3.0/33".to_owned(),
        "did you mean \"password\"".to_owned(),
        "vautl".to_owned(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn the_agent_refuses_an_invalid_configuration_before_attaching_anything() {
    require_root();
    let cg = TestCgroup::new();
    let dir = TempDir::new("bad-agent");
    let bad = dir.write(
        "bad.yaml",
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {name: x}\nspec:\n  \
         destination: {address: 127.0.0.2, port: 70000}\n",
    );
    let stderr = agent_refuses(&bad, &cg);
    assert!(stderr.contains("bad.yaml:5:"), "{stderr}");
    latch_tests::leftovers::assert_none(cg.id(), None);
}

#[test]
fn latch_status_shows_the_running_agent() {
    let cg = TestCgroup::new();
    let agent = Agent::start(&tcp_policy("web", "127.0.0.2", 8080), &cg);
    let out = Command::new(bins::latch())
        .args(["status", "--admin", &agent.admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ready"), "{text}");
    assert!(text.contains("web     tcp       127.0.0.2:8080"), "{text}");
    let out = Command::new(bins::latch())
        .args(["status", "--json", "--admin", &agent.admin.to_string()])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    assert_eq!(json["policies"][0]["name"], "web");
    // The open files, their limit and what the limits can need, which fits the limit.
    let d = &json["descriptors"];
    let (open, limit, budget) = (
        d["open"].as_u64().unwrap(),
        d["limit"].as_u64().unwrap(),
        d["budget"].as_u64().unwrap(),
    );
    assert!(open > 0 && open < limit && budget <= limit, "{d}");
    assert!(text.contains("open files"), "{text}");
    assert!(agent.stop().success());
}

#[test]
fn a_max_connections_that_cannot_fit_the_open_file_limit_is_refused_at_start_with_the_numbers() {
    let dir = TempDir::new("nofile");
    let policy = dir.write("p.yaml", &tcp_policy("web", "127.0.0.2", 8080));
    let cg = TestCgroup::new();
    let out = Command::new(bins::latch())
        .args(["agent", "--policy"])
        .arg(&policy)
        .arg("--cgroup")
        .arg(cg.path())
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        // Far past any open-file limit a process may have (fs.nr_open is at most 2^30).
        .args(["--max-connections", "2000000000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("2000000000 connections × 2") && stderr.contains("the open-file limit is"),
        "{stderr}"
    );
    latch_tests::leftovers::assert_none(cg.id(), None);
}

#[test]
fn the_agent_raises_its_soft_open_file_limit_to_the_hard_one() {
    require_root();
    let dir = TempDir::new("softlimit");
    let policy = dir.write("p.yaml", &tcp_policy("web", "127.0.0.2", 8080));
    let ready = dir.path().join("ready.json");
    let cg = TestCgroup::new();
    // Started with a soft limit far below the hard one, as a shell's default 1024 would be.
    let mut child = Command::new(bins::tool("prlimit", "the Debian package util-linux"))
        .arg("--nofile=1024:20000")
        .arg("--")
        .arg(bins::latch())
        .args(["agent", "--policy"])
        .arg(&policy)
        .arg("--cgroup")
        .arg(cg.path())
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args([
            "--instance",
            &format!("test-softlimit-{}", std::process::id()),
        ])
        .args(["--grace-period", "1", "--ready-file"])
        .arg(&ready)
        .env("LATCH_STATE_DIR", dir.path().join("state"))
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let up = latch_tests::eventually(std::time::Duration::from_secs(20), || ready.exists());
    // prlimit execs the agent: the child's pid is the agent's.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    // SAFETY: kill(2) of our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert!(up, "the agent never became ready:\n{log}");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["20000", "20000"], "soft and hard: {line}");
    assert!(status.success(), "{status}\n{log}");
    latch_tests::leftovers::assert_none(cg.id(), None);
}
