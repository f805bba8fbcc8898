//! A client library's own test suite, run directly and through latch, and the two compared
//! (tests/tests/client_suites.rs). What passes directly must pass through latch, except where
//! the difference is latch's purpose: those are listed with the reason and must fail through
//! latch saying what the list says.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

/// Runs of one test alone after it failed through latch but had passed directly (or failed
/// directly, to tell a flaky test from a failing one): suites have timing-based tests (a
/// pool's idle checks, reconnects, timeouts) that fail now and then on a busy machine,
/// directly too. A test that fails through latch every time is a failure.
const RETRIES: usize = 2;

/// How long one run of a whole suite may take.
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// The test runner a suite uses: how to run all or one of its tests and read its report.
#[derive(Clone, Copy)]
pub enum Harness {
    /// A Rust test binary (libtest).
    Libtest,
    /// `python3 -m pytest`, reporting every outcome (`-rA`).
    Pytest,
}

/// One suite and what is known of it.
pub struct Suite<'a> {
    pub name: &'a str,
    pub harness: Harness,
    /// Arguments that select the whole suite (for pytest: the paths, `--deselect`s).
    pub all: &'a [&'a str],
    /// Tests that differ through latch by design: name → (why, what their failure says).
    pub differs: BTreeMap<String, (&'a str, &'a str)>,
    /// At least this many tests must pass directly (the suite really ran).
    pub min_passing: usize,
}

