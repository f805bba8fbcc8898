//! Decoding `SecretStore.spec`: exactly one backend, each with its own fields.

use std::collections::BTreeMap;
use std::time::Duration;

use super::decode::{self, Cx, Map};
use super::schema_store as schema;
use super::secret::SecretString;
use super::store::{
    AwsAuth, AwsStore, CredentialSource, EnvStore, ExecStore, FileStore, KubernetesStore,
    LiteralSecret, LiteralStore, RoleIdSource, StoreBackend, VaultAuth, VaultStore, VaultTls,
};
use super::yaml::{Entry, Mark, Node, Value};

pub fn store_spec(cx: &mut Cx, node: &Node, at: Mark) -> Option<StoreBackend> {
    let mut m = Map::new(cx, node, at, "", &schema::STORE_SPEC)?;
    let before = cx.errors.len();
    let chosen = m.one_of(cx, &StoreBackend::KINDS, "secret store");
    let backend = chosen.and_then(|(kind, e)| match kind {
        "file" => file(cx, e),
        "env" => env(cx, e),
        "exec" => exec(cx, e),
        "literal" => literal(cx, e),
        "vault" => vault(cx, e),
        "aws" => aws(cx, e),
        _ => kubernetes(cx, e),
    });
    m.finish_choice(cx, "secret store");
    if cx.errors.len() > before {
        return None;
    }
    backend
}

fn file(cx: &mut Cx, e: &Entry) -> Option<StoreBackend> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "file", &schema::FILE)?;
    let path = m
        .require(cx, "path")
        .and_then(|e| decode::absolute_path(cx, &e.value, "file.path"));
    m.finish(cx);
    Some(StoreBackend::File(FileStore { path: path? }))
}

fn env(cx: &mut Cx, e: &Entry) -> Option<StoreBackend> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "env", &schema::ENV)?;
    let prefix = match m.get("prefix") {
        Some(n) => {
            let p = decode::string(cx, n, "env.prefix")?;
            if let Some(c) = p
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
            {
                cx.error(n.mark, format!("invalid env.prefix {p:?}: {c:?} is not allowed in a variable name (use A-Z, 0-9 and _)"));
                return None;
            }
            p
        }
        None => String::new(),
    };
    m.finish(cx);
    Some(StoreBackend::Env(EnvStore { prefix }))
}

fn exec(cx: &mut Cx, e: &Entry) -> Option<StoreBackend> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "exec", &schema::EXEC)?;
    let before = cx.errors.len();
    let mut command = Vec::new();
    if let Some(c) = m.require(cx, "command")
        && let Some(items) = decode::sequence(cx, &c.value, "exec.command")
    {
        {
            for (i, item) in items.iter().enumerate() {
                if let Some(arg) = decode::string(cx, item, &format!("exec.command[{i}]")) {
                    command.push(arg);
                }
            }
            match command.first() {
                None if items.is_empty() => {
                    cx.error(c.value.mark, "exec.command is empty: give the program and its arguments")
                }
                Some(program) if !program.starts_with('/') => cx.error(
                    items[0].mark,
                    format!("exec.command[0] {program:?} must be an absolute path (the agent does not search PATH)"),
                ),
                _ => {}
            }
        }
    }
    let timeout = match m.get("timeout") {
        Some(n) => decode::duration(
            cx,
            n,
            "exec.timeout",
            Duration::from_millis(1),
            Duration::from_secs(300),
        ),
        None => Some(ExecStore::DEFAULT_TIMEOUT),
    };
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    Some(StoreBackend::Exec(ExecStore {
        command,
        timeout: timeout?,
    }))
}

