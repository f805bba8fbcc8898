//! A real MySQL server for the caching_sha2_password tests (tests/src/mysql_server.rs).
//!
//! Debian 12 has MariaDB 10.11 only, which has no server side for caching_sha2_password. Debian
//! unstable ships MySQL itself (`mysql-server-core`), built against unstable's libraries. Its
//! packages are fetched with apt from the same archive this machine uses, through a private apt
//! state (its own sources list, lists and cache under [`PREFIX`]: the machine's apt
//! configuration and dpkg database are not touched), and unpacked with `dpkg-deb -x` into
//! `PREFIX/root` together with every library they need, the C library and its loader included.
//! `PREFIX/bin/mysqld` runs the server through that loader with that library path, so nothing
//! of the host's libraries is used. Nothing is installed into the system.
//!
//! Idempotent: `PREFIX/installed` is written last (the package versions), and a present
//! stamp with a `mysqld --version` that works means done.
use crate::proc::{output, run};
use anyhow::{Context, Result, bail};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the server is unpacked. tests/src/mysql_server.rs reads the same path.
pub const PREFIX: &str = "/opt/latch-test/mysql";
/// The Debian suite that has the MySQL server.
const SUITE: &str = "sid";
/// The package with `mysqld`.
const SERVER_PACKAGE: &str = "mysql-server-core";
/// Dependencies left out: the server package needs perl for its maintainer scripts and helper
/// scripts only; `mysqld` itself does not.
const SKIPPED: &[&str] = &["perl", "perl-base", "perl:any", "debconf"];
/// The dynamic loader inside the unpacked root.
const LOADER: &str = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
const LIBDIR: &str = "usr/lib/x86_64-linux-gnu";

