//! Loading tests: the DESIGN.md contract, each error with its exact position, directories,
//! warnings and redaction.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The resource-shape example of DESIGN.md, byte for byte.
const DESIGN_EXAMPLE: &str = r#"apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata:
  name: local
spec:
  file:
    path: /etc/latch/secrets.yaml     # a YAML mapping; refused if group/world readable
---
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata:
  name: vault
spec:
  vault:                              # Vault or OpenBao
    address: https://vault.internal:8200
    auth:
      token: { file: /run/latch/vault-token }   # or appRole: {...}, kubernetes: {...}
---
apiVersion: latch.dev/v1alpha1
kind: Policy
metadata:
  name: orders-db
spec:
  destination:
    host: orders-db.internal          # or address: 10.0.3.7, or cidr: 10.0.3.0/24
    port: 5432
  workloads:                          # optional; an entry admits when all its fields match
    - uid: 1001
    - cgroup: /system.slice/orders.service
  protocol: postgres                  # tcp | postgres | mysql | http | ssh
  tls:
    mode: verify-full                 # disable | prefer | require | verify-ca | verify-full
    ca: /etc/latch/orders-ca.pem
  credentials:
    store: local
    username: { path: orders-db, field: username }
    password: { path: orders-db, field: password }
    # or, from a dynamic-secrets engine, both at once:  dynamic: { store: vault, path: database/creds/orders-rw }
"#;

/// Two stores used by the policy snippets below (6 + 1 + 8 = 15 lines).
pub(super) const STORES: &str = "\
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata:
  name: local
spec:
  file: {path: /etc/latch/secrets.yaml}
---
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata:
  name: vault
spec:
  vault:
    address: https://vault.internal:8200
    auth: {token: {env: VAULT_TOKEN}}
";

/// A policy document; `spec` is indented by the caller (2 spaces per level).
pub(super) fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

