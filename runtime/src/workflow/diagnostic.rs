//! Errors in a workflow file: where they are and what would fix them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::{Location, Spanned};

/// One problem in a workflow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no single place (a missing field of
    /// the whole file, a cycle).
    pub line: u64,
    /// 1-based; 0 with the line.
    pub column: u64,
    /// What is wrong.
    pub message: String,
    /// What would fix it.
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Relative to where stepbox runs when it lies below it, as people
        // usually name the file.
        let cwd = std::env::current_dir().unwrap_or_default();
        write!(f, "{}", self.file.strip_prefix(&cwd).unwrap_or(&self.file).display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Every problem found in a workflow; validation reports them all at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct WorkflowError {
    /// In the order found.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl WorkflowError {
    pub(crate) fn single(file: &Path, message: impl Into<String>, help: Option<String>) -> Self {
        WorkflowError {
            diagnostics: vec![Diagnostic { file: file.to_owned(), line: 0, column: 0, message: message.into(), help }],
        }
    }
}

/// Collects diagnostics for one file.
pub(crate) struct Diagnostics {
    file: PathBuf,
    list: Vec<Diagnostic>,
}

impl Diagnostics {
    pub(crate) fn new(file: &Path) -> Self {
        Diagnostics { file: file.to_owned(), list: Vec::new() }
    }

    /// Records a problem once: one template that reads the same missing
    /// value twice is one problem.
    pub(crate) fn at(&mut self, location: Location, message: impl Into<String>, help: Option<String>) {
        let diagnostic = Diagnostic {
            file: self.file.clone(),
            line: location.line(),
            column: location.column(),
            message: message.into(),
            help,
        };
        if !self.list.contains(&diagnostic) {
            self.list.push(diagnostic);
        }
    }

    pub(crate) fn on<T>(&mut self, value: &Spanned<T>, message: impl Into<String>, help: Option<String>) {
        self.at(value.referenced, message, help);
    }

    pub(crate) fn nowhere(&mut self, message: impl Into<String>, help: Option<String>) {
        self.at(Location::UNKNOWN, message, help);
    }

    pub(crate) fn into_error(self) -> WorkflowError {
        WorkflowError { diagnostics: self.list }
    }

    pub(crate) fn finish(self) -> Result<(), WorkflowError> {
        if self.list.is_empty() { Ok(()) } else { Err(WorkflowError { diagnostics: self.list }) }
    }
}

/// The candidate closest to `word`, if it is close enough to be a likely
/// typo.
pub(crate) fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::jaro_winkler(word, candidate), candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// "did you mean `x`?" for the nearest candidate, if any.
pub(crate) fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    nearest(word, candidates).map(|candidate| format!("did you mean `{candidate}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_nearest_name() {
        assert_eq!(nearest("dependson", ["depends_on", "id", "uses"]), Some("depends_on"));
        assert_eq!(nearest("zzz", ["depends_on", "id", "uses"]), None);
    }
}
