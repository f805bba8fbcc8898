//! Reading files and directories, decoding each document's envelope (`apiVersion`, `kind`,
//! `metadata`, `spec`), then running the checks across documents.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::decode::{self, Cx, Map};
use super::decode_policy::policy_spec;
use super::decode_store::store_spec;
use super::diagnostic::{Diagnostic, LoadErrors};
use super::policy::Policy;
use super::store::SecretStore;
use super::suggest;
use super::validate;
use super::yaml::{self, Node};
use super::{API_VERSION, Config};

/// One decoded document, with its tree kept for locating fields in later checks.
pub struct LoadedDoc {
    pub file: PathBuf,
    pub root: Node,
    pub resource: Resource,
}

pub enum Resource {
    Policy(Box<Policy>),
    Store(Box<SecretStore>),
}

impl LoadedDoc {
    pub fn location(&self, path: &[&str]) -> super::Location {
        let mark = self.root.locate(path);
        super::Location::new(self.file.clone(), mark.line, mark.column)
    }

    pub fn key_location(&self, path: &[&str]) -> super::Location {
        let mark = self.root.locate_key(path);
        super::Location::new(self.file.clone(), mark.line, mark.column)
    }
}

#[derive(Default)]
struct Loader {
    docs: Vec<LoadedDoc>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    files: Vec<PathBuf>,
    known_stores: Vec<SecretStore>,
}

/// Loads every resource in `paths`: files, and directories (their `*.yaml` and `*.yml` files,
/// sorted by name, not recursive, dot-files skipped). Either the whole set is valid and returned
/// with its warnings, or every error found is returned.
pub fn load(paths: &[PathBuf]) -> Result<Config, LoadErrors> {
    let mut loader = Loader::default();
    let mut seen = Vec::new();
    for path in paths {
        for file in loader.expand(path) {
            let key = fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            match fs::read(&file) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => loader.text(&file, &text),
                    Err(_) => loader
                        .errors
                        .push(Diagnostic::file(&file, "not valid UTF-8 text")),
                },
                Err(e) => loader
                    .errors
                    .push(Diagnostic::file(&file, format!("cannot read: {e}"))),
            }
        }
    }
    loader.finish()
}

/// Loads the documents of one text, reported under the file name `name`.
pub fn load_str(name: &str, text: &str) -> Result<Config, LoadErrors> {
    let mut loader = Loader::default();
    loader.text(Path::new(name), text);
    loader.finish()
}

/// Like [`load_str`], with policies' store references also resolved among `known_stores`
/// (stores defined elsewhere: the files', for a Kubernetes resource).
pub fn load_str_with(
    name: &str,
    text: &str,
    known_stores: &[SecretStore],
) -> Result<Config, LoadErrors> {
    let mut loader = Loader {
        known_stores: known_stores.to_vec(),
        ..Loader::default()
    };
    loader.text(Path::new(name), text);
    loader.finish()
}

impl Loader {
    fn expand(&mut self, path: &Path) -> Vec<PathBuf> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                self.errors
                    .push(Diagnostic::file(path, format!("cannot read: {e}")));
                return Vec::new();
            }
        };
        if !meta.is_dir() {
            return vec![path.to_path_buf()];
        }
        let entries = match fs::read_dir(path) {
            Ok(e) => e,
            Err(e) => {
                self.errors.push(Diagnostic::file(
                    path,
                    format!("cannot read directory: {e}"),
                ));
                return Vec::new();
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.')
                    && (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && e.path().is_file()
            })
            .map(|e| e.path())
            .collect();
        files.sort();
        if files.is_empty() {
            self.warnings.push(Diagnostic::file(
                path,
                "no *.yaml or *.yml files in this directory",
            ));
        }
        files
    }

    fn text(&mut self, file: &Path, text: &str) {
        self.files.push(file.to_path_buf());
        let mut cx = Cx::new(file);
        let (docs, parse_errors) = yaml::parse(text);
        for e in parse_errors {
            cx.error(e.mark, e.message);
        }
        for root in docs {
            if let Some(resource) = document(&mut cx, &root) {
                self.docs.push(LoadedDoc {
                    file: file.to_path_buf(),
                    root,
                    resource,
                });
            }
        }
        self.errors.append(&mut cx.errors);
        self.warnings.append(&mut cx.warnings);
    }

    fn finish(mut self) -> Result<Config, LoadErrors> {
        validate::check(
            &self.docs,
            &self.known_stores,
            &mut self.errors,
            &mut self.warnings,
        );
        let order: BTreeMap<PathBuf, usize> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.clone(), i))
            .collect();
        let key = |d: &Diagnostic| {
            (
                order.get(&d.file).copied().unwrap_or(usize::MAX),
                d.line,
                d.column,
            )
        };
        self.errors.sort_by_key(key);
        self.errors.dedup();
        self.warnings.sort_by_key(key);
        if !self.errors.is_empty() {
            return Err(LoadErrors(self.errors));
        }
        let mut config = Config {
            policies: Vec::new(),
            stores: Vec::new(),
            warnings: self.warnings,
        };
        for doc in self.docs {
            match doc.resource {
                Resource::Policy(p) => config.policies.push(*p),
                Resource::Store(s) => config.stores.push(*s),
            }
        }
        Ok(config)
    }
}

