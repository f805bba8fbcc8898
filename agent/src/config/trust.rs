//! Whether the agent may act on a configuration: the agent runs as root, an `exec` store runs a
//! command as root, and files are hot-reloaded, so whoever can write the policy files is root.
//!
//! * Every policy file, the directories given, and every directory above them must belong to
//!   root and be writable by no one else (a directory with the sticky bit, like `/tmp`, may be
//!   world-writable: others cannot replace what is in it; so may one on a read-only mount,
//!   like a ConfigMap volume in a container: no one can write it there).
//! * An `exec` store may run only a command the operator allowed on the command line
//!   (`--allow-exec PATH`).
//!
//! `latch policy check` does not apply these (it validates files anyone may write).
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::diagnostic::{Diagnostic, LoadErrors};
use super::{Config, StoreBackend};

/// The owner files and directories must have (the agent's own user, root in production).
fn trusted_owner() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Checks the files and directories `paths` (as given to `--policy`), what a directory holds,
/// and every directory above them.
pub fn check_files(paths: &[PathBuf]) -> Result<(), LoadErrors> {
    let mut errors = Vec::new();
    let mut checked: Vec<PathBuf> = Vec::new();
    for given in paths {
        let Ok(real) = std::fs::canonicalize(given) else {
            continue; // loading reports it
        };
        let mut targets = vec![real.clone()];
        if real.is_dir()
            && let Ok(entries) = std::fs::read_dir(&real)
        {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")) {
                    targets.extend(std::fs::canonicalize(e.path()));
                }
            }
        }
        for target in targets {
            for path in target.ancestors() {
                if checked.iter().any(|c| c == path) {
                    continue;
                }
                checked.push(path.to_path_buf());
                if let Some(why) = untrusted(path) {
                    errors.push(Diagnostic::file(
                        given,
                        format!("{}: {why}", path.display()),
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LoadErrors(errors))
    }
}

/// Why `path` cannot be trusted, if it cannot.
fn untrusted(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let owner = trusted_owner();
    if meta.uid() != owner {
        return Some(format!(
            "owned by uid {}, not {owner}: whoever owns the policy files controls what latch does as root; chown it to root",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode();
    let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky_dir && !read_only_mount(path) {
        return Some(format!(
            "mode {:o} lets others write it: whoever can write the policy files controls what latch does as root; chmod go-w",
            mode & 0o7777
        ));
    }
    None
}

/// Whether `path` is on a read-only mount: then no one, root included, can write it through
/// this path, whatever its mode says. The kubelet mounts ConfigMap and Secret volumes
/// read-only into containers but leaves their root directory mode 0777
/// (kubernetes/kubernetes#133641), so the DaemonSet's `/etc/latch/` is one of these.
fn read_only_mount(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path)
        .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// Checks that every `exec` store runs a command in `allowed`.
pub fn check_exec(config: &Config, allowed: &[PathBuf]) -> Result<(), LoadErrors> {
    let errors: Vec<Diagnostic> = config
        .stores
        .iter()
        .filter_map(|s| match &s.backend {
            StoreBackend::Exec(e) if !allowed.iter().any(|a| Path::new(&e.command[0]) == a) => {
                Some(Diagnostic::new(
                    &s.source,
                    format!(
                        "SecretStore {:?} runs {:?}, which the agent was not allowed to run: an exec store runs its command as root; start the agent with --allow-exec {}",
                        s.name, e.command[0], e.command[0]
                    ),
                ))
            }
            _ => None,
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LoadErrors(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("latch-trust-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn files_writable_by_others_or_owned_by_another_user_are_refused() {
        let d = dir("files");
        let file = d.join("p.yaml");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_files(std::slice::from_ref(&d)).is_ok());
        assert!(check_files(std::slice::from_ref(&file)).is_ok());

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let errs = check_files(std::slice::from_ref(&d))
            .unwrap_err()
            .to_string();
        assert!(errs.contains("mode 666 lets others write it"), "{errs}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let errs = check_files(std::slice::from_ref(&file))
            .unwrap_err()
            .to_string();
        assert!(errs.contains("mode 777 lets others write it"), "{errs}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();

        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&file, Some(4242), None).unwrap();
            let errs = check_files(std::slice::from_ref(&d))
                .unwrap_err()
                .to_string();
            assert!(errs.contains("owned by uid 4242, not 0"), "{errs}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exec_stores_run_only_allowed_commands() {
        let text = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: helper}\n\
                    spec: {exec: {command: [/usr/local/bin/get-secret, --json]}}\n";
        let config = crate::config::load_str("s.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let errs = check_exec(&config, &[]).unwrap_err().to_string();
        assert!(
            errs.contains("s.yaml:1:1: SecretStore \"helper\" runs \"/usr/local/bin/get-secret\", which the agent was not allowed to run")
                && errs.contains("--allow-exec /usr/local/bin/get-secret"),
            "{errs}"
        );
        assert!(check_exec(&config, &["/usr/local/bin/get-secret".into()]).is_ok());
    }
}
