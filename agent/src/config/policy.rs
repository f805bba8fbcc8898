//! The `Policy` resource: which destination, which workloads, which protocol, target TLS, which
//! credentials.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use latch_pg::startup_rules::{OptionsRule, StartupRules};

use super::diagnostic::Location;
use super::net::{Cidr, PortRange};

/// A validated `kind: Policy` document.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Where the document starts.
    pub source: Location,
    pub destination: Destination,
    /// Who may use this policy. Empty means every workload in the attached cgroups (the loader
    /// warns about that). Otherwise a connection is admitted when any one entry matches.
    pub workloads: Vec<WorkloadSelector>,
    pub protocol: Protocol,
    /// TLS from the broker to the target; `mode` is already defaulted for the protocol.
    pub tls: TlsSpec,
    /// TLS toward the application (`spec.appTls.mode`), with a certificate from the node-local CA.
    pub app_tls: AppTlsMode,
    /// `None` for `protocol: tcp`, and when the policy holds [`Policy::roles`] instead.
    pub credentials: Option<Credentials>,
    /// `postgres.roles` or `mysql.roles`: several credentials for one destination, selected by
    /// the user name the application asks for. Empty: `credentials` serves whatever user it names.
    pub roles: Vec<Role>,
    /// `postgres.databases` and `postgres.options`: what the application's StartupMessage may
    /// ask for.
    pub startup: StartupRules,
    /// How long fetched credentials may be reused (`credentials.cache.ttl`); `None`: fetch for
    /// every connection.
    pub cache_ttl: Option<Duration>,
    /// `spec.direct`: the application's own connection goes to the target and latch takes
    /// part in its startup only (postgres, plain text on both legs).
    pub direct: bool,
    /// `spec.authentication`: how latch may prove the credentials to the target.
    pub auth: AuthSpec,
    /// `mysql.serverPublicKey`: caching_sha2_password full authentication without TLS.
    pub server_public_key: ServerPublicKey,
    /// `mysql.keepSessions`: sessions the application ends with COM_QUIT are reset and kept
    /// for the workload's next connection (protocol mysql, relay mode; default true).
    pub keep_sessions: bool,
    /// `workloads: all`: the policy admits every workload in the intercepted cgroups, and says
    /// so. The agent refuses a policy that names no workloads and does not say this.
    pub admit_all: bool,
    /// `spec.http`: how the credentials go into requests (protocol http; the default
    /// otherwise).
    pub http: super::http::HttpSpec,
    /// Set on the copy admission makes of a policy whose references say `namespace: fromPod`,
    /// for a connection of a pod of this namespace ([`Policy::in_pod_namespace`]); `None` in
    /// a loaded policy.
    pub pod_namespace: Option<String>,
}

/// `mysql.serverPublicKey`: whether and with which key caching_sha2_password full
/// authentication (an account the server has not cached) may go over a leg without TLS, as
/// the password encrypted with the server's RSA key. Over TLS that verified the server
/// (`verify-full`) the password goes as it is and this is not used.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ServerPublicKey {
    /// Not at all (the default): such a connection fails.
    #[default]
    None,
    /// `request`: ask the server for its key (MySQL's `--get-server-public-key`). Nothing
    /// verifies the key: whoever answers in the server's place reads the password.
    Request,
    /// The server's RSA public key, a PEM file (read at each full authentication).
    File(std::path::PathBuf),
}

/// `spec.authentication` of a policy: the methods latch may answer a server's request with,
/// and channel binding. By default SCRAM-SHA-256 only: a method that shows the password (or a
/// hash as good as the password) to whoever answers is an explicit choice, and allowed only
/// toward a server verified with `tls.mode: verify-full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthSpec {
    pub scram: bool,
    pub md5: bool,
    /// `password`: the password itself (PostgreSQL's AuthenticationCleartextPassword).
    pub cleartext: bool,
    pub channel_binding: ChannelBindingMode,
}

impl Default for AuthSpec {
    fn default() -> Self {
        AuthSpec {
            scram: true,
            md5: false,
            cleartext: false,
            channel_binding: ChannelBindingMode::Prefer,
        }
    }
}

