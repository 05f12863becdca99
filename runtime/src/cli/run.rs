//! `stepbox run`: run a workflow file with live progress and a summary.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::report::{millis, steps_table};
use super::{CliError, Place, admit, engine_config, exit, open_database, parse_key_value, sandbox_with_kv};
use crate::cluster::{HANDED_OVER, QueueExecutor};
use crate::run::{Run, RunReport, RunStatus, StepPath, StepStatus};
use crate::sandbox::EngineConfig;
use crate::scheduler::{self, RunEvent};
use crate::service::{Bundle, Owned, StartRun};
use crate::store::{Heartbeat, Store, WorkflowVersion, new_run_id};
use crate::workflow::Workflow;

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
    /// Attempts running at once, 1 to 4096 [default: twice the CPU cores, at least 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_parallel: Option<u32>,
    /// Cancel running steps as soon as a required step fails (`always` steps still run).
    #[arg(long)]
    fail_fast: bool,
    /// Print the whole run report as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Hand the attempts to `stepbox worker` processes through the database's queue (--db, or the data directory's) instead of running them here; --max-parallel then counts attempts handed over at once [default: 256].
    #[arg(long)]
    queue: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics while the run goes on (port 0 picks a free one; the address is printed). No token is asked for: give an address only operators reach.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

impl HowToRun {
    /// The listener `--metrics-listen` asks for, bound (its address
    /// printed) and recording started; a bad address is a usage error.
    pub(crate) async fn bind_metrics(&self) -> Result<Option<tokio::net::TcpListener>, CliError> {
        match &self.metrics_listen {
            Some(address) => crate::metrics::bind(address).await.map(Some).map_err(CliError::Usage),
            None => Ok(None),
        }
    }

    /// Refuses what only a local run can do, for a run on a server.
    pub(crate) fn local_only(&self) -> Result<(), CliError> {
        if self.max_parallel.is_some() || self.fail_fast || self.queue || self.metrics_listen.is_some() {
            return Err(CliError::Usage(
                "--max-parallel, --fail-fast, --queue and --metrics-listen set how this process runs steps; with \
                 --server, the service decides (and serves its metrics at /metrics)"
                    .into(),
            ));
        }
        Ok(())
    }
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

pub(crate) async fn run(args: Args, place: &Place<'_>, remote: Option<&Client>) -> Result<u8, CliError> {
    let inputs = collect_inputs(args.input_file.as_ref(), &args.inputs).map_err(CliError::Usage)?;
    if let Some(client) = remote {
        return run_remote(args, inputs, client).await;
    }
    // Absolute, so `stepbox resume` finds it from anywhere.
    let file = std::path::absolute(&args.file).unwrap_or_else(|_| args.file.clone());
    let mut workflow = Workflow::load(&file)?;
    let bound = workflow.bind_inputs(&inputs)?;
    let fingerprint =
        workflow.pin().map_err(|err| CliError::Invalid(format!("error: cannot read the workflow's files: {err}")))?;
    let workflow = Arc::new(workflow);
    let tenant = admit(place, &args.tenant, &workflow)?;
    // Bound before the run is recorded: a bad address leaves no run behind.
    let metrics = args.how.bind_metrics().await?;
    let db = open_database(place)?;
    let path = workflow.file.display().to_string();
    let mut run = Run::new(new_run_id(), &workflow.name, &path, &args.tenant, bound.as_map().clone());
    run.labels = args.labels.into_iter().collect();
    let (lease, created) = db.create_run(&run, &fingerprint);
    created.await?;
    let owned = Owned { workflow, run, inputs: bound, tenant, lease };
    execute(db, owned, &args.how, metrics, place).await
}

/// `stepbox run FILE --server URL`: deploys the file with what it
/// references (a new version only if something changed), starts a run of
/// that version and follows it, shown as a local run is.
async fn run_remote(
    args: Args,
    inputs: serde_json::Map<String, serde_json::Value>,
    client: &Client,
) -> Result<u8, CliError> {
    args.how.local_only()?;
    if args.tenant != "default" {
        return Err(CliError::Usage(
            "with --server, the token says which tenant the run belongs to; leave out --tenant".into(),
        ));
    }
    let workflow = Workflow::load(&args.file)?;
    let bundle = Bundle::of_workflow(&workflow, &[]).map_err(CliError::Usage)?;
    let (version, _): (WorkflowVersion, bool) = client.put(&["workflows", &workflow.name], &bundle.encode()).await?;
    let request = StartRun { inputs, labels: args.labels.into_iter().collect(), version: Some(version.version) };
    let (run, _): (Run, bool) = client.post(&["workflows", &workflow.name, "runs"], &request).await?;
    follow(client, &run.id, args.how.json).await
}

/// Follows a run on a server to its end: its events as progress lines,
/// then its report, as a local run is shown; Ctrl-C cancels it.
pub(crate) async fn follow(client: &Client, id: &str, json: bool) -> Result<u8, CliError> {
    let report: RunReport = client.get(&["runs", id], &[]).await?;
    let (events, receiver) = mpsc::unbounded_channel();
    let progress = tokio::spawn(show_progress(receiver, report.steps.len() as u64));
    let followed = tokio::select! {
        followed = client.follow(id, events.clone()) => followed,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("cancelling the run: stopping running steps");
            let _: (Run, bool) = client.post(&["runs", id, "cancel"], &serde_json::json!({})).await?;
            client.follow(id, events.clone()).await
        }
    };
    // The progress display ends when the last sender is gone.
    drop(events);
    let _ = progress.await;
    followed?;
    let report: RunReport = client.get(&["runs", id], &[]).await?;
    summarize(&report, json)
}

