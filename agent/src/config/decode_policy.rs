//! Decoding `Policy.spec`: shape, types and the rules that need only the policy itself.

use std::net::IpAddr;
use std::time::Duration;

use crate::connector::registry;

use super::decode::{self, Cx, Map};
use super::decode_pg_startup;
use super::http::HttpSpec;
use super::net::{self, Cidr, PortRange};
use super::policy::{
    AppTlsMode, AuthSpec, ChannelBindingMode, Credentials, Destination, Protocol, Role, SecretRef,
    ServerPublicKey, StartupRules, Target, TlsMode, TlsSpec, WorkloadSelector,
};
use super::schema_policy as schema;
use super::yaml::{Entry, Mark, Node, Value};

/// The longest credential cache allowed: credentials are meant to be fetched per connection.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);

/// A decoded policy spec (the parts of [`super::Policy`] that come from `spec`).
pub struct PolicySpec {
    pub destination: Destination,
    pub workloads: Vec<WorkloadSelector>,
    pub protocol: Protocol,
    pub tls: TlsSpec,
    pub app_tls: AppTlsMode,
    pub credentials: Option<Credentials>,
    pub cache_ttl: Option<Duration>,
    pub roles: Vec<Role>,
    pub startup: StartupRules,
    pub direct: bool,
    pub auth: AuthSpec,
    pub server_public_key: ServerPublicKey,
    pub keep_sessions: bool,
    /// `workloads: all`: every workload in the intercepted cgroups, said explicitly.
    pub admit_all: bool,
    pub http: HttpSpec,
}

