//! `stepbox run`: run a workflow file with live progress and a summary.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::scheduler::{self, RunEvent, RunOptions, RunReport, RunStatus, StepReport, StepStatus};
use crate::store::{Database, NewRun, new_run_id};
use crate::workflow::{Inputs, Workflow};
use bytesize::ByteSize;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Place, TenantPolicy, engine_config, exit, open_database, parse_key_value, sandbox_with_kv, tenant_policy};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox run examples/diamond.yaml
  stepbox run examples/switch.yaml --input mode=fast
  stepbox run order.yaml --input-file order-inputs.json --max-parallel 4 --fail-fast --json
  stepbox run order.yaml --input order_id=42 --label trace=abc123

Every run is recorded in the data directory: see `stepbox runs`, `show`, `logs`, `resume` and `retry`.

Exit codes: 0 the run succeeded, 1 it failed, 2 usage error, 3 the workflow is not valid, 130 cancelled.")]
pub(crate) struct Args {
    /// The workflow file (YAML or JSON).
    file: PathBuf,
    /// An input, NAME=VALUE; VALUE is read as JSON when it parses, else as a string. Repeatable.
    #[arg(long = "input", short, value_parser = parse_key_value, value_name = "NAME=VALUE")]
    inputs: Vec<(String, String)>,
    /// A JSON file with an object of inputs (--input wins over it).
    #[arg(long, value_name = "FILE")]
    input_file: Option<PathBuf>,
    /// The tenant the run belongs to; key-value state is scoped to it.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// A label to find the run by later (a trace id, a business id), KEY=VALUE. Repeatable.
    #[arg(long = "label", value_parser = parse_key_value, value_name = "KEY=VALUE")]
    labels: Vec<(String, String)>,
    #[command(flatten)]
    how: HowToRun,
}

/// How to run: shared by `run`, `resume` and `retry`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HowToRun {
    /// Attempts running at once [default: twice the CPU cores, at least 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_parallel: Option<u32>,
    /// Cancel running steps as soon as a required step fails (`always` steps still run).
    #[arg(long)]
    fail_fast: bool,
    /// Print the whole run report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Reads `--input-file` and `--input` into one map.
pub(crate) fn collect_inputs(
    file: Option<&PathBuf>,
    pairs: &[(String, String)],
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut inputs = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            match serde_json::from_str(&text) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(_) => return Err(format!("{} must hold a JSON object of inputs", path.display())),
                Err(err) => return Err(format!("{} is not valid JSON: {err}", path.display())),
            }
        }
        None => serde_json::Map::new(),
    };
    for (name, value) in pairs {
        let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.clone()));
        inputs.insert(name.clone(), value);
    }
    Ok(inputs)
}

pub(crate) async fn run(args: Args, place: &Place<'_>) -> u8 {
    let inputs = match collect_inputs(args.input_file.as_ref(), &args.inputs) {
        Ok(inputs) => inputs,
        Err(message) => {
            eprintln!("error: {message}");
            return exit::USAGE;
        }
    };
    let workflow = match Workflow::load(&args.file) {
        Ok(workflow) => Arc::new(workflow),
        Err(err) => {
            eprintln!("{err}");
            return exit::INVALID_COMPONENT;
        }
    };
    let bound = match workflow.bind_inputs(&inputs) {
        Ok(bound) => bound,
        Err(err) => {
            eprintln!("{err}");
            return exit::INVALID_COMPONENT;
        }
    };
    let fingerprint = match workflow.fingerprint() {
        Ok(fingerprint) => fingerprint,
        Err(err) => {
            eprintln!("error: cannot read the workflow's files: {err}");
            return exit::INVALID_COMPONENT;
        }
    };
    let policy = match tenant_policy(place, &args.tenant, &workflow) {
        Ok(policy) => policy,
        Err(code) => return code,
    };
    let Some(db) = open_database(place.data_dir) else { return exit::STEP_FAILED };
    let run_id = new_run_id();
    let path = std::path::absolute(&args.file).unwrap_or_else(|_| args.file.clone());
    let record = NewRun {
        id: &run_id,
        workflow: &workflow.name,
        workflow_path: &path.to_string_lossy(),
        fingerprint: &fingerprint,
        tenant: &args.tenant,
        inputs: &serde_json::Value::Object(bound.as_map().clone()),
        labels: &args.labels,
    };
    if let Err(err) = db.create_run(&record) {
        eprintln!("error: {err}");
        return exit::STEP_FAILED;
    }
    execute(db, workflow, run_id, args.tenant, bound, &args.how, policy).await
}