fn literal(cx: &mut Cx, e: &Entry) -> Option<StoreBackend> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "literal", &schema::LITERAL)?;
    let before = cx.errors.len();
    let mut values = BTreeMap::new();
    if let Some(v) = m.require(cx, "values") {
        match &v.value.value {
            Value::Mapping(entries) => {
                for entry in entries {
                    let what = format!("literal.values.{}", entry.key);
                    if let Some(secret) = literal_secret(cx, &entry.value, &what) {
                        values.insert(entry.key.clone(), secret);
                    }
                }
            }
            _ => cx.error(
                v.value.mark,
                format!(
                    "literal.values must be a mapping, found {}",
                    describe_redacted(&v.value)
                ),
            ),
        }
    }
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    Some(StoreBackend::Literal(LiteralStore { values }))
}

/// Never quotes the text of a scalar: it may be a secret.
fn describe_redacted(node: &Node) -> &'static str {
    match node.value {
        Value::Null => "nothing",
        Value::Scalar { .. } => "a scalar",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
    }
}

fn literal_secret(cx: &mut Cx, node: &Node, what: &str) -> Option<LiteralSecret> {
    match &node.value {
        Value::Scalar { text, .. } => Some(LiteralSecret::Value(SecretString::new(text.clone()))),
        Value::Mapping(entries) => {
            let mut fields = BTreeMap::new();
            for f in entries {
                match &f.value.value {
                    Value::Scalar { text, .. } => {
                        fields.insert(f.key.clone(), SecretString::new(text.clone()));
                    }
                    _ => cx.error(
                        f.value.mark,
                        format!(
                            "{what}.{} must be a string, found {}",
                            f.key,
                            describe_redacted(&f.value)
                        ),
                    ),
                }
            }
            Some(LiteralSecret::Fields(fields))
        }
        _ => {
            cx.error(
                node.mark,
                format!(
                    "{what} must be a string or a mapping of fields, found {}",
                    describe_redacted(node)
                ),
            );
            None
        }
    }
}

/// A minimal URL check: `http://` or `https://`, a host, nothing after the authority but a path.
pub fn url(cx: &mut Cx, node: &Node, what: &str) -> Option<String> {
    let text = decode::string(cx, node, what)?;
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"));
    let Some(rest) = rest else {
        cx.error(
            node.mark,
            format!("invalid {what} {text:?}: must start with http:// or https://"),
        );
        return None;
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains(char::is_whitespace) || authority.contains('@') {
        cx.error(
            node.mark,
            format!("invalid {what} {text:?}: missing or bad host"),
        );
        return None;
    }
    Some(text.trim_end_matches('/').to_string())
}

/// Plain `http://` to a store sends its credentials (a Vault token, signed AWS requests, a
/// service-account token) to whoever holds that address and port — on loopback too, where any
/// local user can bind the port while the real service restarts. It is allowed only when the
/// store says `insecure: true`. Reads that key from `m`; returns whether the URL may be used.
fn require_https(cx: &mut Cx, m: &mut Map, url: Option<(&str, Mark)>, store: &str) -> bool {
    let insecure = match m.get("insecure") {
        Some(n) => decode::boolean(cx, n, &format!("{store}.insecure")).unwrap_or(false),
        None => false,
    };
    let Some((url, mark)) = url else {
        return true;
    };
    if !url.starts_with("http://") {
        return true;
    }
    if insecure {
        cx.warn(
            mark,
            format!("{store}: {url:?} is plain http (insecure: true): credentials go to whoever answers there"),
        );
        return true;
    }
    cx.error(
        mark,
        format!(
            "{store}: {url:?} is plain http: the store's credentials would go to whoever holds that \
             address and port ({}); use https, or set `insecure: true` under {store} to accept that",
            if is_loopback_url(url) {
                "on loopback, any local user while the service is down"
            } else {
                "anyone on the path"
            }
        ),
    );
    false
}

/// Whether the URL's host is a loopback name or address.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(h) = authority.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

fn vault(cx: &mut Cx, e: &Entry) -> Option<StoreBackend> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "vault", &schema::VAULT)?;
    let before = cx.errors.len();
    let address = m
        .require(cx, "address")
        .and_then(|a| Some((url(cx, &a.value, "vault.address")?, a.value.mark)));
    if !require_https(
        cx,
        &mut m,
        address.as_ref().map(|(u, mark)| (u.as_str(), *mark)),
        "vault",
    ) {
        m.finish(cx);
        return None;
    }
    let address = address.map(|(u, _)| u);
    let namespace = m.string(cx, "namespace");
    let mount = m
        .string(cx, "mount")
        .map(|s| s.trim_matches('/').to_string());
    let kv_version = match m.get("kvVersion") {
        Some(n) => decode::integer(cx, n, "vault.kvVersion", 1, 2).map(|v| v as u8),
        None => Some(2),
    };
    let tls = match m.map(cx, "tls") {
        Some(mut t) => {
            let ca = t
                .get("ca")
                .and_then(|n| decode::absolute_path(cx, n, "vault.tls.ca"));
            let server_name = t.string(cx, "serverName");
            t.finish(cx);
            VaultTls { ca, server_name }
        }
        None => VaultTls::default(),
    };
    let auth = m.require(cx, "auth").and_then(|a| vault_auth(cx, a));
    let revoke_on_shutdown = match m.get("revokeOnShutdown") {
        Some(n) => decode::boolean(cx, n, "vault.revokeOnShutdown"),
        None => Some(false),
    };
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    Some(StoreBackend::Vault(VaultStore {
        address: address?,
        namespace,
        mount,
        kv_version: kv_version?,
        tls,
        auth: auth?,
        revoke_on_shutdown: revoke_on_shutdown?,
    }))
}