pub fn policy_spec(cx: &mut Cx, node: &Node, at: Mark) -> Option<PolicySpec> {
    let mut m = Map::new(cx, node, at, "", &schema::POLICY_SPEC)?;
    let errors_before = cx.errors.len();

    let protocol_entry = m.entry("protocol");
    let protocol = match protocol_entry {
        Some(e) => decode::choice(cx, &e.value, "protocol", &Protocol::ALL),
        None => Some(Protocol::Tcp),
    };
    // Refused here rather than accepted and failing every matching connection at run time.
    if let (Some(p), Some(e)) = (protocol, protocol_entry)
        && registry::supports(p).is_none()
    {
        cx.error(
            e.value.mark,
            format!(
                "protocol {p} is not built yet: this version of latch brokers {}",
                quoted_list(&registry::built_names())
            ),
        );
    }
    let destination = match m.require(cx, "destination") {
        Some(e) => destination(cx, e),
        None => None,
    };
    let workloads_node = m.get("workloads");
    let admit_all = workloads_node
        .is_some_and(|n| matches!(&n.value, Value::Scalar { text, .. } if text == "all"));
    let workloads = match workloads_node {
        Some(_) if admit_all => Some(Vec::new()),
        Some(n) => workloads(cx, n),
        None => Some(Vec::new()),
    };
    let credentials_entry = m.entry("credentials");
    let creds = credentials_entry.and_then(|e| credentials(cx, e, "credentials"));
    let default_store = match &creds {
        Some((Credentials::Static { store, .. }, _)) => Some(store.as_str()),
        _ => None,
    };
    let tls_entry = m.entry("tls");
    let tls = tls_entry.and_then(|e| tls(cx, e, default_store));
    // A protocol's own options live under a block named after it (`postgres:`, `mysql:`);
    // PostgreSQL's older top-level spelling is still read, with a warning.
    let block = match protocol {
        Some(Protocol::Mysql) => "mysql",
        _ => "postgres",
    };
    let pg_entry = m.entry("postgres");
    let my_entry = m.entry("mysql");
    let http_entry = m.entry("http");
    for (entry, owner) in [
        (pg_entry, Protocol::Postgres),
        (my_entry, Protocol::Mysql),
        (http_entry, Protocol::Http),
    ] {
        if let (Some(e), Some(p)) = (entry, protocol)
            && p != owner
        {
            cx.error(
                e.key_mark,
                format!("{owner} options apply to protocol {owner} only (not {p}); remove {owner}"),
            );
        }
    }
    let own_entry = if block == "mysql" { my_entry } else { pg_entry };
    let own_schema = m.child(block);
    let mut own = own_entry.and_then(|e| Map::new(cx, &e.value, e.key_mark, block, own_schema));
    let app_tls_entry = protocol_option(cx, &mut m, own.as_mut(), block, "appTls");
    let app_tls = match app_tls_entry {
        Some(e) => app_tls(cx, e),
        None => Some(AppTlsMode::Auto),
    };
    let auth_entry = protocol_option(cx, &mut m, own.as_mut(), block, "authentication");
    let auth = match auth_entry {
        Some(e) => authentication(cx, e),
        None => Some(AuthSpec::default()),
    };
    let direct_entry = protocol_option(cx, &mut m, own.as_mut(), block, "direct");
    let direct = match direct_entry {
        Some(e) => decode::boolean(cx, &e.value, "direct"),
        None => Some(false),
    };
    let key_entry = own
        .as_mut()
        .filter(|_| block == "mysql")
        .and_then(|p| p.entry("serverPublicKey"));
    let server_public_key = match key_entry {
        Some(e) => server_public_key(cx, &e.value),
        None => Some(ServerPublicKey::None),
    };
    let keep_sessions = match own
        .as_mut()
        .filter(|_| block == "mysql")
        .and_then(|p| p.entry("keepSessions"))
    {
        Some(e) => decode::boolean(cx, &e.value, "keepSessions"),
        None => Some(true),
    };
    // Credentials by the user name the application sends: `postgres.roles`, `mysql.roles`.
    let roles_entry = own.as_mut().and_then(|p| p.entry("roles"));
    let roles = match roles_entry {
        Some(e) => decode_pg_startup::roles(cx, e, block),
        None => Some(Vec::new()),
    };
    // What a PostgreSQL StartupMessage may ask for: under `postgres:` only.
    let mut pg = own.as_mut().filter(|_| block == "postgres");
    let databases = match pg.as_mut().and_then(|p| p.entry("databases")) {
        Some(e) => decode_pg_startup::databases(cx, e).map(Some),
        None => Some(None),
    };
    let options = match pg.as_mut().and_then(|p| p.entry("options")) {
        Some(e) => decode_pg_startup::options(cx, e),
        None => Some(Default::default()),
    };
    if let (Some(r), Some(c)) = (roles_entry, credentials_entry) {
        cx.error(
            r.key_mark,
            format!(
                "{block}.roles and credentials (line {}) cannot both be given: with roles, \
                 the user the application asks for selects the credentials; move credentials \
                 under roles with the user name the application sends",
                c.key_mark.line
            ),
        );
    }
    if let Some(own) = own {
        own.finish(cx);
    }
    let http = match http_entry {
        Some(e) if protocol == Some(Protocol::Http) => {
            super::decode_http::http(cx, e, default_store)
        }
        _ => Some((HttpSpec::default(), None)),
    };
    let (http, http_app_tls) = match http {
        Some((h, a)) => (Some(h), a),
        None => (None, None),
    };
    // HTTPS interception is opt-in: `http.appTls` says `enable`; without it (the default for
    // http) an application that opens with TLS is refused.
    let app_tls = if protocol == Some(Protocol::Http) {
        if let Some(e) = app_tls_entry {
            cx.error(
                e.key_mark,
                "for protocol http write appTls under http (http: {appTls: {mode: enable}})",
            );
        }
        match http_app_tls {
            Some((AppTlsMode::Auto, at)) => {
                cx.error(
                    at,
                    "http appTls mode \"auto\": HTTPS interception is opt-in for http; write \
                     \"enable\" (terminate the application's TLS with the node-local CA) or \
                     \"disable\" (the default: refuse it)",
                );
                None
            }
            Some((mode, _)) => Some(mode),
            None => Some(AppTlsMode::Disable),
        }
    } else {
        app_tls
    };
    m.finish(cx);

    let protocol = protocol?;
    let (credentials, cache_ttl) = match creds {
        Some((c, ttl)) => (Some(c), ttl),
        None => (None, None),
    };
    let support = registry::supports(protocol);
    if credentials.is_none()
        && credentials_entry.is_none()
        && roles_entry.is_none()
        && support.is_none_or(|s| s.credentials)
    {
        cx.error(
            m_at(node, at),
            format!("missing field \"credentials\" in spec: protocol {protocol} needs credentials"),
        );
    }
    let tls = match (tls, tls_entry) {
        (Some(tls), Some(e)) => check_tls(cx, tls, protocol, e),
        (None, None) => Some(TlsSpec {
            mode: protocol.default_tls_mode(),
            ca: None,
            server_name: None,
            client_cert: None,
            client_key: None,
        }),
        _ => None,
    };
    if let (Some(AppTlsMode::Enable | AppTlsMode::Auto), Some(e)) = (app_tls, app_tls_entry)
        && !support.is_some_and(|s| s.app_tls)
    {
        cx.error(
            e.key_mark,
            format!(
                "appTls applies to protocol {} only (not {protocol}); remove appTls",
                registry::names_where(|s| s.app_tls)
            ),
        );
    }
    if let (Some(AppTlsMode::Enable), Some(e), Some(t)) = (app_tls, app_tls_entry, tls.as_ref())
        && support.is_some_and(|s| s.app_tls)
        && t.mode != TlsMode::VerifyFull
    {
        cx.warn(
            e.key_mark,
            format!(
                "appTls mode \"enable\" with tls mode {:?}: applications are offered TLS whose \
                 certificate claims the destination, while latch does not verify the server it \
                 reaches; \"auto\" (the default) offers TLS only over \"verify-full\"",
                t.mode.as_str()
            ),
        );
    }
    if let (Some(true), Some(e)) = (direct, direct_entry) {
        check_direct(cx, e.key_mark, protocol, tls.as_ref(), app_tls);
        if let (Some(ServerPublicKey::Request), Some(k)) = (&server_public_key, &key_entry) {
            cx.warn(
                k.key_mark,
                "mysql.serverPublicKey: request is not used with direct: true (asking for the \
                 key takes two packets more than any client's exchange on the application's \
                 connection); pin the server's RSA public key file to have direct mode do \
                 caching_sha2_password's full authentication",
            );
        }
    }
    if let (Some(a), Some(e)) = (auth, auth_entry) {
        check_auth(cx, e, protocol, tls.as_ref(), direct == Some(true), a);
    }
    if protocol == Protocol::Http
        && let (Some(h), Some(t)) = (http.as_ref(), tls.as_ref())
    {
        let at = http_entry.map_or(m_at(node, at), |e| e.key_mark);
        check_http(cx, h, t, credentials.as_ref(), at, tls_entry);
        if let (Some(AppTlsMode::Enable), Some((_, mark))) = (app_tls, http_app_tls)
            && t.mode != TlsMode::VerifyFull
        {
            cx.error(
                mark,
                format!(
                    "http appTls mode \"enable\" needs tls mode \"verify-full\" (not {:?}): \
                     applications trust the node-local CA's certificate for the destination, so \
                     latch must verify the target it re-encrypts to",
                    t.mode.as_str()
                ),
            );
        }
    }
    if cx.errors.len() > errors_before {
        return None;
    }
    Some(PolicySpec {
        destination: destination?,
        workloads: workloads?,
        protocol,
        tls: tls?,
        app_tls: app_tls?,
        credentials,
        cache_ttl,
        roles: roles?,
        startup: StartupRules {
            databases: databases?,
            options: options?,
        },
        direct: direct?,
        auth: auth?,
        server_public_key: server_public_key?,
        keep_sessions: keep_sessions?,
        admit_all,
        http: http?,
    })
}

