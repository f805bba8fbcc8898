//! The PostgreSQL half of `cargo xtask bench`: pgbench select-only with persistent and with
//! new connections (plain, TLS to the server, and app TLS to latch too), and a large COPY out, each three ways — the application straight to the
//! server with its password, through latch (the application holds no password), and through
//! pgbouncer (session pooling, the password in its auth_file) — on one throw-away
//! PostgreSQL 15 that takes SCRAM over plain TCP and TLS.

use crate::pg::Postgres;
use crate::proc::{self, Guard, TempDir};
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// pgbouncer toward the server in plain text, and with TLS.
const BOUNCER_PLAIN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const BOUNCER_TLS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const USER: &str = "bench";
const DB: &str = "bench";
/// Bytes per COPY row: 1000 characters and a newline.
const ROW_BYTES: u64 = 1001;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    /// `pgbench -S -c 4 -j 2`, plain TCP + SCRAM.
    Select,
    /// As `Select`, TLS to the server: direct, pgbench does TLS itself (`sslmode=require`);
    /// through latch, plain text to latch and `tls.mode: require` to the server.
    SelectTls,
    /// As `SelectTls`, and the application keeps `sslmode=require` toward latch too
    /// (`appTls: enable`).
    SelectTlsAppTls,
    /// `pgbench -S -C -c 4 -j 2`: TLS + SCRAM to the server for every transaction.
    SelectConnect,
    /// As `SelectConnect`, but the application keeps `sslmode=require` toward latch too
    /// (`appTls: enable`, a certificate from the node-local CA). No pgbouncer row (it would
    /// need a client certificate set-up of its own).
    SelectConnectAppTls,
    /// `COPY (...) TO STDOUT` of ~100 MB per benchmark second, plain TCP.
    Copy,
}

impl Case {
    const ALL: [Case; 6] = [
        Case::Select,
        Case::SelectTls,
        Case::SelectTlsAppTls,
        Case::SelectConnect,
        Case::SelectConnectAppTls,
        Case::Copy,
    ];

    fn label(self) -> &'static str {
        match self {
            Case::Select => "select-only, persistent (tps)",
            Case::SelectTls => "  same, TLS to the server (tps)",
            Case::SelectTlsAppTls => "  and app TLS to latch (tps)",
            Case::SelectConnect => "select-only -C, TLS+SCRAM (tps)",
            Case::SelectConnectAppTls => "  same, app TLS to latch (tps)",
            Case::Copy => "COPY out (MB/s)",
        }
    }

    /// Whether the leg to the server uses TLS.
    fn tls(self) -> bool {
        matches!(
            self,
            Case::SelectTls
                | Case::SelectTlsAppTls
                | Case::SelectConnect
                | Case::SelectConnectAppTls
        )
    }

    /// Whether the application speaks TLS to latch (`appTls`).
    fn app_tls(self) -> bool {
        matches!(self, Case::SelectTlsAppTls | Case::SelectConnectAppTls)
    }

    /// Whether pgbench opens a new connection per transaction (`-C`).
    fn connect_each(self) -> bool {
        matches!(self, Case::SelectConnect | Case::SelectConnectAppTls)
    }

    fn routes(self) -> &'static [Route] {
        match self {
            Case::SelectConnectAppTls | Case::SelectTlsAppTls => &[Route::Direct, Route::Latch],
            // Direct mode needs plain text to the server.
            Case::SelectConnect | Case::SelectTls => {
                &[Route::Direct, Route::Latch, Route::Pgbouncer]
            }
            _ => &Route::ALL,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Direct,
    /// latch, relaying.
    Latch,
    /// latch with `direct: true`: the application's own connection, latch in its startup.
    LatchDirect,
    Pgbouncer,
}

impl Route {
    const ALL: [Route; 4] = [
        Route::Direct,
        Route::Latch,
        Route::LatchDirect,
        Route::Pgbouncer,
    ];

    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Latch => "latch",
            Route::LatchDirect => "latch direct mode",
            Route::Pgbouncer => "pgbouncer",
        }
    }
}

struct Rig {
    dir: PathBuf,
    /// latch's files (root's alone).
    latch_dir: PathBuf,
    latch: PathBuf,
    password: String,
    pg: Postgres,
    policy_plain: PathBuf,
    policy_direct: PathBuf,
    policy_tls: PathBuf,
    policy_app_tls: PathBuf,
    bouncer_port: u16,
    _bouncers: Vec<Guard>,
    seconds: u32,
}

