//! Hostile: sleeps in a WASI clock wait for `seconds` (default: a day), so it
//! burns no fuel; only the wall-clock timeout stops it.
use serde::Deserialize;
use stepbox_sdk::{StepError, step};

#[derive(Deserialize)]
struct Input {
    #[serde(default = "a_day")]
    seconds: u64,
}

fn a_day() -> u64 {
    24 * 60 * 60
}

#[step]
fn run(input: Input) -> Result<u64, StepError> {
    std::thread::sleep(std::time::Duration::from_secs(input.seconds));
    Ok(input.seconds)
}
