//! Runs the workspace's test binaries three at a time (`cargo test` runs them one after
//! another).
//!
//! Most integration tests spend their time waiting (servers starting, timeouts they provoke,
//! a peer's close); the client libraries' suites are long, some keep a CPU busy, others wait
//! on their own timeouts. So three lanes run at once: two take the client suites' tests first
//! (each its own job), the third every other binary first; a lane whose queue is empty helps
//! the others. Binaries that use something of the whole machine (the Debian package, podman
//! images, the count of named network namespaces, systemd-like units) or that measure time
//! under load run alone at the end. Each job's output is printed in one piece when it ends,
//! in `cargo test`'s form. After Ctrl-C no job starts.
use std::{
    collections::VecDeque,
    fs::File,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::proc;

/// Test binaries (integration test targets) that run alone, after the rest.
const ALONE: &[&str] = &[
    // Installs, checks and purges the package system-wide (/usr/bin/latch, /etc/latch).
    "packaging_deb",
    // podman images, containers and storage.
    "packaging_container",
    "packaging_kubernetes",
    "container_harness",
    "netns_container",
    // Counts every named network namespace on the machine.
    "netns_limits",
    "systemd_unit",
    // Load and timing: thousands of connections, refusal storms, an upgrade under a steady
    // stream of connections.
    "soak",
    "limits",
    "upgrade",
];

/// What each lane takes from first: `true` for the client suites' tests.
const LANES: [bool; 3] = [true, true, false];

/// The binary whose tests are each a job of their own.
const SPLIT: &str = "client_suites";

/// Its longest tests (by name prefix), started first in this order so that none of them is
/// the last to begin: measured 130–330 s each; the others take under two minutes.
const LONGEST_FIRST: &[&str] = &[
    "mysql_connector_python",
    "pg8000",
    "aiomysql",
    "requests",
    "asyncpg",
];

/// One test binary, or one test of it.
struct Job {
    /// `cargo test`'s name for it: `unittests src/lib.rs (latch)`, `tests/mysql.rs`.
    label: String,
    exe: PathBuf,
    /// The package's directory, where cargo runs its tests.
    dir: PathBuf,
    /// `--exact <test>` for one test of a split binary.
    args: Vec<String>,
}

/// What each lane takes from first.
struct Queues {
    long: VecDeque<Job>,
    rest: VecDeque<Job>,
}

/// A job that ended: its label, how long it ran, whether it passed, and for a failure the
/// part of its output that says why.
struct Done {
    label: String,
    secs: f64,
    ok: bool,
    why: String,
}

/// Lines of a failure kept from each end of what it printed, in the recap at the end.
const RECAP_LINES: usize = 60;

/// The test binaries, built, and the order they run in.
pub struct Plan {
    alone: Vec<Job>,
    queues: Queues,
}

/// Builds the test binaries with `build`'s arguments (`cargo test --no-run …`).
pub fn build(build: &[&str]) -> Result<Plan> {
    let out = proc::output(
        proc::cargo()
            .args(build)
            .args(["--no-run", "--message-format", "json-render-diagnostics"])
            .stderr(Stdio::inherit()),
    )?;
    sort(&out, split)
}

impl Plan {
    /// Runs every binary with `envs` set, and reports which failed.
    pub fn run(self, envs: &[(String, PathBuf)]) -> Result<()> {
        let started = Instant::now();
        let queues = Mutex::new(self.queues);
        let done = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for prefers_long in LANES {
                let (queues, done) = (&queues, &done);
                s.spawn(move || {
                    while proc::check_interrupted().is_ok()
                        && let Some(job) = take(queues, prefers_long)
                    {
                        run_job(&job, envs, done);
                    }
                });
            }
        });
        for job in &self.alone {
            proc::check_interrupted()?;
            run_job(job, envs, &done);
        }
        let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
        done.sort_by(|a, b| b.secs.total_cmp(&a.secs));
        println!(
            "\ntest binaries ran in {:.0} s; the longest jobs:",
            started.elapsed().as_secs_f64()
        );
        for d in done.iter().take(5) {
            println!("  {:6.1} s  {}", d.secs, d.label);
        }
        let failed: Vec<&Done> = done.iter().filter(|d| !d.ok).collect();
        // Why, again at the end, where a log cut to its last lines still shows it: each job's
        // output came whole when it ended, possibly long before.
        for d in &failed {
            println!("\n---- why {} failed ----\n{}", d.label, d.why);
        }
        if !failed.is_empty() {
            let failed: Vec<&str> = failed.iter().map(|d| d.label.as_str()).collect();
            bail!("{} failed:\n  {}", failed.len(), failed.join("\n  "));
        }
        Ok(())
    }
}

