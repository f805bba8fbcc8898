//! The fields of `Policy.spec` (see [`super::schema`]; decoded by `decode_policy.rs`,
//! `decode_http.rs`, `decode_pg_startup.rs`).

use super::decode_http::PAYLOADS;
use super::decode_policy;
use super::http::{AppCredentials, Injection};
use super::policy::{AppTlsMode, AuthSpec, ChannelBindingMode, Protocol, TlsMode};
use super::schema::{Field, Object, Type, names};

const PROTOCOLS: [&str; 5] = names(&Protocol::ALL);
const TLS_MODES: [&str; 5] = names(&TlsMode::ALL);
const APP_TLS_MODES: [&str; 3] = names(&AppTlsMode::ALL);
const CHANNEL_BINDING: [&str; 2] = names(&ChannelBindingMode::ALL);
const APP_CREDENTIALS: [&str; 2] = names(&AppCredentials::ALL);
const PAYLOAD: [&str; 2] = names(&PAYLOADS);
const SECRET_NAMESPACES: [&str; 1] = names(&decode_policy::SECRET_NAMESPACES);
const PORT: Type = Type::Integer { min: 1, max: 65535 };
const ID: Type = Type::Integer {
    min: 0,
    max: u32::MAX as i64,
};

pub static POLICY_SPEC: Object = Object {
    name: "spec",
    doc: "Which connections latch brokers, for which workloads, with which credentials.",
    fields: &[
        Field::opt(
            "protocol",
            Type::Enum(&PROTOCOLS),
            "What latch speaks to the target (default tcp).",
        ),
        Field::req(
            "destination",
            Type::Object(&DESTINATION),
            "The connections this policy takes: a host, address or network and a port or range.",
        ),
        Field::opt(
            "workloads",
            Type::Either(&Type::Enum(&["all"]), &Type::List(&Type::Object(&WORKLOAD))),
            "Who may connect: `all`, or a list of selectors (an entry admits a workload that \
             matches every field it gives).",
        ),
        Field::opt(
            "credentials",
            Type::Object(&CREDENTIALS),
            "The credentials latch presents to the target.",
        ),
        Field::opt(
            "tls",
            Type::Object(&TLS),
            "The leg from latch to the target.",
        ),
        Field::opt(
            "postgres",
            Type::Object(&POSTGRES),
            "PostgreSQL options (protocol postgres).",
        )
        .when("protocol", "postgres"),
        Field::opt(
            "mysql",
            Type::Object(&MYSQL),
            "MySQL options (protocol mysql).",
        )
        .when("protocol", "mysql"),
        Field::opt("http", Type::Object(&HTTP), "HTTP options (protocol http).")
            .when("protocol", "http"),
        Field::opt(
            "appTls",
            Type::Object(&APP_TLS),
            "Deprecated: write it under postgres (or mysql).",
        ),
        Field::opt(
            "authentication",
            Type::Object(&AUTHENTICATION),
            "Deprecated: write it under postgres.",
        ),
        Field::opt(
            "direct",
            Type::Boolean,
            "Deprecated: write it under postgres (or mysql).",
        ),
    ],
    one_of: &[],
};

pub(super) static DESTINATION: Object = Object {
    name: "destination",
    doc: "One of host, address, cidr; one of port, ports.",
    fields: &[
        Field::opt("host", Type::String, "A DNS name, resolved by the agent."),
        Field::opt("address", Type::String, "An IPv4 or IPv6 address."),
        Field::opt("cidr", Type::String, "A network, e.g. 10.0.0.0/24."),
        Field::opt("port", PORT, ""),
        Field::opt("ports", Type::Object(&PORT_RANGE), ""),
    ],
    one_of: &[&["host", "address", "cidr"], &["port", "ports"]],
};

pub(super) static PORT_RANGE: Object = Object {
    name: "destination.ports",
    doc: "A range of ports, both ends included (at most 1024).",
    fields: &[Field::req("from", PORT, ""), Field::req("to", PORT, "")],
    one_of: &[],
};

pub(super) static WORKLOAD: Object = Object {
    name: "workloads[]",
    doc: "A workload selector: every field given must match.",
    fields: &[
        Field::opt("uid", ID, ""),
        Field::opt("gid", ID, ""),
        Field::opt(
            "cgroup",
            Type::String,
            "A cgroup path under the cgroup v2 root, or a parent of it.",
        ),
        Field::opt("exe", Type::String, "An absolute path of the executable."),
        Field::opt(
            "comm",
            Type::String,
            "The process name (at most 15 bytes; needs uid or cgroup beside it).",
        ),
        Field::opt("namespace", Type::String, "The pod's Kubernetes namespace."),
        Field::opt("serviceAccount", Type::String, "The pod's service account."),
        Field::opt(
            "labels",
            Type::Map(&Type::String),
            "Labels the pod must carry.",
        ),
    ],
    one_of: &[],
};

pub(super) static CREDENTIALS: Object = Object {
    name: "credentials",
    doc: "store with username and/or password, or dynamic.",
    fields: &[
        Field::opt("cache", Type::Object(&CACHE), ""),
        Field::opt(
            "dynamic",
            Type::Object(&DYNAMIC),
            "A dynamic-secrets engine that returns a username and a password.",
        ),
        Field::opt(
            "store",
            Type::String,
            "The SecretStore the references read by default.",
        ),
        Field::opt("username", Type::Object(&SECRET_REF), ""),
        Field::opt("password", Type::Object(&SECRET_REF), ""),
    ],
    one_of: &[],
};

