//! A client library's own test suite, run directly and through latch, and the two compared
//! (tests/tests/client_suites.rs). What passes directly must pass through latch, except where
//! the difference is latch's purpose: those are listed with the reason and must fail through
//! latch saying what the list says (or, for a difference that shows only in some orderings,
//! pass).
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
    /// A `unittest` runner that prints each test as `name ... outcome` (verbosity 2), as
    /// MySQL Connector/Python's `unittests.py` does; one test alone is `-T <dotted path>`.
    Unittest,
}

/// One suite and what is known of it.
pub struct Suite<'a> {
    pub name: &'a str,
    pub harness: Harness,
    /// Arguments that select the whole suite (for pytest: the paths, `--deselect`s).
    pub all: &'a [&'a str],
    /// Tests that differ through latch by design, by name.
    pub differs: BTreeMap<String, Difference<'a>>,
    /// At least this many tests must pass directly (the suite really ran).
    pub min_passing: usize,
    /// Whether a test that failed in the direct run is run alone (twice) to see if it passes,
    /// so that one failing now and then directly is compared too. Off for a suite with many
    /// tests that fail directly every time (a MySQL driver's tests of MySQL-only features
    /// against MariaDB), where it would take minutes and find nothing.
    pub retry_direct_failures: bool,
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
            retry_direct_failures: true,
        }
    }
}

/// How a test differs through latch by design.
pub struct Difference<'a> {
    /// Why: the latch behaviour that makes it fail.
    pub why: &'a str,
    /// What its failure says (a part of the report of it).
    pub says: &'a str,
    /// When the difference shows only in some orderings that latch does not control (a
    /// session another connection of the application left being kept last): it may pass;
    /// failing otherwise than `says` says, it is compared as any other test.
    pub sometimes: Option<&'a str>,
}

impl<'a> Difference<'a> {
    /// A test that fails through latch every time, saying `says`, because of `why`.
    pub fn always(why: &'a str, says: &'a str) -> Self {
        Difference {
            why,
            says,
            sometimes: None,
        }
    }

    /// One that may pass too, `when` it does.
    pub fn sometimes(why: &'a str, says: &'a str, when: &'a str) -> Self {
        Difference {
            sometimes: Some(when),
            ..Difference::always(why, says)
        }
    }
}