/// Runs a recorded run (new, resumed or retried) with progress and a
/// summary.
pub(crate) async fn execute(
    db: Arc<dyn Store>,
    owned: Owned,
    how: &HowToRun,
    metrics: Option<tokio::net::TcpListener>,
    place: &Place<'_>,
) -> Result<u8, CliError> {
    let default = if how.queue { HANDED_OVER } else { scheduler::default_max_parallel() };
    let max_parallel = how.max_parallel.map_or(default, |n| n as usize);
    // Attempts handed to workers do not run in this sandbox: it only
    // compiles, to check the components before they are handed over.
    let slots = if how.queue { scheduler::default_max_parallel() } else { max_parallel };
    let config = EngineConfig {
        max_concurrent_attempts: u32::try_from(slots).unwrap_or(u32::MAX),
        ..engine_config(place.data_dir)
    };
    let sandbox = sandbox_with_kv(config, db.key_values())?;
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    let (events, receiver) = mpsc::unbounded_channel();
    let dispatcher = scheduler::Dispatcher::new(max_parallel);
    let metrics = metrics.map(|listener| serve_metrics(listener, &dispatcher, how.queue.then(|| db.clone())));
    let mut options = owned.options(db.clone(), dispatcher);
    options.secrets_dir = place.secrets_dir.map(ToOwned::to_owned);
    options.fail_fast = how.fail_fast;
    options.events = Some(events);
    options.cancel = cancel.clone();
    if how.queue {
        // A run taken over (resumed) waits for the attempts an earlier
        // coordinator handed out rather than run them again.
        options.executor = Some(QueueExecutor::new(db.clone()));
    }
    let Owned { workflow, inputs, lease, .. } = owned;
    // Renewed while the run goes on, released when it ends; a lease taken
    // over by another process stops this one, as does a cancel asked of it
    // (through a service sharing the database).
    let heartbeat = Heartbeat::start(db.clone(), lease, cancel.clone(), cancel.clone());
    let progress = tokio::spawn(show_progress(receiver, workflow.steps.len() as u64));
    let result = scheduler::run(&sandbox, workflow, inputs, options).await;
    heartbeat.release().await;
    if let Some(metrics) = metrics {
        metrics.cancel();
    }
    let _ = progress.await;
    let mut report = result?;
    if how.json {
        // The attempts' logs, stdout and stderr left memory for the journal.
        report.restore_records(db.run_report(&report.run.id)?);
    }
    summarize(&report, how.json)
}