fn take(queues: &Mutex<Queues>, prefers_long: bool) -> Option<Job> {
    let mut q = queues.lock().unwrap_or_else(|e| e.into_inner());
    if prefers_long {
        q.long.pop_front().or_else(|| q.rest.pop_front())
    } else {
        q.rest.pop_front().or_else(|| q.long.pop_front())
    }
}

/// Sorts the test binaries cargo reports building (`messages`, one JSON message a line) into
/// the jobs that run alone and the lanes' queues; `split` makes the jobs of [`SPLIT`].
fn sort(messages: &str, split: impl Fn(Job) -> Result<Vec<Job>>) -> Result<Plan> {
    let mut plan = Plan {
        alone: Vec::new(),
        queues: Queues {
            long: VecDeque::new(),
            rest: VecDeque::new(),
        },
    };
    for m in messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
    {
        let Some(exe) = m["executable"].as_str() else {
            continue;
        };
        let target = &m["target"];
        let name = target["name"].as_str().unwrap_or_default();
        let src = target["src_path"].as_str().unwrap_or_default();
        let manifest = PathBuf::from(m["manifest_path"].as_str().unwrap_or_default());
        let dir = manifest
            .parent()
            .context("a manifest has a directory")?
            .to_path_buf();
        let is_test = target["kind"][0] == "test";
        let label = if is_test {
            format!("tests/{name}.rs")
        } else {
            let rel = src
                .strip_prefix(&format!("{}/", dir.display()))
                .unwrap_or(src);
            format!("unittests {rel} ({name})")
        };
        let job = Job {
            label,
            exe: PathBuf::from(exe),
            dir,
            args: Vec::new(),
        };
        if is_test && ALONE.contains(&name) {
            plan.alone.push(job);
        } else if is_test && name == SPLIT {
            plan.queues.long.extend(longest_first(split(job)?));
        } else {
            plan.queues.rest.push_back(job);
        }
    }
    if plan.queues.long.is_empty() && plan.queues.rest.is_empty() {
        bail!("cargo built no test binary");
    }
    Ok(plan)
}

/// `jobs` (the tests of [`SPLIT`]) with those of [`LONGEST_FIRST`] first, in its order.
fn longest_first(mut jobs: Vec<Job>) -> Vec<Job> {
    let rank = |job: &Job| {
        let test = job.args.last().map(String::as_str).unwrap_or_default();
        LONGEST_FIRST
            .iter()
            .position(|p| test.starts_with(p))
            .unwrap_or(LONGEST_FIRST.len())
    };
    jobs.sort_by_key(rank);
    jobs
}

/// One job per test of `job`'s binary.
fn split(job: Job) -> Result<Vec<Job>> {
    let list = proc::output(Command::new(&job.exe).args(["--list", "--format", "terse"]))?;
    Ok(list
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(|test| Job {
            label: format!("{} {test}", job.label),
            exe: job.exe.clone(),
            dir: job.dir.clone(),
            args: vec!["--exact".into(), test.into()],
        })
        .collect())
}

/// Runs `job` with its output in a file, then prints it whole; records how it ended.
fn run_job(job: &Job, envs: &[(String, PathBuf)], done: &Mutex<Vec<Done>>) {
    // A line when it starts, so that a job that never ends is seen in the log.
    println!("     Started {}", job.label);
    let started = Instant::now();
    let outcome = (|| -> Result<(bool, String)> {
        let log = tempfile(&job.label)?;
        let file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(&job.exe)
            .args(&job.args)
            .current_dir(&job.dir)
            .env("CARGO_MANIFEST_DIR", &job.dir)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {}", job.exe.display()))?;
        let status = proc::wait_child(child, None)?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        println!(
            "     Running {} ({}) in {:.1} s\n{text}",
            job.label,
            job.exe.display(),
            started.elapsed().as_secs_f64()
        );
        let why = if status.success() {
            String::new()
        } else {
            failure_of(&text)
        };
        Ok((status.success(), why))
    })();
    let (ok, why) = match outcome {
        Ok(ended) => ended,
        Err(e) => {
            println!("     Running {}: {e:#}", job.label);
            (false, format!("{e:#}"))
        }
    };
    done.lock().unwrap_or_else(|e| e.into_inner()).push(Done {
        label: job.label.clone(),
        secs: started.elapsed().as_secs_f64(),
        ok,
        why,
    });
}

