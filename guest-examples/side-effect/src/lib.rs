//! Does some work (`millis`), then appends its idempotency key and attempt
//! number to `file` (in a granted directory) and returns the key. The crash
//! and chaos tests read the lines to see which executions ran more than
//! once, and which attempt did. Its output carries `value` back unchanged,
//! for outputs to compare between runs.
use std::io::Write;

use serde::{Deserialize, Serialize};
use stepbox_sdk::{Context, StepError, step};

#[derive(Deserialize)]
struct Input {
    file: String,
    #[serde(default)]
    millis: u64,
    #[serde(default)]
    value: serde_json::Value,
}

#[derive(Serialize)]
struct Output {
    key: String,
    value: serde_json::Value,
}

#[step]
fn run(ctx: &Context, input: Input) -> Result<Output, StepError> {
    std::thread::sleep(std::time::Duration::from_millis(input.millis));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&input.file)
        .map_err(|err| StepError::fatal(format!("cannot open {}: {err}", input.file)))?;
    // One write per line, so lines of steps running at once never mix.
    file.write_all(format!("{} {}\n", ctx.idempotency_key, ctx.attempt).as_bytes())?;
    file.sync_all()?;
    Ok(Output { key: ctx.idempotency_key.clone(), value: input.value })
}
