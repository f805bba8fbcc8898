//! The one place that talks to a YAML parser.
//!
//! Everything else in `config` works on the small located tree defined here: every node and every
//! mapping key carries the line and column where it starts, so any later check can point at the
//! exact spot in the file. Swapping the parser means rewriting this file only.
//!
//! Scalars are kept as text plus a "quoted" flag; the decoders decide what a scalar means (YAML 1.2
//! core schema style: `port: 5432` is a number, `port: "5432"` is a string).

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Guard against alias expansion bombs ("billion laughs").
const MAX_NODES: usize = 100_000;

/// A position in a source text; both numbers start at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl Mark {
    fn from_marker(m: Marker) -> Mark {
        Mark {
            line: m.line().max(1),
            column: m.col() + 1,
        }
    }
}

/// One entry of a mapping: the key's text and position, and the value.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub key_mark: Mark,
    pub value: Node,
}

/// What a node holds.
#[derive(Debug, Clone)]
pub enum Value {
    /// `~`, `null`, or nothing at all after a key.
    Null,
    /// Any scalar; `quoted` is true for quoted, block (`|`, `>`) and `!!str`-tagged scalars.
    Scalar {
        text: String,
        quoted: bool,
    },
    Sequence(Vec<Node>),
    /// Entries in source order; keys are unique (duplicates are reported as errors by [`parse`]).
    Mapping(Vec<Entry>),
}

/// A located YAML node.
#[derive(Debug, Clone)]
pub struct Node {
    pub mark: Mark,
    pub value: Value,
}

impl Node {
    /// Short description of the node's type for error messages ("a mapping", "the string \"x\"").
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "nothing".to_string(),
            Value::Scalar { text, quoted: true } => format!("the string {text:?}"),
            Value::Scalar {
                text,
                quoted: false,
            } => format!("{text:?}"),
            Value::Sequence(_) => "a list".to_string(),
            Value::Mapping(_) => "a mapping".to_string(),
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// The entry for `key` when this node is a mapping.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        match &self.value {
            Value::Mapping(entries) => entries.iter().find(|e| e.key == key),
            _ => None,
        }
    }

    /// Where the value at `path` starts. Path segments are mapping keys, or decimal indices into
    /// sequences. When the path does not exist in full, the position of the deepest part that does
    /// is returned (the closest place a human should look).
    pub fn locate(&self, path: &[&str]) -> Mark {
        let mut node = self;
        for seg in path {
            let next = match &node.value {
                Value::Mapping(entries) => entries.iter().find(|e| e.key == *seg).map(|e| {
                    // A null value has no useful position of its own: point at its key.
                    if e.value.is_null() {
                        return Err(e.key_mark);
                    }
                    Ok(&e.value)
                }),
                Value::Sequence(items) => {
                    seg.parse::<usize>().ok().and_then(|i| items.get(i)).map(Ok)
                }
                _ => None,
            };
            match next {
                Some(Ok(n)) => node = n,
                Some(Err(mark)) => return mark,
                None => break,
            }
        }
        node.mark
    }

    /// Where the key of the last path segment starts (falls back like [`Node::locate`]).
    pub fn locate_key(&self, path: &[&str]) -> Mark {
        let Some((last, parent)) = path.split_last() else {
            return self.mark;
        };
        let mut node = self;
        for seg in parent {
            let next = match &node.value {
                Value::Mapping(entries) => entries.iter().find(|e| e.key == *seg).map(|e| &e.value),
                Value::Sequence(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => return node.mark,
            }
        }
        node.entry(last).map_or(node.mark, |e| e.key_mark)
    }
}

/// A problem found while parsing: bad syntax, duplicate keys, unsupported constructs.
#[derive(Debug, Clone)]
pub struct ParseError {
    pub mark: Mark,
    pub message: String,
}

/// The documents of one YAML stream, and every problem found in it. Empty documents (only
/// comments, or a stray `---`) are dropped. After a syntax error the rest of the stream is not
/// parsed, but the documents completed before it are returned.
pub fn parse(text: &str) -> (Vec<Node>, Vec<ParseError>) {
    let mut builder = Builder::default();
    let result = Parser::new_from_str(text).load(&mut builder, true);
    if let Err(e) = result {
        let message = e.info().to_string();
        builder.errors.push(ParseError {
            mark: Mark::from_marker(*e.marker()),
            message: format!("invalid YAML: {message}"),
        });
    }
    (builder.documents, builder.errors)
}

enum Frame {
    Sequence {
        mark: Mark,
        anchor: usize,
        items: Vec<Node>,
    },
    Mapping {
        mark: Mark,
        anchor: usize,
        entries: Vec<Entry>,
        key: Option<(String, Mark)>,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    documents: Vec<Node>,
    errors: Vec<ParseError>,
    nodes: usize,
    too_big: bool,
}

impl Builder {
    fn error(&mut self, mark: Mark, message: String) {
        self.errors.push(ParseError { mark, message });
    }

    fn count(&mut self, n: usize, mark: Mark) {
        self.nodes += n;
        if self.nodes > MAX_NODES && !self.too_big {
            self.too_big = true;
            self.error(
                mark,
                format!("document too large: more than {MAX_NODES} nodes (alias expansion?)"),
            );
        }
    }