impl AuthSpec {
    /// Method names as written in `authentication.methods`.
    pub const METHODS: [&'static str; 3] = ["scram-sha-256", "md5", "password"];
}

/// `authentication.channelBinding`: `prefer` binds SCRAM to the TLS session when the server
/// offers SCRAM-SHA-256-PLUS; `require` refuses any other SCRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBindingMode {
    #[default]
    Prefer,
    Require,
}

impl ChannelBindingMode {
    pub const ALL: [(&'static str, ChannelBindingMode); 2] = [
        ("prefer", ChannelBindingMode::Prefer),
        ("require", ChannelBindingMode::Require),
    ];
}

impl Policy {
    /// Every credentials block: `credentials`, then each role's.
    pub fn credential_blocks(&self) -> impl Iterator<Item = &Credentials> {
        self.credentials
            .iter()
            .chain(self.roles.iter().map(|r| &r.credentials))
    }

    /// Whether a secret reference says `namespace: fromPod`: the Secret is read in the
    /// connecting pod's namespace (a `kubernetes` store; the loader checks that).
    pub fn reads_pod_namespace(&self) -> bool {
        self.secret_refs().any(|r| r.from_pod)
    }

    /// Every secret reference of the policy: credentials, roles, the TLS client certificate
    /// and key, the AWS session token of `http.aws`.
    pub fn secret_refs(&self) -> impl Iterator<Item = &SecretRef> {
        let creds = self.credential_blocks().flat_map(|c| match c {
            Credentials::Static {
                username, password, ..
            } => [username.as_ref(), password.as_ref()],
            Credentials::Dynamic { .. } => [None, None],
        });
        let session = match &self.http.inject {
            super::http::Injection::AwsSigV4(a) => a.session_token.as_ref(),
            _ => None,
        };
        creds
            .chain([
                self.tls.client_cert.as_ref(),
                self.tls.client_key.as_ref(),
                session,
            ])
            .flatten()
    }

    /// The policy as it serves a connection of a pod of `namespace`: each `fromPod`
    /// reference reads the Secret of that name in that namespace (`namespace/path`), and the
    /// credentials are cached per namespace. Only admission calls it, with the namespace the
    /// Kubernetes API gave for the connecting pod.
    pub fn in_pod_namespace(&self, namespace: &str) -> Policy {
        let mut p = self.clone();
        let pin = |r: &mut SecretRef| {
            if r.from_pod {
                r.path = format!("{namespace}/{}", r.path);
                r.from_pod = false;
            }
        };
        let blocks = p
            .credentials
            .iter_mut()
            .chain(p.roles.iter_mut().map(|r| &mut r.credentials));
        for c in blocks {
            if let Credentials::Static {
                username, password, ..
            } = c
            {
                username.iter_mut().chain(password.iter_mut()).for_each(pin);
            }
        }
        p.tls.client_cert.iter_mut().for_each(pin);
        p.tls.client_key.iter_mut().for_each(pin);
        if let super::http::Injection::AwsSigV4(a) = &mut p.http.inject {
            a.session_token.iter_mut().for_each(pin);
        }
        p.pod_namespace = Some(namespace.to_owned());
        p
    }

    /// Whether both legs can be plain TCP once the broker's handshake is done, so that the
    /// kernel may carry the application's sends straight to the target (the fast path). TLS
    /// the broker terminates or originates keeps every byte in user space.
    pub fn fast_path_eligible(&self) -> bool {
        crate::connector::registry::supports(self.protocol).is_some_and(|s| s.fast_path)
            && matches!(self.tls.mode, TlsMode::Disable | TlsMode::Prefer)
            && self.ssl_answer() == super::SslAnswer::Decline
    }
}

/// Where the application was connecting.
///
/// Two policies may not name the same target (equal host, equal address, or equal cidr, an
/// `address` counting as its /32 or /128) with overlapping ports; the loader rejects that. A
/// cidr nested inside a wider one is allowed: for a connection to an address, the most specific
/// match wins (an `address` beats any `cidr`, and a longer prefix beats a shorter one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub target: Target,
    pub ports: PortRange,
}

