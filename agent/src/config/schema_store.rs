//! The fields of `SecretStore.spec` (see [`super::schema`]; decoded by `decode_store.rs`).

use super::schema::{Field, Object, Type};
use super::store::StoreBackend;

const BACKENDS: &[&str] = &StoreBackend::KINDS;
const PATH: &str = "An absolute path.";

pub static STORE_SPEC: Object = Object {
    name: "spec",
    doc: "Where secrets come from: exactly one backend.",
    fields: &[
        Field::opt("file", Type::Object(&FILE), "A local YAML file."),
        Field::opt(
            "env",
            Type::Object(&ENV),
            "The agent's environment variables.",
        ),
        Field::opt(
            "exec",
            Type::Object(&EXEC),
            "A command that prints the secret.",
        ),
        Field::opt(
            "literal",
            Type::Object(&LITERAL),
            "Values written here (development only).",
        ),
        Field::opt("vault", Type::Object(&VAULT), "HashiCorp Vault or OpenBao."),
        Field::opt("aws", Type::Object(&AWS), "AWS Secrets Manager."),
        Field::opt(
            "kubernetes",
            Type::Object(&KUBERNETES),
            "Kubernetes Secrets.",
        ),
    ],
    one_of: &[BACKENDS],
};

pub(super) static FILE: Object = Object {
    name: "file",
    doc: "",
    fields: &[Field::req("path", Type::String, PATH)],
    one_of: &[],
};

pub(super) static ENV: Object = Object {
    name: "env",
    doc: "",
    fields: &[Field::opt(
        "prefix",
        Type::String,
        "Prepended to a reference's path to name the variable.",
    )],
    one_of: &[],
};

pub(super) static EXEC: Object = Object {
    name: "exec",
    doc: "",
    fields: &[
        Field::req(
            "command",
            Type::List(&Type::String),
            "The program (an absolute path) and its arguments.",
        ),
        Field::opt("timeout", Type::String, "e.g. 5s (at most 5m)."),
    ],
    one_of: &[],
};

pub(super) static LITERAL: Object = Object {
    name: "literal",
    doc: "",
    fields: &[Field::req(
        "values",
        Type::Map(&Type::Either(&Type::String, &Type::Map(&Type::String))),
        "Path to a value, or to a mapping of fields.",
    )],
    one_of: &[],
};

pub(super) static VAULT: Object = Object {
    name: "vault",
    doc: "",
    fields: &[
        Field::req("address", Type::String, "https://..."),
        Field::opt("insecure", Type::Boolean, "Allow a plain http address."),
        Field::opt("namespace", Type::String, ""),
        Field::opt("mount", Type::String, "The KV engine's mount."),
        Field::opt("kvVersion", Type::Integer { min: 1, max: 2 }, ""),
        Field::opt("tls", Type::Object(&VAULT_TLS), ""),
        Field::req("auth", Type::Object(&VAULT_AUTH), ""),
        Field::opt(
            "revokeOnShutdown",
            Type::Boolean,
            "Revoke the agent's token when it stops.",
        ),
    ],
    one_of: &[],
};

pub(super) static VAULT_TLS: Object = Object {
    name: "vault.tls",
    doc: "",
    fields: &[
        Field::opt("ca", Type::String, PATH),
        Field::opt("serverName", Type::String, ""),
    ],
    one_of: &[],
};

pub(super) static VAULT_AUTH: Object = Object {
    name: "vault.auth",
    doc: "Exactly one login method.",
    fields: &[
        Field::opt("token", Type::Object(&CREDENTIAL_SOURCE), ""),
        Field::opt("appRole", Type::Object(&APP_ROLE), ""),
        Field::opt("kubernetes", Type::Object(&VAULT_KUBERNETES), ""),
        Field::opt("jwt", Type::Object(&VAULT_JWT), ""),
        Field::opt("cert", Type::Object(&VAULT_CERT), ""),
        Field::opt("aws", Type::Object(&VAULT_AWS), ""),
    ],
    one_of: &[&["token", "appRole", "kubernetes", "jwt", "cert", "aws"]],
};

pub(super) static CREDENTIAL_SOURCE: Object = Object {
    name: "credential source",
    doc: "Where the agent reads a credential of its own: a file or an environment variable.",
    fields: &[
        Field::opt("file", Type::String, PATH),
        Field::opt("env", Type::String, ""),
    ],
    one_of: &[&["file", "env"]],
};