pub(super) fn errors(name: &str, text: &str) -> Vec<String> {
    match load_str(name, text) {
        Ok(c) => panic!("expected errors, loaded {} policies", c.policies.len()),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn assert_has(errors: &[String], expected: &str) {
    assert!(
        errors.iter().any(|e| e == expected),
        "missing error\n  {expected}\namong\n  {}",
        errors.join("\n  ")
    );
}

const PG_SPEC: &str = "  destination: {host: db.internal, port: 5432}
  workloads: [{uid: 1001}]
  protocol: postgres
  credentials:
    store: local
    password: {path: db, field: password}
";

#[test]
fn design_example_loads_as_written() {
    let config = load_str("design.yaml", DESIGN_EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(config.stores.len(), 2);
    assert!(matches!(&config.store("local").unwrap().backend,
        StoreBackend::File(f) if f.path == Path::new("/etc/latch/secrets.yaml")));
    match &config.store("vault").unwrap().backend {
        StoreBackend::Vault(v) => {
            assert_eq!(v.address, "https://vault.internal:8200");
            assert_eq!(v.kv_version, 2);
            assert_eq!(
                v.auth,
                VaultAuth::Token(CredentialSource::File("/run/latch/vault-token".into()))
            );
        }
        other => panic!("{other:?}"),
    }
    let p = config.policy("orders-db").unwrap();
    assert_eq!(p.source, Location::new("design.yaml", 19, 1));
    assert_eq!(
        p.destination.target,
        Target::Host("orders-db.internal".into())
    );
    assert_eq!(p.destination.ports, PortRange::single(5432));
    assert_eq!(p.workloads.len(), 2);
    assert_eq!(p.workloads[0].uid, Some(1001));
    assert_eq!(
        p.workloads[1].cgroup.as_deref(),
        Some("/system.slice/orders.service")
    );
    assert_eq!(p.protocol, Protocol::Postgres);
    assert_eq!(p.tls.mode, TlsMode::VerifyFull);
    assert_eq!(
        p.tls.ca.as_deref(),
        Some(Path::new("/etc/latch/orders-ca.pem"))
    );
    let user = SecretRef {
        store: "local".into(),
        path: "orders-db".into(),
        field: Some("username".into()),
        version: None,
        from_pod: false,
    };
    let password = SecretRef {
        field: Some("password".into()),
        ..user.clone()
    };
    assert_eq!(
        p.credentials,
        Some(Credentials::Static {
            store: "local".into(),
            username: Some(user),
            password: Some(password)
        })
    );
    assert_eq!(p.cache_ttl, None);
}

#[test]
fn design_dynamic_variant_loads() {
    let text = DESIGN_EXAMPLE.replace(
        "    store: local\n    username: { path: orders-db, field: username }\n    password: { path: orders-db, field: password }\n",
        "    dynamic: { store: vault, path: database/creds/orders-rw }\n    cache: { ttl: 30s }\n",
    );
    let config = load_str("design.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let p = &config.policies[0];
    assert_eq!(
        p.credentials,
        Some(Credentials::Dynamic {
            store: "vault".into(),
            path: "database/creds/orders-rw".into()
        })
    );
    assert_eq!(p.cache_ttl, Some(Duration::from_secs(30)));
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples")
}

#[test]
fn example_directory_loads() {
    let config = load(&[examples_dir()]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.stores.len(), 2);
    assert_eq!(config.policies.len(), 2);
    assert!(config.policies[0].source.file.ends_with("orders-db.yaml"));
    let api = config.policy("payments-api").expect("the http example");
    assert_eq!(api.http.target_port, Some(443));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn unknown_field_with_suggestion() {
    let text = format!(
        "{STORES}{}",
        policy(
            "orders",
            "  destination: {host: db.internal, port: 5432}\n  workloads: [{uid: 1001}]\n  protocol: postgres\n  credentials:\n    store: local\n    pasword: {path: db, field: password}\n"
        )
    );
    assert_eq!(
        errors("policies/orders.yaml", &text),
        vec![
            "policies/orders.yaml:27:5: unknown field \"pasword\" in credentials (did you mean \"password\"?)"
        ]
    );
}

#[test]
fn unknown_secret_store_kind() {
    let text = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: v}\nspec:\n  vautl:\n    address: http://127.0.0.1:8200\n";
    let errs = errors("stores.yaml", text);
    assert_eq!(
        errs,
        vec!["stores.yaml:5:3: unknown secret store \"vautl\" (did you mean \"vault\"?)"]
    );

    let text = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: v}\nspec:\n  file: {path: /a}\n  env: {}\n";
    assert_eq!(
        errors("stores.yaml", text),
        vec!["stores.yaml:6:3: spec has both \"file\" and \"env\"; give exactly one secret store"]
    );
}

#[test]
fn invalid_cidr() {
    let text = format!(
        "{STORES}{}",
        policy(
            "net",
            "  destination:\n    cidr: 10.0.3.0/33\n    port: 5432\n"
        )
    );
    assert_eq!(
        errors("p.yaml", &text),
        vec!["p.yaml:23:11: invalid cidr \"10.0.3.0/33\": prefix length must be at most 32"]
    );
    let text = policy("net", "  destination: {cidr: 10.0.3.7/24, port: 22}\n");
    assert_eq!(
        errors("p.yaml", &text),
        vec![
            "p.yaml:7:23: invalid cidr \"10.0.3.7/24\": host bits are set (did you mean \"10.0.3.0/24\"?)"
        ]
    );
}

#[test]
fn dynamic_credentials_need_vault() {
    let text = format!(
        "{STORES}{}",
        policy(
            "dyn",
            "  destination: {host: db.internal, port: 5432}\n  workloads: [{uid: 1}]\n  protocol: postgres\n  credentials:\n    dynamic: {store: local, path: database/creds/x}\n"
        )
    );
    assert_eq!(
        errors("p.yaml", &text),
        vec![
            "p.yaml:26:22: credentials.dynamic store \"local\" is a file store; dynamic credentials need a vault store"
        ]
    );
}

#[test]
fn unknown_store_reference() {
    let text = format!(
        "{STORES}{}",
        policy("pg", &PG_SPEC.replace("store: local", "store: locl"))
    );
    assert_eq!(
        errors("p.yaml", &text),
        vec!["p.yaml:26:12: no SecretStore named \"locl\" (did you mean \"local\"?)"]
    );
}

#[test]
fn duplicate_names_per_kind() {
    // A Policy may share a store's name; two stores may not.
    let text = format!("{STORES}{}---\n{STORES}", policy("local", PG_SPEC));
    assert_eq!(
        errors("d.yaml", &text),
        vec![
            "d.yaml:32:9: duplicate SecretStore \"local\": already defined at d.yaml:4:9",
            "d.yaml:39:9: duplicate SecretStore \"vault\": already defined at d.yaml:11:9",
        ]
    );
}

#[test]
fn missing_fields_and_unknown_kind_and_api_version() {
    let text = "apiVersion: latch.dev/v1\nkind: Polcy\nmetadata: {}\nspec: {}\n---\napiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {name: a}\nspec:\n  destination:\n    host: a.internal\n";
    let errs = errors("m.yaml", text);
    assert_eq!(
        errs,
        vec![
            "m.yaml:1:13: unknown apiVersion \"latch.dev/v1\" (expected \"latch.dev/v1alpha1\")",
            "m.yaml:2:7: unknown kind \"Polcy\" (did you mean \"Policy\"?)",
            "m.yaml:3:1: missing field \"name\" in metadata",
            "m.yaml:10:3: missing port in destination: give one of \"port\" or \"ports\"",
        ]
    );
}

#[test]
fn ports_and_workload_values() {
    let spec = "  destination:\n    address: 10.0.3.7\n    ports: {from: 1000, to: 5000}\n  workloads:\n    - comm: a-very-long-process-name\n    - {}\n    - uid: -1\n    - comm: psql\n    - {comm: psql, uid: 1001}\n";
    let errs = errors("w.yaml", &policy("w", spec));
    assert_eq!(
        errs,
        vec![
            "w.yaml:9:12: port range 1000-5000 has 4001 ports; at most 1024 are allowed (each port becomes a kernel map entry)",
            "w.yaml:11:13: comm \"a-very-long-process-name\" is 24 bytes; the kernel keeps at most 15 bytes of a process name (did you mean \"a-very-long-pro\"?)",
            "w.yaml:12:7: workloads[1] is empty: an entry needs at least one of uid, gid, cgroup, exe, comm, namespace, serviceAccount, labels",
            "w.yaml:13:12: workloads[2].uid -1 is out of range: must be between 0 and 4294967295",
            "w.yaml:14:7: workloads[3] admits by comm alone, which a process sets itself: name a uid or a cgroup in the same entry (comm then narrows it)",
        ]
    );
    let errs = errors(
        "w.yaml",
        &policy("w", "  destination: {address: 10.0.3.7, port: 0}\n"),
    );
    assert_eq!(
        errs,
        vec!["w.yaml:7:42: destination.port 0 is out of range: must be between 1 and 65535"]
    );
    let errs = errors(
        "w.yaml",
        &policy("w", "  destination: {address: 10.0.3.7, port: \"5432\"}\n"),
    );
    assert_eq!(
        errs,
        vec!["w.yaml:7:42: destination.port must be an integer, found the string \"5432\""]
    );
}

#[test]
fn overlapping_destinations_are_rejected_with_both_locations() {
    let a = policy(
        "a",
        "  destination: {address: 10.0.3.7, ports: {from: 8000, to: 8010}}\n",
    );
    let b = policy("b", "  destination: {cidr: 10.0.3.7/32, port: 8005}\n");
    let errs = errors("o.yaml", &format!("{a}{b}"));
    assert_eq!(
        errs,
        vec![
            "o.yaml:14:3: destination cidr 10.0.3.7/32 port 8005 overlaps Policy \"a\" (address 10.0.3.7 port 8000-8010) at o.yaml:7:3: one destination is served by one policy"
        ]
    );
    // Hosts compare case-insensitively.
    let a = policy("a", "  destination: {host: DB.internal, port: 80}\n");
    let b = policy("b", "  destination: {host: db.internal., port: 80}\n");
    assert_eq!(errors("o.yaml", &format!("{a}{b}")).len(), 1);
}

#[test]
fn nested_cidrs_and_disjoint_ports_are_allowed() {
    let a = policy(
        "wide",
        "  destination: {cidr: 10.0.0.0/8, port: 5432}\n  workloads: [{uid: 1}]\n",
    );
    let b = policy(
        "narrow",
        "  destination: {cidr: 10.0.3.0/24, port: 5432}\n  workloads: [{uid: 1}]\n",
    );
    let c = policy(
        "host",
        "  destination: {address: 10.0.3.7, port: 5432}\n  workloads: [{uid: 1}]\n",
    );
    let d = policy(
        "other-port",
        "  destination: {cidr: 10.0.0.0/8, port: 5433}\n  workloads: [{uid: 1}]\n",
    );
    let config = load_str("n.yaml", &format!("{a}{b}{c}{d}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.policies.len(), 4);
    let addr: IpAddr = "10.0.3.7".parse().unwrap();
    let best = config
        .policies
        .iter()
        .filter(|p| p.destination.target.contains(&addr) && p.destination.ports.contains(5432))
        .max_by_key(|p| p.destination.target.prefix_len())
        .unwrap();
    assert_eq!(best.name, "host");
}

#[test]
fn all_errors_of_a_load_are_reported() {
    let bad_store = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: s}\nspec:\n  exec: {command: [helper], timeout: 30}\n";
    let bad_policy = policy(
        "p",
        "  destination: {host: db.internal, port: 70000}\n  protocol: postgress\n  tls: {mode: verify}\n  credentials:\n    store: nowhere\n    password: s3cret\n    cache: {ttl: 30}\n",
    );
    let errs = errors("all.yaml", &format!("{bad_store}{bad_policy}"));
    assert_eq!(
        errs,
        vec![
            "all.yaml:5:20: exec.command[0] \"helper\" must be an absolute path (the agent does not search PATH)",
            "all.yaml:5:38: invalid exec.timeout \"30\": missing unit (ms, s, m or h), e.g. \"30s\"",
            "all.yaml:12:42: destination.port 70000 is out of range: must be between 1 and 65535",
            "all.yaml:13:13: invalid protocol \"postgress\": expected \"tcp\", \"postgres\", \"mysql\", \"http\" or \"ssh\" (did you mean \"postgres\"?)",
            "all.yaml:14:15: invalid tls mode \"verify\": expected \"disable\", \"prefer\", \"require\", \"verify-ca\" or \"verify-full\"",
            "all.yaml:17:15: credentials.password must be a secret reference such as {path: orders-db, field: password}; secret values are never written in a Policy",
            "all.yaml:18:18: invalid credentials.cache.ttl \"30\": missing unit (ms, s, m or h), e.g. \"30s\"",
        ]
    );
    assert!(errs.iter().all(|e| !e.contains("s3cret")));
}

#[test]
fn protocol_rules() {
    let http_prefer = policy(
        "h",
        "  destination: {host: api.internal, port: 443}\n  workloads: [{uid: 1}]\n  protocol: http\n  tls: {mode: prefer}\n  credentials: {store: local, password: {path: api}}\n",
    );
    let errs = errors("t.yaml", &format!("{STORES}{http_prefer}"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0]
            .starts_with("t.yaml:25:15: tls mode \"prefer\" needs a protocol that negotiates TLS"),
        "{errs:?}"
    );

    let no_creds = policy(
        "s",
        "  destination: {host: git.internal, port: 22}\n  protocol: ssh\n",
    );
    assert_eq!(
        errors("t.yaml", &no_creds),
        vec![
            "t.yaml:6:1: missing field \"credentials\" in spec: protocol ssh needs credentials",
            "t.yaml:8:13: protocol ssh is not built yet: this version of latch brokers \"tcp\", \"postgres\", \"mysql\" and \"http\""
        ]
    );

    let ca_without_tls = policy(
        "c",
        "  destination: {host: db.internal, port: 1}\n  tls:\n    mode: disable\n    ca: /ca.pem\n",
    );
    assert_eq!(
        errors("t.yaml", &ca_without_tls),
        vec![
            "t.yaml:10:5: tls.ca has no effect with tls mode \"disable\"; set mode to \"require\", \"verify-ca\" or \"verify-full\""
        ]
    );

    // Defaults: tcp needs no credentials and gets tls disable; postgres verifies the server.
    let tcp = policy(
        "tcp",
        "  destination: {host: db.internal, port: 1}\n  workloads: [{uid: 1}]\n",
    );
    let config = load_str("t.yaml", &format!("{STORES}{tcp}{}", policy("pg", PG_SPEC))).unwrap();
    assert_eq!(config.policy("tcp").unwrap().tls.mode, TlsMode::Disable);
    assert_eq!(config.policy("tcp").unwrap().protocol, Protocol::Tcp);
    assert_eq!(config.policy("pg").unwrap().tls.mode, TlsMode::VerifyFull);
}

#[test]
fn yaml_syntax_errors_are_located() {
    let errs = errors(
        "s.yaml",
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {name: a\nspec: {}\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("s.yaml:4:"), "{errs:?}");
    assert!(errs[0].contains("invalid YAML"), "{errs:?}");

    let errs = errors(
        "s.yaml",
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nkind: SecretStore\n",
    );
    assert_has(
        &errs,
        "s.yaml:3:1: duplicate key \"kind\" (first at line 2, column 1)",
    );
}

#[test]
fn warnings_for_open_policies_and_literal_stores() {
    let literal = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: dev}\nspec:\n  literal:\n    values:\n      db: {username: app, password: hunter2-secret}\n      token: tok-secret-value\n";
    let open = policy(
        "open",
        "  destination: {host: db.internal, port: 5432}\n  protocol: postgres\n  credentials:\n    store: dev\n    username: {path: db, field: username}\n    password: {path: db, field: password}\n",
    );
    let config = load_str("w.yaml", &format!("{literal}{open}")).unwrap_or_else(|e| panic!("{e}"));
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        vec![
            "w.yaml:5:3: SecretStore \"dev\" is a literal store: its secrets are written in the configuration; use it for development only",
            "w.yaml:14:1: Policy \"open\" names no workloads: the agent refuses it (latch run, whose cgroup holds only its command, admits every process there); list the workloads it admits, or say `workloads: all`",
        ]
    );
    // Debug never shows secret values.
    let debug = format!("{config:?}");
    assert!(
        !debug.contains("hunter2-secret") && !debug.contains("tok-secret-value"),
        "{debug}"
    );
    assert!(debug.contains("<redacted>"));
    // The values are there for the broker.
    match &config.store("dev").unwrap().backend {
        StoreBackend::Literal(l) => match &l.values["token"] {
            LiteralSecret::Value(v) => assert_eq!(v.expose(), "tok-secret-value"),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn literal_store_references_are_checked() {
    let literal = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: dev}\nspec:\n  literal:\n    values:\n      db: {username: app, password: hunter2-secret}\n";
    let p = policy(
        "p",
        "  destination: {host: db.internal, port: 5432}\n  workloads: [{uid: 1}]\n  protocol: postgres\n  credentials:\n    store: dev\n    username: {path: db, field: usernme}\n    password: {path: bd, field: password}\n",
    );
    let errs = errors("l.yaml", &format!("{literal}{p}"));
    assert_eq!(
        errs,
        vec![
            "l.yaml:19:33: secret \"db\" in literal store \"dev\" has no field \"usernme\" (did you mean \"username\"?)",
            "l.yaml:20:22: literal store \"dev\" has no secret \"bd\" (did you mean \"db\"?)",
        ]
    );
    assert!(errs.iter().all(|e| !e.contains("hunter2")));
}

#[test]
fn every_store_backend_decodes() {
    let text = "\
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata: {name: env}
spec:
  env:
---
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata: {name: exec}
spec:
  exec: {command: [/usr/local/bin/get-secret, --json], timeout: 2s}
---
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata: {name: bao, labels: {team: payments}}
spec:
  vault:
    address: https://bao.internal:8200
    namespace: team-a
    mount: kv
    kvVersion: 1
    tls: {ca: /etc/latch/bao-ca.pem, serverName: bao.internal}
    auth:
      appRole: {roleId: {value: 1234-abcd}, secretId: {file: /run/latch/secret-id}}
---
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata: {name: vault-k8s}
spec:
  vault:
    address: https://vault.internal
    auth: {kubernetes: {role: latch}}
---
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata: {name: aws}
spec:
  aws:
    region: eu-west-1
    endpoint: https://127.0.0.1:4566
    auth: {webIdentity: {roleArn: 'arn:aws:iam::123456789012:role/latch', tokenFile: /var/run/token}}
---
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata: {name: k8s}
spec:
  kubernetes: {namespace: apps}
";
    let config = load_str("all.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<&str> = config.stores.iter().map(|s| s.backend.kind()).collect();
    assert_eq!(
        kinds,
        ["env", "exec", "vault", "vault", "aws", "kubernetes"]
    );
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    match &config.store("exec").unwrap().backend {
        StoreBackend::Exec(e) => assert_eq!(e.timeout, Duration::from_secs(2)),
        other => panic!("{other:?}"),
    }
    match &config.store("bao").unwrap().backend {
        StoreBackend::Vault(v) => {
            assert_eq!(v.kv_version, 1);
            assert_eq!(v.mount.as_deref(), Some("kv"));
            assert!(
                matches!(&v.auth, VaultAuth::AppRole { mount, role_id: RoleIdSource::Value(_), .. } if mount == "approle")
            );
        }
        other => panic!("{other:?}"),
    }
    match &config.store("vault-k8s").unwrap().backend {
        StoreBackend::Vault(VaultStore {
            auth: VaultAuth::Kubernetes { token_file, .. },
            ..
        }) => assert_eq!(token_file, Path::new(VaultAuth::DEFAULT_K8S_TOKEN_FILE)),
        other => panic!("{other:?}"),
    }
    let env = EnvStore {
        prefix: "LATCH_".into(),
    };
    assert_eq!(
        env.variable_name("orders-db", Some("password")),
        "LATCH_ORDERS_DB_PASSWORD"
    );
}

#[test]
fn store_errors() {
    let text = "\
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata: {name: v}
spec:
  vault:
    address: vault.internal:8200
    kvVersion: 3
    auth:
      tokn: {file: /t}
---
apiVersion: latch.dev/v1alpha1
kind: SecretStore
metadata: {name: f}
spec:
  file: {path: secrets.yaml}
";
    assert_eq!(
        errors("s.yaml", text),
        vec![
            "s.yaml:6:14: invalid vault.address \"vault.internal:8200\": must start with http:// or https://",
            "s.yaml:7:16: vault.kvVersion 3 is out of range: must be between 1 and 2",
            "s.yaml:9:7: unknown vault auth method \"tokn\" (did you mean \"token\"?)",
            "s.yaml:15:16: file.path \"secrets.yaml\" must be an absolute path",
        ]
    );
}

#[test]
fn vault_revoke_on_shutdown_is_a_boolean() {
    let store = |value: &str| {
        format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: v}}\nspec:\n  vault:\n    \
             address: https://127.0.0.1:8200\n    revokeOnShutdown: {value}\n    auth: {{token: {{file: /t}}}}\n"
        )
    };
    let config = load_str("s.yaml", &store("true")).expect("valid");
    match &config.store("v").unwrap().backend {
        StoreBackend::Vault(v) => assert!(v.revoke_on_shutdown),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        errors("s.yaml", &store("\"yes\"")),
        vec!["s.yaml:7:23: vault.revokeOnShutdown must be true or false, found the string \"yes\""]
    );
}

#[test]
fn secrets_written_in_place_are_refused_without_echo() {
    let text = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: v}\nspec:\n  vault:\n    address: https://vault.internal\n    auth: {token: hvs.SECRETTOKEN}\n";
    let errs = errors("v.yaml", text);
    assert_eq!(
        errs,
        vec![
            "v.yaml:7:19: vault.auth.token must be {file: /path} or {env: NAME}; a secret is never written in the configuration"
        ]
    );
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("latch-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn directory_load_spans_files() {
    let dir = TempDir::new("dir");
    dir.write("10-orders.yml", &policy("orders", PG_SPEC));
    dir.write("00-stores.yaml", STORES);
    dir.write("README.md", "not yaml: [");
    dir.write(".hidden.yaml", "not yaml: [");
    let config = load(std::slice::from_ref(&dir.0)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.stores.len(), 2);
    assert_eq!(config.policies[0].source.file, dir.0.join("10-orders.yml"));

    // A file given besides its directory is read once; errors name each file.
    let extra = dir.write(
        "20-dup.yaml",
        &policy("orders", &PG_SPEC.replace("db.internal", "x.internal")),
    );
    let errs = errors_of(load(&[dir.0.clone(), extra.clone()]));
    let first = dir.0.join("10-orders.yml");
    assert_eq!(
        errs,
        vec![format!(
            "{}:5:9: duplicate Policy \"orders\": already defined at {}:5:9",
            extra.display(),
            first.display()
        )]
    );

    let missing = dir.0.join("nope.yaml");
    let errs = errors_of(load(std::slice::from_ref(&missing)));
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(&format!("{}: cannot read:", missing.display())),
        "{errs:?}"
    );
}

fn errors_of(result: Result<Config, LoadErrors>) -> Vec<String> {
    match result {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn load_errors_display_one_per_line() {
    let err = load_str("x.yaml", "kind: Nope\n").unwrap_err();
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), err.len());
    assert!(shown.lines().all(|l| l.starts_with("x.yaml:")), "{shown}");
    let _: &dyn std::error::Error = &err;
}

#[test]
fn app_tls_mode() {
    let spec = |proto: &str, app_tls: &str| {
        format!(
            "  destination: {{address: 10.0.0.1, port: 5432}}\n  protocol: {proto}\n  appTls: {app_tls}\n  credentials: {{store: local, password: {{path: db}}}}\n"
        )
    };
    let on = policy("db", &spec("postgres", "{mode: enable}"));
    let config = load_str("t.yaml", &format!("{STORES}{on}")).unwrap();
    assert_eq!(config.policies[0].app_tls, AppTlsMode::Enable);

    let unset = policy(
        "db",
        "  destination: {address: 10.0.0.1, port: 5432}\n  protocol: postgres\n  credentials: {store: local, password: {path: db}}\n",
    );
    let config = load_str("t.yaml", &format!("{STORES}{unset}")).unwrap();
    // Unset: auto, which offers TLS over the default verify-full leg to the server.
    assert_eq!(config.policies[0].app_tls, AppTlsMode::Auto);
    assert_eq!(config.policies[0].ssl_answer(), SslAnswer::Tls);
    assert!(!config.policies[0].fast_path_eligible());
    let off = policy("db", &spec("postgres", "{mode: disable}"));
    let config = load_str("t.yaml", &format!("{STORES}{off}")).unwrap();
    assert_eq!(config.policies[0].ssl_answer(), SslAnswer::Decline);
    // The new spelling under postgres:, auto over a plain leg: declined, fast path kept.
    let plain = policy(
        "db",
        "  destination: {address: 10.0.0.1, port: 5432}\n  protocol: postgres\n  tls: {mode: disable}\n  postgres: {appTls: {mode: auto}}\n  credentials: {store: local, password: {path: db}}\n",
    );
    let config = load_str("t.yaml", &format!("{STORES}{plain}")).unwrap();
    assert_eq!(config.policies[0].app_tls, AppTlsMode::Auto);
    assert_eq!(config.policies[0].ssl_answer(), SslAnswer::Decline);
    assert!(config.policies[0].fast_path_eligible());
    // enable over a leg latch does not verify: allowed, with a warning that says what it claims.
    let claims = policy(
        "db",
        "  destination: {address: 10.0.0.1, port: 5432}\n  protocol: postgres\n  tls: {mode: require}\n  postgres: {appTls: {mode: enable}}\n  credentials: {store: local, password: {path: db}}\n",
    );
    let config = load_str("t.yaml", &format!("{STORES}{claims}")).unwrap();
    assert_eq!(config.policies[0].ssl_answer(), SslAnswer::Tls);
    assert!(
        config.warnings.iter().any(|w| w
            .message
            .starts_with("appTls mode \"enable\" with tls mode \"require\"")),
        "{:?}",
        config.warnings
    );

    let bad = policy("db", &spec("postgres", "{mode: on}"));
    assert_eq!(
        errors("t.yaml", &format!("{STORES}{bad}")),
        vec![
            "t.yaml:24:18: invalid appTls mode \"on\": expected \"auto\", \"disable\" or \"enable\""
        ]
    );
    let tcp = policy("db", &spec("tcp", "{mode: enable}"));
    assert_eq!(
        errors("t.yaml", &format!("{STORES}{tcp}")),
        vec![
            "t.yaml:24:3: appTls applies to protocol postgres, mysql, http only (not tcp); remove appTls"
        ]
    );
}

#[test]
fn direct_mode_needs_postgres_in_plain_text_on_both_legs() {
    let spec = |proto: &str, extra: &str| {
        format!(
            "  destination: {{address: 10.0.0.1, port: 5432}}\n  protocol: {proto}\n  credentials: {{store: local, password: {{path: db}}}}\n{extra}  direct: true\n"
        )
    };
    let ok = policy("db", &spec("postgres", "  tls: {mode: disable}\n"));
    let config = load_str("t.yaml", &format!("{STORES}{ok}")).unwrap();
    assert!(config.policies[0].direct);

    let unset = policy(
        "db",
        "  destination: {address: 10.0.0.1, port: 5432}\n  protocol: postgres\n  credentials: {store: local, password: {path: db}}\n",
    );
    let config = load_str("t.yaml", &format!("{STORES}{unset}")).unwrap();
    assert!(!config.policies[0].direct);

    // postgres defaults to tls.mode prefer: direct mode cannot keep that promise.
    let tls = policy("db", &spec("postgres", ""));
    let errs = errors("t.yaml", &format!("{STORES}{tls}"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("t.yaml:25:3: direct needs tls.mode disable"),
        "{errs:?}"
    );
    let app_tls = policy(
        "db",
        &spec(
            "postgres",
            "  tls: {mode: disable}\n  appTls: {mode: enable}\n",
        ),
    );
    let errs = errors("t.yaml", &format!("{STORES}{app_tls}"));
    assert!(
        errs.len() == 1 && errs[0].starts_with("t.yaml:27:3: direct cannot terminate TLS"),
        "{errs:?}"
    );
    // auto (the default, and said explicitly) declines over direct mode's plain leg.
    let auto = policy(
        "db",
        &spec(
            "postgres",
            "  tls: {mode: disable}\n  appTls: {mode: auto}\n",
        ),
    );
    let config = load_str("t.yaml", &format!("{STORES}{auto}")).unwrap();
    assert_eq!(config.policies[0].ssl_answer(), SslAnswer::Decline);
    // MySQL too (`mysql: {direct: true}`, or the old spelling), in plain text.
    let mysql = policy("db", &spec("mysql", "  tls: {mode: disable}\n"));
    let config = load_str("t.yaml", &format!("{STORES}{mysql}")).unwrap();
    assert!(config.policies[0].direct);
    let mysql_tls = policy("db", &spec("mysql", "  tls: {mode: require}\n"));
    let errs = errors("t.yaml", &format!("{STORES}{mysql_tls}"));
    assert!(
        errs.len() == 1 && errs[0].contains("direct needs tls.mode disable"),
        "{errs:?}"
    );
    let not_bool = policy(
        "db",
        "  destination: {address: 10.0.0.1, port: 5432}\n  protocol: postgres\n  tls: {mode: disable}\n  credentials: {store: local, password: {path: db}}\n  direct: yes please\n",
    );
    let errs = errors("t.yaml", &format!("{STORES}{not_bool}"));
    assert!(errs.len() == 1 && errs[0].contains("direct"), "{errs:?}");
}

#[test]
fn plain_http_to_a_store_needs_an_explicit_insecure_even_on_loopback() {
    let vault = |extra: &str| {
        format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: v}}\nspec:\n  vault:\n    \
             address: http://127.0.0.1:8200\n{extra}    auth: {{token: {{file: /t}}}}\n"
        )
    };
    let errs = errors("s.yaml", &vault(""));
    assert_has(
        &errs,
        "s.yaml:6:14: vault: \"http://127.0.0.1:8200\" is plain http: the store's credentials would go to whoever holds that address and port (on loopback, any local user while the service is down); use https, or set `insecure: true` under vault to accept that",
    );
    let allowed = load_str("s.yaml", &vault("    insecure: true\n")).expect("insecure: true");
    assert_eq!(allowed.warnings.len(), 1, "{:?}", allowed.warnings);
    assert!(
        allowed.warnings[0]
            .message
            .contains("is plain http (insecure: true)"),
        "{:?}",
        allowed.warnings
    );
    let aws = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: a}\nspec:\n  aws:\n    \
               region: eu-west-1\n    endpoint: http://10.0.0.5:4566\n";
    assert_has(
        &errors("a.yaml", aws),
        "a.yaml:7:15: aws: \"http://10.0.0.5:4566\" is plain http: the store's credentials would go to whoever holds that address and port (anyone on the path); use https, or set `insecure: true` under aws to accept that",
    );
    let k8s = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: k}\nspec:\n  kubernetes:\n    \
               apiServer: http://127.0.0.1:6443\n";
    assert_eq!(
        errors("k.yaml", k8s).len(),
        1,
        "{:?}",
        errors("k.yaml", k8s)
    );
    let https = "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: k}\nspec:\n  kubernetes:\n    \
                 apiServer: https://127.0.0.1:6443\n";
    assert!(load_str("k.yaml", https).is_ok());
}

