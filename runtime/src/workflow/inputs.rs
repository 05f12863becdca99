//! A run's inputs: the values given checked against the declared inputs,
//! with defaults filled in. Bound once, when a run is created; resumes,
//! retries and the scheduler take the bound inputs as they are.

use serde_json::Value;

use super::Workflow;
use super::diagnostic::{Diagnostics, WorkflowError, did_you_mean};
use super::spec::InputType;

/// Inputs after binding: every declared input present (a default, or null
/// for an optional one without), each of its declared type, and nothing
/// undeclared. Only [`Workflow::bind_inputs`] makes one.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Inputs(serde_json::Map<String, Value>);

impl Inputs {
    /// The inputs by name.
    pub fn as_map(&self) -> &serde_json::Map<String, Value> {
        &self.0
    }
}

/// Whether `value` has the declared type of input `name`.
pub(crate) fn check_type(name: &str, kind: InputType, value: &Value) -> Result<(), String> {
    let ok = match kind {
        InputType::Any => true,
        InputType::String => value.is_string(),
        InputType::Number => value.is_number(),
        InputType::Integer => value.is_i64() || value.is_u64(),
        InputType::Boolean => value.is_boolean(),
        InputType::Object => value.is_object(),
        InputType::Array => value.is_array(),
    };
    if ok { Ok(()) } else { Err(format!("input `{name}` must be of type {kind:?}, not {value}").to_lowercase()) }
}

/// Checks `given` against the workflow's declared inputs; every problem is
/// reported at once.
pub(crate) fn bind(workflow: &Workflow, given: &serde_json::Map<String, Value>) -> Result<Inputs, WorkflowError> {
    let mut d = Diagnostics::new(&workflow.file);
    let declared: Vec<&str> = workflow.inputs.keys().map(String::as_str).collect();
    for name in given.keys() {
        if !workflow.inputs.contains_key(name) {
            d.nowhere(
                format!("unknown input `{name}`"),
                did_you_mean(name, declared.iter().copied())
                    .or_else(|| Some(format!("the workflow's inputs are: {}", declared.join(", ")))),
            );
        }
    }
    let mut bound = serde_json::Map::new();
    for (name, input) in &workflow.inputs {
        match given.get(name).or(input.default.as_ref()) {
            Some(value) => {
                if let Err(message) = check_type(name, input.kind, value) {
                    d.nowhere(message, None);
                }
                bound.insert(name.clone(), value.clone());
            }
            None if input.required => {
                d.nowhere(
                    format!("the required input `{name}` is missing"),
                    Some(format!("pass it with --input {name}=VALUE")),
                );
            }
            None => {
                bound.insert(name.clone(), Value::Null);
            }
        }
    }
    d.finish()?;
    Ok(Inputs(bound))
}
