//! Hostile: floods stdout and stderr. `{"lines": N}` writes N lines to each
//! and returns; `{"bytes": N}` writes N bytes to each, 64 KiB at a time;
//! with neither it never stops.
use std::io::Write;

use serde::Deserialize;
use stepbox_sdk::{StepError, step};

#[derive(Deserialize)]
struct Input {
    lines: Option<u64>,
    bytes: Option<u64>,
}

#[step]
fn run(input: Input) -> Result<u64, StepError> {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    if let Some(bytes) = input.bytes {
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let now = left.min(chunk.len() as u64) as usize;
            stdout.write_all(&chunk[..now])?;
            stderr.write_all(&chunk[..now])?;
            left -= now as u64;
        }
        return Ok(bytes);
    }
    let mut written = 0;
    while input.lines.is_none_or(|lines| written < lines) {
        writeln!(stdout, "line {written}: all work and no play makes a dull step")?;
        writeln!(stderr, "line {written} to stderr")?;
        written += 1;
    }
    Ok(written)
}