/// Serves the metrics on `listener` until the returned token is cancelled:
/// attempts waiting and running in `dispatcher`, and in the queue of
/// `queue` when the run hands its attempts to workers.
fn serve_metrics(
    listener: tokio::net::TcpListener,
    dispatcher: &Arc<scheduler::Dispatcher>,
    queue: Option<Arc<dyn Store>>,
) -> CancellationToken {
    let dispatcher = Arc::downgrade(dispatcher);
    let snapshots: crate::metrics::Snapshots = Arc::new(move || {
        let mut snapshots: Vec<_> = dispatcher.upgrade().map(|dispatcher| dispatcher.snapshot()).into_iter().collect();
        snapshots.extend(queue.as_deref().and_then(crate::metrics::queue_snapshot));
        snapshots
    });
    let stop = CancellationToken::new();
    tokio::spawn(crate::metrics::serve(listener, snapshots, stop.clone().cancelled_owned()));
    stop
}

/// Prints what a finished run gave (its report as JSON, or a table and its
/// outputs) and how it ended; returns the run's exit code. The same for a
/// local run and one followed on a server.
pub(crate) fn summarize(report: &RunReport, json: bool) -> Result<u8, CliError> {
    if json {
        let text = serde_json::to_string_pretty(report)
            .map_err(|err| CliError::Failed(format!("cannot encode the report: {err}")))?;
        println!("{text}");
    } else {
        eprintln!("{}", steps_table(report));
        for error in &report.output_errors {
            eprintln!("warning: {error}");
        }
        println!("{}", serde_json::Value::Object(report.run.outputs.clone().unwrap_or_default()));
    }
    if let Some(error) = &report.run.error {
        eprintln!("error: {error}");
    }
    let status = report.run.status;
    eprintln!(
        "run {} {} in {:.2?}",
        report.run.id,
        if status == RunStatus::Cancelled { "was cancelled" } else { status.as_str() },
        millis(report.run.duration_ms().unwrap_or_default())
    );
    Ok(match status {
        RunStatus::Succeeded => 0,
        RunStatus::Running | RunStatus::Interrupted | RunStatus::Failed => exit::FAILED,
        RunStatus::Cancelled => exit::CANCELLED,
        RunStatus::Waiting => {
            eprintln!(
                "the run waits for an event: send it with `POST /v1/runs/{}/events/NAME` to the `stepbox serve` it \
                 was deployed to",
                report.run.id
            );
            exit::WAITING
        }
    })
}

/// Ctrl-C or SIGTERM cancels the run; running attempts end as cancelled.
async fn cancel_on_signal(cancel: CancellationToken) {
    super::interrupted().await;
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
    let mut running: HashMap<StepPath, ProgressBar> = HashMap::new();
    while let Some(event) = events.recv().await {
        match &event {
            RunEvent::AttemptStarted { path, attempt } => {
                let step = path.to_string();
                let bar = running.entry(path.clone()).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_style(spinner.clone());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                });
                bar.set_message(if *attempt > 1 { format!("{step} (attempt {attempt})") } else { step });
            }
            RunEvent::Retrying { .. } => {
                let _ = bars.println(describe(&event));
            }
            RunEvent::StepFinished { path, status, .. } => {
                let finished: Vec<StepPath> = running.keys().filter(|key| key.step() == *path).cloned().collect();
                for key in finished {
                    if let Some(bar) = running.remove(&key) {
                        bar.finish_and_clear();
                    }
                }
                if path.depth() == 1 {
                    overall.inc(1);
                }
                if *status != StepStatus::Succeeded {
                    let _ = bars.println(describe(&event));
                }
            }
            RunEvent::RunFinished { .. } => {}
            RunEvent::WaitStarted { .. } => {
                let _ = bars.println(describe(&event));
            }
        }
    }
    overall.finish_and_clear();
}

fn describe(event: &RunEvent) -> String {
    match event {
        RunEvent::AttemptStarted { path, attempt } => format!("{path}: attempt {attempt} started"),
        RunEvent::Retrying { path, attempt, delay, failure } => {
            format!("{path}: attempt {attempt} failed ({failure}); retrying in {:.1?}", delay)
        }
        RunEvent::StepFinished { path, status, reason } => match reason {
            Some(reason) => format!("{path}: {status} ({reason})"),
            None => format!("{path}: {status}"),
        },
        RunEvent::RunFinished { status } => format!("the run {status}"),
        RunEvent::WaitStarted { path, event } => format!("{path}: waiting for the event `{event}`"),
    }
}
