//! Reading typed values out of the located YAML tree, collecting every error on the way.
//!
//! Decoders never stop at the first problem: each helper reports what is wrong to the [`Cx`] and
//! returns `None`, and callers carry on with the other fields.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::diagnostic::{Diagnostic, Location};
use super::schema::{Object, Type};
use super::suggest;
use super::yaml::{Entry, Mark, Node, Value};

/// The decoding context of one file: its name and the diagnostics found so far.
pub struct Cx {
    pub file: PathBuf,
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Cx {
    pub fn new(file: &Path) -> Cx {
        Cx {
            file: file.to_path_buf(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn location(&self, mark: Mark) -> Location {
        Location::new(self.file.clone(), mark.line, mark.column)
    }

    pub fn error(&mut self, mark: Mark, message: impl Into<String>) {
        let d = Diagnostic::new(&self.location(mark), message);
        self.errors.push(d);
    }

    pub fn warn(&mut self, mark: Mark, message: impl Into<String>) {
        let d = Diagnostic::new(&self.location(mark), message);
        self.warnings.push(d);
    }
}

/// A mapping being read, described by its [`Object`] of the schema. Every key asked for becomes
/// a known key; [`Map::finish`] reports the others as unknown, with a suggestion among the known
/// ones. Asking for a key the object does not declare is a decoder bug (a debug assertion): the
/// schema is what the CRDs are generated from, so the two cannot drift apart.
pub struct Map<'n> {
    schema: &'static Object,
    entries: &'n [Entry],
    /// Where "missing field" errors point: the key that holds this mapping.
    at: Mark,
    /// Human path of this mapping, e.g. `credentials` or `workloads[1]`.
    pub what: String,
    known: Vec<&'static str>,
}

impl<'n> Map<'n> {
    /// Opens `node` as a mapping. `null` reads as an empty mapping (`env:` alone is `env: {}`).
    pub fn new(
        cx: &mut Cx,
        node: &'n Node,
        at: Mark,
        what: impl Into<String>,
        schema: &'static Object,
    ) -> Option<Map<'n>> {
        let what = what.into();
        let entries: &'n [Entry] = match &node.value {
            Value::Mapping(entries) => entries,
            Value::Null => &[],
            _ => {
                cx.error(
                    node.mark,
                    format!("{what} must be a mapping, found {}", node.describe()),
                );
                return None;
            }
        };
        Some(Map {
            schema,
            entries,
            at,
            what,
            known: Vec::new(),
        })
    }

    /// The human path of a field of this mapping.
    pub fn path(&self, key: &str) -> String {
        if self.what.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.what)
        }
    }

    /// Where this mapping's holder is (for errors about the mapping as a whole).
    pub fn at(&self) -> Mark {
        self.at
    }

    /// The entry for `key`, unless absent or null.
    pub fn entry(&mut self, key: &'static str) -> Option<&'n Entry> {
        self.declared(key);
        self.forbidden(key)
    }

    /// The entry for a key the format names only to refuse it with a better message than
    /// "unknown field" (`value:` where a secret would be written): not in the schema.
    pub fn forbidden(&mut self, key: &'static str) -> Option<&'n Entry> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        self.entries
            .iter()
            .find(|e| e.key == key && !e.value.is_null())
    }

    pub fn get(&mut self, key: &'static str) -> Option<&'n Node> {
        self.entry(key).map(|e| &e.value)
    }

    /// Like [`Map::entry`], reporting `missing field "key" in what` when absent.
    pub fn require(&mut self, cx: &mut Cx, key: &'static str) -> Option<&'n Entry> {
        debug_assert!(
            self.schema.field(key).is_none_or(|f| f.required),
            "the decoder requires {key:?} in {}, which the schema declares optional",
            self.schema.name
        );
        let entry = self.entry(key);
        if entry.is_none() {
            let explicit_null = self.entries.iter().find(|e| e.key == key);
            match explicit_null {
                Some(e) => cx.error(e.key_mark, format!("{} needs a value", self.path(key))),
                None => cx.error(
                    self.at,
                    format!("missing field {key:?} in {}", self.what_or_spec()),
                ),
            }
        }
        entry
    }

    fn what_or_spec(&self) -> &str {
        if self.what.is_empty() {
            "spec"
        } else {
            &self.what
        }
    }

    /// An optional string field.
    pub fn string(&mut self, cx: &mut Cx, key: &'static str) -> Option<String> {
        let path = self.path(key);
        self.get(key).and_then(|n| string(cx, n, &path))
    }

    /// A required, non-empty string field.
    pub fn require_string(&mut self, cx: &mut Cx, key: &'static str) -> Option<String> {
        let path = self.path(key);
        self.require(cx, key)
            .and_then(|e| string(cx, &e.value, &path))
    }

    /// An optional child mapping, described by the field's object in the schema.
    pub fn map(&mut self, cx: &mut Cx, key: &'static str) -> Option<Map<'n>> {
        let path = self.path(key);
        let entry = self.entry(key)?;
        let schema = self.child(key);
        Map::new(cx, &entry.value, entry.key_mark, path, schema)
    }

    /// The schema object of field `key` (a decoder bug if the field is not an object).
    pub fn child(&self, key: &str) -> &'static Object {
        match self.schema.field(key).map(|f| f.ty) {
            Some(Type::Object(o)) => o,
            other => panic!(
                "the decoder reads {key:?} of {} as a mapping; the schema says {other:?}",
                self.schema.name
            ),
        }
    }

    /// Asserts (in debug builds) that the schema declares `key`.
    fn declared(&self, key: &str) {
        debug_assert!(
            self.schema.field(key).is_some(),
            "the decoder reads {key:?} in {}, which the schema does not declare",
            self.schema.name
        );
    }

    /// Which of `choices` are present (non-null), in source order.
    pub fn present(&mut self, choices: &[&'static str]) -> Vec<(&'static str, &'n Entry)> {
        for c in choices {
            self.declared(c);
            if !self.known.contains(c) {
                self.known.push(c);
            }
        }
        // A null value still names the choice (`env:` alone means `env: {}`).
        let entries = self.entries;
        let mut found: Vec<(&'static str, &'n Entry)> = choices
            .iter()
            .filter_map(|c| entries.iter().find(|e| e.key == *c).map(|e| (*c, e)))
            .collect();
        found.sort_by_key(|(_, e)| e.key_mark);
        found
    }

    /// Exactly one of `choices` (used for "one of" blocks such as a store's backend). Reports none
    /// or several; `noun` names the choice in messages ("secret store", "vault auth method").
    /// When none is present but keys not yet asked for are, those are reported as unknown by
    /// [`Map::finish`] or [`Map::finish_choice`] instead, so this stays silent.
    pub fn one_of(
        &mut self,
        cx: &mut Cx,
        choices: &[&'static str],
        noun: &str,
    ) -> Option<(&'static str, &'n Entry)> {
        debug_assert!(
            self.schema.one_of.contains(&choices),
            "the decoder reads one of {choices:?} in {}, which the schema does not declare as a group",
            self.schema.name
        );
        let found = self.present(choices);
        match found.as_slice() {
            [] => {
                let known = &self.known;
                let has_unknown = self
                    .entries
                    .iter()
                    .any(|e| !known.contains(&e.key.as_str()));
                if !has_unknown {
                    cx.error(
                        self.at,
                        format!(
                            "missing {noun} in {}: give one of {}",
                            self.what_or_spec(),
                            list(choices)
                        ),
                    );
                }
                None
            }
            [one] => Some(*one),
            [first, second, ..] => {
                cx.error(
                    second.1.key_mark,
                    format!(
                        "{} has both {:?} and {:?}; give exactly one {noun}",
                        self.what_or_spec(),
                        first.0,
                        second.0
                    ),
                );
                None
            }
        }
    }

    /// Reports every key never asked for: `unknown field "x" in what (did you mean "y"?)`.
    pub fn finish(self, cx: &mut Cx) {
        for e in self.entries {
            if !self.known.contains(&e.key.as_str()) {
                let hint = suggest::hint(&e.key, self.known.iter().copied());
                let place = self.what_or_spec();
                cx.error(
                    e.key_mark,
                    format!("unknown field {:?} in {place}{hint}", e.key),
                );
            }
        }
    }

    /// Like [`Map::finish`] for a mapping that is a choice: `unknown secret store "vautl" (did you
    /// mean "vault"?)`.
    pub fn finish_choice(self, cx: &mut Cx, noun: &str) {
        for e in self.entries {
            if !self.known.contains(&e.key.as_str()) {
                let hint = suggest::hint(&e.key, self.known.iter().copied());
                let hint = if hint.is_empty() {
                    format!(" (expected one of {})", list(&self.known))
                } else {
                    hint
                };
                cx.error(e.key_mark, format!("unknown {noun} {:?}{hint}", e.key));
            }
        }
    }
}

/// `a, b or c`, each quoted.
pub fn list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// A non-empty string scalar. Plain scalars that look like numbers are taken as text too.
pub fn string(cx: &mut Cx, node: &Node, what: &str) -> Option<String> {
    match &node.value {
        Value::Scalar { text, .. } if text.is_empty() => {
            cx.error(node.mark, format!("{what} must not be empty"));
            None
        }
        Value::Scalar { text, .. } => Some(text.clone()),
        _ => {
            cx.error(
                node.mark,
                format!("{what} must be a string, found {}", node.describe()),
            );
            None
        }
    }
}

/// An unquoted `true` or `false`.
pub fn boolean(cx: &mut Cx, node: &Node, what: &str) -> Option<bool> {
    match &node.value {
        Value::Scalar {
            text,
            quoted: false,
        } if text == "true" => Some(true),
        Value::Scalar {
            text,
            quoted: false,
        } if text == "false" => Some(false),
        _ => {
            cx.error(
                node.mark,
                format!("{what} must be true or false, found {}", node.describe()),
            );
            None
        }
    }
}

/// An unquoted integer scalar in `min..=max`.
pub fn integer(cx: &mut Cx, node: &Node, what: &str, min: i64, max: i64) -> Option<i64> {
    let number = match &node.value {
        Value::Scalar {
            text,
            quoted: false,
        } => parse_int(text),
        _ => None,
    };
    match number {
        Some(n) if (min..=max).contains(&n) => Some(n),
        Some(n) => {
            cx.error(
                node.mark,
                format!("{what} {n} is out of range: must be between {min} and {max}"),
            );
            None
        }
        None => {
            cx.error(
                node.mark,
                format!("{what} must be an integer, found {}", node.describe()),
            );
            None
        }
    }
}

fn parse_int(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    let body = digits.strip_prefix('-').unwrap_or(digits);
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Out-of-range numbers still read as numbers, so the range message is the one shown.
    digits
        .parse::<i64>()
        .ok()
        .or(Some(if digits.starts_with('-') {
            i64::MIN
        } else {
            i64::MAX
        }))
}

/// One of a fixed set of words: `invalid protocol "postgress": expected "tcp", … (did you mean …)`.
pub fn choice<T: Copy>(
    cx: &mut Cx,
    node: &Node,
    what: &str,
    options: &[(&'static str, T)],
) -> Option<T> {
    let text = string(cx, node, what)?;
    if let Some((_, v)) = options.iter().find(|(name, _)| *name == text) {
        return Some(*v);
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    let hint = suggest::hint(&text, names.iter().copied());
    cx.error(
        node.mark,
        format!("invalid {what} {text:?}: expected {}{hint}", list(&names)),
    );
    None
}

/// A humane duration in `min..=max`.
pub fn duration(
    cx: &mut Cx,
    node: &Node,
    what: &str,
    min: Duration,
    max: Duration,
) -> Option<Duration> {
    let text = string(cx, node, what)?;
    match super::duration::parse(&text) {
        Ok(d) if d < min => {
            cx.error(
                node.mark,
                format!(
                    "{what} {text:?} is too short: at least {}",
                    super::duration::format(min)
                ),
            );
            None
        }
        Ok(d) if d > max => {
            cx.error(
                node.mark,
                format!(
                    "{what} {text:?} is too long: at most {}",
                    super::duration::format(max)
                ),
            );
            None
        }
        Ok(d) => Some(d),
        Err(reason) => {
            cx.error(node.mark, format!("invalid {what} {text:?}: {reason}"));
            None
        }
    }
}

/// An absolute file system path.
pub fn absolute_path(cx: &mut Cx, node: &Node, what: &str) -> Option<PathBuf> {
    let text = string(cx, node, what)?;
    if !text.starts_with('/') {
        cx.error(
            node.mark,
            format!("{what} {text:?} must be an absolute path"),
        );
        return None;
    }
    Some(PathBuf::from(text))
}

/// A mapping of strings to strings (labels, annotations).
pub fn string_map(cx: &mut Cx, node: &Node, what: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match &node.value {
        Value::Null => {}
        Value::Mapping(entries) => {
            for e in entries {
                let path = format!("{what}.{}", e.key);
                let value = match &e.value.value {
                    Value::Scalar { text, .. } => Some(text.clone()),
                    Value::Null => Some(String::new()),
                    _ => {
                        cx.error(
                            e.value.mark,
                            format!("{path} must be a string, found {}", e.value.describe()),
                        );
                        None
                    }
                };
                if let Some(v) = value {
                    out.insert(e.key.clone(), v);
                }
            }
        }
        _ => cx.error(
            node.mark,
            format!("{what} must be a mapping, found {}", node.describe()),
        ),
    }
    out
}

/// A list; `null` reads as empty.
pub fn sequence<'n>(cx: &mut Cx, node: &'n Node, what: &str) -> Option<&'n [Node]> {
    match &node.value {
        Value::Sequence(items) => Some(items),
        Value::Null => Some(&[]),
        _ => {
            cx.error(
                node.mark,
                format!("{what} must be a list, found {}", node.describe()),
            );
            None
        }
    }
}

/// A Kubernetes-style name: lowercase letters, digits, `-` and `.`, starting and ending with a
/// letter or digit, at most 253 characters.
pub fn resource_name(text: &str) -> Result<(), String> {
    if text.len() > 253 {
        return Err("must be at most 253 characters".to_string());
    }
    if let Some(c) = text
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Err(format!(
            "{c:?} is not allowed (use lowercase letters, digits, '-' and '.')"
        ));
    }
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !ends_ok(text.chars().next()) || !ends_ok(text.chars().last()) {
        return Err("must start and end with a letter or digit".to_string());
    }
    Ok(())
}
