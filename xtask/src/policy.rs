//! Policies the demo and the benchmarks generate (with the ports they actually use).

use anyhow::{Context, Result};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// A `protocol: tcp` Policy: latch relays connections to address:port without touching the bytes.
pub fn tcp(name: &str, address: Ipv4Addr, port: u16) -> String {
    format!(
        "apiVersion: latch.dev/v1alpha1
kind: Policy
metadata:
  name: {name}
spec:
  destination:
    address: {address}
    port: {port}
  protocol: tcp
  workloads: all
"
    )
}

/// The demo's resources: a `file` SecretStore at `secrets` and a `protocol: postgres` Policy
/// whose credentials come from it.
pub fn postgres(name: &str, address: Ipv4Addr, port: u16, secrets: &Path) -> String {
    format!(
        "apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata:
  name: local
spec:
  file:
    path: {secrets}
---
apiVersion: latch.dev/v1alpha1
kind: Policy
metadata:
  name: {name}
spec:
  destination:
    address: {address}
    port: {port}
  protocol: postgres
  credentials:
    store: local
    username: {{ path: orders-db, field: username }}
    password: {{ path: orders-db, field: password }}
",
        secrets = secrets.display()
    )
}

/// What the demo relaxes, said in its policy: its throw-away server has no certificate, so the
/// leg to it is plain text (policies verify the server by default).
pub const DEMO_TLS: &str =
    "  tls:\n    mode: disable   # demo only: the throw-away server has no certificate\n";

/// Write `tcp(name, …)` to `dir/name.yaml` and return the path.
pub fn write_tcp(dir: &Path, name: &str, address: Ipv4Addr, port: u16) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, tcp(name, address, port))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in example is exactly what the demo generates for the default port.
    #[test]
    fn demo_policy_matches_checked_in_example() {
        let file = crate::proc::root().join("policies/demo-postgres.yaml");
        let text = std::fs::read_to_string(&file).expect("policies/demo-postgres.yaml");
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            body,
            postgres(
                "demo-postgres",
                Ipv4Addr::new(127, 0, 0, 2),
                5432,
                Path::new("/etc/latch/secrets.yaml")
            ) + DEMO_TLS
        );
    }
}