impl<'a> Suite<'a> {
    /// A pytest suite with no test that differs by design.
    pub fn pytest(name: &'a str, all: &'a [&'a str], min_passing: usize) -> Suite<'a> {
        Suite {
            name,
            harness: Harness::Pytest,
            all,
            differs: BTreeMap::new(),
            min_passing,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    /// Ignored, or an expected failure.
    Other,
}

pub struct Run {
    /// Every test reported, by name.
    pub results: BTreeMap<String, Outcome>,
    /// What the runner printed (its report, with each failure's output).
    pub text: String,
}

impl Suite<'_> {
    /// Runs the suite with `direct()` and with `through()` (commands that start the runner,
    /// in and out of latch's reach) and compares them; panics with every test that passes
    /// directly and not through latch. Returns the run through latch.
    pub fn compare(&self, direct: impl Fn() -> Command, through: impl Fn() -> Command) -> Run {
        let name = self.name;
        let first = self.run(&mut direct(), self.all);
        let passed_directly: Vec<&str> = first
            .results
            .iter()
            .filter(|(test, r)| **r == Outcome::Ok || self.passes_alone(&direct, test))
            .map(|(test, _)| test.as_str())
            .collect();
        assert!(
            passed_directly.len() >= self.min_passing,
            "only {} of {name}'s tests pass directly:\n{}",
            passed_directly.len(),
            first.text
        );
        for test in self.differs.keys() {
            assert!(
                passed_directly.contains(&test.as_str()),
                "{test} no longer passes directly: is the difference still there?\n{}",
                first.text
            );
        }

        let latch = self.run(&mut through(), self.all);
        assert_eq!(
            latch.results.keys().collect::<Vec<_>>(),
            first.results.keys().collect::<Vec<_>>(),
            "the two runs of {name}'s suite ran different tests"
        );
        let mut failed = Vec::new();
        let mut retried = Vec::new();
        for test in &passed_directly {
            let outcome = latch.results[*test];
            let failure = self.harness.failure_of(&latch.text, test);
            if let Some((why, says)) = self.differs.get(*test) {
                assert_eq!(
                    outcome,
                    Outcome::Failed,
                    "{test} passes through latch: {why}"
                );
                assert!(
                    failure.contains(says),
                    "{test} failed through latch otherwise than by design ({why}):\n{failure}"
                );
                continue;
            }
            if outcome == Outcome::Ok {
                continue;
            }
            retried.push(*test);
            if !self.passes_alone(&through, test) {
                failed.push(format!("{test}\n{}", failure.trim_end()));
            }
        }
        eprintln!(
            "{name}'s suite: {} tests reported, {} pass directly; through latch: {} at once, \
             {} on a retry {retried:?}, {} different by design",
            first.results.len(),
            passed_directly.len(),
            passed_directly.len() - retried.len() - self.differs.len(),
            retried.len() - failed.len(),
            self.differs.len()
        );
        assert!(
            failed.is_empty(),
            "{} of {name}'s tests pass directly but not through latch:\n\n{}",
            failed.len(),
            failed.join("\n\n")
        );
        latch
    }

    /// Runs `cmd` with `select` and reads the report.
    fn run(&self, cmd: &mut Command, select: &[&str]) -> Run {
        match self.harness {
            Harness::Libtest => cmd
                .args(select)
                .args(["--test-threads", "2"])
                .env("RUST_BACKTRACE", "0"),
            Harness::Pytest => cmd
                .args(["-p", "no:cacheprovider", "-rA", "--tb=short", "-q"])
                .args(select),
        };
        let out: Output = crate::run_within(cmd, RUN_LIMIT);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let results = self.harness.parse(&text);
        assert!(
            !results.is_empty(),
            "{}'s suite reported no test (exit {}):\n{text}",
            self.name,
            out.status
        );
        Run { results, text }
    }

    /// Whether `test` passes in one of [`RETRIES`] runs of it alone.
    fn passes_alone(&self, cmd: &impl Fn() -> Command, test: &str) -> bool {
        let select = match self.harness {
            Harness::Libtest => vec![test, "--exact"],
            Harness::Pytest => vec![test],
        };
        (0..RETRIES).any(|_| self.run(&mut cmd(), &select).results.get(test) == Some(&Outcome::Ok))
    }
}

impl Harness {
    /// Every test the report names, with its outcome.
    fn parse(self, text: &str) -> BTreeMap<String, Outcome> {
        let mut results = BTreeMap::new();
        for line in text.lines() {
            let found = match self {
                // "test name ... ok|FAILED|ignored[, reason]"
                Harness::Libtest => line
                    .strip_prefix("test ")
                    .and_then(|rest| rest.rsplit_once(" ... "))
                    .and_then(|(name, outcome)| match outcome {
                        "ok" => Some((name, Outcome::Ok)),
                        "FAILED" => Some((name, Outcome::Failed)),
                        o if o.starts_with("ignored") => Some((name, Outcome::Other)),
                        _ => None,
                    }),
                // "-rA" summary: "PASSED id", "FAILED id - message", "ERROR id - ...",
                // "XFAIL id - reason", "XPASS id" (skips name no id and are left out).
                Harness::Pytest => line.split_once(' ').and_then(|(word, rest)| {
                    let id = rest.split(" - ").next().unwrap_or(rest).trim();
                    let outcome = match word {
                        "PASSED" => Outcome::Ok,
                        "FAILED" | "ERROR" => Outcome::Failed,
                        "XFAIL" | "XPASS" => Outcome::Other,
                        _ => return None,
                    };
                    id.contains("::").then_some((id, outcome))
                }),
            };
            if let Some((name, outcome)) = found {
                results.insert(name.to_owned(), outcome);
            }
        }
        results
    }

    /// What the report says of failed `test`.
    fn failure_of(self, text: &str, test: &str) -> String {
        match self {
            // "---- name stdout ----" up to the next section.
            Harness::Libtest => {
                let head = format!("---- {test} stdout ----");
                let Some(start) = text.find(&head) else {
                    return String::new();
                };
                let body = &text[start + head.len()..];
                let end = body
                    .find("\n---- ")
                    .or_else(|| body.find("\nfailures:"))
                    .unwrap_or(body.len());
                format!("{head}{}", &body[..end])
            }
            // The summary line, and the traceback section of that test.
            Harness::Pytest => {
                let summary = text
                    .lines()
                    .find(|l| {
                        (l.starts_with("FAILED ") || l.starts_with("ERROR "))
                            && l.split_once(' ').is_some_and(|(_, r)| {
                                r.split(" - ").next().unwrap_or(r).trim() == test
                            })
                    })
                    .unwrap_or_default();
                let short = test.rsplit("::").next().unwrap_or(test);
                let section = text
                    .split("\n_")
                    .find(|s| s.trim_start_matches('_').trim_start().starts_with(short))
                    .unwrap_or_default();
                format!("{summary}\n{section}")
            }
        }
    }
}

/// A library's Rust test binary or Python source, from `env` or where `cargo xtask test`
/// puts it (`target/client-suites/<file>`).
pub fn path(env: &str, file: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let path = crate::bins::target_dir().join("client-suites").join(file);
    assert!(
        path.exists(),
        "{} not found: `cargo xtask test` fetches and builds the client libraries' own tests \
         (or set {env})",
        path.display()
    );
    path
}
