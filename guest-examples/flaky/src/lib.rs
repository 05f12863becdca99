//! Fails with a retryable error until attempt `succeed_on_attempt`,
//! logging a warning each time.
use serde::{Deserialize, Serialize};
use stepbox_sdk::{Context, StepError, step};

#[derive(Deserialize)]
struct Input {
    succeed_on_attempt: u32,
}

#[derive(Serialize)]
struct Output {
    succeeded_on_attempt: u32,
}

#[step]
fn run(ctx: &Context, input: Input) -> Result<Output, StepError> {
    if ctx.attempt < input.succeed_on_attempt {
        stepbox_sdk::warn!("attempt {}: the upstream answered 503", ctx.attempt);
        return Err(StepError::retryable(format!(
            "attempt {} of {}: the upstream is still warming up",
            ctx.attempt, input.succeed_on_attempt
        )));
    }
    Ok(Output { succeeded_on_attempt: ctx.attempt })
}