/// The address part of a [`Destination`]; see there for how overlapping targets are ranked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A DNS name, lowercased, without trailing dot; the agent resolves it to addresses.
    Host(String),
    Address(IpAddr),
    Cidr(Cidr),
}

impl Target {
    /// Whether a connection to `addr` falls under this target. A host never matches here: its
    /// addresses come from resolution, outside the configuration.
    pub fn contains(&self, addr: &IpAddr) -> bool {
        match self {
            Target::Host(_) => false,
            Target::Address(a) => a == addr,
            Target::Cidr(c) => c.contains(addr),
        }
    }

    /// The prefix length this target covers (32/128 for an address), for longest-prefix-match
    /// ranking; `None` for a host.
    pub fn prefix_len(&self) -> Option<u8> {
        match self {
            Target::Host(_) => None,
            Target::Address(a) => Some(Cidr::host(*a).prefix_len()),
            Target::Cidr(c) => Some(c.prefix_len()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host(h) => write!(f, "host {h}"),
            Target::Address(a) => write!(f, "address {a}"),
            Target::Cidr(c) => write!(f, "cidr {c}"),
        }
    }
}

/// One entry of `workloads`: it admits a connection when every field that is set matches.
/// At least one field is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadSelector {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A cgroup v2 path prefix, matched by whole path components: `/system.slice/orders.service`
    /// matches itself and `/system.slice/orders.service/child`, not `/system.slice/orders.service2`.
    /// Stored without a trailing `/`.
    pub cgroup: Option<String>,
    /// The absolute path of the executable.
    pub exe: Option<PathBuf>,
    /// The process name as the kernel keeps it (at most 15 bytes).
    pub comm: Option<String>,
    /// Kubernetes pod namespace (matched against the pod cache, see `crate::pods`).
    pub namespace: Option<String>,
    /// Kubernetes service account name.
    pub service_account: Option<String>,
    /// Kubernetes pod labels that must all be present with these values.
    pub labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether this entry uses Kubernetes fields, which need pod identity to match.
    pub fn uses_kubernetes(&self) -> bool {
        self.namespace.is_some() || self.service_account.is_some() || !self.labels.is_empty()
    }

