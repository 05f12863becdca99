//! Hostile: floods stdout and stderr. `{"lines": N}` writes N lines to each
//! and returns; without `lines` it never stops.
use std::io::Write;

use serde::Deserialize;
use stepbox_sdk::{StepError, step};

#[derive(Deserialize)]
struct Input {
    lines: Option<u64>,
}

#[step]
fn run(input: Input) -> Result<u64, StepError> {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    let mut written = 0;
    while input.lines.is_none_or(|lines| written < lines) {
        writeln!(stdout, "line {written}: all work and no play makes a dull step")?;
        writeln!(stderr, "line {written} to stderr")?;
        written += 1;
    }
    Ok(written)
}
