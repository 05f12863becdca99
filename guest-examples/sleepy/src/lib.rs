//! Hostile: sleeps in a WASI clock wait, so it burns no fuel; only the
//! wall-clock timeout stops it. `{"seconds": N}` or `{"millis": N}`; a day
//! when neither is given. The example workflows use it as a slow step.
use serde::Deserialize;
use stepbox_sdk::{StepError, step};

#[derive(Deserialize)]
struct Input {
    seconds: Option<u64>,
    millis: Option<u64>,
}

#[step]
fn run(input: Input) -> Result<u64, StepError> {
    let millis = input.millis.or(input.seconds.map(|s| s * 1000)).unwrap_or(24 * 60 * 60 * 1000);
    std::thread::sleep(std::time::Duration::from_millis(millis));
    Ok(millis)
}