/// Runs the PostgreSQL cases `repeat` times (interleaved) and prints one table.
pub fn run(latch: &Path, seconds: u32, repeat: u32) -> Result<()> {
    let tmp = TempDir::new("latch-bench-pg")?;
    // latch's policies, secrets and state in a directory of root's: the server's belongs to
    // the postgres user, and latch refuses policy files anyone else controls.
    let latch_tmp = TempDir::new("latch-bench-pg-policy")?;
    let rig = Rig::start(tmp.path(), latch_tmp.path(), latch, seconds)?;
    let mut samples: Vec<(Case, Route, Vec<f64>, Option<String>)> = Vec::new();
    for case in Case::ALL {
        for &route in case.routes() {
            samples.push((case, route, Vec::new(), None));
        }
    }
    for round in 1..=repeat {
        for (case, route, got, failed) in samples.iter_mut() {
            if failed.is_some() {
                continue;
            }
            print!(
                "bench: round {round}/{repeat}: {:<32} {:<17} ",
                case.label(),
                route.label()
            );
            let _ = std::io::Write::flush(&mut std::io::stdout());
            match rig.measure(*case, *route) {
                Ok(v) => {
                    println!("{v:10.1}");
                    got.push(v);
                }
                Err(e) => {
                    println!("failed: {e:#}");
                    *failed = Some(format!("{e:#}"));
                }
            }
            proc::check_interrupted()?;
        }
    }

    println!(
        "\nPostgreSQL 15 on {SERVER}, pgbench -S -c 4 -j 2 -T {seconds} (scale 5), COPY of {} MB; median of {repeat} run(s):\n",
        rig.copy_rows() * ROW_BYTES / 1_000_000
    );
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>10} {:>13} {:>12} {:>16}",
        "case",
        "direct",
        "latch",
        "latch dm",
        "pgbouncer",
        "latch/direct",
        "dm/direct",
        "pgbouncer/direct"
    );
    let mut any_failed = false;
    for case in Case::ALL {
        let value = |route: Route| {
            samples
                .iter()
                .find(|s| s.0 == case && s.1 == route)
                .and_then(|s| if s.3.is_some() { None } else { median(&s.2) })
        };
        let (d, l, m, b) = (
            value(Route::Direct),
            value(Route::Latch),
            value(Route::LatchDirect),
            value(Route::Pgbouncer),
        );
        let ratio = |v: Option<f64>| match (v, d) {
            (Some(v), Some(d)) if d > 0.0 => format!("{:.2}", v / d),
            _ => "-".to_string(),
        };
        let ran = |route: Route| case.routes().contains(&route);
        any_failed |= d.is_none()
            || l.is_none()
            || (ran(Route::Pgbouncer) && b.is_none())
            || (ran(Route::LatchDirect) && m.is_none());
        let cell = |v: Option<f64>| v.map_or("failed".to_string(), |v| format!("{v:.1}"));
        let optional = |route: Route, v: Option<f64>| {
            if ran(route) {
                (cell(v), ratio(v))
            } else {
                ("-".to_string(), "-".to_string())
            }
        };
        let (m_cell, m_ratio) = optional(Route::LatchDirect, m);
        let (b_cell, b_ratio) = optional(Route::Pgbouncer, b);
        println!(
            "{:<32} {:>10} {:>10} {:>10} {:>10} {:>13} {:>12} {:>16}",
            case.label(),
            cell(d),
            cell(l),
            m_cell,
            b_cell,
            ratio(l),
            m_ratio,
            b_ratio
        );
    }
    for (case, route, _, failed) in &samples {
        if let Some(why) = failed {
            println!("  {} / {}: {why}", case.label(), route.label());
        }
    }
    drop(rig);
    if any_failed {
        bail!("some PostgreSQL bench cases failed");
    }
    Ok(())
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

