//! The MySQL half of `cargo xtask bench`, on one throw-away MariaDB 10.11 (the account on
//! mysql_native_password): sysbench `oltp_read_only` with persistent connections, and a new
//! connection per query (a sysbench Lua script: connect, `SELECT 1`, disconnect), each two
//! three ways — the application straight to the server with its password, through latch's
//! relay (`latch run`, the application holding no password), and through latch's direct mode
//! (`mysql: {direct: true}`: the application's own connection, latch in its authentication
//! only). A third case opens a new connection per query to an account that requires TLS: the
//! application keeps its TLS on (verifying the server: its CA file is the test CA directly and
//! latch's node CA through latch) and latch speaks TLS to the server, verify-full.

use crate::bench_conns::agent_measured;
use crate::bench_cpu::{self, PerOp};
use crate::bench_pg::write_private;
use crate::proc::{self, Guard, TempDir};
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const USER: &str = "bench";
const DB: &str = "bench";
/// sysbench's data: tables × rows.
const TABLES: u32 = 4;
const TABLE_SIZE: u32 = 10_000;
const THREADS: u32 = 4;
/// The account that must use TLS (`REQUIRE SSL`).
const TLS_USER: &str = "bench_tls";

/// One connection per event: what `pgbench -C` is for PostgreSQL.
const CONNECT_LUA: &str = r#"
function thread_init()
  drv = sysbench.sql.driver()
end

function event()
  local con = drv:connect()
  con:query("SELECT 1")
  con:disconnect()
end
"#;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    OltpReadOnly,
    ConnectPerQuery,
    /// A new connection per query, TLS on both legs (the account requires it).
    ConnectPerQueryTls,
}

impl Case {
    const ALL: [Case; 3] = [
        Case::OltpReadOnly,
        Case::ConnectPerQuery,
        Case::ConnectPerQueryTls,
    ];

    fn label(self) -> &'static str {
        match self {
            Case::OltpReadOnly => "oltp_read_only, persistent (tps)",
            Case::ConnectPerQuery => "new connection per query (cps)",
            Case::ConnectPerQueryTls => "new connection per query, TLS (cps)",
        }
    }

    /// What latch should reach, as a share of direct (issue #14).
    fn target(self) -> f64 {
        match self {
            Case::OltpReadOnly => 0.95,
            Case::ConnectPerQuery | Case::ConnectPerQueryTls => 1.0,
        }
    }

    /// What one operation of the case is.
    fn unit(self) -> &'static str {
        match self {
            Case::OltpReadOnly => "transaction",
            Case::ConnectPerQuery | Case::ConnectPerQueryTls => "connection",
        }
    }

    /// Direct mode hands the application its own plain connection to the server, so it has no
    /// TLS case (a client that insists on TLS gets 1043 there, docs/direct-mode.md).
    fn has(self, route: Route) -> bool {
        !(self == Case::ConnectPerQueryTls && route == Route::LatchDirect)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Direct,
    Latch,
    /// latch with `mysql: {direct: true}`.
    LatchDirect,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Latch, Route::LatchDirect];

    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Latch => "latch",
            Route::LatchDirect => "latch-dm",
        }
    }
}

struct Rig {
    dir: PathBuf,
    latch: PathBuf,
    policy: PathBuf,
    policy_direct: PathBuf,
    /// verify-full to the server, for [`TLS_USER`].
    policy_tls: PathBuf,
    /// sysbench's working directories for the TLS case: it reads `cacert.pem`,
    /// `client-cert.pem` and `client-key.pem` from there. Direct: the test CA; through latch:
    /// the node CA (`latch ca export`).
    app_direct: PathBuf,
    app_latch: PathBuf,
    port: u16,
    password: String,
    lua: PathBuf,
    seconds: u32,
    /// The server's Unix socket (root, not intercepted), for its counters.
    socket: PathBuf,
    _server: Guard,
}

