//! Counts its runs in key-value state, and remembers who ran last with a
//! compare-and-swap update.
use serde::{Deserialize, Serialize};
use stepbox_sdk::kv::Bucket;
use stepbox_sdk::{Context, StepError, step};

#[derive(Deserialize)]
struct Input {
    #[serde(default = "default_key")]
    key: String,
}

fn default_key() -> String {
    "runs".to_owned()
}

#[derive(Serialize)]
struct Output {
    count: i64,
    previous_run: Option<String>,
    runs_seen: u64,
}

#[step]
fn run(ctx: &Context, input: Input) -> Result<Output, StepError> {
    let bucket = Bucket::open_default()?;
    let count = bucket.increment(&input.key, 1)?;
    let previous_run: Option<String> = bucket.get("last_run")?;
    bucket.set("last_run", &ctx.run_id)?;
    let runs_seen = bucket.update("runs_seen", |seen: Option<u64>| seen.unwrap_or(0) + 1)?;
    Ok(Output { count, previous_run, runs_seen })
}