/// The rules that tie `http` to the credentials and the target leg: an injection that needs
/// a username gets one; a credential sent over a leg latch does not verify is warned about.
fn check_http(
    cx: &mut Cx,
    http: &HttpSpec,
    tls: &TlsSpec,
    credentials: Option<&Credentials>,
    at: Mark,
    tls_entry: Option<&Entry>,
) {
    if let Some(Credentials::Static {
        username: None,
        password,
        ..
    }) = credentials
        && http.inject.needs_username()
    {
        cx.error(
            at,
            format!(
                "http inject {:?} needs credentials.username as well as credentials.password{}",
                http.inject.name(),
                if password.is_some() && matches!(http.inject, super::http::Injection::Basic) {
                    "; for a token alone set http.inject to \"bearer\", or give http.header or http.query"
                } else {
                    ""
                }
            ),
        );
    }
    if let Some(Credentials::Static { password: None, .. }) = credentials {
        cx.error(
            at,
            "protocol http injects credentials.password (the secret): give it",
        );
    }
    if tls.mode != TlsMode::VerifyFull {
        cx.warn(
            tls_entry.map_or(at, |e| e.key_mark),
            format!(
                "tls mode {:?}: latch puts the credential into requests to whoever answers at \
                 the destination, unchecked; use \"verify-full\" (the default for http) where \
                 the target has a certificate",
                tls.mode.as_str()
            ),
        );
    }
}