/// Runs the MySQL cases `repeat` times (interleaved) and prints one table.
pub fn run(latch: &Path, seconds: u32, repeat: u32) -> Result<()> {
    let tmp = TempDir::new("latch-bench-my")?;
    let rig = Rig::start(tmp.path(), latch, seconds)?;
    let mut samples: Vec<Samples> = Vec::new();
    // Logins at the server and connections the client made, in the last round, by route
    // (new connection per query): how many connections latch served with a kept session.
    let mut logins: Vec<(Route, u64, u64)> = Vec::new();
    for case in Case::ALL {
        for route in Route::ALL {
            if case.has(route) {
                samples.push(Samples {
                    case,
                    route,
                    rates: Vec::new(),
                    cpu: Vec::new(),
                    machine: Vec::new(),
                    failed: None,
                });
            }
        }
    }
    for round in 1..=repeat {
        for Samples {
            case,
            route,
            rates,
            cpu,
            machine,
            failed,
        } in samples.iter_mut()
        {
            if failed.is_some() {
                continue;
            }
            print!(
                "bench: round {round}/{repeat}: {:<34} {:<8} ",
                case.label(),
                route.label()
            );
            let _ = std::io::Write::flush(&mut std::io::stdout());
            let before = rig.logins();
            match rig.measure(*case, *route) {
                Ok((v, made, used)) => {
                    println!(
                        "{v:10.1}{}",
                        used.0.map_or(String::new(), |c| format!(
                            "  {:.0} µs of latch's CPU each ({:.0} in the kernel)",
                            c.total(),
                            c.system
                        ))
                    );
                    rates.push(v);
                    cpu.extend(used.0);
                    machine.extend(used.1);
                    if let (Case::ConnectPerQuery, Ok(before), Ok(after)) =
                        (*case, before, rig.logins())
                    {
                        // (Less the counter's own query.)
                        logins.retain(|(r, ..)| r != route);
                        logins.push((*route, after.saturating_sub(before + 1), made));
                    }
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
        "\nMariaDB 10.11 on {SERVER} (mysql_native_password), sysbench {THREADS} threads, \
         {seconds} s, {TABLES} tables × {TABLE_SIZE} rows; median of {repeat} run(s):\n"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>13} {:>10} {:>8}",
        "case", "direct", "latch", "latch-dm", "latch/direct", "dm/direct", "target"
    );
    let mut any_failed = false;
    for case in Case::ALL {
        let value = |route: Route| {
            samples
                .iter()
                .find(|s| s.case == case && s.route == route)
                .and_then(|s| {
                    if s.failed.is_some() {
                        None
                    } else {
                        crate::bench::median(&s.rates)
                    }
                })
        };
        let (d, l, m) = (
            value(Route::Direct),
            value(Route::Latch),
            value(Route::LatchDirect),
        );
        any_failed |= d.is_none() || l.is_none() || (m.is_none() && case.has(Route::LatchDirect));
        let cell = |v: Option<f64>, route: Route| match v {
            Some(v) => format!("{v:.1}"),
            None if case.has(route) => "failed".to_string(),
            None => "-".to_string(),
        };
        let ratio = |x: Option<f64>| match (x, d) {
            (Some(x), Some(d)) if d > 0.0 => format!("{:.2}", x / d),
            _ => "-".to_string(),
        };
        println!(
            "{:<34} {:>10} {:>10} {:>10} {:>13} {:>10} {:>8}",
            case.label(),
            cell(d, Route::Direct),
            cell(l, Route::Latch),
            cell(m, Route::LatchDirect),
            ratio(l),
            ratio(m),
            format!("≥{:.2}", case.target())
        );
    }
    if !logins.is_empty() {
        let cells: Vec<String> = logins
            .iter()
            .map(|(r, n, made)| format!("{} {n} for {made}", r.label()))
            .collect();
        println!(
            "new connection per query, logins at the server for the connections made (last \
             round): {}",
            cells.join(", ")
        );
    }
    for s in &samples {
        if let Some(why) = &s.failed {
            println!("  {} / {}: {why}", s.case.label(), s.route.label());
        }
    }
    // What each case's target leaves latch, against what it used.
    for s in samples.iter().filter(|s| s.route != Route::Direct) {
        let direct = samples
            .iter()
            .find(|d| d.case == s.case && d.route == Route::Direct);
        let direct_rate = direct.and_then(|d| crate::bench::median(&d.rates));
        let direct_machine = direct.and_then(|d| crate::bench::median(&d.machine));
        if let (Some(cpu), Some(direct)) = (bench_cpu::median(&s.cpu), direct_rate) {
            println!(
                "{}, {}",
                s.case.label(),
                bench_cpu::verdict(
                    s.route.label(),
                    &format!("{:.2}× direct", s.case.target()),
                    s.case.target() * direct,
                    s.case.unit(),
                    &cpu,
                    direct_machine,
                )
            );
        }
    }
    drop(rig);
    if any_failed {
        bail!("some MySQL bench cases failed");
    }
    Ok(())
}

/// latch's CPU per operation (through latch) and the whole machine's (µs).
type Used = (Option<PerOp>, Option<f64>);

/// One case on one route over the rounds: its rates, latch's CPU per operation (latch's
/// routes), and why it failed.
struct Samples {
    case: Case,
    route: Route,
    rates: Vec<f64>,
    cpu: Vec<PerOp>,
    /// The whole machine's CPU per operation (µs).
    machine: Vec<f64>,
    failed: Option<String>,
}

fn tool(name: &str) -> Result<PathBuf> {
    let path = PathBuf::from("/usr/bin").join(name);
    if !path.exists() {
        let path = PathBuf::from("/usr/sbin").join(name);
        if path.exists() {
            return Ok(path);
        }
        bail!("{name} is missing: run `cargo xtask setup`");
    }
    Ok(path)
}

impl Rig {
    fn start(dir: &Path, latch: &Path, seconds: u32) -> Result<Rig> {
        let data = dir.join("data");
        let socket = dir.join("mysqld.sock");
        // Its own tmpdir: a server starting removes every `#sql-*` file in it.
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        proc::run(
            Command::new(tool("mariadb-install-db")?)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--tmpdir={}", tmp.display()))
                .args([
                    "--user=root",
                    "--skip-test-db",
                    "--auth-root-authentication-method=socket",
                ])
                .stdout(Stdio::null()),
        )?;
        let tls = dir.join("tls");
        make_certificates(&tls)?;
        let port = proc::free_port(SERVER)?;
        let mut server = Guard::spawn(
            "mariadbd",
            Command::new(tool("mariadbd")?)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--tmpdir={}", tmp.display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
                .arg(format!("--log-error={}", dir.join("server.log").display()))
                .arg(format!("--bind-address={SERVER}"))
                .arg(format!("--port={port}"))
                .args([
                    "--user=root",
                    "--skip-log-bin",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=128M",
                    "--max-connections=1000",
                ])
                .arg(format!("--ssl-ca={}", tls.join("ca.pem").display()))
                .arg(format!("--ssl-cert={}", tls.join("server.pem").display()))
                .arg(format!("--ssl-key={}", tls.join("server.key").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            libc::SIGTERM,
        )?;
        let admin = |sql: &str| -> Result<()> {
            proc::run(
                Command::new(tool("mariadb")?)
                    .arg("--no-defaults")
                    .arg(format!("--socket={}", socket.display()))
                    .args(["-u", "root", "-e", sql]),
            )
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            server.ensure_running()?;
            if proc::is_listening(SERVER, port)
                && proc::succeeds(
                    Command::new(tool("mariadb")?)
                        .arg("--no-defaults")
                        .arg(format!("--socket={}", socket.display()))
                        .args(["-u", "root", "-e", "SELECT 1"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null()),
                )
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "mariadbd not ready after 30 s (log: {})",
                    dir.join("server.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let password = format!("pw-{}", std::process::id());
        admin(&format!("CREATE DATABASE {DB}"))?;
        admin(&format!(
            "CREATE USER {USER}@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{password}')"
        ))?;
        admin(&format!("GRANT ALL ON {DB}.* TO {USER}@'%'"))?;
        admin(&format!(
            "CREATE USER {TLS_USER}@'%' IDENTIFIED VIA mysql_native_password \
             USING PASSWORD('{password}') REQUIRE SSL"
        ))?;
        admin(&format!("GRANT ALL ON {DB}.* TO {TLS_USER}@'%'"))?;

        // latch: the password lives only in a 0600 secrets file.
        let secrets = dir.join("secrets.yaml");
        write_private(
            &secrets,
            &format!(
                "orders-db: {{username: {USER}, password: {password}}}\n\
                 orders-db-tls: {{username: {TLS_USER}, password: {password}}}\n"
            ),
        )?;
        let policy = dir.join("bench-my.yaml");
        std::fs::write(
            &policy,
            crate::policy::postgres("bench-my", SERVER, port, &secrets)
                .replace("protocol: postgres", "protocol: mysql")
                + "  tls:\n    mode: disable\n",
        )?;
        let policy_direct = dir.join("bench-my-direct.yaml");
        std::fs::write(
            &policy_direct,
            crate::policy::postgres("bench-my-direct", SERVER, port, &secrets)
                .replace("protocol: postgres", "protocol: mysql")
                + "  tls:\n    mode: disable\n  mysql:\n    direct: true\n",
        )?;
        let policy_tls = dir.join("bench-my-tls.yaml");
        std::fs::write(
            &policy_tls,
            crate::policy::postgres("bench-my-tls", SERVER, port, &secrets)
                .replace("protocol: postgres", "protocol: mysql")
                .replace("path: orders-db,", "path: orders-db-tls,")
                + &format!(
                    "  tls:\n    mode: verify-full\n    ca: {}\n",
                    tls.join("ca.pem").display()
                ),
        )?;
        // The application verifies whom it talks to: the test CA directly, the node CA that
        // issues latch's certificates toward applications through latch.
        let (app_direct, app_latch) = (dir.join("app-direct"), dir.join("app-latch"));
        for app in [&app_direct, &app_latch] {
            std::fs::create_dir_all(app)?;
            for f in ["client-cert.pem", "client-key.pem"] {
                std::fs::copy(tls.join(f), app.join(f))?;
            }
        }
        std::fs::copy(tls.join("ca.pem"), app_direct.join("cacert.pem"))?;
        let node_ca = proc::output(
            Command::new(latch)
                .args(["ca", "export", "--state-dir"])
                .arg(dir.join("latch-state")),
        )
        .context("latch ca export")?;
        std::fs::write(app_latch.join("cacert.pem"), node_ca)?;
        let lua = dir.join("connect.lua");
        std::fs::write(&lua, CONNECT_LUA)?;
        let rig = Rig {
            dir: dir.to_path_buf(),
            latch: latch.to_path_buf(),
            policy,
            policy_direct,
            policy_tls,
            app_direct,
            app_latch,
            port,
            password,
            lua,
            seconds,
            socket: socket.clone(),
            _server: server,
        };
        println!("bench: sysbench oltp_read_only prepare ({TABLES} × {TABLE_SIZE} rows)");
        let mut prepare = Command::new(tool("sysbench")?);
        prepare
            .args(rig.sysbench_args(Case::OltpReadOnly, Route::Direct))
            .arg("prepare")
            .stdout(Stdio::null());
        proc::run(&mut prepare)?;
        Ok(rig)
    }

    fn sysbench_args(&self, case: Case, route: Route) -> Vec<String> {
        let script = match case {
            Case::OltpReadOnly => "oltp_read_only".to_owned(),
            Case::ConnectPerQuery | Case::ConnectPerQueryTls => self.lua.display().to_string(),
        };
        let mut a = vec![
            script,
            "--db-driver=mysql".to_owned(),
            format!("--mysql-host={SERVER}"),
            format!("--mysql-port={}", self.port),
            format!("--mysql-db={DB}"),
            format!("--tables={TABLES}"),
            format!("--table-size={TABLE_SIZE}"),
            format!("--threads={THREADS}"),
            format!("--time={}", self.seconds),
        ];
        let tls = case == Case::ConnectPerQueryTls;
        match route {
            Route::Direct => {
                a.push(format!(
                    "--mysql-user={}",
                    if tls { TLS_USER } else { USER }
                ));
                a.push(format!("--mysql-password={}", self.password));
            }
            // The application holds no password, and names no real user.
            Route::Latch | Route::LatchDirect => a.push("--mysql-user=app".to_owned()),
        }
        if tls {
            a.push("--mysql-ssl=on".to_owned());
        }
        a
    }

    /// The server's count of connections made to it so far (each one a login).
    fn logins(&self) -> Result<u64> {
        let out = Command::new(tool("mariadb")?)
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-u", "root", "-N", "-B", "-e"])
            .arg("SHOW GLOBAL STATUS LIKE 'Connections'")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no Connections count in {text:?}"))
    }

    /// One run: transactions (events) per second, how many there were, through latch its CPU
    /// per transaction (measured while sysbench runs, not the agent's start or exit), and the
    /// whole machine's.
    fn measure(&self, case: Case, route: Route) -> Result<(f64, u64, Used)> {
        let mut argv = vec![tool("sysbench")?.display().to_string()];
        argv.extend(self.sysbench_args(case, route));
        argv.push("run".to_owned());
        let cwd = match (case, route) {
            (Case::ConnectPerQueryTls, Route::Direct) => Some(&self.app_direct),
            (Case::ConnectPerQueryTls, _) => Some(&self.app_latch),
            _ => None,
        };
        let err_path = self.dir.join("client.stderr");
        let stderr = std::fs::File::create(&err_path)?;
        let failed = |why: String| {
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            anyhow::anyhow!("{why} {}", stderr.trim())
        };
        if route == Route::Direct {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]).stderr(stderr);
            if let Some(cwd) = cwd {
                cmd.current_dir(cwd);
            }
            let timeout = Duration::from_secs(u64::from(self.seconds) * 3 + 60);
            let before = bench_cpu::Mark::machine()?;
            let (status, stdout) = proc::run_capture(&mut cmd, timeout)?;
            let machine = before.since()?;
            return match (status.success(), parse_tps(&stdout)) {
                (true, Ok((rate, count))) => {
                    Ok((rate, count, (None, machine.machine_per_op(count as f64))))
                }
                (_, parsed) => Err(failed(format!(
                    "exited {status}; {}",
                    parsed.err().map(|e| format!("{e:#}")).unwrap_or_default()
                ))),
            };
        }
        let policy = match (case, route) {
            (Case::ConnectPerQueryTls, _) => &self.policy_tls,
            (_, Route::Latch) => &self.policy,
            _ => &self.policy_direct,
        };
        let agent = |script: &str| {
            let mut c = crate::bench::latch_run(&self.latch, policy, &self.dir.join("latch-state"));
            c.args(["--", "sh", "-c", script]).stderr(stderr);
            if let Some(cwd) = cwd {
                c.current_dir(cwd);
            }
            c
        };
        let (stdout, cpu) = agent_measured(agent, &crate::bench::shell_words(&argv))
            .map_err(|e| failed(format!("{e:#}")))?;
        let (rate, count) = parse_tps(&stdout).map_err(|e| failed(format!("{e:#}")))?;
        let ops = count as f64;
        Ok((rate, count, (cpu.per_op(ops), cpu.machine_per_op(ops))))
    }
}

/// A test CA, the server's certificate for [`SERVER`] and a client certificate (sysbench
/// loads one whenever TLS is on), P-256, into `dir`.
fn make_certificates(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let openssl = |args: &[&str]| {
        proc::run(
            Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=latch bench CA"],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    )
    .context("generating the bench CA")?;
    let san = format!("subjectAltName=IP:{SERVER}");
    std::fs::write(dir.join("server.ext"), &san)?;
    for (name, subject, ext) in [
        ("server", format!("/CN={SERVER}"), Some("server.ext")),
        ("client", "/CN=bench client".to_owned(), None),
    ] {
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-subj", &subject, "-keyout", &key, "-out", &csr],
            ]
            .concat(),
        )
        .with_context(|| format!("generating the {name} key"))?;
        let mut sign = vec![
            "x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key",
        ];
        sign.extend(["-CAcreateserial", "-days", "2", "-out", &pem]);
        if let Some(ext) = ext {
            sign.extend(["-extfile", ext]);
        }
        openssl(&sign).with_context(|| format!("signing the {name} certificate"))?;
    }
    std::fs::rename(dir.join("client.pem"), dir.join("client-cert.pem"))?;
    std::fs::rename(dir.join("client.key"), dir.join("client-key.pem"))?;
    Ok(())
}

/// sysbench's "transactions: N (X per sec.)": the rate X and the count N.
fn parse_tps(out: &str) -> Result<(f64, u64)> {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("transactions:"))
        .context("no transactions line in sysbench's output")?;
    let count = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("no count in sysbench's transactions line")?;
    let inner = line
        .split('(')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context("no rate in sysbench's transactions line")?;
    let rate = inner
        .parse()
        .with_context(|| format!("cannot parse sysbench rate {inner:?}"))?;
    Ok((rate, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysbench_transactions() {
        let out = "SQL statistics:\n    transactions:                        12345  (2468.21 per sec.)\n    queries: 1\n";
        let (rate, count) = parse_tps(out).unwrap();
        assert!((rate - 2468.21).abs() < 1e-9);
        assert_eq!(count, 12345);
        assert!(parse_tps("nothing").is_err());
    }
}
