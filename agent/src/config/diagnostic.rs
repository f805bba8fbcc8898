//! Located messages: errors and warnings that point at a file, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a resource (or one of its fields) was written. Line and column start at 1; a line of 0
/// means "the file as a whole" (for example when it could not be read).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Location {
    pub fn new(file: impl Into<PathBuf>, line: usize, column: usize) -> Location {
        Location {
            file: file.into(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
        }
    }
}

/// One error or warning. `Display` gives `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Diagnostic {
    pub fn new(location: &Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: location.file.clone(),
            line: location.line,
            column: location.column,
            message: message.into(),
        }
    }

    /// A diagnostic about a whole file (no line or column).
    pub fn file(file: &Path, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(&Location::new(file, 0, 0), message)
    }

    pub fn location(&self) -> Location {
        Location::new(self.file.clone(), self.line, self.column)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location(), self.message)
    }
}

/// Every error found by one load, in file and position order. `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.0))]
pub struct LoadErrors(pub Vec<Diagnostic>);

impl LoadErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn lines(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
