//! The Debian package (`cargo deb`, `[package.metadata.deb]` in agent/Cargo.toml) installs,
//! runs as its unit says, brokers, and purges without a trace.
//!
//! This test installs into `/` of the machine it runs on. It refuses to start if anything
//! of a latch installation is already there (the package, /etc/latch, /usr/bin/latch, the
//! unit, the state or log directory) rather than clobber it, and a guard purges the package
//! and removes those paths again however the test ends.
//!
//! The package is built with `cargo deb --no-build --profile dev` from the `latch` that
//! `cargo xtask test` already built (target/debug/latch, stripped into the package), so no
//! second build happens here; `cargo deb -p latch` for users builds and packages the release
//! binary the same way.
//!
//! PID 1 on these machines is not systemd, so `systemctl start latch` cannot run here (the
//! package's systemd snippets are guarded by `[ -d /run/systemd/system ]` and do nothing).
//! What systemd would do is done by hand: the installed unit's `ExecStart=` argument list,
//! with its `Environment=`, under its `CapabilityBoundingSet`/`AmbientCapabilities`,
//! `SecureBits`, `NoNewPrivileges` and `LimitNOFILE` (setpriv, prlimit; as in
//! systemd_unit.rs). Only `--cgroup /` is replaced, by the test's own cgroup (never attach
//! to the root here), and the admin port by a free one.
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use latch_tests::{
    Killed, TempDir, TestCgroup, bins, http, leftovers,
    postgres::{PgCluster, SCRAM_USER, secrets_yaml},
    run_ok,
    servers::free_port,
    wait_for,
};

const PASSWORD: &str = "deb-Secret-3c9d";

/// What the package installs or creates, all of which must be absent before and after.
const PATHS: &[&str] = &[
    "/usr/bin/latch",
    "/usr/lib/systemd/system/latch.service",
    // deb-systemd-helper's records and masks (made on remove, gone on purge).
    "/etc/systemd/system/latch.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/latch.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-masked/latch.service",
    "/etc/latch",
    "/var/lib/latch",
    "/var/log/latch",
    "/usr/share/doc/latch",
];

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "latch"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty() && o.stdout != b"not-installed")
}

/// Purges the package and removes what is left of [`PATHS`] on drop (they did not exist
/// before the test: checked first).
struct Installation;