pub(super) static APP_ROLE: Object = Object {
    name: "vault.auth.appRole",
    doc: "",
    fields: &[
        Field::req("roleId", Type::Object(&ROLE_ID), ""),
        Field::req("secretId", Type::Object(&CREDENTIAL_SOURCE), ""),
        Field::opt("mount", Type::String, ""),
    ],
    one_of: &[],
};

pub(super) static ROLE_ID: Object = Object {
    name: "vault.auth.appRole.roleId",
    doc: "",
    fields: &[
        Field::opt("file", Type::String, PATH),
        Field::opt("env", Type::String, ""),
        Field::opt("value", Type::String, "A role id is not a secret."),
    ],
    one_of: &[&["file", "env", "value"]],
};

pub(super) static VAULT_KUBERNETES: Object = Object {
    name: "vault.auth.kubernetes",
    doc: "",
    fields: &[
        Field::req("role", Type::String, ""),
        Field::opt("tokenFile", Type::String, PATH),
        Field::opt("mount", Type::String, ""),
    ],
    one_of: &[],
};

pub(super) static VAULT_JWT: Object = Object {
    name: "vault.auth.jwt",
    doc: "",
    fields: &[
        Field::req("role", Type::String, ""),
        Field::req("tokenFile", Type::String, PATH),
        Field::opt("mount", Type::String, ""),
    ],
    one_of: &[],
};

pub(super) static VAULT_CERT: Object = Object {
    name: "vault.auth.cert",
    doc: "",
    fields: &[
        Field::req("certFile", Type::String, PATH),
        Field::req("keyFile", Type::String, PATH),
        Field::opt("role", Type::String, ""),
        Field::opt("mount", Type::String, ""),
    ],
    one_of: &[],
};

pub(super) static VAULT_AWS: Object = Object {
    name: "vault.auth.aws",
    doc: "",
    fields: &[
        Field::req("role", Type::String, ""),
        Field::opt("mount", Type::String, ""),
        Field::opt("region", Type::String, ""),
        Field::opt("stsEndpoint", Type::String, ""),
        Field::opt("serverId", Type::String, ""),
    ],
    one_of: &[],
};

pub(super) static AWS: Object = Object {
    name: "aws",
    doc: "",
    fields: &[
        Field::req("region", Type::String, ""),
        Field::opt("endpoint", Type::String, ""),
        Field::opt("insecure", Type::Boolean, "Allow a plain http endpoint."),
        Field::opt("auth", Type::Object(&AWS_AUTH), ""),
    ],
    one_of: &[],
};

pub(super) static EMPTY: Object = Object {
    name: "{}",
    doc: "",
    fields: &[],
    one_of: &[],
};

pub(super) static AWS_AUTH: Object = Object {
    name: "aws.auth",
    doc: "One credential provider (default: the SDKs' chain).",
    fields: &[
        Field::opt("env", Type::Object(&EMPTY), ""),
        Field::opt("profile", Type::String, ""),
        Field::opt("webIdentity", Type::Object(&WEB_IDENTITY), ""),
        Field::opt("instance", Type::Object(&EMPTY), ""),
        Field::opt("container", Type::Object(&EMPTY), ""),
    ],
    one_of: &[&["env", "profile", "webIdentity", "instance", "container"]],
};

pub(super) static WEB_IDENTITY: Object = Object {
    name: "aws.auth.webIdentity",
    doc: "",
    fields: &[
        Field::req("roleArn", Type::String, ""),
        Field::req("tokenFile", Type::String, PATH),
    ],
    one_of: &[],
};

pub(super) static KUBERNETES: Object = Object {
    name: "kubernetes",
    doc: "",
    fields: &[
        Field::opt(
            "namespace",
            Type::String,
            "The namespace of Secrets a reference names without one.",
        ),
        Field::opt("apiServer", Type::String, "Default: in-cluster."),
        Field::opt("insecure", Type::Boolean, "Allow a plain http apiServer."),
        Field::opt("tokenFile", Type::String, PATH),
        Field::opt("caFile", Type::String, PATH),
    ],
    one_of: &[],
};