const KINDS: [&str; 2] = ["Policy", "SecretStore"];

struct Metadata {
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn document(cx: &mut Cx, root: &Node) -> Option<Resource> {
    let mut m = Map::new(cx, root, root.mark, "document", &super::schema::DOCUMENT)?;
    let before = cx.errors.len();
    if let Some(e) = m.require(cx, "apiVersion")
        && let Some(v) = decode::string(cx, &e.value, "apiVersion")
        && v != API_VERSION
    {
        cx.error(
            e.value.mark,
            format!("unknown apiVersion {v:?} (expected {API_VERSION:?})"),
        );
    }
    let kind = m.require(cx, "kind").and_then(|e| {
        let k = decode::string(cx, &e.value, "kind")?;
        if KINDS.contains(&k.as_str()) {
            return Some(k);
        }
        let hint = suggest::hint(&k, KINDS);
        let hint = if hint.is_empty() {
            " (expected \"Policy\" or \"SecretStore\")".to_string()
        } else {
            hint
        };
        cx.error(e.value.mark, format!("unknown kind {k:?}{hint}"));
        None
    });
    let metadata = m.require(cx, "metadata").and_then(|e| metadata(cx, e));
    let spec = m.require(cx, "spec");
    m.finish(cx);
    let (kind, spec) = (kind?, spec?);
    let source = cx.location(root.mark);
    let resource = if kind == "Policy" {
        let spec = policy_spec(cx, &spec.value, spec.key_mark);
        let (metadata, spec) = (metadata?, spec?);
        Resource::Policy(Box::new(Policy {
            name: metadata.name,
            labels: metadata.labels,
            annotations: metadata.annotations,
            source,
            destination: spec.destination,
            workloads: spec.workloads,
            protocol: spec.protocol,
            tls: spec.tls,
            app_tls: spec.app_tls,
            direct: spec.direct,
            auth: spec.auth,
            server_public_key: spec.server_public_key,
            keep_sessions: spec.keep_sessions,
            admit_all: spec.admit_all,
            credentials: spec.credentials,
            cache_ttl: spec.cache_ttl,
            roles: spec.roles,
            startup: spec.startup,
            http: spec.http,
            pod_namespace: None,
        }))
    } else {
        let backend = store_spec(cx, &spec.value, spec.key_mark);
        let (metadata, backend) = (metadata?, backend?);
        Resource::Store(Box::new(SecretStore {
            name: metadata.name,
            labels: metadata.labels,
            annotations: metadata.annotations,
            source,
            backend,
        }))
    };
    (cx.errors.len() == before).then_some(resource)
}

fn metadata(cx: &mut Cx, e: &yaml::Entry) -> Option<Metadata> {
    let mut m = Map::new(
        cx,
        &e.value,
        e.key_mark,
        "metadata",
        &super::schema::METADATA,
    )?;
    let name = m.require(cx, "name").and_then(|n| {
        let name = decode::string(cx, &n.value, "metadata.name")?;
        match decode::resource_name(&name) {
            Ok(()) => Some(name),
            Err(reason) => {
                cx.error(
                    n.value.mark,
                    format!("invalid metadata.name {name:?}: {reason}"),
                );
                None
            }
        }
    });
    let labels = m
        .get("labels")
        .map(|n| decode::string_map(cx, n, "metadata.labels"))
        .unwrap_or_default();
    let annotations = m
        .get("annotations")
        .map(|n| decode::string_map(cx, n, "metadata.annotations"))
        .unwrap_or_default();
    m.finish(cx);
    Some(Metadata {
        name: name?,
        labels,
        annotations,
    })
}