/// `mysql.serverPublicKey`: `request`, or the absolute path of a PEM file.
fn server_public_key(cx: &mut Cx, node: &Node) -> Option<ServerPublicKey> {
    let what = "mysql.serverPublicKey";
    let text = decode::string(cx, node, what)?;
    if text == "request" {
        return Some(ServerPublicKey::Request);
    }
    if !text.starts_with('/') {
        cx.error(
            node.mark,
            format!(
                "{what} {text:?}: write \"request\" (ask the server for its RSA key) or the \
                 absolute path of the server's RSA public key (PEM)"
            ),
        );
        return None;
    }
    Some(ServerPublicKey::File(text.into()))
}

/// A protocol's option: `<block>.<key>` (`postgres.appTls`), or `<key>` at the top of the spec
/// as it was spelled before (a deprecation warning; both at once is an error).
fn protocol_option<'n>(
    cx: &mut Cx,
    spec: &mut Map<'n>,
    own: Option<&mut Map<'n>>,
    block: &str,
    key: &'static str,
) -> Option<&'n Entry> {
    let old = spec.entry(key);
    let new = own.and_then(|p| p.entry(key));
    match (old, new) {
        (Some(_), Some(n)) => {
            cx.error(
                n.key_mark,
                format!(
                    "{key} is given twice, in {block} and at the top of spec; keep {block}.{key}"
                ),
            );
            None
        }
        (Some(o), None) => {
            cx.warn(
                o.key_mark,
                format!(
                    "{key} at the top of spec is deprecated: write it under {block} \
                     ({block}: {{{key}: ...}}); the old spelling is read until the next release"
                ),
            );
            Some(o)
        }
        (None, new) => new,
    }
}

/// `authentication: {methods: [scram-sha-256, md5, password], channelBinding: prefer}`.
fn authentication(cx: &mut Cx, entry: &Entry) -> Option<AuthSpec> {
    let mut m = Map::new(
        cx,
        &entry.value,
        entry.key_mark,
        "authentication",
        &schema::AUTHENTICATION,
    )?;
    let mut spec = AuthSpec::default();
    if let Some(e) = m.entry("methods") {
        let items = decode::sequence(cx, &e.value, "authentication.methods")?;
        spec.scram = false;
        for item in items {
            let name = decode::string(cx, item, "authentication method")?;
            match name.as_str() {
                "scram-sha-256" => spec.scram = true,
                "md5" => spec.md5 = true,
                "password" => spec.cleartext = true,
                other => cx.error(
                    item.mark,
                    format!(
                        "unknown authentication method {other:?}; expected one of {}",
                        decode::list(&AuthSpec::METHODS)
                    ),
                ),
            }
        }
        if !(spec.scram || spec.md5 || spec.cleartext) {
            cx.error(
                e.value.mark,
                "authentication.methods is empty: name at least one",
            );
        }
    }
    if let Some(e) = m.entry("channelBinding") {
        spec.channel_binding = decode::choice(
            cx,
            &e.value,
            "authentication.channelBinding",
            &ChannelBindingMode::ALL,
        )?;
    }
    m.finish(cx);
    Some(spec)
}

/// Methods that show the password (or an equivalent hash) to whoever answers go only to a
/// server whose identity TLS verified; never on the application's own connection (direct
/// mode), where the application reads everything; channel binding needs TLS.
fn check_auth(
    cx: &mut Cx,
    entry: &Entry,
    protocol: Protocol,
    tls: Option<&TlsSpec>,
    direct: bool,
    auth: AuthSpec,
) {
    if protocol != Protocol::Postgres {
        cx.error(
            entry.key_mark,
            format!("authentication applies to protocol postgres only (not {protocol}); remove it"),
        );
        return;
    }
    let revealing: Vec<&str> = [("md5", auth.md5), ("password", auth.cleartext)]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    if let Some(first) = revealing.first() {
        let at = entry.value.locate(&["methods"]);
        if direct {
            cx.error(
                at,
                format!("authentication method {first:?} with direct: true would put the password on the application's own connection; use scram-sha-256"),
            );
        } else if tls.is_some_and(|t| t.mode != TlsMode::VerifyFull) {
            cx.error(
                at,
                format!("authentication method {first:?} shows the password (or a hash as good as it) to whoever answers: it needs tls.mode verify-full"),
            );
        }
    }
    if auth.channel_binding == ChannelBindingMode::Require
        && tls.is_some_and(|t| matches!(t.mode, TlsMode::Disable | TlsMode::Prefer))
    {
        cx.error(
            entry.value.locate(&["channelBinding"]),
            "channelBinding require needs TLS to the target: tls.mode require, verify-ca or verify-full",
        );
    }
}

