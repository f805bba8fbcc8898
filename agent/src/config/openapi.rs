//! Structural OpenAPI v3 schemas from [`super::schema`]: what the CRDs of `Policy`,
//! `ClusterPolicy` and `SecretStore` say about their `spec` (see `crs::crd`).
//!
//! Structural, as Kubernetes requires of a CRD: every node has a type, no `$ref`, logical
//! junctors (`oneOf`, `allOf`) only carry `required`. Two shapes of the format cannot be said so:
//! a field with either of two shapes ([`Type::Either`]: `workloads: all` or a list) is left open
//! (`x-kubernetes-preserve-unknown-fields`), except an integer-or-string
//! (`x-kubernetes-int-or-string`); the agent's decoder checks both and reports the outcome in
//! `.status.conditions`.

use serde_json::{Map, Value, json};

use super::schema::{Field, Object, Type};

/// Which resources a schema is for: a namespaced resource's leaves out the fields the
/// decoder refuses there ([`Field::cluster_only`]), so the API server rejects them up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `ClusterPolicy`, and the file format: every field.
    Cluster,
    /// A namespaced `Policy`.
    Namespaced,
}

/// The schema of a mapping of the format, every field.
pub fn object(o: &Object) -> Value {
    object_in(o, Scope::Cluster)
}

/// The schema of a mapping of the format for resources of `scope`.
pub fn object_in(o: &Object, scope: Scope) -> Value {
    let fields: Vec<&Field> = o
        .fields
        .iter()
        .filter(|f| scope == Scope::Cluster || !f.cluster_only)
        .collect();
    let mut out = Map::new();
    out.insert("type".into(), "object".into());
    if !o.doc.is_empty() {
        out.insert("description".into(), o.doc.into());
    }
    if !fields.is_empty() {
        let properties: Map<String, Value> = fields
            .iter()
            .map(|f| (f.name.to_string(), field(f, scope)))
            .collect();
        out.insert("properties".into(), properties.into());
    }
    let required: Vec<&str> = fields
        .iter()
        .filter(|f| f.required)
        .map(|f| f.name)
        .collect();
    if !required.is_empty() {
        out.insert("required".into(), json!(required));
    }
    let groups: Vec<Value> = o.one_of.iter().map(|g| one_of(g)).collect();
    match groups.len() {
        0 => {}
        1 => {
            out.insert("oneOf".into(), groups[0]["oneOf"].clone());
        }
        _ => {
            out.insert("allOf".into(), groups.into());
        }
    }
    out.into()
}

/// Exactly one of `names`: `{oneOf: [{required: [a]}, {required: [b]}]}`.
fn one_of(names: &[&str]) -> Value {
    let choices: Vec<Value> = names.iter().map(|n| json!({"required": [n]})).collect();
    json!({ "oneOf": choices })
}

fn field(f: &Field, scope: Scope) -> Value {
    let mut v = of_type(&f.ty, scope);
    let mut doc = f.doc.to_string();
    if let Some((sibling, value)) = f.when {
        doc = format!("{doc} Read with {sibling}: {value}.")
            .trim()
            .to_string();
    }
    if let Some(m) = v.as_object_mut() {
        // The field's words first, then the type's own (an object's, an open field's shapes).
        let own = m.get("description").and_then(Value::as_str).unwrap_or("");
        let text = format!("{doc} {own}").trim().to_string();
        if !text.is_empty() {
            m.insert("description".into(), text.into());
        }
    }
    v
}

fn of_type(t: &Type, scope: Scope) -> Value {
    match t {
        Type::String => json!({"type": "string"}),
        Type::Integer { min, max } => {
            let mut v = json!({"type": "integer", "minimum": min, "maximum": max});
            if *max > i64::from(i32::MAX) {
                v["format"] = "int64".into();
            }
            v
        }
        Type::Boolean => json!({"type": "boolean"}),
        Type::Enum(values) => json!({"type": "string", "enum": values}),
        Type::Object(o) => object_in(o, scope),
        Type::List(item) => json!({"type": "array", "items": of_type(item, scope)}),
        Type::Map(value) => {
            json!({"type": "object", "additionalProperties": of_type(value, scope)})
        }
        Type::Either(Type::Integer { .. }, Type::String)
        | Type::Either(Type::String, Type::Integer { .. }) => json!({
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
        }),
        Type::Either(a, b) => json!({
            "x-kubernetes-preserve-unknown-fields": true,
            "description": format!("{} or {} (checked by the agent).", shape(a), shape(b)),
        }),
    }
}

/// How a description names a shape.
fn shape(t: &Type) -> String {
    match t {
        Type::String => "a string".into(),
        Type::Integer { .. } => "an integer".into(),
        Type::Boolean => "true or false".into(),
        Type::Enum(values) => values
            .iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(" or "),
        Type::Object(o) => format!("a {} mapping", o.name),
        Type::List(item) => format!("a list of {}", shape(item)),
        Type::Map(value) => format!("a mapping of names to {}", shape(value)),
        Type::Either(a, b) => format!("{} or {}", shape(a), shape(b)),
    }
}
