//! `cargo demo`: runs the example steps through the sandbox, healthy and
//! hostile, and shows what each attempt returned and used. It is also a
//! small example of embedding the `stepbox` library.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use serde_json::{Value, json};
use stepbox::sandbox::{AttemptReport, AttemptRequest, EngineConfig, Grants, Limits, Outcome, Sandbox, StepContext};
use stepbox::store::MemoryKeyValueStore;
use stepbox_tests::guests;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sandbox = Sandbox::new(EngineConfig::default(), Arc::new(MemoryKeyValueStore::new()))?;
    let order = json!({
        "id": "o-42",
        "customer": { "first_name": "Ada", "last_name": "Lovelace" },
        "items": [ { "sku": "engine", "quantity": 1, "unit_price_cents": 99_00 } ]
    });
    let tight = Limits { timeout: Duration::from_secs(1), memory: ByteSize::mib(32), ..Limits::default() };

    println!("healthy steps");
    show(&sandbox, "hello", guests::HELLO, json!({ "name": "Ada" }), Limits::default(), Grants::default(), 1).await?;
    let config = Grants { config: [("currency".to_owned(), "EUR".to_owned())].into(), ..Grants::default() };
    show(&sandbox, "transform", guests::TRANSFORM, order, Limits::default(), config, 1).await?;
    for attempt in 1..=3 {
        let report = show(
            &sandbox,
            "flaky",
            guests::FLAKY,
            json!({ "succeed_on_attempt": 3 }),
            Limits::default(),
            Grants::default(),
            attempt,
        )
        .await?;
        if report.output().is_some() {
            break;
        }
    }
    for _ in 0..2 {
        show(&sandbox, "counter", guests::COUNTER, json!({}), Limits::default(), Grants::default(), 1).await?;
    }

    println!("\nhostile steps, each stopped by its limit (timeout 1s, memory 32 MiB)");
    for (name, path, input) in [
        ("spin", guests::SPIN, Value::Null),
        ("memory-hog", guests::MEMORY_HOG, Value::Null),
        ("recurse", guests::RECURSE, Value::Null),
        ("sleepy", guests::SLEEPY, json!({})),
        ("chatty", guests::CHATTY, json!({})),
    ] {
        show(&sandbox, name, path, input, tight.clone(), Grants::default(), 1).await?;
    }
    println!(
        "\nTry one yourself: cargo run -p stepbox-runtime -- step run {} --input '{{\"name\": \"you\"}}'",
        guests::HELLO
    );
    Ok(())
}

async fn show(
    sandbox: &Sandbox,
    name: &str,
    path: &str,
    input: Value,
    limits: Limits,
    grants: Grants,
    attempt: u32,
) -> anyhow::Result<AttemptReport> {
    let component = sandbox.load(Path::new(path))?;
    let context = StepContext {
        run_id: "demo".into(),
        step_id: name.into(),
        attempt,
        idempotency_key: format!("demo/{name}"),
        tenant: "demo".into(),
        workflow: "demo".into(),
    };
    let report = sandbox.run(&component, AttemptRequest { context, input: input.to_string(), limits, grants }).await;
    let result = match &report.outcome {
        Outcome::Succeeded { output } => format!("ok    {output}"),
        Outcome::Failed(failure) => format!("{:<5} {}", "fail", failure),
    };
    println!(
        "  {name:<11} #{attempt} {:>9.1?} {:>13} fuel {:>10}  {result}",
        report.duration,
        report.fuel_consumed,
        ByteSize(report.peak_memory).display().iec().to_string()
    );
    Ok(report)
}