/// `direct: true` leaves the application's connection to the target, so both legs must be
/// plain text and the protocol one whose startup latch can take part in.
fn check_direct(
    cx: &mut Cx,
    at: Mark,
    protocol: Protocol,
    tls: Option<&TlsSpec>,
    app_tls: Option<AppTlsMode>,
) {
    if !registry::supports(protocol).is_some_and(|s| s.direct) {
        cx.error(
            at,
            format!(
                "direct applies to protocol {} only (not {protocol}); remove direct",
                registry::names_where(|s| s.direct)
            ),
        );
    } else if tls.is_some_and(|t| t.mode != TlsMode::Disable) {
        cx.error(
            at,
            "direct needs tls.mode disable: the application's own connection carries the \
             session, and it cannot speak TLS that latch negotiated"
                .to_string(),
        );
    } else if app_tls == Some(AppTlsMode::Enable) {
        cx.error(
            at,
            "direct cannot terminate TLS from the application; remove appTls or direct".to_string(),
        );
    }
}

/// Where errors about the spec as a whole point: its first key if any.
fn m_at(node: &Node, at: Mark) -> Mark {
    match &node.value {
        Value::Mapping(_) => at,
        _ => node.mark,
    }
}

fn destination(cx: &mut Cx, entry: &Entry) -> Option<Destination> {
    let mut m = Map::new(
        cx,
        &entry.value,
        entry.key_mark,
        "destination",
        &schema::DESTINATION,
    )?;
    let target = m.one_of(cx, &["host", "address", "cidr"], "target");
    let target = target.and_then(|(kind, e)| {
        let what = format!("destination.{kind}");
        let text = decode::string(cx, &e.value, &what)?;
        let parsed = match kind {
            "host" => net::host_name(&text).map(Target::Host),
            "address" => parse_address(&text).map(Target::Address),
            _ => text.parse::<Cidr>().map(Target::Cidr),
        };
        parsed
            .map_err(|reason| cx.error(e.value.mark, format!("invalid {kind} {text:?}: {reason}")))
            .ok()
    });
    let ports = match m.one_of(cx, &["port", "ports"], "port") {
        Some(("port", e)) => port(cx, &e.value, "destination.port").map(PortRange::single),
        Some((_, e)) => port_range(cx, e),
        None => None,
    };
    m.finish(cx);
    Some(Destination {
        target: target?,
        ports: ports?,
    })
}

fn parse_address(text: &str) -> Result<IpAddr, String> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse::<IpAddr>().map_err(|_| {
        if text.contains('/') {
            "not an IP address; for a network write `cidr:`".to_string()
        } else {
            "not an IPv4 or IPv6 address".to_string()
        }
    })
}

fn port(cx: &mut Cx, node: &Node, what: &str) -> Option<u16> {
    decode::integer(cx, node, what, 1, 65535).and_then(|p| u16::try_from(p).ok())
}

fn port_range(cx: &mut Cx, entry: &Entry) -> Option<PortRange> {
    let mut m = Map::new(
        cx,
        &entry.value,
        entry.key_mark,
        "destination.ports",
        &schema::PORT_RANGE,
    )?;
    let from = m
        .require(cx, "from")
        .and_then(|e| port(cx, &e.value, "destination.ports.from"));
    let to = m
        .require(cx, "to")
        .and_then(|e| port(cx, &e.value, "destination.ports.to"));
    m.finish(cx);
    let (from, to) = (from?, to?);
    let range = PortRange { from, to };
    if from > to {
        cx.error(
            entry.value.mark,
            format!("invalid port range {from}-{to}: from is greater than to"),
        );
        return None;
    }
    if range.len() > PortRange::MAX_LEN {
        cx.error(
            entry.value.mark,
            format!(
                "port range {range} has {} ports; at most {} are allowed (each port becomes a kernel map entry)",
                range.len(),
                PortRange::MAX_LEN
            ),
        );
        return None;
    }
    Some(range)
}