pub fn mysql_server(step: impl Fn(&str, &str)) -> Result<()> {
    let prefix = Path::new(PREFIX);
    let wrapper = prefix.join("bin/mysqld");
    if prefix.join("installed").is_file() && version(&wrapper).is_ok() {
        step("mysql server (Debian sid)", "ok");
        return Ok(());
    }
    let apt = PrivateApt::new(&prefix.join("apt"))?;
    apt.update()?;
    let packages = apt.closure(SERVER_PACKAGE)?;
    let debs = apt.download(&packages)?;
    // Unpack into a fresh directory, then put it in place.
    let staging = prefix.join("root.new");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging)?;
    for deb in &debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&staging))?;
    }
    let root = prefix.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    std::fs::rename(&staging, &root)?;
    write_wrapper(&wrapper, &root)?;
    let v = version(&wrapper).context("the unpacked mysqld does not run")?;
    let missing = output(
        Command::new(root.join(LOADER))
            .arg("--library-path")
            .arg(root.join(LIBDIR))
            .arg("--list")
            .arg(root.join("usr/sbin/mysqld")),
    )?;
    if missing.contains("not found") {
        bail!("mysqld misses libraries after unpacking:\n{missing}");
    }
    let mut stamp = format!("{v}\n");
    for deb in &debs {
        stamp.push_str(&format!(
            "{}\n",
            deb.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    std::fs::write(prefix.join("installed"), stamp)?;
    // The downloaded packages are not needed any more.
    let _ = std::fs::remove_dir_all(apt.dir.join("cache"));
    let _ = std::fs::remove_dir_all(apt.dir.join("debs"));
    step("mysql server (Debian sid)", &format!("installed {v}"));
    Ok(())
}

fn version(wrapper: &Path) -> Result<String> {
    let v = output(Command::new(wrapper).arg("--version"))?;
    Ok(v.trim().to_owned())
}

fn write_wrapper(wrapper: &Path, root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(wrapper.parent().expect("bin/"))?;
    let script = format!(
        "#!/bin/sh\n\
         # MySQL from Debian {SUITE}, with its own C library and libraries (cargo xtask setup).\n\
         exec {root}/{LOADER} --library-path {root}/{LIBDIR} {root}/usr/sbin/mysqld \"$@\"\n",
        root = root.display()
    );
    std::fs::write(wrapper, script)?;
    std::fs::set_permissions(wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// apt with its own sources list, lists, cache and an empty dpkg status: every package
/// counts as not installed, so dependency closures are complete.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(dir: &Path) -> Result<PrivateApt> {
        for sub in ["lists/partial", "cache/archives/partial", "parts"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mirror = debian_mirror()?;
        std::fs::write(
            dir.join("sources.list"),
            format!("deb {mirror} {SUITE} main\n"),
        )?;
        std::fs::write(dir.join("status"), "")?;
        Ok(PrivateApt {
            dir: dir.to_path_buf(),
        })
    }

    fn options(&self, cmd: &mut Command) {
        let d = |s: &str| self.dir.join(s).display().to_string();
        for (k, v) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("parts")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::Cache", d("cache")),
            ("Dir::State::Status", d("status")),
            ("APT::Sandbox::User", "root".into()),
        ] {
            cmd.arg("-o").arg(format!("{k}={v}"));
        }
    }

    fn update(&self) -> Result<()> {
        let mut c = Command::new("apt-get");
        self.options(&mut c);
        run(c.arg("-q").arg("update"))
    }

    /// `package` and what it depends on (Depends and Pre-Depends, first alternative),
    /// without [`SKIPPED`].
    fn closure(&self, package: &str) -> Result<Vec<String>> {
        let mut c = Command::new("apt-cache");
        self.options(&mut c);
        c.args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            package,
        ]);
        let text = output(&mut c)?;
        // apt-cache prints each package at the left margin and its dependencies indented below.
        let mut graph: HashMap<String, Vec<String>> = HashMap::new();
        let mut current: Option<String> = None;
        let mut alternative = false;
        for line in text.lines() {
            if !line.starts_with(' ') {
                current = Some(line.trim().to_owned());
                graph.entry(line.trim().to_owned()).or_default();
                alternative = false;
                continue;
            }
            let t = line.trim();
            let Some((kind, dep)) = t.split_once(": ") else {
                continue;
            };
            let is_dep = matches!(kind, "Depends" | "PreDepends" | "|Depends" | "|PreDepends");
            if !is_dep {
                continue;
            }
            // After `|Depends: a`, the next Depends line is an alternative to it.
            let take = !alternative;
            alternative = kind.starts_with('|');
            if let (true, Some(cur)) = (take, current.as_ref()) {
                graph
                    .entry(cur.clone())
                    .or_default()
                    .push(dep.trim().to_owned());
            }
        }
        let mut seen = BTreeSet::new();
        let mut todo = vec![package.to_owned()];
        while let Some(p) = todo.pop() {
            if SKIPPED.contains(&p.as_str()) || p.starts_with('<') || !seen.insert(p.clone()) {
                continue;
            }
            if let Some(deps) = graph.get(&p) {
                todo.extend(deps.iter().cloned());
            }
        }
        if !seen.contains(package) || seen.len() < 2 {
            bail!("apt-cache found no {package} in Debian {SUITE}:\n{text}");
        }
        Ok(seen.into_iter().collect())
    }

    fn download(&self, packages: &[String]) -> Result<Vec<PathBuf>> {
        let into = self.dir.join("debs");
        if into.exists() {
            std::fs::remove_dir_all(&into)?;
        }
        std::fs::create_dir_all(&into)?;
        let mut c = Command::new("apt-get");
        self.options(&mut c);
        run(c
            .current_dir(&into)
            .arg("-q")
            .arg("download")
            .args(packages))?;
        let mut debs: Vec<PathBuf> = std::fs::read_dir(&into)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .collect();
        debs.sort();
        if debs.len() != packages.len() {
            bail!(
                "asked apt for {} packages, got {} files in {}",
                packages.len(),
                debs.len(),
                into.display()
            );
        }
        Ok(debs)
    }
}

/// The URI of this machine's Debian archive (the one its own release comes from), read from
/// apt's sources: deb822 `.sources` files and one-line `sources.list` entries.
fn debian_mirror() -> Result<String> {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .context("no VERSION_CODENAME in /etc/os-release: is this Debian?")?;
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if file.extension().is_some_and(|x| x == "sources") {
            for stanza in text.split("\n\n") {
                let field = |name: &str| {
                    stanza.lines().find_map(|l| {
                        l.strip_prefix(name)
                            .and_then(|r| r.strip_prefix(':'))
                            .map(|v| v.trim().to_owned())
                    })
                };
                let suites = field("Suites").unwrap_or_default();
                let types = field("Types").unwrap_or_default();
                if types.split_whitespace().any(|t| t == "deb")
                    && suites.split_whitespace().any(|s| s == codename)
                    && let Some(uri) =
                        field("URIs").and_then(|u| u.split_whitespace().next().map(str::to_owned))
                {
                    return Ok(uri);
                }
            }
        } else {
            for line in text.lines() {
                // deb [options] URI suite components...
                let line = match (line.find('['), line.find(']')) {
                    (Some(a), Some(b)) if a < b => format!("{}{}", &line[..a], &line[b + 1..]),
                    _ => line.to_owned(),
                };
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() >= 3 && f[0] == "deb" && f[2] == codename {
                    return Ok(f[1].to_owned());
                }
            }
        }
    }
    bail!(
        "no apt source for Debian {codename} found in /etc/apt: cannot tell the archive's address"
    )
}