    fn complete(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if !node.is_null() {
                    self.documents.push(node);
                }
            }
            Some(Frame::Sequence { items, .. }) => items.push(node),
            Some(Frame::Mapping { entries, key, .. }) => match key.take() {
                None => {
                    let mark = node.mark;
                    let text = match node.value {
                        Value::Scalar { text, .. } => text,
                        Value::Null => String::new(),
                        _ => {
                            *key = Some(("\u{0}".to_string(), mark));
                            self.error(mark, "mapping keys must be plain strings".to_string());
                            return;
                        }
                    };
                    if text == "<<" {
                        *key = Some(("\u{0}".to_string(), mark));
                        self.error(mark, "YAML merge keys (<<) are not supported".to_string());
                        return;
                    }
                    *key = Some((text, mark));
                }
                Some((text, key_mark)) => {
                    if text == "\u{0}" {
                        return;
                    }
                    if let Some(first) = entries.iter().find(|e| e.key == text) {
                        let message = format!(
                            "duplicate key {text:?} (first at line {}, column {})",
                            first.key_mark.line, first.key_mark.column
                        );
                        self.error(key_mark, message);
                        return;
                    }
                    entries.push(Entry {
                        key: text,
                        key_mark,
                        value: node,
                    });
                }
            },
        }
    }
}

fn node_count(node: &Node) -> usize {
    match &node.value {
        Value::Sequence(items) => 1 + items.iter().map(node_count).sum::<usize>(),
        Value::Mapping(entries) => {
            1 + entries
                .iter()
                .map(|e| 1 + node_count(&e.value))
                .sum::<usize>()
        }
        _ => 1,
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, marker: Marker) {
        if self.too_big {
            return;
        }
        let mark = Mark::from_marker(marker);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1, mark);
                let forced_str = tag.as_ref().is_some_and(|t| {
                    t.suffix == "str" && (t.handle == "!!" || t.handle == "tag:yaml.org,2002:")
                });
                let quoted = forced_str || !matches!(style, TScalarStyle::Plain);
                let is_null =
                    !quoted && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL");
                let value = if is_null {
                    Value::Null
                } else {
                    Value::Scalar { text, quoted }
                };
                self.complete(Node { mark, value }, anchor);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Sequence {
                mark,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Mapping {
                mark,
                anchor,
                entries: Vec::new(),
                key: None,
            }),
            Event::SequenceEnd => {
                if let Some(Frame::Sequence {
                    mark,
                    anchor,
                    items,
                }) = self.stack.pop()
                {
                    self.count(1, mark);
                    let node = Node {
                        mark,
                        value: Value::Sequence(items),
                    };
                    self.complete(node, anchor);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Mapping {
                    mut mark,
                    anchor,
                    entries,
                    ..
                }) = self.stack.pop()
                {
                    // The parser marks a block mapping one column after its first key; the first
                    // key is the better position (a flow mapping's `{` comes before its key).
                    if let Some(first) = entries.first() {
                        mark = mark.min(first.key_mark);
                    }
                    self.count(1, mark);
                    let node = Node {
                        mark,
                        value: Value::Mapping(entries),
                    };
                    self.complete(node, anchor);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(node) => {
                    self.count(node_count(&node), mark);
                    self.complete(node, 0);
                }
                None => self.error(mark, "unknown alias".to_string()),
            },
            Event::DocumentStart => {
                self.stack.clear();
                self.anchors.clear();
            }
            Event::DocumentEnd | Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_one_based_and_keys_located() {
        let (docs, errors) =
            parse("a: 1\nb:\n  c: 'x'\n  d:\n---\n# only a comment\n---\ne: [1, 2]\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(docs.len(), 2);
        let root = &docs[0];
        assert_eq!(root.mark, Mark { line: 1, column: 1 });
        assert_eq!(root.locate(&["b", "c"]), Mark { line: 3, column: 6 });
        assert_eq!(root.locate_key(&["b", "c"]), Mark { line: 3, column: 3 });
        // null value: points at its key
        assert_eq!(root.locate(&["b", "d"]), Mark { line: 4, column: 3 });
        // missing: deepest existing part
        assert_eq!(root.locate(&["b", "zz", "y"]), Mark { line: 3, column: 3 });
        assert_eq!(docs[1].locate(&["e", "1"]), Mark { line: 8, column: 8 });
    }

    #[test]
    fn duplicate_keys_and_syntax_errors() {
        let (_, errors) = parse("a: 1\nb: 2\na: 3\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].mark, Mark { line: 3, column: 1 });
        assert!(
            errors[0].message.contains("duplicate key \"a\""),
            "{}",
            errors[0].message
        );

        let (docs, errors) = parse("a: 1\n---\nb: [1\n");
        assert_eq!(docs.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.starts_with("invalid YAML"));
    }

    #[test]
    fn aliases_expand_and_quoting_is_kept() {
        let (docs, errors) = parse("a: &x {b: 1}\nc: *x\nd: \"5\"\ne: !!str 6\nf: 7\n");
        assert!(errors.is_empty(), "{errors:?}");
        let c = &docs[0].entry("c").unwrap().value;
        assert!(matches!(&c.value, Value::Mapping(e) if e.len() == 1));
        for (k, q) in [("d", true), ("e", true), ("f", false)] {
            match &docs[0].entry(k).unwrap().value.value {
                Value::Scalar { quoted, .. } => assert_eq!(*quoted, q, "{k}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let (_, errors) = parse(&text);
        assert!(errors.iter().any(|e| e.message.contains("too large")));
    }
}