fn workloads(cx: &mut Cx, node: &Node) -> Option<Vec<WorkloadSelector>> {
    let items = decode::sequence(cx, node, "workloads")?;
    if items.is_empty() {
        cx.error(
            node.mark,
            "workloads is empty: list who may connect, or say `workloads: all` to admit every workload",
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match workload(cx, item, i) {
            Some(w) => out.push(w),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn workload(cx: &mut Cx, node: &Node, index: usize) -> Option<WorkloadSelector> {
    let what = format!("workloads[{index}]");
    let before = cx.errors.len();
    let mut m = Map::new(cx, node, node.mark, what.clone(), &schema::WORKLOAD)?;
    let mut w = WorkloadSelector::default();
    let id = |cx: &mut Cx, n: &Node, what: String| {
        decode::integer(cx, n, &what, 0, i64::from(u32::MAX)).and_then(|v| u32::try_from(v).ok())
    };
    w.uid = m.get("uid").and_then(|n| id(cx, n, format!("{what}.uid")));
    w.gid = m.get("gid").and_then(|n| id(cx, n, format!("{what}.gid")));
    if let Some(n) = m.get("cgroup") {
        w.cgroup =
            decode::string(cx, n, &format!("{what}.cgroup")).and_then(|c| match cgroup_path(&c) {
                Ok(c) => Some(c),
                Err(reason) => {
                    cx.error(n.mark, format!("invalid cgroup {c:?}: {reason}"));
                    None
                }
            });
    }
    w.exe = m
        .get("exe")
        .and_then(|n| decode::absolute_path(cx, n, &format!("{what}.exe")));
    if let Some(n) = m.get("comm") {
        w.comm = decode::string(cx, n, &format!("{what}.comm")).and_then(|c| {
            if c.len() > 15 {
                cx.error(
                    n.mark,
                    format!(
                        "comm {c:?} is {} bytes; the kernel keeps at most 15 bytes of a process name (did you mean {:?}?)",
                        c.len(),
                        truncate(&c, 15)
                    ),
                );
                None
            } else {
                Some(c)
            }
        });
    }
    w.namespace = m.string(cx, "namespace");
    w.service_account = m.string(cx, "serviceAccount");
    if let Some(n) = m.get("labels") {
        w.labels = decode::string_map(cx, n, &format!("{what}.labels"));
    }
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    if w == WorkloadSelector::default() {
        cx.error(
            node.mark,
            format!("{what} is empty: an entry needs at least one of uid, gid, cgroup, exe, comm, namespace, serviceAccount, labels"),
        );
        return None;
    }
    // A process names itself (prctl, exec of a renamed copy): comm alone admits anyone who
    // chooses that name.
    if w.comm.is_some() && w.uid.is_none() && w.cgroup.is_none() {
        cx.error(
            node.mark,
            format!("{what} admits by comm alone, which a process sets itself: name a uid or a cgroup in the same entry (comm then narrows it)"),
        );
        return None;
    }
    Some(w)
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn cgroup_path(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err("a cgroup path starts with '/' (relative to the cgroup v2 root)".to_string());
    }
    if text.split('/').any(|c| c == "." || c == "..") {
        return Err("'.' and '..' are not allowed".to_string());
    }
    if text.contains("//") {
        return Err("empty path component".to_string());
    }
    let trimmed = text.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

/// Decoded `credentials` (or a role's credentials, `what` naming where) with its cache ttl.
pub(super) fn credentials(
    cx: &mut Cx,
    entry: &Entry,
    what: &str,
) -> Option<(Credentials, Option<Duration>)> {
    let mut m = Map::new(cx, &entry.value, entry.key_mark, what, &schema::CREDENTIALS)?;
    let before = cx.errors.len();
    let cache_ttl = m.map(cx, "cache").and_then(|mut c| {
        let ttl = c.require(cx, "ttl").and_then(|e| {
            decode::duration(
                cx,
                &e.value,
                &format!("{what}.cache.ttl"),
                Duration::ZERO,
                MAX_CACHE_TTL,
            )
        });
        c.finish(cx);
        ttl
    });
    let dynamic = m.entry("dynamic");
    let store = m.entry("store");
    let username = m.entry("username");
    let password = m.entry("password");
    let result = if let Some(dynamic) = dynamic {
        for (name, e) in [
            ("store", store),
            ("username", username),
            ("password", password),
        ] {
            if let Some(e) = e {
                cx.error(
                    e.key_mark,
                    format!("{what}.{name} cannot be combined with {what}.dynamic (the dynamic engine returns both username and password)"),
                );
            }
        }
        let d = Map::new(
            cx,
            &dynamic.value,
            dynamic.key_mark,
            format!("{what}.dynamic"),
            &schema::DYNAMIC,
        );
        let result = d.and_then(|mut d| {
            let store = d.require_string(cx, "store");
            let path = d.require_string(cx, "path");
            d.finish(cx);
            Some(Credentials::Dynamic {
                store: store?,
                path: path?,
            })
        });
        m.finish(cx);
        result
    } else {
        let store_name = match store {
            Some(e) => decode::string(cx, &e.value, &format!("{what}.store")),
            None => {
                cx.error(
                    entry.key_mark,
                    format!("missing field \"store\" in {what} (or use {what}.dynamic)"),
                );
                None
            }
        };
        let default = store_name.as_deref().unwrap_or("");
        let username =
            username.and_then(|e| secret_ref(cx, e, &format!("{what}.username"), Some(default)));
        let password =
            password.and_then(|e| secret_ref(cx, e, &format!("{what}.password"), Some(default)));
        m.finish(cx);
        if username.is_none() && password.is_none() && cx.errors.len() == before {
            cx.error(
                entry.key_mark,
                format!("{what} needs username, password, or both (or dynamic)"),
            );
        }
        Some(Credentials::Static {
            store: store_name?,
            username,
            password,
        })
    };
    if cx.errors.len() > before {
        return None;
    }
    result.map(|c| (c, cache_ttl))
}

/// A secret reference's `namespace`: `fromPod`, the connecting pod's.
pub const SECRET_NAMESPACES: [(&str, bool); 1] = [("fromPod", true)];

/// `{store?, path, field?, version?, namespace?}`; `store` defaults to `default_store`.
pub(super) fn secret_ref(
    cx: &mut Cx,
    entry: &Entry,
    what: &str,
    default_store: Option<&str>,
) -> Option<SecretRef> {
    if let Value::Scalar { .. } = entry.value.value {
        cx.error(
            entry.value.mark,
            format!("{what} must be a secret reference such as {{path: orders-db, field: password}}; secret values are never written in a Policy"),
        );
        return None;
    }
    let before = cx.errors.len();
    let mut m = Map::new(
        cx,
        &entry.value,
        entry.key_mark,
        what.to_string(),
        &schema::SECRET_REF,
    )?;
    if let Some(v) = m.forbidden("value") {
        cx.error(
            v.key_mark,
            format!("{what}.value: secret values are never written in a Policy; put them in a SecretStore (a literal store for development)"),
        );
    }
    let store = match m.get("store") {
        Some(n) => decode::string(cx, n, &format!("{what}.store")),
        None => match default_store {
            Some(s) => Some(s.to_string()),
            None => {
                cx.error(entry.key_mark, format!("missing field \"store\" in {what} (credentials names no store to default to)"));
                None
            }
        },
    };
    let path = m.require_string(cx, "path");
    let field = m.string(cx, "field");
    let from_pod = match m.get("namespace") {
        Some(n) => decode::choice(cx, n, &format!("{what}.namespace"), &SECRET_NAMESPACES),
        None => Some(false),
    };
    if from_pod == Some(true)
        && let Some(p) = path.as_deref().filter(|p| p.contains('/'))
    {
        cx.error(
            m.at(),
            format!("{what}: path {p:?} names a namespace, and namespace: fromPod says the pod's; name the Secret alone"),
        );
    }
    let version = m.get("version").and_then(|n| match &n.value {
        Value::Scalar { text, .. } if !text.is_empty() => Some(text.clone()),
        _ => {
            cx.error(
                n.mark,
                format!(
                    "{what}.version must be a number or a string, found {}",
                    n.describe()
                ),
            );
            None
        }
    });
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    Some(SecretRef {
        store: store?,
        path: path?,
        field,
        version,
        from_pod: from_pod?,
    })
}

/// `appTls: {mode: auto | disable | enable}`.
pub(super) fn app_tls(cx: &mut Cx, entry: &Entry) -> Option<AppTlsMode> {
    let mut m = Map::new(cx, &entry.value, entry.key_mark, "appTls", &schema::APP_TLS)?;
    let mode = match m.require(cx, "mode") {
        Some(e) => decode::choice(cx, &e.value, "appTls mode", &AppTlsMode::ALL),
        None => None,
    };
    m.finish(cx);
    mode
}

/// `tls` as written; the mode is `None` when not given (defaulted by [`check_tls`]).
struct RawTls {
    mode: Option<(TlsMode, Mark)>,
    spec: TlsSpec,
}

fn tls(cx: &mut Cx, entry: &Entry, default_store: Option<&str>) -> Option<RawTls> {
    let mut m = Map::new(cx, &entry.value, entry.key_mark, "tls", &schema::TLS)?;
    let before = cx.errors.len();
    let mode = m
        .get("mode")
        .and_then(|n| decode::choice(cx, n, "tls mode", &TlsMode::ALL).map(|mode| (mode, n.mark)));
    let ca = m
        .get("ca")
        .and_then(|n| decode::absolute_path(cx, n, "tls.ca"));
    let server_name = m.get("serverName").and_then(|n| {
        let name = decode::string(cx, n, "tls.serverName")?;
        if name.parse::<IpAddr>().is_ok() {
            return Some(name);
        }
        net::host_name(&name)
            .map_err(|reason| {
                cx.error(n.mark, format!("invalid tls.serverName {name:?}: {reason}"))
            })
            .ok()
    });
    let client_cert = m
        .entry("clientCert")
        .and_then(|e| secret_ref(cx, e, "tls.clientCert", default_store));
    let client_key = m
        .entry("clientKey")
        .and_then(|e| secret_ref(cx, e, "tls.clientKey", default_store));
    match (m.entry("clientCert"), m.entry("clientKey")) {
        (Some(e), None) => cx.error(e.key_mark, "tls.clientCert needs tls.clientKey"),
        (None, Some(e)) => cx.error(e.key_mark, "tls.clientKey needs tls.clientCert"),
        _ => {}
    }
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    Some(RawTls {
        mode,
        spec: TlsSpec {
            mode: TlsMode::Disable,
            ca,
            server_name,
            client_cert,
            client_key,
        },
    })
}

/// The rules that tie `tls` to the protocol; fills in the default mode.
fn check_tls(cx: &mut Cx, raw: RawTls, protocol: Protocol, entry: &Entry) -> Option<TlsSpec> {
    let RawTls { mode, mut spec } = raw;
    let (mode, mode_mark) = mode.unwrap_or((protocol.default_tls_mode(), entry.key_mark));
    let before = cx.errors.len();
    let support = registry::supports(protocol);
    if support.is_some_and(|s| !s.target_tls) && mode != TlsMode::Disable {
        cx.error(
            mode_mark,
            format!("latch does not make TLS for protocol {protocol}, so tls mode {:?} would be ignored; remove tls (or set mode \"disable\")", mode.as_str()),
        );
    } else if protocol == Protocol::Ssh && mode != TlsMode::Disable {
        cx.error(
            mode_mark,
            "tls does not apply to protocol ssh (SSH has its own encryption); remove tls",
        );
    } else if mode == TlsMode::Prefer && !support.is_some_and(|s| s.negotiates_tls) {
        cx.error(
            mode_mark,
            format!("tls mode \"prefer\" needs a protocol that negotiates TLS ({}); for {protocol} use \"disable\", \"require\", \"verify-ca\" or \"verify-full\"", registry::names_where(|s| s.negotiates_tls)),
        );
    }
    if mode == TlsMode::Disable {
        let set: Vec<&str> = [
            ("ca", spec.ca.is_some()),
            ("serverName", spec.server_name.is_some()),
            ("clientCert", spec.client_cert.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| *name)
        .collect();
        if let Some(first) = set.first() {
            cx.error(
                entry.value.locate_key(&[first]),
                format!("tls.{first} has no effect with tls mode \"disable\"; set mode to \"require\", \"verify-ca\" or \"verify-full\""),
            );
        }
    }
    if cx.errors.len() > before {
        return None;
    }
    if matches!(protocol, Protocol::Postgres | Protocol::Mysql) && mode != TlsMode::VerifyFull {
        // How latch authenticates to a server nobody verified (threat model rows 16 and 32).
        let how = if protocol == Protocol::Postgres {
            "by SCRAM, which keeps the password from it"
        } else {
            "by challenge-response (mysql_native_password, caching_sha2_password's fast path, \
             client_ed25519), which does not send the password; the exchanges that would send \
             it are refused there, unless mysql.serverPublicKey opts in to RSA"
        };
        cx.warn(
            mode_mark,
            format!(
                "tls mode {:?} does not check who answers at the destination: latch authenticates \
                 to it all the same ({how}); use \"verify-full\" (the default) where the server \
                 has a certificate",
                mode.as_str()
            ),
        );
    }
    spec.mode = mode;
    Some(spec)
}

/// `"a"`, `"a" and "b"`, `"a", "b" and "c"`.
fn quoted_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
}
