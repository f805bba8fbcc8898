//! The schema ([`super::schema`]) and the decoders agree, field by field.
//!
//! For every object reachable in `Policy.spec` and `SecretStore.spec`, and every field of it,
//! a document is generated that holds that field (with each sample value of its type) and an
//! unknown key `zz-unknown` beside it, and decoded by the real loader:
//!
//! - `zz-unknown` is reported: the decoder reached that mapping (else the test is not testing);
//! - the field is not reported unknown: the decoder reads every field the schema declares;
//! - a value of the declared type draws no type error, an enum's values are all accepted, and a
//!   wrong word is refused with exactly the schema's values as the expected ones;
//! - every field the schema calls required, when absent, is reported missing.
//!
//! The other direction (the decoder reads a field the schema does not declare, or requires one
//! the schema calls optional) is a debug assertion in `decode::Map`, which these documents and
//! every other config test run through.

use std::rc::Rc;

use super::load_str;
use super::schema::{Object, POLICY_SPEC, STORE_SPEC, Type};

/// A YAML tree to write: mappings and lists in block style, values in flow style.
#[derive(Clone)]
enum Doc {
    Map(Vec<(String, Doc)>),
    List(Vec<Doc>),
    Flow(String),
}

const TARGET: &str = "\u{0}target";
const UNKNOWN: &str = "zz-unknown";

/// Writes `doc` at `indent`; returns the 1-based line (counted from `first_line`) of the key
/// prefixed with [`TARGET`] (the prefix is not written).
fn emit(doc: &Doc, indent: usize, out: &mut String, target: &mut Option<usize>) {
    let pad = " ".repeat(indent);
    match doc {
        Doc::Map(entries) => {
            for (k, v) in entries {
                let key = match k.strip_prefix(TARGET) {
                    Some(k) => {
                        *target = Some(out.matches('\n').count() + 1);
                        k
                    }
                    None => k,
                };
                match v {
                    Doc::Flow(s) => out.push_str(&format!("{pad}{key}: {s}\n")),
                    nested => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        emit(nested, indent + 2, out, target);
                    }
                }
            }
        }
        Doc::List(items) => {
            for item in items {
                match item {
                    Doc::Flow(s) => out.push_str(&format!("{pad}- {s}\n")),
                    nested => {
                        out.push_str(&format!("{pad}-\n"));
                        emit(nested, indent + 2, out, target);
                    }
                }
            }
        }
        Doc::Flow(s) => out.push_str(&format!("{pad}{s}\n")),
    }
}

/// Sample values of a type, in flow style (an enum: each of its words).
fn samples(t: &Type) -> Vec<String> {
    match t {
        Type::String => vec!["x".into()],
        Type::Integer { min, .. } => vec![min.to_string()],
        Type::Boolean => vec!["true".into()],
        Type::Enum(values) => values.iter().map(|v| v.to_string()).collect(),
        Type::Object(_) => vec!["{}".into()],
        Type::List(item) => samples(item)
            .into_iter()
            .map(|s| format!("[{s}]"))
            .collect(),
        Type::Map(value) => samples(value)
            .into_iter()
            .map(|s| format!("{{k: {s}}}"))
            .collect(),
        Type::Either(a, b) => samples(a).into_iter().chain(samples(b)).collect(),
    }
}

/// The enum values a wrong word should be checked against (an enum, or a list of one).
fn enum_of(t: &Type) -> Option<(&'static [&'static str], bool)> {
    match t {
        Type::Enum(v) => Some((v, false)),
        Type::List(Type::Enum(v)) => Some((v, true)),
        _ => None,
    }
}

/// Wraps the entries of a mapping into the whole `spec` document.
type Wrap = Rc<dyn Fn(Vec<(String, Doc)>) -> Doc>;

struct Run {
    kind: &'static str,
    docs: usize,
    failures: Vec<String>,
}

