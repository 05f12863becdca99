//! Returns its input unchanged. The example workflows use it to gather the
//! outputs of other steps (a fan-in) or to produce a list to fan out over.
use stepbox_sdk::{StepError, step};

#[step]
fn run(input: serde_json::Value) -> Result<serde_json::Value, StepError> {
    Ok(input)
}
