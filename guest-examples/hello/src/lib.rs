//! Greets its input: `{"name": "Ada"}` → `{"greeting": "Hello, Ada!"}`.
use serde::{Deserialize, Serialize};
use stepbox_sdk::{Context, StepError, step};

#[derive(Deserialize)]
struct Input {
    name: String,
}

#[derive(Serialize)]
struct Output {
    greeting: String,
}

#[step]
fn run(ctx: &Context, input: Input) -> Result<Output, StepError> {
    stepbox_sdk::info!("greeting {} in step {}", input.name, ctx.step_id);
    Ok(Output { greeting: format!("Hello, {}!", input.name) })
}