pub(super) static CACHE: Object = Object {
    name: "credentials.cache",
    doc: "",
    fields: &[Field::req(
        "ttl",
        Type::String,
        "How long resolved credentials are kept, e.g. 5m (at most 24h).",
    )],
    one_of: &[],
};

pub(super) static DYNAMIC: Object = Object {
    name: "credentials.dynamic",
    doc: "",
    fields: &[
        Field::req("store", Type::String, ""),
        Field::req("path", Type::String, ""),
    ],
    one_of: &[],
};

pub(super) static SECRET_REF: Object = Object {
    name: "secret reference",
    doc: "A secret in a store: path, and optionally field, version, store.",
    fields: &[
        Field::opt("store", Type::String, "Defaults to credentials.store."),
        Field::req("path", Type::String, ""),
        Field::opt("field", Type::String, ""),
        Field::opt(
            "namespace",
            Type::Enum(&SECRET_NAMESPACES),
            "fromPod: the Secret named by path is in the connecting pod's namespace (a \
             kubernetes store; a pod whose namespace latch does not know gets nothing). \
             ClusterPolicies and files only: a namespaced Policy reads its own namespace's.",
        )
        .cluster_only(),
        Field::opt(
            "version",
            Type::Either(
                &Type::Integer {
                    min: 0,
                    max: i64::MAX,
                },
                &Type::String,
            ),
            "",
        ),
    ],
    one_of: &[],
};

pub(super) static TLS: Object = Object {
    name: "tls",
    doc: "",
    fields: &[
        Field::opt("mode", Type::Enum(&TLS_MODES), ""),
        Field::opt("ca", Type::String, "An absolute path of a PEM file."),
        Field::opt("serverName", Type::String, ""),
        Field::opt("clientCert", Type::Object(&SECRET_REF), ""),
        Field::opt("clientKey", Type::Object(&SECRET_REF), ""),
    ],
    one_of: &[],
};

pub(super) static APP_TLS: Object = Object {
    name: "appTls",
    doc: "TLS toward the application, from the node-local CA.",
    fields: &[Field::req("mode", Type::Enum(&APP_TLS_MODES), "")],
    one_of: &[],
};

pub(super) static AUTHENTICATION: Object = Object {
    name: "authentication",
    doc: "",
    fields: &[
        Field::opt("methods", Type::List(&Type::Enum(&AuthSpec::METHODS)), ""),
        Field::opt("channelBinding", Type::Enum(&CHANNEL_BINDING), ""),
    ],
    one_of: &[],
};

pub(super) static ROLES: Type = Type::Map(&Type::Object(&CREDENTIALS));

pub(super) static POSTGRES: Object = Object {
    name: "postgres",
    doc: "",
    fields: &[
        Field::opt("appTls", Type::Object(&APP_TLS), ""),
        Field::opt("authentication", Type::Object(&AUTHENTICATION), ""),
        Field::opt(
            "direct",
            Type::Boolean,
            "Leave the session on the application's own connection after authentication.",
        ),
        Field::opt(
            "roles",
            ROLES,
            "Credentials by the user name the application sends.",
        ),
        Field::opt(
            "databases",
            Type::List(&Type::String),
            "The databases the application may ask for.",
        ),
        Field::opt(
            "options",
            Type::Either(&Type::Enum(&["pass", "refuse"]), &Type::List(&Type::String)),
            "The startup options the application may set: pass, refuse, or a list of names.",
        ),
    ],
    one_of: &[],
};

pub(super) static MYSQL: Object = Object {
    name: "mysql",
    doc: "",
    fields: &[
        Field::opt("appTls", Type::Object(&APP_TLS), ""),
        Field::opt(
            "authentication",
            Type::Object(&AUTHENTICATION),
            "Refused: postgres only.",
        ),
        Field::opt(
            "direct",
            Type::Boolean,
            "Leave the session on the application's own connection after authentication.",
        ),
        Field::opt(
            "keepSessions",
            Type::Boolean,
            "Keep a session the application ended with COM_QUIT, reset, for the workload's next \
             connection (default true).",
        ),
        Field::opt(
            "roles",
            ROLES,
            "Credentials by the user name the application sends.",
        ),
        Field::opt(
            "serverPublicKey",
            Type::String,
            "caching_sha2_password full authentication without TLS: the absolute path of the \
             server's RSA public key (PEM), or \"request\" to ask the server for it (unverified).",
        ),
    ],
    one_of: &[],
};

pub(super) static HTTP: Object = Object {
    name: "http",
    doc: "",
    fields: &[
        Field::opt("inject", Type::Enum(&Injection::NAMES), ""),
        Field::opt(
            "header",
            Type::String,
            "\"Name: template\" with {secret} and/or {username}.",
        ),
        Field::opt("query", Type::String, "A query parameter's name."),
        Field::opt("aws", Type::Object(&HTTP_AWS), ""),
        Field::opt("appCredentials", Type::Enum(&APP_CREDENTIALS), ""),
        Field::opt("targetPort", PORT, ""),
        Field::opt("host", Type::String, "The Host header toward the target."),
        Field::opt("appTls", Type::Object(&APP_TLS), "HTTPS interception."),
    ],
    one_of: &[],
};

pub(super) static HTTP_AWS: Object = Object {
    name: "http.aws",
    doc: "AWS Signature Version 4.",
    fields: &[
        Field::req("service", Type::String, ""),
        Field::req("region", Type::String, ""),
        Field::opt("sessionToken", Type::Object(&SECRET_REF), ""),
        Field::opt("payload", Type::Enum(&PAYLOAD), ""),
    ],
    one_of: &[],
};