/// More tests than this missing from the report through latch (a runner that crashed or was
/// cut) fail the comparison at once rather than each being run alone.
const MISSING_AT_MOST: usize = 10;

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
            // A skipped test is skipped alone as well: only failures are run again.
            .filter(|(test, r)| match r {
                Outcome::Ok => true,
                Outcome::Failed => self.retry_direct_failures && self.passes_alone(&direct, test),
                Outcome::Other => false,
            })
            .map(|(test, _)| test.as_str())
            .collect();
        assert!(
            passed_directly.len() >= self.min_passing,
            "only {} of {name}'s tests pass directly:\n{}",
            passed_directly.len(),
            first.text
        );
        // (One that differs only sometimes may fail directly now and then as well.)
        for (test, _) in self.differs.iter().filter(|(_, d)| d.sometimes.is_none()) {
            assert!(
                passed_directly.contains(&test.as_str()),
                "{test} no longer passes directly: is the difference still there?\n{}",
                first.text
            );
        }

        let latch = self.run(&mut through(), self.all);
        // A test the report through latch does not name (its line mixed with what another
        // test printed) is run alone like a failure; many missing mean the run broke off.
        let missing: Vec<&str> = passed_directly
            .iter()
            .copied()
            .filter(|t| !latch.results.contains_key(*t))
            .collect();
        assert!(
            missing.len() <= MISSING_AT_MOST,
            "{} of {name}'s tests that pass directly are not in its report through latch \
             ({:?}…):\n{}",
            missing.len(),
            &missing[..MISSING_AT_MOST],
            latch.text
        );
        let mut failed = Vec::new();
        let mut retried = Vec::new();
        let mut passed_anyway = Vec::new();
        let mut in_order = Vec::new();
        for test in &passed_directly {
            let outcome = latch.results.get(*test).copied();
            let failure = self.harness.failure_of(&latch.text, test);
            if let Some(d) = self.differs.get(*test) {
                let why = d.why;
                let by_design = outcome == Some(Outcome::Failed) && failure.contains(d.says);
                match (outcome, d.sometimes) {
                    _ if by_design => continue,
                    (Some(Outcome::Ok), Some(when)) => {
                        passed_anyway.push(format!("{test}: {when}"));
                        continue;
                    }
                    // Otherwise, one that differs only sometimes is compared as any other.
                    (_, Some(_)) => {}
                    (Some(Outcome::Failed), None) => panic!(
                        "{test} failed through latch otherwise than by design ({why}):\n{failure}"
                    ),
                    (_, None) => panic!("{test} did not fail through latch ({outcome:?}): {why}"),
                }
            }
            if outcome == Some(Outcome::Ok) {
                continue;
            }
            retried.push(*test);
            if self.passes_alone(&through, test) {
                continue;
            }
            // One that fails alone directly too needs the tests before it (what they left in
            // the database): a second whole run through latch judges it.
            match self.passes_alone(&direct, test) {
                true => failed.push(format!("{test}\n{}", failure.trim_end())),
                false => in_order.push((*test, failure)),
            }
        }
        if !in_order.is_empty() {
            let again = self.run(&mut through(), self.all);
            for (test, failure) in &in_order {
                if again.results.get(*test) != Some(&Outcome::Ok) {
                    failed.push(format!(
                        "{test} (fails alone, directly too; failed in two whole runs through \
                         latch)\n{}",
                        failure.trim_end()
                    ));
                }
            }
        }
        eprintln!(
            "{name}'s suite: {} tests reported, {} pass directly; through latch: {} at once, \
             {} on a retry {retried:?}, {} different by design (of which passed this time, \
             as they may: {passed_anyway:?}), {} not in the report {missing:?}, {} judged by \
             a second whole run {:?}",
            first.results.len(),
            passed_directly.len(),
            passed_directly
                .iter()
                .filter(|t| latch.results.get(**t) == Some(&Outcome::Ok))
                .filter(|t| !self.differs.contains_key(**t))
                .count(),
            retried.len() - failed.len(),
            self.differs.len(),
            missing.len(),
            in_order.len(),
            in_order.iter().map(|(t, _)| t).collect::<Vec<_>>()
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
            // One test alone reuses the build of the library that the whole run made.
            Harness::Unittest => cmd
                .args(["--verbosity", "2"])
                .args((!select.is_empty()).then_some("--skip-install"))
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
        let path = unittest_path(test);
        let select = match self.harness {
            Harness::Libtest => vec![test, "--exact"],
            Harness::Pytest => vec![test],
            Harness::Unittest => vec!["-T", path.as_str()],
        };
        (0..RETRIES).any(|_| self.run(&mut cmd(), &select).results.get(test) == Some(&Outcome::Ok))
    }
}