    /// Whether `cgroup_path` is inside this entry's cgroup prefix (true when no prefix is set).
    pub fn cgroup_matches(&self, cgroup_path: &str) -> bool {
        match &self.cgroup {
            None => true,
            Some(prefix) if prefix == "/" => cgroup_path.starts_with('/'),
            Some(prefix) => cgroup_path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

/// The protocol the broker speaks with the application and the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Bytes only: no authentication by the broker (credentials optional, e.g. for TLS
    /// client certificates).
    Tcp,
    Postgres,
    Mysql,
    Http,
    Ssh,
}

impl Protocol {
    pub const ALL: [(&'static str, Protocol); 5] = [
        ("tcp", Protocol::Tcp),
        ("postgres", Protocol::Postgres),
        ("mysql", Protocol::Mysql),
        ("http", Protocol::Http),
        ("ssh", Protocol::Ssh),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
            Protocol::Mysql => "mysql",
            Protocol::Http => "http",
            Protocol::Ssh => "ssh",
        }
    }

    /// The TLS mode when a policy names none: `verify-full` for the protocols latch puts
    /// credentials into (postgres, mysql, http; plain text toward an HTTP target is an explicit
    /// `tls: {mode: disable}`), `disable` for the others (ssh has its own encryption; tcp
    /// relays the application's bytes as they are unless its policy has a `tls` block).
    pub fn default_tls_mode(self) -> TlsMode {
        match self {
            // Verify the server unless the policy says otherwise: a credential exchange with
            // whoever answers is what TLS without verification allows.
            Protocol::Postgres | Protocol::Mysql | Protocol::Http => TlsMode::VerifyFull,
            Protocol::Tcp | Protocol::Ssh => TlsMode::Disable,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TLS from the broker to the target, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// Plain text.
    Disable,
    /// TLS if the server offers it, else plain text (postgres and mysql only).
    Prefer,
    /// TLS, without checking the certificate.
    Require,
    /// TLS, certificate signed by the CA (`ca`, or the system roots).
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the target (`serverName`, or the host/address).
    VerifyFull,
}

impl TlsMode {
    pub const ALL: [(&'static str, TlsMode); 5] = [
        ("disable", TlsMode::Disable),
        ("prefer", TlsMode::Prefer),
        ("require", TlsMode::Require),
        ("verify-ca", TlsMode::VerifyCa),
        ("verify-full", TlsMode::VerifyFull),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the target's certificate chain is checked.
    pub fn verifies(self) -> bool {
        matches!(self, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `spec.postgres.appTls.mode`: whether latch accepts TLS from the application (answering
/// PostgreSQL's SSLRequest with 'S') and terminates it with a certificate for the original
/// destination, issued by the node-local CA. `auto` (the default) does so only when the leg to
/// the server is TLS that latch verifies (`tls.mode: verify-full`), so that TLS toward the
/// application never claims more than is true of the server leg; `enable` always; `disable`
/// never (the application is told 'N' and goes on in plain text, or gives up). The decision is
/// [`Policy::ssl_answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AppTlsMode {
    #[default]
    Auto,
    Disable,
    Enable,
}

impl AppTlsMode {
    pub const ALL: [(&'static str, AppTlsMode); 3] = [
        ("auto", AppTlsMode::Auto),
        ("disable", AppTlsMode::Disable),
        ("enable", AppTlsMode::Enable),
    ];
}

/// `spec.tls` of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    pub mode: TlsMode,
    /// PEM file of CA certificates; `None`: the system roots.
    pub ca: Option<PathBuf>,
    /// Name to verify and to send as SNI instead of the destination host.
    pub server_name: Option<String>,
    /// Client certificate and key (PEM), both or neither.
    pub client_cert: Option<SecretRef>,
    pub client_key: Option<SecretRef>,
}

/// A reference to one secret value in a store. Holds no secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SecretRef {
    /// The store's name; defaulted from `credentials.store` when the reference names none.
    pub store: String,
    /// The secret's path in the store (for Vault KV, including the mount unless the store sets
    /// `mount`).
    pub path: String,
    /// A key inside the secret; `None` when the secret is a single value.
    pub field: Option<String>,
    /// A specific version (Vault KV v2: a positive integer; AWS: a version id or stage).
    pub version: Option<String>,
    /// `namespace: fromPod`: `path` names a Secret of the connecting pod's namespace (a
    /// `kubernetes` store). Without it a reference never reads there.
    pub from_pod: bool,
}

/// One entry of `postgres.roles` or `mysql.roles`: the credentials latch logs in with when the application
/// asks for `user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The user name the application sends (PostgreSQL's StartupMessage, MySQL's
    /// HandshakeResponse41; case-sensitive).
    pub user: String,
    pub credentials: Credentials,
    /// `cache.ttl` of this role's credentials.
    pub cache_ttl: Option<Duration>,
}

/// `spec.credentials` of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Values read from a store. At least one of `username` and `password` is set. Without a
    /// `username`, the broker keeps the user name the application sent.
    Static {
        store: String,
        username: Option<SecretRef>,
        password: Option<SecretRef>,
    },
    /// A username/password pair minted by a dynamic-secrets engine (Vault/OpenBao), e.g.
    /// `database/creds/orders-rw`.
    Dynamic { store: String, path: String },
}

impl Credentials {
    /// Every store this credentials block reads from.
    pub fn stores(&self) -> Vec<&str> {
        match self {
            Credentials::Static {
                store,
                username,
                password,
            } => {
                let mut v = vec![store.as_str()];
                for r in [username, password].into_iter().flatten() {
                    if !v.contains(&r.store.as_str()) {
                        v.push(&r.store);
                    }
                }
                v
            }
            Credentials::Dynamic { store, .. } => vec![store.as_str()],
        }
    }
}