fn vault_auth(cx: &mut Cx, e: &Entry) -> Option<VaultAuth> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "vault.auth", &schema::VAULT_AUTH)?;
    let chosen = m.one_of(
        cx,
        &["token", "appRole", "kubernetes", "jwt", "cert", "aws"],
        "vault auth method",
    );
    let auth = chosen.and_then(|(kind, e)| match kind {
        "token" => credential_source(cx, e, "vault.auth.token").map(VaultAuth::Token),
        "appRole" => {
            let mut a = Map::new(
                cx,
                &e.value,
                e.key_mark,
                "vault.auth.appRole",
                &schema::APP_ROLE,
            )?;
            let role_id = a.require(cx, "roleId").and_then(|r| role_id(cx, r));
            let secret_id = a
                .require(cx, "secretId")
                .and_then(|s| credential_source(cx, s, "vault.auth.appRole.secretId"));
            let mount = a
                .string(cx, "mount")
                .unwrap_or_else(|| "approle".to_string());
            a.finish(cx);
            Some(VaultAuth::AppRole {
                role_id: role_id?,
                secret_id: secret_id?,
                mount,
            })
        }
        "jwt" => {
            let mut j = Map::new(
                cx,
                &e.value,
                e.key_mark,
                "vault.auth.jwt",
                &schema::VAULT_JWT,
            )?;
            let role = j.require_string(cx, "role");
            let token_file = j
                .require(cx, "tokenFile")
                .and_then(|n| decode::absolute_path(cx, &n.value, "vault.auth.jwt.tokenFile"));
            let mount = j.string(cx, "mount").unwrap_or_else(|| "jwt".to_string());
            j.finish(cx);
            Some(VaultAuth::Jwt {
                role: role?,
                token_file: token_file?,
                mount,
            })
        }
        "cert" => {
            let mut c = Map::new(
                cx,
                &e.value,
                e.key_mark,
                "vault.auth.cert",
                &schema::VAULT_CERT,
            )?;
            let cert_file = c
                .require(cx, "certFile")
                .and_then(|n| decode::absolute_path(cx, &n.value, "vault.auth.cert.certFile"));
            let key_file = c
                .require(cx, "keyFile")
                .and_then(|n| decode::absolute_path(cx, &n.value, "vault.auth.cert.keyFile"));
            let role = c.string(cx, "role");
            let mount = c.string(cx, "mount").unwrap_or_else(|| "cert".to_string());
            c.finish(cx);
            Some(VaultAuth::Cert {
                cert_file: cert_file?,
                key_file: key_file?,
                role,
                mount,
            })
        }
        "aws" => {
            let mut a = Map::new(
                cx,
                &e.value,
                e.key_mark,
                "vault.auth.aws",
                &schema::VAULT_AWS,
            )?;
            let role = a.require_string(cx, "role");
            let mount = a.string(cx, "mount").unwrap_or_else(|| "aws".to_string());
            let region = a
                .string(cx, "region")
                .unwrap_or_else(|| "us-east-1".to_string());
            let sts_endpoint = match a.get("stsEndpoint") {
                Some(n) => url(cx, n, "vault.auth.aws.stsEndpoint"),
                None => Some("https://sts.amazonaws.com/".to_string()),
            };
            let server_id = a.string(cx, "serverId");
            a.finish(cx);
            Some(VaultAuth::Aws {
                role: role?,
                mount,
                region,
                sts_endpoint: sts_endpoint?,
                server_id,
            })
        }
        _ => {
            let mut k = Map::new(
                cx,
                &e.value,
                e.key_mark,
                "vault.auth.kubernetes",
                &schema::VAULT_KUBERNETES,
            )?;
            let role = k.require_string(cx, "role");
            let token_file = match k.get("tokenFile") {
                Some(n) => decode::absolute_path(cx, n, "vault.auth.kubernetes.tokenFile"),
                None => Some(VaultAuth::DEFAULT_K8S_TOKEN_FILE.into()),
            };
            let mount = k
                .string(cx, "mount")
                .unwrap_or_else(|| "kubernetes".to_string());
            k.finish(cx);
            Some(VaultAuth::Kubernetes {
                role: role?,
                token_file: token_file?,
                mount,
            })
        }
    });
    m.finish_choice(cx, "vault auth method");
    auth
}