impl Harness {
    /// Every test the report names, with its outcome.
    fn parse(self, text: &str) -> BTreeMap<String, Outcome> {
        let read: fn(&str) -> Option<(&str, Outcome)> = match self {
            Harness::Libtest => libtest_line,
            Harness::Pytest => pytest_line,
            Harness::Unittest => return parse_unittest(text),
        };
        text.lines()
            .filter_map(read)
            .map(|(name, outcome)| (name.to_owned(), outcome))
            .collect()
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
            // "FAIL: name" or "ERROR: name" (a parameterised test adds " (using …)") up to
            // the next section's rule of '='.
            Harness::Unittest => text
                .split("\n======================================================================\n")
                .find(|s| {
                    s.lines().next().is_some_and(|head| {
                        ["FAIL: ", "ERROR: "].iter().any(|kind| {
                            head.strip_prefix(kind)
                                .is_some_and(|name| unittest_name(name) == test)
                        })
                    })
                })
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

/// A libtest line: "test name ... ok|FAILED|ignored[, reason]".
fn libtest_line(line: &str) -> Option<(&str, Outcome)> {
    let (name, outcome) = line.strip_prefix("test ")?.rsplit_once(" ... ")?;
    match outcome {
        "ok" => Some((name, Outcome::Ok)),
        "FAILED" => Some((name, Outcome::Failed)),
        o if o.starts_with("ignored") => Some((name, Outcome::Other)),
        _ => None,
    }
}

/// A line of pytest's `-rA` summary: "PASSED id", "FAILED id - message", "ERROR id - ...",
/// "XFAIL id - reason", "XPASS id" (skips name no id and are left out).
fn pytest_line(line: &str) -> Option<(&str, Outcome)> {
    let (word, rest) = line.split_once(' ')?;
    let id = rest.split(" - ").next().unwrap_or(rest).trim();
    let outcome = match word {
        "PASSED" => Outcome::Ok,
        "FAILED" | "ERROR" => Outcome::Failed,
        "XFAIL" | "XPASS" => Outcome::Other,
        _ => return None,
    };
    id.contains("::").then_some((id, outcome))
}

/// A unittest verbose report: each test's `name ... ` line ends with its outcome, or the
/// outcome comes on a line of its own after what the test printed meanwhile. A test named in a
/// `FAIL:` or `ERROR:` section (the line after a rule of `=`) failed, whatever its line said
/// (an error in its clean-up comes after an `ok`).
fn parse_unittest(text: &str) -> BTreeMap<String, Outcome> {
    let outcome = |word: &str| match word {
        "ok" => Some(Outcome::Ok),
        "FAIL" | "ERROR" => Some(Outcome::Failed),
        w if w.starts_with("skipped") || w == "expected failure" || w == "unexpected success" => {
            Some(Outcome::Other)
        }
        _ => None,
    };
    let mut results = BTreeMap::new();
    let mut pending: Option<&str> = None;
    let mut after_rule = false;
    let mut sections = false;
    for line in text.lines() {
        if after_rule {
            for kind in ["FAIL: ", "ERROR: "] {
                if let Some(name) = line.strip_prefix(kind) {
                    results.insert(unittest_name(name).to_owned(), Outcome::Failed);
                }
            }
        }
        after_rule = line.len() >= 40 && line.bytes().all(|b| b == b'=');
        // The failures' sections come after every test's line; their tracebacks are not read.
        sections |= after_rule;
        if sections {
            continue;
        }
        if let Some((name, rest)) = line.split_once(" ... ")
            && !name.is_empty()
            && !name.starts_with(' ')
        {
            if let Some(unknown) = pending.take() {
                results.entry(unknown.to_owned()).or_insert(Outcome::Other);
            }
            let name = unittest_name(name);
            match outcome(rest.trim_end()) {
                Some(o) => {
                    results.insert(name.to_owned(), o);
                }
                None => pending = Some(name),
            }
        } else if let Some(name) = pending
            && let Some(o) = outcome(line.trim_end())
        {
            results.insert(name.to_owned(), o);
            pending = None;
        }
    }
    // A test whose outcome word was glued to what it printed is still listed, as neither
    // passed nor failed unless a section says it failed (through latch: run alone).
    if let Some(unknown) = pending {
        results.entry(unknown.to_owned()).or_insert(Outcome::Other);
    }
    results
}

/// A test's name without the " (using …)" a parameterised run adds.
fn unittest_name(name: &str) -> &str {
    let name = name.trim_end();
    match name.rsplit_once(" (using ") {
        Some((base, _)) if name.ends_with(')') => base,
        _ => name,
    }
}

/// The dotted path that runs one test alone: Connector/Python reports
/// `group.Class.method` for `tests/test_group.py`, and the full path for others.
fn unittest_path(test: &str) -> String {
    if test.starts_with("tests.") {
        test.to_owned()
    } else {
        format!("tests.test_{test}")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as Connector/Python's `unittests.py --verbosity 2` printed them against MariaDB.
    const REPORT: &str = "\
abstracts.ConnectionSubclasses.test_cmd_refresh ... skipped
aio_connection.MySQLConnectionAioTests.test__do_auth ... Traceback (most recent call last):
  File \"tests/test_aio_connection.py\", line 837, in test__do_auth
TypeError: cannot unpack non-iterable NoneType object
ERROR
aio_connection.MySQLConnectionAioTests.test__handle_eof ... ok
bugs.BugOra15915243.test_ping ... FAIL
setUpModule (tests.qa.test_qa_vector_type) ... ERROR
tests.qa.test_qa_multi_statement.SplitMultiStatementUnitTests.test_mapping ... ok
connection.MySQLConnectionTests.test_reconnect ... ok
cursor.MySQLCursorTests.test_glued ... a warning without a newline ok

======================================================================
FAIL: bugs.BugOra15915243.test_ping (using MySQLConnection)
----------------------------------------------------------------------
Traceback (most recent call last):
    self.assertNotEqual(cid, self.cnx.connection_id) ... ok
AssertionError: 1793 == 1793

======================================================================
ERROR: connection.MySQLConnectionTests.test_reconnect
----------------------------------------------------------------------
Traceback (most recent call last):
RuntimeError: in its clean-up

----------------------------------------------------------------------
Ran 7 tests in 0.5s
";

    #[test]
    fn a_unittest_report_gives_each_test_its_outcome() {
        let r = Harness::Unittest.parse(REPORT);
        let want = [
            (
                "abstracts.ConnectionSubclasses.test_cmd_refresh",
                Outcome::Other,
            ),
            (
                "aio_connection.MySQLConnectionAioTests.test__do_auth",
                Outcome::Failed,
            ),
            (
                "aio_connection.MySQLConnectionAioTests.test__handle_eof",
                Outcome::Ok,
            ),
            ("bugs.BugOra15915243.test_ping", Outcome::Failed),
            (
                "setUpModule (tests.qa.test_qa_vector_type)",
                Outcome::Failed,
            ),
            (
                "tests.qa.test_qa_multi_statement.SplitMultiStatementUnitTests.test_mapping",
                Outcome::Ok,
            ),
            // Its outcome was glued to what it printed.
            ("cursor.MySQLCursorTests.test_glued", Outcome::Other),
            // "ok" on its line, then an error in its clean-up.
            (
                "connection.MySQLConnectionTests.test_reconnect",
                Outcome::Failed,
            ),
        ];
        assert_eq!(
            r,
            want.iter()
                .map(|(n, o)| (n.to_string(), *o))
                .collect::<BTreeMap<_, _>>()
        );
    }

    #[test]
    fn a_unittest_failure_is_found_by_its_name_and_run_alone_by_its_path() {
        let f = Harness::Unittest.failure_of(REPORT, "bugs.BugOra15915243.test_ping");
        assert!(
            f.starts_with("FAIL: bugs.BugOra15915243.test_ping (using"),
            "{f}"
        );
        assert!(f.contains("AssertionError: 1793 == 1793"), "{f}");
        assert!(!f.contains("in its clean-up"), "{f}");
        assert_eq!(
            unittest_path("bugs.BugOra15915243.test_ping"),
            "tests.test_bugs.BugOra15915243.test_ping"
        );
        assert_eq!(
            unittest_path("tests.qa.test_qa_aio_timeout.ReadWriteTimeoutAioTests.test_x"),
            "tests.qa.test_qa_aio_timeout.ReadWriteTimeoutAioTests.test_x"
        );
    }

    /// A runner that prints `whole` for the whole suite and `alone` for a test run alone
    /// (`-T`), as a unittest report on stderr.
    fn runner(whole: &'static str, alone: &'static str) -> impl Fn() -> Command {
        move || {
            let mut cmd = Command::new("sh");
            cmd.args([
                "-c",
                r#"case "$*" in *-T*) printf "$2" ;; *) printf "$1" ;; esac >&2"#,
            ])
            .args(["sh", whole, alone]);
            cmd
        }
    }

    fn suite(differs: BTreeMap<String, Difference<'static>>) -> Suite<'static> {
        Suite {
            name: "s",
            harness: Harness::Unittest,
            all: &[],
            differs,
            min_passing: 3,
            retry_direct_failures: false,
        }
    }

    /// What `f` panicked with (it must panic).
    fn panic_of(f: impl FnOnce() -> Run) -> String {
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .err()
            .expect("it panics");
        match err.downcast::<String>() {
            Ok(s) => *s,
            Err(e) => e
                .downcast::<&str>()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        }
    }

    const RULE: &str = "======================================================================";

    #[test]
    fn a_difference_that_shows_sometimes_may_pass_and_one_that_always_shows_may_not() {
        let direct = runner(
            "a.A.t ... ok\nb.B.t ... ok\nc.C.t ... ok\n",
            "b.B.t ... ok\n",
        );
        let through = runner("a.A.t ... ok\nb.B.t ... ok\nc.C.t ... ok\n", "");
        let sometimes = || {
            BTreeMap::from([(
                "b.B.t".to_owned(),
                Difference::sometimes("kept", "1 == 1", "another"),
            )])
        };
        suite(sometimes()).compare(&direct, &through);
        let always =
            || BTreeMap::from([("b.B.t".to_owned(), Difference::always("kept", "1 == 1"))]);
        let passed = panic_of(|| suite(always()).compare(&direct, &through));
        assert!(
            passed.contains("b.B.t did not fail through latch"),
            "{passed}"
        );
        // Failing, it must say what the list says.
        let said = format!("a.A.t ... ok\nb.B.t ... FAIL\nc.C.t ... ok\n\n{RULE}\nFAIL: b.B.t\n");
        let said: &'static str =
            Box::leak(format!("{said}AssertionError: 1 == 1\n").into_boxed_str());
        suite(sometimes()).compare(&direct, runner(said, ""));
        suite(always()).compare(&direct, runner(said, ""));
        // Failing otherwise: an error, or (when it differs only sometimes) compared as any
        // other test, run alone.
        let other: &'static str = Box::leak(said.replace("1 == 1", "2 != 3").into_boxed_str());
        let wrong = panic_of(|| suite(always()).compare(&direct, runner(other, "")));
        assert!(wrong.contains("otherwise than by design"), "{wrong}");
        suite(sometimes()).compare(&direct, runner(other, "b.B.t ... ok\n"));
        let wrong =
            panic_of(|| suite(sometimes()).compare(&direct, runner(other, "b.B.t ... FAIL\n")));
        assert!(
            wrong.contains("1 of s's tests pass directly but not"),
            "{wrong}"
        );
    }

    #[test]
    fn a_test_missing_from_the_report_through_latch_is_run_alone() {
        let direct = runner(
            "a.A.t ... ok\nb.B.t ... ok\nc.C.t ... ok\n",
            "b.B.t ... ok\n",
        );
        // b's line was mixed with what another test printed.
        let whole = "a.A.t ... ok\nprinted b.B.t ... ok\nc.C.t ... ok\n";
        suite(BTreeMap::new()).compare(&direct, runner(whole, "b.B.t ... ok\n"));
        let fails_alone = runner(whole, "b.B.t ... FAIL\n");
        let failed = panic_of(|| suite(BTreeMap::new()).compare(&direct, &fails_alone));
        assert!(
            failed.contains("1 of s's tests pass directly but not"),
            "{failed}"
        );
    }

    #[test]
    fn a_test_that_cannot_run_alone_is_judged_by_a_second_whole_run() {
        // Runs `first`, then `later` for the whole suite (a file marks the first run done);
        // `alone` for one test.
        let tmp = crate::TempDir::new("suites");
        let runs = std::cell::Cell::new(0);
        let counted = |first: &'static str, later: &'static str, alone: &'static str| {
            runs.set(runs.get() + 1);
            let marker = tmp.path().join(runs.get().to_string());
            move || {
                let mut cmd = Command::new("sh");
                cmd.args([
                    "-c",
                    r#"case "$*" in *-T*) printf "$3" ;;
                       *) if [ -e "$4" ]; then printf "$2"; else : > "$4"; printf "$1"; fi ;;
                       esac >&2"#,
                ])
                .args(["sh", first, later, alone])
                .arg(&marker);
                cmd
            }
        };
        let ok = "a.A.t ... ok\nb.B.t ... ok\nc.C.t ... ok\n";
        let b_fails = "a.A.t ... ok\nb.B.t ... FAIL\nc.C.t ... ok\n";
        // Alone, b fails directly as well: it needs what a left behind.
        let direct = || counted(ok, ok, "b.B.t ... FAIL\n");
        suite(BTreeMap::new()).compare(direct(), counted(b_fails, ok, "b.B.t ... FAIL\n"));
        let twice = panic_of(|| {
            suite(BTreeMap::new()).compare(direct(), counted(b_fails, b_fails, "b.B.t ... FAIL\n"))
        });
        assert!(twice.contains("failed in two whole runs"), "{twice}");
        // One that passes alone directly is latch's failure, without a second run.
        let alone_ok = panic_of(|| {
            suite(BTreeMap::new()).compare(
                counted(ok, ok, "b.B.t ... ok\n"),
                counted(b_fails, ok, "b.B.t ... FAIL\n"),
            )
        });
        assert!(
            alone_ok.contains("1 of s's tests pass directly but not"),
            "{alone_ok}"
        );
    }
}
