//! Reports what the sandbox grants it, for the capability tests:
//! `{"probe": "args" | "scratch" | "clock-and-random" | "leak-secret" | "leak-secret-in-error" | "trace"}`.
use std::hash::BuildHasher;

use serde::Deserialize;
use serde_json::{Value, json};
use stepbox_sdk::{Context, StepError, config, step};

#[derive(Deserialize)]
struct Input {
    probe: String,
}

#[step]
fn run(ctx: &Context, input: Input) -> Result<Value, StepError> {
    match input.probe.as_str() {
        "trace" => Ok(json!({ "traceparent": ctx.trace_parent(), "trace_id": ctx.trace_id() })),
        "args" => Ok(json!(std::env::args().collect::<Vec<_>>())),
        "scratch" => {
            let before: Vec<String> = std::fs::read_dir("/scratch")?
                .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            std::fs::write("/scratch/note.txt", "scribbled")?;
            let read = std::fs::read_to_string("/scratch/note.txt")?;
            Ok(json!({ "before": before, "read": read }))
        }
        "clock-and-random" => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(StepError::fatal)?;
            let start = std::time::Instant::now();
            let random = std::collections::hash_map::RandomState::new().hash_one(42u64);
            Ok(
                json!({ "now": now.as_secs(), "random": random.to_string(), "elapsed_ns": start.elapsed().as_nanos() as u64 }),
            )
        }
        "leak-secret" => {
            let secret = config::require("api_key")?;
            stepbox_sdk::info!("the key is {secret}");
            println!("stdout: {secret}");
            eprintln!("stderr: {secret}");
            Ok(json!({ "key": secret }))
        }
        "leak-secret-in-error" => {
            let secret = config::require("api_key")?;
            Err(StepError::fatal(format!("upstream refused key {secret}")))
        }
        other => Err(StepError::fatal(format!("unknown probe {other}"))),
    }
}