/// `{file: /path}` or `{env: NAME}`.
fn credential_source(cx: &mut Cx, e: &Entry, what: &str) -> Option<CredentialSource> {
    if let Value::Scalar { .. } = e.value.value {
        // Never echo the text: it is likely the secret itself.
        cx.error(
            e.value.mark,
            format!("{what} must be {{file: /path}} or {{env: NAME}}; a secret is never written in the configuration"),
        );
        return None;
    }
    let mut m = Map::new(
        cx,
        &e.value,
        e.key_mark,
        what.to_string(),
        &schema::CREDENTIAL_SOURCE,
    )?;
    let source = m
        .one_of(cx, &["file", "env"], "source")
        .and_then(|(kind, s)| {
            if kind == "file" {
                decode::absolute_path(cx, &s.value, &format!("{what}.file"))
                    .map(CredentialSource::File)
            } else {
                env_name(cx, &s.value, &format!("{what}.env")).map(CredentialSource::Env)
            }
        });
    if m.forbidden("value").is_some() {
        cx.error(
            m.at(),
            format!(
                "{what}.value: a secret is never written in the configuration; use file or env"
            ),
        );
    }
    m.finish(cx);
    source
}

fn role_id(cx: &mut Cx, e: &Entry) -> Option<RoleIdSource> {
    let what = "vault.auth.appRole.roleId";
    let mut m = Map::new(cx, &e.value, e.key_mark, what, &schema::ROLE_ID)?;
    let source =
        m.one_of(cx, &["file", "env", "value"], "source")
            .and_then(|(kind, s)| match kind {
                "file" => decode::absolute_path(cx, &s.value, &format!("{what}.file"))
                    .map(RoleIdSource::File),
                "env" => env_name(cx, &s.value, &format!("{what}.env")).map(RoleIdSource::Env),
                _ => {
                    decode::string(cx, &s.value, &format!("{what}.value")).map(RoleIdSource::Value)
                }
            });
    m.finish(cx);
    source
}

fn env_name(cx: &mut Cx, node: &Node, what: &str) -> Option<String> {
    let name = decode::string(cx, node, what)?;
    let valid = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        cx.error(
            node.mark,
            format!("invalid {what} {name:?}: not an environment variable name"),
        );
        return None;
    }
    Some(name)
}

