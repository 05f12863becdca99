//! Greets its input: `{"name": "Ada"}` → `{"greeting": "Hello, Ada!"}`. The
//! word "Hello" can be changed with the `GREETING` environment variable, if
//! the workflow grants it.
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
    let word = std::env::var("GREETING").unwrap_or_else(|_| "Hello".to_owned());
    Ok(Output { greeting: format!("{word}, {}!", input.name) })
}