#[test]
fn tls_on_a_tcp_policy_makes_tls_to_the_target() {
    let text = policy(
        "p",
        "  destination: {address: 10.0.0.1, port: 6379}\n  protocol: tcp\n  tls:\n    mode: verify-full\n    ca: /etc/ca.pem\n    serverName: cache.internal\n",
    );
    let c = load_str("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.policies[0].tls.mode, TlsMode::VerifyFull);
    let prefer = policy(
        "p",
        "  destination: {address: 10.0.0.1, port: 6379}\n  protocol: tcp\n  tls: {mode: prefer}\n",
    );
    let errs = errors("p.yaml", &prefer);
    assert!(
        errs[0].contains("\"prefer\" needs a protocol that negotiates TLS"),
        "{errs:?}"
    );
    let plain = policy(
        "p",
        "  destination: {address: 10.0.0.1, port: 6379}\n  protocol: tcp\n  tls: {mode: disable}\n",
    );
    assert!(load_str("p.yaml", &plain).is_ok());
}

#[test]
fn password_revealing_methods_need_a_verified_server_and_never_direct_mode() {
    let pg = |extra: &str| {
        policy(
            "db",
            &format!(
                "  destination: {{address: 10.0.0.1, port: 5432}}\n  protocol: postgres\n  \
                 workloads: [{{uid: 1}}]\n  credentials:\n    store: s\n    \
                 password: {{path: db, field: password}}\n{extra}"
            ),
        ) + "---\napiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {name: s}\nspec: {env: {}}\n"
    };
    // The default: SCRAM-SHA-256 only, channel binding when offered.
    let config = load_str("p.yaml", &pg("")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.policies[0].auth, AuthSpec::default());
    // ... toward a server TLS verifies, unless the policy says otherwise.
    assert_eq!(config.policies[0].tls.mode, TlsMode::VerifyFull);
    assert!(load_str("p.yaml", &pg("  authentication: {methods: [md5]}\n")).is_ok());
    assert!(config.policies[0].auth.scram && !config.policies[0].auth.md5);

    let errs = errors(
        "p.yaml",
        &pg("  tls: {mode: require}\n  authentication: {methods: [md5]}\n"),
    );
    assert!(
        errs.iter().any(
            |e| e.contains("authentication method \"md5\" shows the password")
                && e.contains("needs tls.mode verify-full")
        ),
        "{errs:?}"
    );
    let errs = errors(
        "p.yaml",
        &pg("  tls: {mode: disable}\n  direct: true\n  authentication: {methods: [password]}\n"),
    );
    assert!(
        errs.iter().any(|e| e.contains(
            "with direct: true would put the password on the application's own connection"
        )),
        "{errs:?}"
    );
    let errs = errors(
        "p.yaml",
        &pg("  tls: {mode: disable}\n  authentication: {channelBinding: require}\n"),
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("channelBinding require needs TLS to the target")),
        "{errs:?}"
    );
    let errs = errors("p.yaml", &pg("  authentication: {methods: [kerberos]}\n"));
    assert!(
        errs.iter()
            .any(|e| e.contains("unknown authentication method \"kerberos\"")),
        "{errs:?}"
    );
    let ok = load_str(
        "p.yaml",
        &pg("  tls: {mode: verify-full}\n  authentication:\n    methods: [scram-sha-256, md5, password]\n    channelBinding: require\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let a = ok.policies[0].auth;
    assert!(a.scram && a.md5 && a.cleartext);
    assert_eq!(a.channel_binding, ChannelBindingMode::Require);
}

#[test]
fn postgres_options_live_under_postgres_and_the_old_spelling_is_read_with_a_warning() {
    let head = "  destination: {address: 10.0.0.1, port: 5432}\n  workloads: all\n  protocol: postgres\n  credentials: {store: local, password: {path: db}}\n  tls: {mode: disable}\n";
    let new = policy(
        "db",
        &format!(
            "{head}  postgres:\n    direct: true\n    authentication: {{channelBinding: prefer}}\n"
        ),
    );
    let config = load_str("t.yaml", &format!("{STORES}{new}")).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.policies[0].direct);
    let deprecated = |c: &Config| -> Vec<String> {
        c.warnings
            .iter()
            .map(ToString::to_string)
            .filter(|w| w.contains("deprecated"))
            .collect()
    };
    assert!(deprecated(&config).is_empty(), "{:?}", config.warnings);

    let old = policy("db", &format!("{head}  direct: true\n"));
    let config = load_str("t.yaml", &format!("{STORES}{old}")).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.policies[0].direct, "the old spelling still works");
    assert_eq!(
        deprecated(&config),
        vec![
            "t.yaml:27:3: direct at the top of spec is deprecated: write it under postgres (postgres: {direct: ...}); the old spelling is read until the next release"
        ]
    );

    let both = policy(
        "db",
        &format!("{head}  direct: true\n  postgres: {{direct: true}}\n"),
    );
    assert_eq!(
        errors("t.yaml", &format!("{STORES}{both}")),
        vec![
            "t.yaml:28:14: direct is given twice, in postgres and at the top of spec; keep postgres.direct"
        ]
    );

    let unknown = policy("db", &format!("{head}  postgres: {{drect: true}}\n"));
    let errs = errors("t.yaml", &format!("{STORES}{unknown}"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(
            "t.yaml:27:14: unknown field \"drect\" in postgres (did you mean \"direct\"?)"
        ),
        "{errs:?}"
    );

    let tcp = policy(
        "t",
        "  destination: {address: 10.0.0.2, port: 9}\n  workloads: all\n  postgres: {direct: true}\n",
    );
    let errs = errors("t.yaml", &format!("{STORES}{tcp}"));
    assert!(
        errs.iter().any(|e| e.starts_with(
            "t.yaml:24:3: postgres options apply to protocol postgres only (not tcp)"
        )),
        "{errs:?}"
    );
}

#[test]
fn mysql_options_live_under_mysql_with_roles_selected_by_the_user_the_application_sends() {
    let head =
        "  destination: {address: 10.0.0.1, port: 3306}\n  workloads: all\n  protocol: mysql\n";
    let ok = policy(
        "my",
        &format!(
            "{head}  mysql:\n    appTls: {{mode: enable}}\n    roles:\n      app: {{store: local, username: {{path: app, field: username}}, password: {{path: app, field: password}}}}\n      reader: {{store: local, password: {{path: reader}}, cache: {{ttl: 30s}}}}\n"
        ),
    );
    let config = load_str("t.yaml", &format!("{STORES}{ok}")).unwrap_or_else(|e| panic!("{e}"));
    let p = &config.policies[0];
    assert_eq!(p.protocol, Protocol::Mysql);
    assert_eq!(p.app_tls, AppTlsMode::Enable);
    assert_eq!(p.ssl_answer(), SslAnswer::Tls);
    assert!(p.credentials.is_none());
    let users: Vec<&str> = p.roles.iter().map(|r| r.user.as_str()).collect();
    assert_eq!(users, ["app", "reader"]);
    assert_eq!(p.roles[1].cache_ttl, Some(Duration::from_secs(30)));
    // appTls auto, as for PostgreSQL: TLS offered only over a verify-full leg to the server.
    for (tls, want) in [
        ("", SslAnswer::Tls),
        ("  tls: {mode: require}\n", SslAnswer::Decline),
    ] {
        let auto = policy(
            "my",
            &format!("{head}{tls}  credentials: {{store: local, password: {{path: db}}}}\n"),
        );
        let config =
            load_str("t.yaml", &format!("{STORES}{auto}")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.policies[0].ssl_answer(), want, "{tls:?}");
    }

    // Roles and credentials at once: located at mysql.roles, naming the credentials' line.
    let both = policy(
        "my",
        &format!(
            "{head}  credentials: {{store: local, password: {{path: db}}}}\n  mysql:\n    roles:\n      app: {{store: local, password: {{path: app}}}}\n"
        ),
    );
    assert_eq!(
        errors("t.yaml", &format!("{STORES}{both}")),
        vec![
            "t.yaml:27:5: mysql.roles and credentials (line 25) cannot both be given: with roles, the user the application asks for selects the credentials; move credentials under roles with the user name the application sends"
        ]
    );
    let empty = policy("my", &format!("{head}  mysql: {{roles: {{}}}}\n"));
    assert_eq!(
        errors("t.yaml", &format!("{STORES}{empty}")),
        vec!["t.yaml:25:11: mysql.roles is empty: name at least one role, or use credentials"]
    );
    // A role's store is checked like spec.credentials, at the role's own position.
    let store = policy(
        "my",
        &format!(
            "{head}  mysql:\n    roles:\n      app: {{store: nowhere, password: {{path: app}}}}\n"
        ),
    );
    let errs = errors("t.yaml", &format!("{STORES}{store}"));
    assert!(
        errs.iter()
            .any(|e| e.starts_with("t.yaml:27:20: ") && e.contains("nowhere")),
        "{errs:?}"
    );
    // PostgreSQL-only options are unknown under mysql.
    let pg_only = policy(
        "my",
        &format!(
            "{head}  credentials: {{store: local, password: {{path: db}}}}\n  mysql: {{databases: [a]}}\n"
        ),
    );
    let errs = errors("t.yaml", &format!("{STORES}{pg_only}"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("t.yaml:26:11: unknown field \"databases\" in mysql"),
        "{errs:?}"
    );

    // A block of the other protocol is an error, either way round.
    let pg_on_my = policy(
        "my",
        &format!(
            "{head}  credentials: {{store: local, password: {{path: db}}}}\n  postgres: {{direct: true}}\n"
        ),
    );
    assert_eq!(
        errors("t.yaml", &format!("{STORES}{pg_on_my}")),
        vec![
            "t.yaml:26:3: postgres options apply to protocol postgres only (not mysql); remove postgres"
        ]
    );
    let my_on_pg = policy(
        "pg",
        "  destination: {address: 10.0.0.1, port: 5432}\n  workloads: all\n  protocol: postgres\n  credentials: {store: local, password: {path: db}}\n  mysql: {roles: {a: {store: local, password: {path: a}}}}\n",
    );
    assert_eq!(
        errors("t.yaml", &format!("{STORES}{my_on_pg}")),
        vec![
            "t.yaml:26:3: mysql options apply to protocol mysql only (not postgres); remove mysql"
        ]
    );
}

#[test]
fn vault_machine_identity_auth_methods() {
    let store = |auth: &str| {
        format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: v}}\nspec:\n  vault:\n    address: https://vault.internal\n    auth: {auth}\n"
        )
    };
    let auth_of = |text: String| match load_str("v.yaml", &text)
        .unwrap_or_else(|e| panic!("{e}"))
        .stores
        .remove(0)
        .backend
    {
        StoreBackend::Vault(v) => v.auth,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        auth_of(store(
            "{jwt: {role: node, tokenFile: /run/latch/oidc-token}}"
        )),
        VaultAuth::Jwt {
            role: "node".into(),
            token_file: "/run/latch/oidc-token".into(),
            mount: "jwt".into(),
        }
    );
    assert_eq!(
        auth_of(store(
            "{cert: {certFile: /etc/latch/node.crt, keyFile: /etc/latch/node.key, role: nodes}}"
        )),
        VaultAuth::Cert {
            cert_file: "/etc/latch/node.crt".into(),
            key_file: "/etc/latch/node.key".into(),
            role: Some("nodes".into()),
            mount: "cert".into(),
        }
    );
    assert_eq!(
        auth_of(store("{aws: {role: node, serverId: vault.internal}}")),
        VaultAuth::Aws {
            role: "node".into(),
            mount: "aws".into(),
            region: "us-east-1".into(),
            sts_endpoint: "https://sts.amazonaws.com/".into(),
            server_id: Some("vault.internal".into()),
        }
    );
    let errors = errors_of(load_str("v.yaml", &store("{jwt: {role: node}}")));
    assert!(errors.iter().any(|e| e.contains("tokenFile")), "{errors:?}");
    let errors = errors_of(load_str(
        "v.yaml",
        &store("{cert: {certFile: node.crt, keyFile: /k}}"),
    ));
    assert!(errors.iter().any(|e| e.contains("certFile")), "{errors:?}");
}