/// Runs a recorded run (new, resumed or retried) with progress and a
/// summary.
pub(crate) async fn execute(
    db: Arc<Database>,
    workflow: Arc<Workflow>,
    run_id: String,
    tenant: String,
    inputs: Inputs,
    how: &HowToRun,
    policy: TenantPolicy,
) -> u8 {
    let config = engine_config(db.data_dir());
    let Some(sandbox) = sandbox_with_kv(config, db.clone()) else { return exit::STEP_FAILED };
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    let (events, receiver) = mpsc::unbounded_channel();
    let mut options = RunOptions::new(run_id);
    options.tenant = tenant;
    options.fail_fast = how.fail_fast;
    options.events = Some(events);
    options.cancel = cancel.clone();
    options.journal = Some(db);
    if let Some(n) = how.max_parallel {
        options.max_parallel = n as usize;
    }
    let dispatcher = scheduler::Dispatcher::new(options.max_parallel);
    dispatcher.set_share(&options.tenant, policy.share);
    options.dispatcher = Some(dispatcher);
    options.max_run_fuel = policy.max_run_fuel;
    options.tenants = policy.tenants;
    let progress = tokio::spawn(show_progress(receiver, workflow.steps.len() as u64));
    let result = scheduler::run(&sandbox, workflow, inputs, options).await;
    let _ = progress.await;
    let report = match result {
        Ok(report) => report,
        Err(err) => {
            eprintln!("{err}");
            return exit::INVALID_COMPONENT;
        }
    };
    if how.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(err) => eprintln!("error: cannot encode the report: {err}"),
        }
    } else {
        eprintln!("{}", summary_table(&report));
        for error in &report.output_errors {
            eprintln!("warning: {error}");
        }
        println!("{}", serde_json::Value::Object(report.outputs.clone()));
    }
    if let Some(error) = &report.error {
        eprintln!("error: {error}");
    }
    eprintln!(
        "run {} {} in {:.2?}",
        report.run_id,
        match report.status {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "was cancelled",
        },
        Duration::from_secs_f64(report.duration_ms / 1000.0)
    );
    match report.status {
        RunStatus::Succeeded => 0,
        RunStatus::Failed => exit::STEP_FAILED,
        RunStatus::Cancelled => exit::CANCELLED,
    }
}

/// Ctrl-C or SIGTERM cancels the run; running attempts end as cancelled.
async fn cancel_on_signal(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        () = terminate => {}
    }
    eprintln!("cancelling the run: stopping running steps");
    cancel.cancel();
}

/// A progress bar and one line per running step on a terminal; plain lines
/// otherwise.
async fn show_progress(mut events: mpsc::UnboundedReceiver<RunEvent>, total: u64) {
    let started = Instant::now();
    if !std::io::stderr().is_terminal() {
        while let Some(event) = events.recv().await {
            eprintln!("[{:>8.2?}] {}", started.elapsed(), describe(&event));
        }
        return;
    }
    let bars = MultiProgress::new();
    let overall = bars.add(ProgressBar::new(total));
    overall.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let spinner = ProgressStyle::with_template("  {spinner} {msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut running: HashMap<String, ProgressBar> = HashMap::new();
    while let Some(event) = events.recv().await {
        match &event {
            RunEvent::AttemptStarted { step, attempt, .. } => {
                let bar = running.entry(step.clone()).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_style(spinner.clone());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                });
                bar.set_message(if *attempt > 1 { format!("{step} (attempt {attempt})") } else { step.clone() });
            }
            RunEvent::Retrying { .. } => {
                let _ = bars.println(describe(&event));
            }
            RunEvent::StepFinished { step, status, .. } => {
                let finished_items: Vec<String> = running
                    .keys()
                    .filter(|key| *key == step || key.starts_with(&format!("{step}[")))
                    .cloned()
                    .collect();
                for key in finished_items {
                    if let Some(bar) = running.remove(&key) {
                        bar.finish_and_clear();
                    }
                }
                if !step.contains('.') {
                    overall.inc(1);
                }
                if *status != StepStatus::Succeeded {
                    let _ = bars.println(describe(&event));
                }
            }
        }
    }
    overall.finish_and_clear();
}

fn describe(event: &RunEvent) -> String {
    match event {
        RunEvent::AttemptStarted { step, attempt, .. } => format!("{step}: attempt {attempt} started"),
        RunEvent::Retrying { step, attempt, delay, failure, .. } => {
            format!("{step}: attempt {attempt} failed ({failure}); retrying in {:.1?}", delay)
        }
        RunEvent::StepFinished { step, status, reason } => match reason {
            Some(reason) => format!("{step}: {} ({reason})", status.as_str()),
            None => format!("{step}: {}", status.as_str()),
        },
    }
}

/// Step, status, attempts, duration, fuel, peak memory, error.
fn summary_table(report: &RunReport) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_BORDERS_ONLY)
        .set_header(["step", "status", "attempts", "duration", "fuel", "memory", "error"]);
    fn add(table: &mut Table, step: &StepReport) {
        let status = if step.required {
            step.status.as_str().to_owned()
        } else {
            format!("{} (optional)", step.status.as_str())
        };
        // Skipped steps and includes ran no attempts of their own.
        let ran = step.attempts() > 0;
        let if_ran = |text: String| if ran { text } else { String::new() };
        table.add_row([
            step.id.clone(),
            status,
            if_ran(step.attempts().to_string()),
            step.duration().map(|d| format!("{d:.1?}")).unwrap_or_default(),
            if_ran(step.fuel_consumed().to_string()),
            if_ran(ByteSize(step.peak_memory()).display().iec().to_string()),
            step.reason.clone().unwrap_or_default(),
        ]);
        for child in &step.steps {
            add(table, child);
        }
    }
    for step in &report.steps {
        add(&mut table, step);
    }
    table
}