/// The failures libtest reports in `text` (from the first `---- <test> stdout ----` to the
/// closing list of names), or the end of `text` when there is no such report (a crash);
/// [`RECAP_LINES`] from each end when longer.
fn failure_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("---- ") && l.ends_with(" stdout ----"));
    let report = match start {
        Some(start) => {
            let end = lines
                .iter()
                .rposition(|l| *l == "failures:")
                .filter(|&end| end > start)
                .unwrap_or(lines.len());
            &lines[start..end]
        }
        None => &lines[lines.len().saturating_sub(RECAP_LINES)..],
    };
    if report.len() <= 2 * RECAP_LINES {
        return report.join("\n");
    }
    format!(
        "{}\n[… {} lines …]\n{}",
        report[..RECAP_LINES].join("\n"),
        report.len() - 2 * RECAP_LINES,
        report[report.len() - RECAP_LINES..].join("\n")
    )
}

/// Where a job's output goes while it runs.
fn tempfile(label: &str) -> Result<PathBuf> {
    let dir = proc::target_dir().join("test-output");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let name: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Ok(dir.join(format!("{name}.log")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(kind: &str, name: &str, src: &str, test: bool) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "manifest_path": "/w/tests/Cargo.toml",
            "target": {"kind": [kind], "name": name, "src_path": format!("/w/tests/{src}")},
            "profile": {"test": test},
            "executable": format!("/w/target/debug/deps/{name}-0123"),
        })
        .to_string()
    }

    fn labels<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Vec<&'a str> {
        jobs.into_iter().map(|j| j.label.as_str()).collect()
    }

    #[test]
    fn binaries_are_sorted_into_the_lanes_and_those_that_run_alone() {
        let messages = [
            artifact("lib", "latch_tests", "src/lib.rs", true),
            artifact("test", "mysql", "tests/mysql.rs", true),
            artifact("test", "packaging_deb", "tests/packaging_deb.rs", true),
            artifact("test", SPLIT, "tests/client_suites.rs", true),
            // Not a test binary: the binaries the tests spawn.
            artifact("bin", "latch-probe", "src/bin/probe.rs", false),
            "a line that is not JSON".into(),
        ]
        .join("\n");
        let plan = sort(&messages, |job| {
            Ok(["a", "b", "pg8000_suite"]
                .iter()
                .map(|t| Job {
                    label: format!("{} {t}", job.label),
                    exe: job.exe.clone(),
                    dir: job.dir.clone(),
                    args: vec!["--exact".into(), (*t).into()],
                })
                .collect())
        })
        .unwrap();
        assert_eq!(
            labels(&plan.queues.rest),
            ["unittests src/lib.rs (latch_tests)", "tests/mysql.rs"]
        );
        assert_eq!(
            labels(&plan.queues.long),
            [
                "tests/client_suites.rs pg8000_suite",
                "tests/client_suites.rs a",
                "tests/client_suites.rs b"
            ]
        );
        assert_eq!(labels(&plan.alone), ["tests/packaging_deb.rs"]);
        assert_eq!(plan.queues.long[2].args, ["--exact", "b"]);
        assert_eq!(plan.queues.rest[1].dir, PathBuf::from("/w/tests"));
    }

    #[test]
    fn no_test_binary_is_an_error() {
        let messages = artifact("bin", "latch", "src/main.rs", false);
        assert!(sort(&messages, |j| Ok(vec![j])).is_err());
    }

    #[test]
    fn a_lane_takes_from_its_own_queue_first_then_helps_the_other() {
        let job = |label: &str| Job {
            label: label.into(),
            exe: PathBuf::new(),
            dir: PathBuf::new(),
            args: Vec::new(),
        };
        let queues = Mutex::new(Queues {
            long: VecDeque::from([job("suite")]),
            rest: VecDeque::from([job("one"), job("two")]),
        });
        let took = |long| take(&queues, long).map(|j| j.label);
        assert_eq!(took(false).as_deref(), Some("one"));
        assert_eq!(took(true).as_deref(), Some("suite"));
        assert_eq!(took(true).as_deref(), Some("two"));
        assert_eq!(took(false), None);
    }

    #[test]
    fn a_failure_is_recapped_by_libtests_report_or_the_end_of_the_output() {
        let text = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
                    ---- b stdout ----\nthread 'b' panicked at tests/b.rs:3:5:\nwhy\n\n\
                    failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\n";
        assert_eq!(
            failure_of(text),
            "---- b stdout ----\nthread 'b' panicked at tests/b.rs:3:5:\nwhy\n"
        );
        let crash: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let recap = failure_of(&crash);
        assert!(recap.starts_with("line 140\n") && recap.ends_with("line 199"));
        let long = format!("---- c stdout ----\n{crash}failures:\n    c\n");
        let recap = failure_of(&long);
        assert!(recap.starts_with("---- c stdout ----\nline 0\n"));
        assert!(recap.contains("\n[… 81 lines …]\nline 140\n") && recap.ends_with("line 199"));
    }
}