impl Run {
    /// Decodes `spec` (with its target line) and returns the errors: (line, message).
    fn decode(&mut self, spec: &Doc) -> (String, Option<usize>, Vec<(usize, String)>) {
        let mut text = format!(
            "apiVersion: latch.dev/v1alpha1\nkind: {}\nmetadata:\n  name: t\nspec:\n",
            self.kind
        );
        let header = text.matches('\n').count();
        let mut body = String::new();
        let mut target = None;
        emit(spec, 2, &mut body, &mut target);
        text.push_str(&body);
        self.docs += 1;
        let errors = match load_str("t.yaml", &text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|d| (d.line, d.message.clone())).collect(),
        };
        (text, target.map(|t| t + header), errors)
    }

    fn visit(&mut self, o: &'static Object, wrap: Wrap) {
        for f in o.fields {
            let siblings: Vec<(String, Doc)> = f
                .when
                .iter()
                .map(|(k, v)| (k.to_string(), Doc::Flow(v.to_string())))
                .collect();
            let doc_with = |value: String| {
                let mut entries = siblings.clone();
                entries.push((format!("{TARGET}{}", f.name), Doc::Flow(value)));
                entries.push((UNKNOWN.to_string(), Doc::Flow("1".into())));
                wrap(entries)
            };
            for value in samples(&f.ty) {
                let (text, line, errors) = self.decode(&doc_with(value.clone()));
                let line = line.expect("target line");
                let at = format!("{}.{} = {value}", o.name, f.name);
                if !errors
                    .iter()
                    .any(|(_, m)| m.contains("unknown") && m.contains(UNKNOWN))
                {
                    self.failures.push(format!(
                        "{at}: the decoder never reached {} (no error for {UNKNOWN:?}):\n{text}{errors:?}",
                        o.name
                    ));
                    continue;
                }
                let quoted = format!("{:?}", f.name);
                for (l, m) in &errors {
                    if m.contains(UNKNOWN) {
                        continue;
                    }
                    if m.contains("unknown") && m.contains(&quoted) {
                        self.failures.push(format!(
                            "{at}: the schema declares it, the decoder does not read it: {m}"
                        ));
                    }
                    if *l == line && m.contains("must be") && m.contains(", found") {
                        self.failures.push(format!(
                            "{at}: a value of the schema's type is refused by the decoder: {m}"
                        ));
                    }
                    if *l == line
                        && enum_of(&f.ty).is_some()
                        && (m.contains("invalid") || m.contains("unknown"))
                        && m.contains(&format!("{:?}", value.trim_matches(['[', ']'])))
                    {
                        self.failures.push(format!(
                            "{at}: the schema's enum value is refused by the decoder: {m}"
                        ));
                    }
                }
                for r in o.fields.iter().filter(|r| r.required && r.name != f.name) {
                    let missing = format!("missing field {:?}", r.name);
                    if !errors.iter().any(|(_, m)| m.contains(&missing)) {
                        self.failures.push(format!(
                            "{at}: the schema requires {:?}, the decoder does not miss it: {errors:?}",
                            r.name
                        ));
                    }
                }
            }
            if let Some((values, list)) = enum_of(&f.ty) {
                let bad = if list { "[zz-bad]" } else { "zz-bad" };
                let (_, line, errors) = self.decode(&doc_with(bad.into()));
                let at = format!("{}.{}", o.name, f.name);
                match errors
                    .iter()
                    .find(|(l, m)| Some(*l) == line && m.contains("\"zz-bad\""))
                {
                    None => self.failures.push(format!(
                        "{at}: {bad} is outside the schema's enum and the decoder takes it: {errors:?}"
                    )),
                    Some((_, m)) => {
                        let expected = m.split("expected").nth(1).unwrap_or("");
                        let mut said: Vec<&str> = expected
                            .split('"')
                            .skip(1)
                            .step_by(2)
                            .take_while(|_| true)
                            .collect();
                        // A "did you mean" hint repeats a value.
                        said.sort();
                        said.dedup();
                        let mut schema: Vec<&str> = values.to_vec();
                        schema.sort();
                        if said != schema {
                            self.failures.push(format!(
                                "{at}: the decoder accepts {said:?}, the schema's enum is {schema:?}: {m}"
                            ));
                        }
                    }
                }
            }
            // Down into the objects this field holds.
            for (child, inner) in children(&f.ty) {
                let wrap = wrap.clone();
                let name = f.name.to_string();
                let siblings = siblings.clone();
                let inner: Place = inner;
                self.visit(
                    child,
                    Rc::new(move |entries| {
                        let mut outer = siblings.clone();
                        outer.push((name.clone(), inner(Doc::Map(entries))));
                        wrap(outer)
                    }),
                );
            }
        }
    }
}

