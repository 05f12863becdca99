//! The __NAME__ step: `{"name": "Ada"}` → `{"greeting": "Hello, Ada!"}`.
//! The greeting word comes from the `greeting` config value, if the workflow
//! sets one.
use serde::{Deserialize, Serialize};
use stepbox_sdk::{Context, StepError, config, step};

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
    if input.name.is_empty() {
        return Err(StepError::fatal("`name` must be a non-empty string"));
    }
    stepbox_sdk::info!("greeting {} (attempt {})", input.name, ctx.attempt);
    let word = config::get("greeting")?.unwrap_or_else(|| "Hello".to_owned());
    Ok(Output { greeting: format!("{word}, {}!", input.name) })
}