impl Drop for Installation {
    fn drop(&mut self) {
        if installed() {
            let _ = Command::new("dpkg")
                .args(["--purge", "latch"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for p in PATHS {
            let p = Path::new(p);
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(p);
            } else {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn build_deb(out: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The binary the package takes (cargo-deb maps target/release/ to the profile's directory)
    // is the one the other tests run.
    let packaged = root.join("target/debug/latch");
    assert_eq!(
        std::fs::canonicalize(&packaged).ok(),
        std::fs::canonicalize(bins::latch()).ok(),
        "the package takes {}, but the tests run {} (LATCH_BIN): build with `cargo xtask test`",
        packaged.display(),
        bins::latch().display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = std::time::Instant::now();
    let deb_ok = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        deb_ok,
        "cargo-deb is not installed: `cargo install cargo-deb --locked` (`cargo xtask setup` does)"
    );
    run_ok(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["deb", "-p", "latch", "--no-build", "--profile", "dev"])
            .args(["--strip", "--fast", "--output"])
            .arg(out),
    );
    eprintln!("package built in {:?}", started.elapsed());
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    debs[0].clone()
}

fn mode(p: &str) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

/// Every value of `key=` in a unit.
fn directive(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_deb_installs_runs_the_units_exec_start_brokers_psql_and_purges_cleanly() {
    latch_tests::require_root();
    // Never clobber an installation that is not ours.
    assert!(
        !installed(),
        "a `latch` package is installed on this machine; this test installs and purges its \
         own: remove it first (`dpkg --purge latch`) or run the test elsewhere"
    );
    for p in PATHS {
        assert!(
            !Path::new(p).exists(),
            "{p} exists already; this test installs the latch package into / and would \
             clobber it: move it away or run the test elsewhere"
        );
    }
    let work = TempDir::new("deb");
    let deb = build_deb(work.path());
    let _installation = Installation;

    // Install.
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/latch.service").unwrap();
    assert_eq!(
        unit,
        std::fs::read_to_string(latch_tests::manifests::deploy_dir().join("latch.service"))
            .unwrap(),
        "the package's unit is deploy/latch.service"
    );
    assert_eq!(mode("/usr/bin/latch"), 0o755);
    assert_eq!(mode("/etc/latch/secrets/credentials.yaml"), 0o600);
    assert_eq!(mode("/etc/latch/secrets"), 0o700);
    assert_eq!(mode("/var/lib/latch"), 0o700, "the state directory");
    assert_eq!(mode("/var/log/latch"), 0o700, "the log directory");
    let conffiles = String::from_utf8_lossy(
        &run_ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "latch"])).stdout,
    )
    .to_string();
    for c in [
        "/etc/latch/stores.yaml",
        "/etc/latch/secrets/credentials.yaml",
    ] {
        assert!(conffiles.contains(c), "{c} is not a conffile: {conffiles}");
    }
    // The default configuration is valid as installed.
    let out = run_ok(Command::new("/usr/bin/latch").args(["policy", "check", "/etc/latch/"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 policies, 1 secret stores"),
        "{out:?}"
    );

    // Configure it as a user would: credentials into the store's file, a policy beside it.
    let pg = PgCluster::start("127.0.0.2", PASSWORD, "unused-md5", "unused-plain");
    std::fs::write(
        "/etc/latch/secrets/credentials.yaml",
        secrets_yaml(SCRAM_USER, PASSWORD),
    )
    .unwrap();
    let policy = "/etc/latch/orders-db.yaml";
    std::fs::write(
        policy,
        format!(
            "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: orders-db}}\n\
             spec:\n  destination: {{address: \"{}\", port: {}}}\n  workloads: all\n  \
             protocol: postgres\n  tls: {{mode: disable}}\n  credentials:\n    store: local\n    \
             username: {{path: db, field: username}}\n    password: {{path: db, field: password}}\n",
            pg.addr.ip(),
            pg.addr.port()
        ),
    )
    .unwrap();
    run_ok(Command::new("/usr/bin/latch").args(["policy", "check", "/etc/latch/"]));

    // The unit's ExecStart, as systemd would start it.
    let exec = directive(&unit, "ExecStart");
    assert_eq!(exec.len(), 1);
    let mut argv: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
    assert_eq!(
        argv[0], "/usr/bin/latch",
        "the unit runs the packaged binary"
    );
    let cg = TestCgroup::new();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let mut replaced = 0;
    for a in argv.iter_mut() {
        if a == "/" {
            *a = cg.path().display().to_string();
            replaced += 1;
        } else if a == "127.0.0.1:952" {
            *a = admin.to_string();
            replaced += 1;
        }
    }
    assert_eq!(replaced, 2, "the unit's --cgroup / and --admin: {argv:?}");
    let caps = |key: &str| -> String {
        directive(&unit, key)[0]
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let nofile: u64 = directive(&unit, "LimitNOFILE")[0].parse().unwrap();
    let nofile = nofile.min(hard);
    let log = work.path().join("stderr.log");
    let mut cmd = Command::new(bins::tool("prlimit", "the Debian package util-linux"));
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .arg(bins::tool("setpriv", "the Debian package util-linux"))
        .arg(format!(
            "--bounding-set=-all,{}",
            caps("CapabilityBoundingSet")
        ))
        .arg(format!("--inh-caps=-all,{}", caps("AmbientCapabilities")))
        .arg(format!(
            "--ambient-caps=-all,{}",
            caps("AmbientCapabilities")
        ))
        .arg("--securebits=+noroot,+noroot_locked")
        .arg("--no-new-privs")
        .arg("--")
        .args(&argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        // What systemd sets for StateDirectory= and LogsDirectory=.
        .env("STATE_DIRECTORY", "/var/lib/latch")
        .env("LOGS_DIRECTORY", "/var/log/latch")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for env in directive(&unit, "Environment") {
        let (k, v) = env.split_once('=').expect("Environment=KEY=VALUE");
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start the unit's ExecStart");
    let pid = child.id();
    let mut agent = Killed(child);
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = wait_for(Duration::from_secs(20), || {
        if let Ok(Some(st)) = agent.0.try_wait() {
            panic!("the agent exited ({st}):\n{}", stderr());
        }
        matches!(http::get(admin, "/readyz"), Ok((200, _))).then_some(())
    });
    assert!(ready.is_some(), "not ready:\n{}", stderr());

    // psql in the intercepted cgroup, no password anywhere.
    let out = run_ok(&mut pg.psql_in(&cg, "whoever", "postgres", "select current_user"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), SCRAM_USER);
    let audit = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string("/var/log/latch/audit.jsonl")
            .ok()
            .filter(|a| a.contains("\"relayed\""))
    })
    .unwrap_or_else(|| {
        panic!(
            "no relayed record in /var/log/latch/audit.jsonl:\n{}",
            stderr()
        )
    });
    assert!(audit.contains("\"policy\":\"orders-db\""), "{audit}");
    assert!(!stderr().contains(PASSWORD) && !audit.contains(PASSWORD));

    // systemctl stop: SIGTERM to the main process (KillMode=mixed).
    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = wait_for(Duration::from_secs(20), || {
        agent.0.try_wait().ok().flatten()
    })
    .unwrap_or_else(|| panic!("did not stop on SIGTERM:\n{}", stderr()));
    assert!(st.success(), "exit {st}:\n{}", stderr());
    leftovers::assert_none(cg.id(), None);
    drop(agent);

    // Remove what the user added (dpkg never removes files it did not install), then purge.
    std::fs::remove_file(policy).unwrap();
    run_ok(Command::new("dpkg").args(["--purge", "latch"]));
    assert!(!installed(), "still installed after --purge");
    for p in PATHS {
        assert!(!Path::new(p).exists(), "{p} is left after dpkg --purge");
    }
}