#[test]
fn mysql_server_public_key_is_request_or_an_absolute_path() {
    let spec = |extra: &str| {
        format!(
            "  destination: {{address: 10.0.0.1, port: 3306}}\n  protocol: mysql\n  tls: {{mode: disable}}\n  credentials: {{store: local, password: {{path: db}}}}\n{extra}"
        )
    };
    let load = |extra: &str| {
        load_str("t.yaml", &format!("{STORES}{}", policy("db", &spec(extra))))
            .unwrap()
            .policies[0]
            .server_public_key
            .clone()
    };
    assert_eq!(load(""), ServerPublicKey::None);
    assert_eq!(
        load("  mysql: {serverPublicKey: request}\n"),
        ServerPublicKey::Request
    );
    assert_eq!(
        load("  mysql: {serverPublicKey: /etc/latch/orders-db.pem}\n"),
        ServerPublicKey::File("/etc/latch/orders-db.pem".into())
    );
    let relative = policy("db", &spec("  mysql: {serverPublicKey: orders-db.pem}\n"));
    let errs = errors("t.yaml", &format!("{STORES}{relative}"));
    assert!(
        errs.len() == 1
            && errs[0].contains("mysql.serverPublicKey \"orders-db.pem\": write \"request\""),
        "{errs:?}"
    );
    // Direct mode uses a pinned key only: `request` there is said to do nothing.
    let warnings = |extra: &str| -> Vec<String> {
        load_str("t.yaml", &format!("{STORES}{}", policy("db", &spec(extra))))
            .unwrap()
            .warnings
            .iter()
            .map(ToString::to_string)
            .filter(|w| w.contains("mysql.serverPublicKey: request"))
            .collect()
    };
    let asked = warnings("  mysql: {direct: true, serverPublicKey: request}\n");
    assert!(
        asked.len() == 1 && asked[0].contains("not used with direct: true"),
        "{asked:?}"
    );
    assert!(warnings("  mysql: {direct: true, serverPublicKey: /etc/latch/k.pem}\n").is_empty());
    assert!(warnings("  mysql: {serverPublicKey: request}\n").is_empty());
    // PostgreSQL has no such thing.
    let pg = policy(
        "db",
        "  destination: {address: 10.0.0.1, port: 5432}\n  protocol: postgres\n  tls: {mode: disable}\n  credentials: {store: local, password: {path: db}}\n  postgres: {serverPublicKey: request}\n",
    );
    let errs = errors("t.yaml", &format!("{STORES}{pg}"));
    assert!(
        errs.len() == 1 && errs[0].contains("serverPublicKey"),
        "{errs:?}"
    );
}
