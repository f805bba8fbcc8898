//! The one description of the file format's fields: per mapping, its field names, their types,
//! which are required, which form an "exactly one of" group. Two readers use it:
//!
//! - the decoders (`decode*.rs`): every [`super::decode::Map`] is opened with its [`Object`];
//!   asking it for a field the object does not declare, or `require`-ing one not declared
//!   required, is a bug caught by a debug assertion (every test runs with them);
//! - [`super::openapi`], which turns `Policy.spec` and `SecretStore.spec` into the structural
//!   OpenAPI v3 schemas of the CRDs (`latch crds`, `deploy/kubernetes/crds.yaml`).
//!
//! `schema_tests.rs` decodes, for every field of every object, a document that holds it (and
//! an unknown key beside it), so a field declared here that the decoder does not read, an enum
//! whose values differ from what the decoder accepts, or a required field the decoder does not
//! ask for fails a test. The semantic rules (ranges between fields, paths, URLs, the namespace
//! rule) stay in the decoders: the agent reports them in `.status.conditions`.

/// The type of a field's value.
#[derive(Debug, Clone, Copy)]
pub enum Type {
    /// A string (its form, when it has one, is in the field's description).
    String,
    /// An unquoted integer in `min..=max`.
    Integer {
        min: i64,
        max: i64,
    },
    Boolean,
    /// One of these words.
    Enum(&'static [&'static str]),
    Object(&'static Object),
    List(&'static Type),
    /// A mapping from names the user chooses (labels, role names, secret paths) to values.
    Map(&'static Type),
    /// Either shape (`workloads: all` or a list). YAML has no trouble with it; a structural
    /// OpenAPI schema cannot say it, so the CRD leaves the field open and the agent checks it.
    Either(&'static Type, &'static Type),
}

/// One field of an [`Object`].
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub ty: Type,
    pub required: bool,
    pub doc: &'static str,
    /// Read only when a sibling field has this value (`http` with `protocol: http`).
    pub when: Option<(&'static str, &'static str)>,
    /// Not for namespaced resources: the decoder refuses it in a namespaced `Policy`, and that
    /// CRD's schema leaves it out (`namespace: fromPod`, for `ClusterPolicy`s and files).
    pub cluster_only: bool,
}

impl Field {
    pub const fn opt(name: &'static str, ty: Type, doc: &'static str) -> Field {
        Field {
            name,
            ty,
            required: false,
            doc,
            when: None,
            cluster_only: false,
        }
    }

    pub const fn req(name: &'static str, ty: Type, doc: &'static str) -> Field {
        Field {
            required: true,
            ..Field::opt(name, ty, doc)
        }
    }

    pub const fn when(self, sibling: &'static str, value: &'static str) -> Field {
        Field {
            when: Some((sibling, value)),
            ..self
        }
    }

    /// Left out of the schemas of namespaced resources ([`Field::cluster_only`]).
    pub const fn cluster_only(self) -> Field {
        Field {
            cluster_only: true,
            ..self
        }
    }
}

/// A mapping of the format.
#[derive(Debug)]
pub struct Object {
    /// How documentation names it (`tls`, `vault.auth`).
    pub name: &'static str,
    pub doc: &'static str,
    pub fields: &'static [Field],
    /// Groups of which exactly one field must be given (a store's backend, a destination's
    /// target).
    pub one_of: &'static [&'static [&'static str]],
}

impl Object {
    pub fn field(&self, name: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// The names of a decoder's `(name, value)` table, for [`Type::Enum`]: the schema's enum is the
/// decoder's own list.
pub const fn names<T: Copy, const N: usize>(all: &[(&'static str, T); N]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = all[i].0;
        i += 1;
    }
    out
}

pub use super::schema_policy::POLICY_SPEC;
pub use super::schema_store::STORE_SPEC;

/// The envelope of a file's documents (a custom resource's is Kubernetes' own).
pub static DOCUMENT: Object = Object {
    name: "document",
    doc: "A resource of a policy file.",
    fields: &[
        Field::req("apiVersion", Type::String, "latch.dev/v1alpha1"),
        Field::req("kind", Type::String, "Policy or SecretStore"),
        Field::req("metadata", Type::Object(&METADATA), ""),
        // Its type depends on `kind`: the decoder opens it with POLICY_SPEC or STORE_SPEC
        // (this envelope is not part of any CRD; only its field names are checked).
        Field::req(
            "spec",
            Type::Object(&POLICY_SPEC),
            "POLICY_SPEC or STORE_SPEC, by kind",
        ),
    ],
    one_of: &[],
};

pub static METADATA: Object = Object {
    name: "metadata",
    doc: "",
    fields: &[
        Field::req("name", Type::String, ""),
        Field::opt("labels", Type::Map(&Type::String), ""),
        Field::opt("annotations", Type::Map(&Type::String), ""),
    ],
    one_of: &[],
};
