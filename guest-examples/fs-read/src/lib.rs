//! Reads a text file from a directory the workflow granted.
use serde::{Deserialize, Serialize};
use stepbox_sdk::{StepError, step};

#[derive(Deserialize)]
struct Input {
    path: String,
}

#[derive(Serialize)]
struct Output {
    path: String,
    contents: String,
    bytes: usize,
}

#[step]
fn run(input: Input) -> Result<Output, StepError> {
    let contents = std::fs::read_to_string(&input.path)
        .map_err(|err| StepError::fatal(format!("cannot read {}: {err}", input.path)))?;
    Ok(Output { bytes: contents.len(), path: input.path, contents })
}
