//! `latch run`: the one-command way to try latch, and its cleanup duties.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use latch_tests::{
    TempDir, bins,
    cgroup::v2_root,
    eventually, leftovers, require_root,
    servers::{NGINX_BODY, Nginx},
    tcp_policy,
};

fn latch_run(policy: &Path) -> Command {
    let mut cmd = Command::new(bins::latch());
    cmd.arg("run")
        .arg("--policy")
        .arg(policy)
        .env("LATCH_LOG", "info");
    cmd
}

/// `latch run --policy POLICY -- true`, which must refuse the configuration (status 64);
/// returns its stderr.
fn run_refused(policy: &Path) -> String {
    let out = latch_run(policy)
        .args(["--", "true"])
        .output()
        .expect("latch run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    stderr
}

fn run_cgroup(pid: u32) -> std::path::PathBuf {
    v2_root().join(format!("latch-run-{pid}"))
}

#[test]
fn unmodified_curl_reaches_nginx_through_latch_run() {
    require_root();
    let nginx = Nginx::start("127.0.0.2");
    let dir = TempDir::new("run");
    let policy = dir.write("p.yaml", &tcp_policy("web", "127.0.0.2", nginx.addr.port()));
    let out = latch_run(&policy)
        .arg("--")
        .arg(bins::tool("curl", "curl"))
        .args(["-sS", "--max-time", "10", &nginx.url()])
        .output()
        .expect("latch run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "latch run failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), NGINX_BODY);
    assert!(
        stderr.contains("relayed=1 refused=0 failed=0"),
        "the broker did not count one relayed connection:\n{stderr}"
    );
}

#[test]
fn latch_run_exits_with_the_commands_status_and_removes_its_cgroup() {
    require_root();
    let dir = TempDir::new("run");
    let policy = dir.write("p.yaml", &tcp_policy("x", "127.0.0.2", 9));
    // The command reports its cgroup and that cgroup's id (inode), then exits 7.
    let script = format!(
        "cat /proc/self/cgroup; stat -c %i {}$(sed -n 's/^0:://p' /proc/self/cgroup); exit 7",
        v2_root().display()
    );
    let child = latch_run(&policy)
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("latch run");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(7));
    let cgroup = String::from_utf8_lossy(&out.stdout);
    assert!(
        cgroup.contains(&format!("/latch-run-{pid}")),
        "the command did not run inside latch's cgroup: {cgroup}"
    );
    let id: u64 = cgroup
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cgroup id in {cgroup}"));
    leftovers::assert_none(id, Some(&run_cgroup(pid)));
}

#[test]
fn a_killed_latch_run_is_cleaned_up_by_the_next_start() {
    require_root();
    let dir = TempDir::new("run");
    let policy = dir.write("p.yaml", &tcp_policy("x", "127.0.0.2", 9));
    let mut victim = latch_run(&policy)
        .args(["--", "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("latch run");
    let pid = victim.id();
    let cg = run_cgroup(pid);
    let started =
        || std::fs::read_to_string(cg.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty());
    assert!(
        eventually(Duration::from_secs(10), started),
        "latch run never started its command"
    );
    victim.kill().expect("kill -9 latch run");
    victim.wait().expect("reap");
    assert!(cg.exists(), "the cgroup should survive a kill -9 of latch");

    let out = latch_run(&policy)
        .args(["--", "true"])
        .output()
        .expect("latch run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !cg.exists(),
        "the next latch run did not remove the dead run's cgroup"
    );
}

#[test]
fn invalid_policy_is_refused_with_status_64_and_its_location() {
    require_root();
    let dir = TempDir::new("run");
    let policy = dir.write(
        "bad.yaml",
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {name: x}\nspec:\n  \
         destination: {cidr: 10.0.0.0/33, port: 5432}\n  protocol: tcp\n",
    );
    let stderr = run_refused(&policy);
    assert!(stderr.contains("bad.yaml:5:"), "no file:line in {stderr}");
    assert!(
        stderr.contains("10.0.0.0/33"),
        "no offending value in {stderr}"
    );
}

#[test]
fn doctor_says_this_machine_can_run_latch() {
    require_root();
    let out = Command::new(bins::latch())
        .arg("doctor")
        .output()
        .expect("latch doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for check in [
        "kernel",
        "cgroup v2",
        "prog cgroup_sock_addr",
        "prog sock_ops",
        "latch programs",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "doctor did not pass `{check}`:\n{text}"
        );
    }
}

#[test]
fn the_command_gets_its_users_environment_less_what_latch_reads_secrets_from() {
    require_root();
    let dir = TempDir::new("run");
    let policy = dir.write(
        "p.yaml",
        &format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: envs}}\n\
             spec: {{env: {{prefix: APP_SECRET_}}}}\n---\n\
             apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: db}}\nspec:\n  \
             destination: {{address: 127.0.0.2, port: 9}}\n  protocol: postgres\n  \
             tls: {{mode: disable}}\n  credentials:\n    store: envs\n    \
             password: {{path: db, field: password}}\n---\n{}",
            tcp_policy("x", "127.0.0.2", 10)
        ),
    );
    let out = latch_run(&policy)
        .env("APP_SECRET_DB_PASSWORD", "canary-env-store-7f1e")
        .env("VAULT_TOKEN", "canary-vault-token-3c9a")
        .env("AWS_SECRET_ACCESS_KEY", "canary-aws-key-88d2")
        .env("UNRELATED_SETTING", "kept-as-is")
        .args(["--", "env"])
        .output()
        .expect("latch run");
    let env = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.contains("UNRELATED_SETTING=kept-as-is"), "{env}");
    for canary in [
        "canary-env-store-7f1e",
        "canary-vault-token-3c9a",
        "canary-aws-key-88d2",
    ] {
        assert!(
            !env.contains(canary),
            "{canary} reached the command:\n{env}"
        );
    }
}

#[test]
fn policy_files_others_may_write_and_exec_stores_not_allowed_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    require_root();
    let dir = TempDir::new("run");
    let policy = dir.write("p.yaml", &tcp_policy("x", "127.0.0.2", 9));
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o666)).unwrap();
    let stderr = run_refused(&policy);
    assert!(stderr.contains("mode 666 lets others write it"), "{stderr}");

    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o600)).unwrap();
    let helper = dir.write("get-secret.sh", "#!/bin/sh\necho pw\n");
    let exec = dir.write(
        "exec.yaml",
        &format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: helper}}\n\
             spec: {{exec: {{command: [{}]}}}}\n",
            helper.display()
        ),
    );
    let stderr = run_refused(&exec);
    assert!(
        stderr.contains("which the agent was not allowed to run"),
        "{stderr}"
    );
    let out = latch_run(&exec)
        .arg("--allow-exec")
        .arg(&helper)
        .args(["--", "true"])
        .output()
        .expect("latch run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
