//! The `exec` store: runs a command (an argv, no shell) with the path and field as its last
//! arguments, and reads the value from its standard output — the whole output, or a field of a
//! JSON object it prints. The command is killed when it outlives the store's timeout.

use std::process::Stdio;

use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

use super::error::SecretError;
use super::store::{BoxFuture, Lookup, Store};
use super::value::{Secret, json_fields};
use crate::config::{self, SecretString};

/// Output beyond this is refused (a secret is small; a runaway command is not).
const MAX_OUTPUT: usize = 1 << 20;

pub struct ExecStore {
    name: String,
    spec: config::ExecStore,
}

impl ExecStore {
    pub fn new(name: String, spec: config::ExecStore) -> ExecStore {
        ExecStore { name, spec }
    }

    async fn run(&self, lookup: Lookup<'_>) -> Result<Secret, SecretError> {
        let what = match lookup.field {
            Some(f) => format!("{}#{f}", lookup.path),
            None => lookup.path.to_string(),
        };
        let program = &self.spec.command[0];
        let mut cmd = tokio::process::Command::new(program);
        // The helper sees none of the agent's environment (store credentials, env-store
        // secrets), only what it needs to run.
        super::child_env::helper_env(&mut cmd);
        cmd.args(&self.spec.command[1..])
            .arg(lookup.path)
            .args(lookup.field)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| SecretError::Unreachable {
            store: self.name.clone(),
            kind: "exec",
            reason: format!("cannot run {program}: {e}"),
        })?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut out = Zeroizing::new(Vec::new());
        let work = async {
            let mut buf = Zeroizing::new([0u8; 4096]);
            loop {
                let n = stdout.read(&mut buf[..]).await?;
                if n == 0 {
                    break;
                }
                if out.len() + n > MAX_OUTPUT {
                    return Err(std::io::Error::other("output larger than 1 MiB"));
                }
                crate::wipe::append(&mut out, &buf[..n]);
            }
            child.wait().await
        };
        let status = match tokio::time::timeout(self.spec.timeout, work).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                let _ = child.kill().await;
                return Err(SecretError::Unreachable {
                    store: self.name.clone(),
                    kind: "exec",
                    reason: format!("{program} for {what}: {e}"),
                });
            }
            Err(_) => {
                // kill and reap, so no zombie stays behind
                let _ = child.kill().await;
                return Err(SecretError::Timeout {
                    store: self.name.clone(),
                    after: self.spec.timeout,
                });
            }
        };
        if !status.success() {
            return Err(SecretError::Unreachable {
                store: self.name.clone(),
                kind: "exec",
                reason: format!("{program} for {what} failed ({status})"),
            });
        }
        parse_output(&out, lookup.field.is_some()).map_err(|reason| SecretError::Invalid {
            store: self.name.clone(),
            path: what,
            reason,
        })
    }
}

/// Turns a command's output into a secret: trailing line breaks are dropped; when a field was
/// asked for and the output is a JSON object, its fields (strings, numbers, booleans).
pub fn parse_output(out: &[u8], field_asked: bool) -> Result<Secret, String> {
    let text = std::str::from_utf8(out).map_err(|_| "the output is not UTF-8".to_string())?;
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() {
        return Err("the command printed nothing".to_string());
    }
    if field_asked
        && text.trim_start().starts_with('{')
        && let Ok(doc) = super::value::SecretJson::parse(text.as_bytes())
        && let serde_json::Value::Object(map) = &*doc
    {
        return Ok(Secret::Fields(json_fields(map)));
    }
    Ok(Secret::Value(SecretString::new(text.to_string())))
}

impl Store for ExecStore {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn per_field(&self) -> bool {
        true
    }

    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
        Box::pin(self.run(lookup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_output() {
        let s = parse_output(b"s3cret\n", true).unwrap();
        assert!(matches!(s, Secret::Value(v) if v.expose() == "s3cret"));
    }

    #[test]
    fn json_output_with_field() {
        let s = parse_output(br#"{"username":"app","password":"pw","port":5432}"#, true).unwrap();
        match s {
            Secret::Fields(f) => {
                assert_eq!(f["password"].expose(), "pw");
                assert_eq!(f["port"].expose(), "5432");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn json_output_without_field_is_the_whole_text() {
        let s = parse_output(br#"{"a":1}"#, false).unwrap();
        assert!(matches!(s, Secret::Value(v) if v.expose() == r#"{"a":1}"#));
    }

    #[test]
    fn empty_and_binary_output() {
        assert!(parse_output(b"\n", false).is_err());
        assert!(parse_output(&[0xff, 0xfe], false).is_err());
    }
}
