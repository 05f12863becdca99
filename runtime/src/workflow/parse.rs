//! Decoding workflow and tenants files: YAML (or JSON, which is YAML too)
//! into their spec types, with each error located and, for a misspelt
//! field, the nearest known name.

use std::path::Path;

use serde_saphyr::Location;

use super::diagnostic::{Diagnostics, WorkflowError, did_you_mean};

/// Reads and decodes a file.
pub(crate) fn read<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, WorkflowError> {
    decode(path, &read_text(path, what)?)
}

/// The text of the `what` at `path`.
pub(crate) fn read_text(path: &Path, what: &str) -> Result<String, WorkflowError> {
    std::fs::read_to_string(path).map_err(|err| {
        WorkflowError::single(path, format!("cannot read the {what}: {err}"), Some("check the path".into()))
    })
}

/// Decodes YAML or JSON text with located errors.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, WorkflowError> {
    serde_saphyr::from_str::<T>(text).map_err(|err| {
        let mut diagnostics = Diagnostics::new(path);
        let location = err.location().unwrap_or(Location::UNKNOWN);
        let message = err.without_snippet().to_string();
        let mut message = message.lines().next().unwrap_or_default().to_owned();
        // The location is already in front of the message.
        if let Some(at) = message.rfind(" at line ") {
            message.truncate(at);
        }
        let help = unknown_field_help(&message);
        diagnostics.at(location, message, help);
        diagnostics.into_error()
    })
}

/// For "unknown field `x`, expected one of a, b, c": the nearest known
/// field, or the list.
fn unknown_field_help(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest
        .split_once("expected ")
        .map(|(_, list)| list.trim_start_matches("one of ").split(", ").map(|name| name.trim_matches('`')).collect())
        .unwrap_or_default();
    did_you_mean(field, expected.iter().copied())
}