fn aws(cx: &mut Cx, e: &Entry) -> Option<StoreBackend> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "aws", &schema::AWS)?;
    let before = cx.errors.len();
    let region = m.require(cx, "region").and_then(|r| {
        let region = decode::string(cx, &r.value, "aws.region")?;
        let ok = region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            cx.error(
                r.value.mark,
                format!(
                    "invalid aws.region {region:?}: expected a region name such as \"eu-west-1\""
                ),
            );
            return None;
        }
        Some(region)
    });
    let endpoint = m
        .get("endpoint")
        .and_then(|n| Some((url(cx, n, "aws.endpoint")?, n.mark)));
    if !require_https(
        cx,
        &mut m,
        endpoint.as_ref().map(|(u, mark)| (u.as_str(), *mark)),
        "aws",
    ) {
        m.finish(cx);
        return None;
    }
    let endpoint = endpoint.map(|(u, _)| u);
    let auth = match m.map(cx, "auth") {
        Some(mut a) => {
            let chosen = a.one_of(
                cx,
                &["env", "profile", "webIdentity", "instance", "container"],
                "aws auth method",
            );
            let auth = chosen.and_then(|(kind, e)| match kind {
                "env" | "instance" | "container" => {
                    let what = format!("aws.auth.{kind}");
                    let inner = Map::new(cx, &e.value, e.key_mark, &what, &schema::EMPTY)?;
                    inner.finish(cx);
                    Some(match kind {
                        "env" => AwsAuth::Env,
                        "instance" => AwsAuth::Instance,
                        _ => AwsAuth::Container,
                    })
                }
                "profile" => decode::string(cx, &e.value, "aws.auth.profile").map(AwsAuth::Profile),
                _ => {
                    let mut w = Map::new(
                        cx,
                        &e.value,
                        e.key_mark,
                        "aws.auth.webIdentity",
                        &schema::WEB_IDENTITY,
                    )?;
                    let role_arn = w.require(cx, "roleArn").and_then(|r| {
                        let arn = decode::string(cx, &r.value, "aws.auth.webIdentity.roleArn")?;
                        if !arn.starts_with("arn:") {
                            cx.error(
                                r.value.mark,
                                format!("invalid roleArn {arn:?}: an ARN starts with \"arn:\""),
                            );
                            return None;
                        }
                        Some(arn)
                    });
                    let token_file = w.require(cx, "tokenFile").and_then(|t| {
                        decode::absolute_path(cx, &t.value, "aws.auth.webIdentity.tokenFile")
                    });
                    w.finish(cx);
                    Some(AwsAuth::WebIdentity {
                        role_arn: role_arn?,
                        token_file: token_file?,
                    })
                }
            });
            a.finish_choice(cx, "aws auth method");
            auth
        }
        None => Some(AwsAuth::Chain),
    };
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    Some(StoreBackend::Aws(AwsStore {
        region: region?,
        endpoint,
        auth: auth?,
    }))
}

fn kubernetes(cx: &mut Cx, e: &Entry) -> Option<StoreBackend> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "kubernetes", &schema::KUBERNETES)?;
    let before = cx.errors.len();
    let namespace = m.string(cx, "namespace");
    let api_server = m
        .get("apiServer")
        .and_then(|n| Some((url(cx, n, "kubernetes.apiServer")?, n.mark)));
    if !require_https(
        cx,
        &mut m,
        api_server.as_ref().map(|(u, mark)| (u.as_str(), *mark)),
        "kubernetes",
    ) {
        m.finish(cx);
        return None;
    }
    let api_server = api_server.map(|(u, _)| u);
    let token_file = m
        .get("tokenFile")
        .and_then(|n| decode::absolute_path(cx, n, "kubernetes.tokenFile"));
    let ca_file = m
        .get("caFile")
        .and_then(|n| decode::absolute_path(cx, n, "kubernetes.caFile"));
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    Some(StoreBackend::Kubernetes(KubernetesStore {
        namespace,
        api_server,
        token_file,
        ca_file,
    }))
}
