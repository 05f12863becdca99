//! Keeping secrets out of everything an attempt leaves behind. Text is
//! redacted before it is cut to a limit, so a secret that crosses the cut
//! does not leave its head behind.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;

/// What replaces a secret value.
pub const REDACTED: &str = "[redacted]";

/// Replaces the values of secrets in text and JSON.
#[derive(Debug, Clone, Default)]
pub(crate) struct Redactor {
    /// Every secret, found in one pass; the longest wins where two overlap,
    /// so a secret that contains another is replaced whole.
    matcher: Option<Arc<AhoCorasick>>,
    secrets: Arc<[String]>,
}

impl Redactor {
    pub(crate) fn new<'a>(secrets: impl IntoIterator<Item = &'a String>) -> Self {
        let secrets: Arc<[String]> = secrets.into_iter().filter(|s| !s.is_empty()).cloned().collect();
        let matcher = (!secrets.is_empty())
            .then(|| AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(secrets.iter()).ok())
            .flatten()
            .map(Arc::new);
        Redactor { matcher, secrets }
    }

    /// The longest secret, in bytes: how far past a cut a secret that
    /// crosses it can reach.
    pub(crate) fn longest(&self) -> usize {
        self.secrets.iter().map(String::len).max().unwrap_or(0)
    }

    pub(crate) fn text(&self, text: &str) -> String {
        match &self.matcher {
            Some(matcher) => matcher.replace_all(text, &vec![REDACTED; self.secrets.len()]),
            None => text.to_owned(),
        }
    }

    pub(crate) fn json(&self, value: Value) -> Value {
        if self.matcher.is_none() {
            return value;
        }
        match value {
            Value::String(text) => Value::String(self.text(&text)),
            Value::Array(items) => Value::Array(items.into_iter().map(|item| self.json(item)).collect()),
            Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (self.text(&k), self.json(v))).collect()),
            // A number or boolean that reads as a secret (a PIN, an account
            // number) is one.
            Value::Number(_) | Value::Bool(_) => {
                let text = value.to_string();
                if self.secrets.contains(&text) { Value::String(REDACTED.into()) } else { value }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn replaces_every_secret_everywhere() {
        let secrets = ["hunter2".to_owned(), "hunter2-long".to_owned(), "4242".to_owned(), "true".to_owned()];
        let redactor = Redactor::new(&secrets);
        assert_eq!(redactor.text("a hunter2-long and hunter2"), "a [redacted] and [redacted]");
        assert_eq!(
            redactor.json(json!({ "k": ["xhunter2x", 1, 4242, true, false, 42420] })),
            json!({ "k": ["x[redacted]x", 1, "[redacted]", "[redacted]", false, 42420] })
        );
        assert_eq!(redactor.longest(), 12);
        assert_eq!(Redactor::new(&[]).text("hunter2"), "hunter2");
    }
}
