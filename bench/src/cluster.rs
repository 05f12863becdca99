//! The cluster: I/O-bound steps handed through the PostgreSQL queue to 1, 2
//! and 4 workers, and how long an attempt waits from its step's start to
//! its start on an idle worker, beside the same in process.
//!
//! Each worker has what a `stepbox worker` process has (its own store
//! connections and runtime, its own sandbox) on a thread of its own; they
//! share this process only so the smoke test can run them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stepbox::cluster::{HANDED_OVER, QueueExecutor, WorkerConfig, work};
use stepbox::run::{Run, RunReport, RunStatus};
use stepbox::sandbox::{EngineConfig, Sandbox};
use stepbox::scheduler::{self, Executor, RunOptions};
use stepbox::store::{PgStore, Store};
use stepbox::workflow::{StepBuilder, Workflow, WorkflowBuilder};
use stepbox_tests::guests;
use tokio_util::sync::CancellationToken;

use crate::measure::{MachineCpu, percentile};

/// Slots of each worker.
pub const SLOTS: usize = 4;
/// Reserve slots of each worker, as `stepbox worker` has by default (one
/// tenant here, so they stay free).
const RESERVE: usize = SLOTS.div_ceil(4);
/// How long each I/O-bound step waits in a host call.
pub const WAIT_MS: u64 = 20;

/// What the cluster's paths measured.
pub struct ClusterTimes {
    /// Each I/O-bound run, by number of workers.
    pub runs: Vec<Scaled>,
    /// A step's start to its attempt's start on an idle worker, p50 and
    /// p99.
    pub queued: (Duration, Duration),
    /// The same in process, p50 and p99.
    pub local: (Duration, Duration),
}

/// The I/O-bound run on some workers.
pub struct Scaled {
    pub workers: usize,
    /// Wall time per step.
    pub per_step: Duration,
    /// The share of the machine's cores busy meanwhile (PostgreSQL's work
    /// included): near 1, the machine, not stepbox's design, set the pace.
    pub busy: f64,
    /// PostgreSQL transactions committed per step, every process's.
    pub commits: f64,
}

/// A worker on its own thread; stopped and joined when dropped.
struct Worker {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn start(url: &str, data_dir: &std::path::Path, n: usize) -> anyhow::Result<Worker> {
        let store: Arc<dyn Store> = Arc::new(PgStore::open(url)?);
        let engine = EngineConfig {
            data_dir: Some(data_dir.to_owned()),
            max_concurrent_attempts: (SLOTS + RESERVE) as u32,
            ..EngineConfig::default()
        };
        let sandbox = Sandbox::new(engine, store.key_values())?;
        let config = WorkerConfig {
            slots: SLOTS,
            reserve: RESERVE,
            lease: Duration::from_secs(5),
            owner: format!("bench-worker-{n}"),
            tenants: None,
            secrets_dir: None,
        };
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let thread = std::thread::spawn(move || runtime.block_on(work(store, sandbox, config, stopping)));
        Ok(Worker { stop, thread: Some(thread) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `n` independent steps that each wait [`WAIT_MS`] in a host call.
fn waiting(n: usize) -> anyhow::Result<Workflow> {
    let mut builder = WorkflowBuilder::new("io").component("sleepy", guests::SLEEPY);
    for i in 0..n {
        builder = builder.step(StepBuilder::new(format!("s{i}"), "sleepy").with(json!({ "millis": WAIT_MS })));
    }
    Ok(builder.build()?)
}

/// Runs `workflow`, journaled to `store`, its attempts on `executor`
/// (`None`: in `sandbox`); returns the report and the wall time.
async fn run(
    sandbox: &Sandbox,
    store: &Arc<dyn Store>,
    executor: Option<Arc<dyn Executor>>,
    workflow: Arc<Workflow>,
) -> anyhow::Result<(RunReport, Duration)> {
    let mut options = RunOptions::new(stepbox::store::new_run_id());
    let (_, created) = store
        .create_run(&Run::new(options.run_id.clone(), &workflow.name, "", "default", Default::default()), &json!({}));
    created.await?;
    options.journal = Some(store.clone());
    if executor.is_some() {
        options.max_parallel = HANDED_OVER;
    }
    options.executor = executor;
    let inputs = workflow.bind_inputs(&Default::default())?;
    let started = Instant::now();
    let report = scheduler::run(sandbox, workflow, inputs, options).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(report.run.status == RunStatus::Succeeded, "a benchmark run failed: {:?}", report.run.error);
    Ok((report, elapsed))
}

/// Transactions committed in `database` so far.
fn committed(database: &stepbox_tests::postgres::TestDatabase) -> u64 {
    let rows = database.query("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()");
    rows.first().and_then(|row| row.first().cloned().flatten()).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// How long the run's one step waited from its start to its attempt's (ms).
fn waited(report: &RunReport) -> f64 {
    let step = &report.steps[0];
    let attempt = &step.executions[0].attempts[0];
    attempt.started_ms - step.started_ms.unwrap_or(attempt.started_ms)
}

/// Measures with `steps` I/O-bound steps per run and `samples` one-step
/// runs for the latencies.
pub async fn measure(steps: usize, samples: usize) -> anyhow::Result<ClusterTimes> {
    let dir = tempfile::tempdir()?;
    let database = stepbox_tests::postgres::TestDatabase::create();
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&database.url)?);
    let sandbox = Sandbox::new(
        EngineConfig { data_dir: Some(dir.path().to_owned()), ..EngineConfig::default() },
        store.key_values(),
    )?;
    // Compiled once into the shared cache, so no worker measures a compile.
    sandbox.load(std::path::Path::new(guests::SLEEPY))?;
    let executor: Arc<dyn Executor> = QueueExecutor::new(store.clone());
    let workflow = Arc::new(waiting(steps)?);
    let mut runs = Vec::new();
    let mut workers = Vec::new();
    for count in [1, 2, 4] {
        while workers.len() < count {
            workers.push(Worker::start(&database.url, dir.path(), workers.len())?);
        }
        // A first run warms each worker's component cache.
        run(&sandbox, &store, Some(executor.clone()), Arc::new(waiting(4 * count * SLOTS)?)).await?;
        let (cpu, commits) = (MachineCpu::now(), committed(&database));
        let (_, time) = run(&sandbox, &store, Some(executor.clone()), workflow.clone()).await?;
        let busy = MachineCpu::now().busy_since(cpu);
        // PostgreSQL counts a backend's commits when it next idles (within
        // a second).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let commits = committed(&database).saturating_sub(commits) as f64 / steps as f64;
        runs.push(Scaled { workers: count, per_step: time / steps as u32, busy, commits });
    }
    workers.truncate(1);
    let one = Arc::new(waiting(1)?);
    let (mut queued, mut local) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let (report, _) = run(&sandbox, &store, Some(executor.clone()), one.clone()).await?;
        queued.push(waited(&report));
        let (report, _) = run(&sandbox, &store, None, one.clone()).await?;
        local.push(waited(&report));
    }
    drop(workers);
    drop(executor);
    drop(store);
    Ok(ClusterTimes {
        runs,
        queued: (percentile(&mut queued, 0.5), percentile(&mut queued, 0.99)),
        local: (percentile(&mut local, 0.5), percentile(&mut local, 0.99)),
    })
}