impl Rig {
    fn start(dir: &Path, latch_dir: &Path, latch: &Path, seconds: u32) -> Result<Rig> {
        let pg = Postgres::start_with(dir, SERVER, true)?;
        let password = format!("pw-{}", std::process::id());
        pg.admin_sql(
            dir,
            &format!("CREATE ROLE {USER} LOGIN PASSWORD '{password}'"),
        )?;
        pg.admin_sql(dir, &format!("CREATE DATABASE {DB} OWNER {USER}"))?;
        println!("bench: pgbench -i -s 5 (over the unix socket)");
        let out = Command::new("pgbench")
            .args(["-i", "-q", "-s", "5", "-h"])
            .arg(dir)
            .args(["-p", &pg.port.to_string(), "-U", USER, DB])
            .stdin(Stdio::null())
            .output()
            .context("running pgbench -i")?;
        if !out.status.success() {
            bail!(
                "pgbench -i failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }

        // latch: the password lives only in a 0600 secrets file.
        let secrets = latch_dir.join("secrets.yaml");
        write_private(
            &secrets,
            &format!("orders-db: {{username: {USER}, password: {password}}}\n"),
        )?;
        let policy = |name: &str, mode: &str, extra: &str| -> Result<PathBuf> {
            let text = crate::policy::postgres(name, SERVER, pg.port, &secrets)
                + &format!("  tls:\n    mode: {mode}\n{extra}");
            let path = latch_dir.join(format!("{name}.yaml"));
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let policy_plain = policy("bench-pg-plain", "disable", "")?;
        let policy_direct = policy("bench-pg-direct", "disable", "  direct: true\n")?;
        let policy_tls = policy("bench-pg-tls", "require", "")?;
        let policy_app_tls = policy(
            "bench-pg-app-tls",
            "require",
            "  appTls:\n    mode: enable\n",
        )?;

        // pgbouncer: same credentials, in its auth_file; it runs as the postgres user.
        let userlist = dir.join("userlist.txt");
        write_private(&userlist, &format!("\"{USER}\" \"{password}\"\n"))?;
        std::os::unix::fs::chown(&userlist, Some(pg.uid), Some(pg.gid))?;
        let bouncer_port = proc::free_port(BOUNCER_PLAIN)?;
        let mut bouncers = Vec::new();
        for (addr, sslmode) in [(BOUNCER_PLAIN, "disable"), (BOUNCER_TLS, "require")] {
            bouncers.push(start_pgbouncer(
                dir,
                &pg,
                addr,
                bouncer_port,
                sslmode,
                &userlist,
            )?);
        }
        Ok(Rig {
            dir: dir.to_path_buf(),
            latch_dir: latch_dir.to_path_buf(),
            latch: latch.to_path_buf(),
            password,
            pg,
            policy_plain,
            policy_direct,
            policy_tls,
            policy_app_tls,
            bouncer_port,
            _bouncers: bouncers,
            seconds,
        })
    }

    fn copy_rows(&self) -> u64 {
        100_000 * u64::from(self.seconds)
    }

    /// One run: transactions per second (pgbench) or MB/s (COPY).
    fn measure(&self, case: Case, route: Route) -> Result<f64> {
        let (host, port) = match route {
            Route::Direct | Route::Latch | Route::LatchDirect => (SERVER, self.pg.port),
            Route::Pgbouncer if case.tls() => (BOUNCER_TLS, self.bouncer_port),
            Route::Pgbouncer => (BOUNCER_PLAIN, self.bouncer_port),
        };
        let conn = [
            "-h".to_string(),
            host.to_string(),
            "-p".to_string(),
            port.to_string(),
            "-U".to_string(),
            USER.to_string(),
        ];
        let mut argv: Vec<String> = match case {
            Case::Select
            | Case::SelectTls
            | Case::SelectTlsAppTls
            | Case::SelectConnect
            | Case::SelectConnectAppTls => {
                let mut a: Vec<String> = ["pgbench", "-n", "-S", "-c", "4", "-j", "2", "-T"]
                    .map(String::from)
                    .to_vec();
                a.push(self.seconds.to_string());
                if case.connect_each() {
                    a.push("-C".to_string());
                }
                a.extend(conn);
                a.push(DB.to_string());
                a
            }
            Case::Copy => {
                let psql = format!(
                    "psql -X -q {} -d {DB} -c \"$COPY_SQL\" > /dev/null",
                    conn.join(" ")
                );
                vec![
                    "bash".to_string(),
                    "-c".to_string(),
                    format!("TIMEFORMAT=%R; {{ time {psql} ; }} 2>&1"),
                ]
            }
        };
        let mut cmd = if matches!(route, Route::Latch | Route::LatchDirect) {
            let policy = match case {
                _ if route == Route::LatchDirect => &self.policy_direct,
                _ if case.app_tls() => &self.policy_app_tls,
                _ if case.tls() => &self.policy_tls,
                _ => &self.policy_plain,
            };
            let mut c =
                crate::bench::latch_run(&self.latch, policy, &self.latch_dir.join("latch-state"));
            c.arg("--");
            c.args(&argv);
            c
        } else {
            let mut c = Command::new(argv.remove(0));
            c.args(&argv);
            c
        };
        cmd.env(
            "COPY_SQL",
            format!(
                "COPY (SELECT repeat('x', 1000) FROM generate_series(1, {})) TO STDOUT",
                self.copy_rows()
            ),
        );
        match route {
            // The application holds no password; latch authenticates (and does TLS when the
            // policy says so) for it.
            Route::Latch | Route::LatchDirect => {
                let sslmode = if case.app_tls() { "require" } else { "disable" };
                cmd.env_remove("PGPASSWORD").env("PGSSLMODE", sslmode);
            }
            // What the application does on its own: its password, TLS when the case uses it.
            Route::Direct => {
                cmd.env("PGPASSWORD", &self.password)
                    .env("PGSSLMODE", if case.tls() { "require" } else { "disable" });
            }
            Route::Pgbouncer => {
                cmd.env("PGPASSWORD", &self.password)
                    .env("PGSSLMODE", "disable");
            }
        }
        let err_path = self.dir.join("client.stderr");
        cmd.stderr(std::fs::File::create(&err_path)?);
        let timeout = Duration::from_secs(u64::from(self.seconds) * 3 + 60);
        let (status, stdout) = proc::run_capture(&mut cmd, timeout)?;
        let parsed = match case {
            Case::Select
            | Case::SelectTls
            | Case::SelectTlsAppTls
            | Case::SelectConnect
            | Case::SelectConnectAppTls => parse_tps(&stdout),
            Case::Copy => parse_seconds(&stdout)
                .map(|s| (self.copy_rows() * ROW_BYTES) as f64 / 1e6 / s.max(1e-6)),
        };
        match (status.success(), parsed) {
            (true, Ok(v)) => Ok(v),
            (ok, parsed) => {
                let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
                let tail: Vec<&str> = stdout.lines().rev().take(3).collect();
                let why = parsed.err().map(|e| format!("{e:#}")).unwrap_or_default();
                bail!(
                    "exited {status}{}; {why} {} {}",
                    if ok { "" } else { " (failure)" },
                    stderr.trim(),
                    tail.join(" | ")
                )
            }
        }
    }
}

pub fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn start_pgbouncer(
    dir: &Path,
    pg: &Postgres,
    addr: Ipv4Addr,
    port: u16,
    server_sslmode: &str,
    userlist: &Path,
) -> Result<Guard> {
    let ini = dir.join(format!("pgbouncer-{server_sslmode}.ini"));
    std::fs::write(
        &ini,
        format!(
            "[databases]
{DB} = host={SERVER} port={} dbname={DB}

[pgbouncer]
listen_addr = {addr}
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {}
pool_mode = session
max_client_conn = 200
default_pool_size = 20
server_tls_sslmode = {server_sslmode}
ignore_startup_parameters = extra_float_digits
",
            pg.port,
            userlist.display()
        ),
    )?;
    let log = std::fs::File::create(dir.join(format!("pgbouncer-{server_sslmode}.log")))?;
    std::os::unix::fs::chown(&ini, Some(pg.uid), Some(pg.gid))?;
    let mut g = Guard::spawn(
        "pgbouncer",
        Command::new("pgbouncer")
            .arg(&ini)
            .uid(pg.uid)
            .gid(pg.gid)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
        libc::SIGINT,
    )?;
    proc::wait_listening(&mut g, addr, port)?;
    Ok(g)
}

/// `tps = 1234.5 (...)` from pgbench's report.
pub fn parse_tps(out: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("pgbench printed no `tps = ` line")
}

/// The last line bash's `time` (TIMEFORMAT=%R) printed: elapsed seconds.
fn parse_seconds(out: &str) -> Result<f64> {
    out.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("no elapsed time in {:?}", out.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_and_time() {
        let out = "number of failed transactions: 0 (0.000%)\nlatency average = 0.5 ms\ntps = 7890.123456 (without initial connection time)\n";
        assert_eq!(parse_tps(out).unwrap(), 7890.123456);
        assert!(parse_tps("nothing").is_err());
        assert_eq!(parse_seconds("noise\n1.25\n").unwrap(), 1.25);
        assert_eq!(median(&[3.0, 1.0]), Some(2.0));
    }
}