/// How an object's mapping is placed in its field's value (as is, in a list, under a key).
type Place = Rc<dyn Fn(Doc) -> Doc>;

/// The objects a type holds, each with its [`Place`].
fn children(t: &Type) -> Vec<(&'static Object, Place)> {
    match t {
        Type::Object(o) => vec![(*o, Rc::new(|d| d))],
        Type::List(item) => children(item)
            .into_iter()
            .map(|(o, inner)| {
                let f: Place = Rc::new(move |d| Doc::List(vec![inner(d)]));
                (o, f)
            })
            .collect(),
        Type::Map(value) => children(value)
            .into_iter()
            .map(|(o, inner)| {
                let f: Place = Rc::new(move |d| Doc::Map(vec![("k".into(), inner(d))]));
                (o, f)
            })
            .collect(),
        Type::Either(a, b) => children(a).into_iter().chain(children(b)).collect(),
        _ => Vec::new(),
    }
}

fn check(kind: &'static str, root: &'static Object) -> usize {
    let mut run = Run {
        kind,
        docs: 0,
        failures: Vec::new(),
    };
    run.visit(root, Rc::new(Doc::Map));
    assert!(
        run.failures.is_empty(),
        "{} disagreements between the schema and the decoder of {kind}:\n{}",
        run.failures.len(),
        run.failures.join("\n\n")
    );
    run.docs
}

#[test]
fn the_policy_schema_and_decoder_agree_on_every_field() {
    let docs = check("Policy", &POLICY_SPEC);
    assert!(docs > 150, "only {docs} documents");
}

#[test]
fn the_store_schema_and_decoder_agree_on_every_field() {
    let docs = check("SecretStore", &STORE_SPEC);
    assert!(docs > 40, "only {docs} documents");
}

/// The check can fail: a schema with a field the decoder does not read, and an enum with a
/// value the decoder refuses, are both reported.
#[test]
fn a_schema_field_the_decoder_does_not_read_is_caught() {
    use super::schema::Field;
    static TLS_PLUS: Object = Object {
        name: "tls",
        doc: "",
        fields: &[
            Field::opt(
                "mode",
                Type::Enum(&["disable", "verify-full", "paranoid"]),
                "",
            ),
            Field::opt("pinnedKey", Type::String, ""),
        ],
        one_of: &[],
    };
    static SPEC: Object = Object {
        name: "spec",
        doc: "",
        fields: &[Field::opt("tls", Type::Object(&TLS_PLUS), "")],
        one_of: &[],
    };
    let mut run = Run {
        kind: "Policy",
        docs: 0,
        failures: Vec::new(),
    };
    run.visit(&SPEC, Rc::new(Doc::Map));
    let all = run.failures.join("\n");
    assert!(
        all.contains("tls.pinnedKey = x: the schema declares it, the decoder does not read it"),
        "{all}"
    );
    assert!(
        all.contains("tls.mode = paranoid: the schema's enum value is refused"),
        "{all}"
    );
    assert!(all.contains("tls.mode: the decoder accepts"), "{all}");
}
