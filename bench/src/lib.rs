//! The benchmark suite. Every comparison runs in one process, side by side
//! with its baseline, and is reported as a ratio, so a noisy shared machine
//! moves both sides alike.

mod cluster;
pub mod counts;
mod floor;
mod measure;
mod service;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stepbox::run::{Run, RunStatus};
use stepbox::sandbox::{EngineConfig, Sandbox};
use stepbox::scheduler::{self, RunOptions};
use stepbox::store::{Database, MemoryKeyValueStore, PgStore, Store};
use stepbox::workflow::{StepBuilder, Workflow, WorkflowBuilder};
use stepbox_tests::guests;

use counts::Shape;
use measure::per_step;
pub use measure::{Report, Row, Target, Value};

/// How big each comparison is.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Steps in the wide graph and in the chain (and processes).
    pub graph: usize,
    /// Steps of the naive embedding, which compiles for each.
    pub naive: usize,
    /// Rounds of the CPU-bound step's work.
    pub cpu_rounds: u32,
    /// Iterations of the empty loop.
    pub cpu_loop: u64,
    /// Steps per run in the memory comparison, and runs before each reading.
    pub memory_run: usize,
    pub memory_runs: (usize, usize),
    /// Runs started one at a time for the service's latencies, and runs
    /// started by 50 clients for its rate.
    pub service: (usize, usize),
    /// I/O-bound steps per run through the cluster's queue, and one-step
    /// runs for its latencies.
    pub cluster: (usize, usize),
    /// Steps of the graphs whose instructions callgrind counts (see
    /// [`counts::per_step`]); none at the smoke size, where a test of its
    /// own does the counting.
    pub counts: Option<counts::Sizes>,
}

/// What the issue asks for: 10,000 steps, 100,000 sequential ones.
pub const FULL: Sizes = Sizes {
    graph: 10_000,
    naive: 100,
    cpu_rounds: 20,
    cpu_loop: 1_000_000_000,
    memory_run: 1_000,
    memory_runs: (1, 100),
    service: (200, 5_000),
    cluster: (2_000, 200),
    counts: Some(counts::Sizes { small: 200, large: 1_200 }),
};
/// Every comparison, small enough for CI.
pub const SMOKE: Sizes = Sizes {
    graph: 100,
    naive: 3,
    cpu_rounds: 1,
    cpu_loop: 5_000_000,
    memory_run: 20,
    memory_runs: (1, 5),
    service: (5, 100),
    cluster: (40, 5),
    counts: None,
};

/// Parts of the suite that can run alone: each measures its own
/// baselines, so its ratios mean what they mean in the whole suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Runs started through `stepbox serve`'s API.
    Service,
    /// Attempts handed to workers through the PostgreSQL queue.
    Cluster,
    /// The wide graph with metrics recorded and traces exported.
    Observe,
    /// The floors, the wide graph and the chain, in process on SQLite.
    Graph,
    /// Instructions per no-op step, counted by valgrind's callgrind.
    Counts,
    /// The wide graph and the chain recorded in PostgreSQL, against SQLite.
    Postgres,
    /// What fuel and time limits cost CPU-bound guests.
    Metering,
}

/// What later rows compare with.
struct Graph {
    floor_one: Duration,
    wide_journal: Duration,
    chain_journal: Duration,
}

/// The floors (wasmtime alone, each way), then the wide graph and the
/// chain, with and without the journal, against them.
async fn graph_rows(
    report: &mut Report,
    sizes: Sizes,
    progress: &impl Fn(&str),
    sandbox: &Sandbox,
    dir: &Path,
) -> anyhow::Result<Graph> {
    let n = sizes.graph;
    let parallel = scheduler::default_max_parallel();
    progress("floor");
    let floors = floor::Floors::measure(sandbox.engine(), guests::NOOP, n, parallel).await?;
    let ((fastest_one, floor_one), (fastest_parallel, floor_parallel)) = floors.fastest();
    for (what, one, many) in &floors.each {
        // stepbox's engine, and the pool resetting only written pages,
        // are not floors: each is measured against them.
        let (to_one, to_many) = match *what == floor::SETTINGS[2] || *what == floor::SETTINGS[3] {
            true => (Some(("floor, one at a time", floor_one)), Some(("floor, parallel", floor_parallel))),
            false => (None, None),
        };
        report.step(
            &format!("wasmtime, {what}: instantiate + call a no-op step, one at a time"),
            *one,
            to_one,
            Target::None,
        );
        report.step(&format!("wasmtime, {what}: the same, {parallel} at a time"), *many, to_many, Target::None);
    }
    report.step(&format!("floor, one at a time: the fastest, {fastest_one}"), floor_one, None, Target::None);
    report.step(
        &format!("floor, parallel: the fastest {parallel} at a time, {fastest_parallel}"),
        floor_parallel,
        None,
        Target::None,
    );

    // Loading the component first puts it in the compile cache, so the
    // runs measure scheduling and attempts, not a compile.
    sandbox.load(Path::new(guests::NOOP))?;
    let floor_wide = Some(("floor, parallel", floor_parallel));
    let floor_chain = Some(("floor, one at a time", floor_one));
    let mut wide_journal = Duration::ZERO;
    for (journal, target) in [(false, 1.3), (true, 1.6)] {
        let what = if journal { "journal" } else { "no journal" };
        progress(&format!("wide graph, {what}"));
        let (time, commits) = fastest_run(sandbox, "wide", n, false, journal.then(|| dir.join("wide"))).await?;
        report.step(&format!("stepbox: {n} independent no-op steps, {what}"), time, floor_wide, Target::AtMost(target));
        if journal {
            wide_journal = time;
            report.count("journal commits per step, independent steps", commits as f64 / n as f64, None);
        }
    }
    // A link with the journal must wait for its start record's commit: the
    // target is the floor's 1.5× beyond that one commit.
    progress("fsync");
    let commit = measure::durable_commit(&dir.join("fsync"))?;
    report.time("one durable SQLite commit on this disk (WAL, synchronous=FULL)", commit, None);
    let mut chain_journal = Duration::ZERO;
    for journal in [false, true] {
        let what = if journal { "journal" } else { "no journal" };
        progress(&format!("chain, {what}"));
        let (time, commits) = fastest_run(sandbox, "chain", n, true, journal.then(|| dir.join("chain"))).await?;
        let target = if journal { Target::None } else { Target::AtMost(1.5) };
        report.step(&format!("stepbox: a chain of {n} no-op steps, {what}"), time, floor_chain, target);
        if journal {
            chain_journal = time;
            report.count("journal commits per link, chain", commits as f64 / n as f64, None);
            report.step(
                "chain, journal: a link's time beyond its one durable commit",
                time.saturating_sub(commit),
                floor_chain,
                Target::AtMost(1.5),
            );
        }
    }

    Ok(Graph { floor_one, wide_journal, chain_journal })
}

/// The wide graph and the chain recorded in PostgreSQL (a database of the
/// suite's own on the local server), against the same on SQLite
/// (`on_sqlite`: per step, wide and chain).
async fn postgres_rows(
    report: &mut Report,
    n: usize,
    progress: &impl Fn(&str),
    sandbox: &Sandbox,
    on_sqlite: (Duration, Duration),
) -> anyhow::Result<()> {
    progress("PostgreSQL");
    let database = stepbox_tests::postgres::TestDatabase::create();
    for (chain, shape, on_sqlite) in
        [(false, "independent no-op steps", on_sqlite.0), (true, "chained no-op steps", on_sqlite.1)]
    {
        let store: Arc<dyn Store> = Arc::new(PgStore::open(&database.url)?);
        let name = if chain { "chain" } else { "wide" };
        let (time, commits) = timed_run(sandbox, workflow(name, n, chain)?, Some(store)).await?;
        report.step(
            &format!("stepbox on PostgreSQL: {n} {shape}"),
            per_step(time, n),
            Some(("the same on SQLite", on_sqlite)),
            Target::None,
        );
        report.count(&format!("journal commits per step on PostgreSQL, {shape}"), commits as f64 / n as f64, None);
    }
    Ok(())
}

/// Runs every comparison, or only the `only` part; `progress` hears what
/// is about to run.
pub async fn suite(sizes: Sizes, only: Option<Part>, progress: impl Fn(&str)) -> anyhow::Result<Report> {
    let mut report = Report::new();
    if let Some(part) = only {
        match part {
            Part::Service => service_rows(&mut report, sizes, &progress).await?,
            Part::Cluster => cluster_rows(&mut report, sizes, &progress).await?,
            Part::Observe => observe_rows(&mut report, sizes, &progress).await?,
            Part::Graph => {
                let dir = tempfile::tempdir()?;
                graph_rows(&mut report, sizes, &progress, &sandbox(dir.path())?, dir.path()).await?;
            }
            Part::Counts => count_rows(&mut report, sizes, &progress)?,
            Part::Metering => limits_rows(&mut report, sizes, &progress).await?,
            Part::Postgres => {
                let dir = tempfile::tempdir()?;
                let sandbox = sandbox(dir.path())?;
                sandbox.load(Path::new(guests::NOOP))?;
                let n = sizes.graph;
                let wide = fastest_run(&sandbox, "wide", n, false, Some(dir.path().join("wide"))).await?.0;
                let chain = fastest_run(&sandbox, "chain", n, true, Some(dir.path().join("chain"))).await?.0;
                postgres_rows(&mut report, n, &progress, &sandbox, (wide, chain)).await?;
            }
        }
        return Ok(report);
    }
    let dir = tempfile::tempdir()?;
    let sandbox = sandbox(dir.path())?;
    let n = sizes.graph;
    let parallel = scheduler::default_max_parallel();

    let graph = graph_rows(&mut report, sizes, &progress, &sandbox, dir.path()).await?;
    let (floor_chain, wide_journal, chain_journal) =
        (Some(("floor, one at a time", graph.floor_one)), graph.wide_journal, graph.chain_journal);

    postgres_rows(&mut report, n, &progress, &sandbox, (wide_journal, chain_journal)).await?;

    progress("memory");
    let (early, late) = sizes.memory_runs;
    let memory_workflow = Arc::new(workflow("memory", sizes.memory_run, true)?);
    for _ in 0..early {
        run(&sandbox, memory_workflow.clone(), RunOptions::new("memory")).await?;
    }
    let after_early = measure::resident_bytes();
    for _ in early..late {
        run(&sandbox, memory_workflow.clone(), RunOptions::new("memory")).await?;
    }
    let after_late = measure::resident_bytes();
    let (steps_early, steps_late) = (early * sizes.memory_run, late * sizes.memory_run);
    report.bytes(&format!("resident memory after {steps_early} sequential steps"), after_early, None, Target::None);
    report.bytes(
        &format!("resident memory after {steps_late} sequential steps"),
        after_late,
        Some((&format!("after {steps_early}"), after_early)),
        Target::AtMost(1.1),
    );
    let before = measure::resident_bytes();
    measure::reset_peak_resident();
    timed_run(&sandbox, workflow("pending", n, false)?, sqlite(&dir.path().join("pending"))?).await?;
    report.bytes(
        &format!("peak resident memory while {n} steps are pending (journal on)"),
        measure::peak_resident_bytes(),
        Some(("resident before the run", before)),
        Target::None,
    );
    progress("process per step");
    let processes = per_step(process_per_step(n, parallel).await?, n);
    report.step(
        &format!("process per step: {n} × /bin/true, {parallel} at a time"),
        processes,
        Some(("stepbox, independent steps, journal", wide_journal)),
        Target::AtLeast(20.0),
    );

    progress("naive embedding");
    let naive = per_step(floor::naive(guests::NOOP, sizes.naive).await?, sizes.naive);
    report.step(
        &format!("naive embedding: a new engine and a compile per step ({} steps)", sizes.naive),
        naive,
        floor_chain,
        Target::None,
    );

    progress("cold and warm start");
    let large = guests::TRANSFORM_JS;
    let megabytes = std::fs::metadata(large)?.len() as f64 / 1e6;
    let cache = dir.path().join("start");
    let cold = start(large, &cache).await?;
    let warm = start(large, &cache).await?;
    report.time("warm start: a run of a one-step workflow, compiled component cached", warm, None);
    report.compare(
        &format!("cold start: the same run compiling its {megabytes:.1} MB component"),
        cold,
        Some(("warm start", warm)),
        Target::AtLeast(20.0),
    );

    service_rows(&mut report, sizes, &progress).await?;
    cluster_rows(&mut report, sizes, &progress).await?;

    limits_rows(&mut report, sizes, &progress).await?;
    observe_rows(&mut report, sizes, &progress).await?;
    count_rows(&mut report, sizes, &progress)?;
    Ok(report)
}

/// Instructions per no-op step of the wide graph and the chain, counted in
/// runs of this executable's own `--count` (so only the suite's binary,
/// not a test, asks for them).
fn count_rows(report: &mut Report, sizes: Sizes, progress: &impl Fn(&str)) -> anyhow::Result<()> {
    let Some(steps) = sizes.counts else { return Ok(()) };
    let exe = std::env::current_exe()?;
    progress("instruction counts, floor");
    let floor = counts::per_step(&exe, Shape::Floor, steps)?;
    let what = "wasmtime alone on stepbox's engine: instantiate + call";
    report.count(&format!("instructions per no-op step (callgrind, one slot): {what}"), floor, None);
    let mut wide = 0.0;
    for (shape, what, baseline) in [
        (Shape::Wide, "independent no-op steps, no journal", None),
        (Shape::Chain, "a chain of no-op steps, no journal", None),
        (Shape::WideJournal, "independent no-op steps, SQLite journal", Some("no journal")),
        (
            Shape::WideWatched,
            "independent no-op steps, metrics recorded and traces exported over OTLP",
            Some("unwatched"),
        ),
    ] {
        progress(&format!("instruction counts, {what}"));
        let count = counts::per_step(&exe, shape, steps)?;
        let to = match baseline {
            Some(baseline) => (baseline, wide),
            None => ("wasmtime alone", floor),
        };
        report.count(&format!("instructions per no-op step (callgrind, one slot): stepbox, {what}"), count, Some(to));
        if shape == Shape::Wide {
            wide = count;
        }
    }
    Ok(())
}

/// A CPU-bound guest metered each way, against no metering at all; the
/// target is for what stepbox runs (fuel and epochs).
/// What fuel and time limits cost CPU-bound guests: a JSON step, a sieve
/// and an empty loop, metered each way.
async fn limits_rows(report: &mut Report, sizes: Sizes, progress: &impl Fn(&str)) -> anyhow::Result<()> {
    progress("fuel and time limits");
    let json = format!(r#"{{"work": "json", "rounds": {}, "size": 10000}}"#, sizes.cpu_rounds);
    let step = floor::step_limits_cost(guests::CRUNCH, &json, 3).await?;
    let what = format!("CPU-bound step ({} rounds of writing and reading 10,000 JSON records)", sizes.cpu_rounds);
    metering_rows(report, &what, "JSON step", &step, Target::AtMost(1.3));
    let sieve = format!(r#"{{"work": "sieve", "rounds": {}, "size": 100000}}"#, sizes.cpu_rounds * 10);
    let step = floor::step_limits_cost(guests::CRUNCH, &sieve, 3).await?;
    let what = format!("tight loops ({} rounds of a prime sieve)", sizes.cpu_rounds * 10);
    metering_rows(report, &what, "sieve", &step, Target::AtMost(1.7));
    let tight = floor::loop_limits_cost(sizes.cpu_loop, 3).await?;
    let what = format!("worst case, an empty loop of {} iterations", sizes.cpu_loop);
    metering_rows(report, &what, "empty loop", &tight, Target::None);
    Ok(())
}

fn metering_rows(report: &mut Report, what: &str, short: &str, cost: &floor::LimitsCost, target: Target) {
    let bare = Some(("no fuel, no epochs", cost.bare));
    report.time(&format!("{what}: no fuel, no epochs"), cost.bare, None);
    report.compare(&format!("{short}: fuel on"), cost.fuel, bare, Target::None);
    report.compare(&format!("{short}: epoch interruption on"), cost.epoch, bare, Target::None);
    report.compare(
        &format!("{short}: fuel and epochs on (what stepbox ran until 2026-12-05)"),
        cost.both,
        bare,
        Target::None,
    );
    report.compare(
        &format!(
            "{short}: fuel in slices of {}, yielding after slow host calls (what stepbox runs)",
            stepbox::sandbox::FUEL_SLICE
        ),
        cost.stepbox,
        bare,
        target,
    );
}

/// The service's rows: runs started through its API, against in process.
async fn service_rows(report: &mut Report, sizes: Sizes, progress: &impl Fn(&str)) -> anyhow::Result<()> {
    progress("service");
    let (samples, runs) = sizes.service;
    let times = service::measure(samples, runs, 50).await?;
    for (p, api, local) in [("p50", times.api.0, times.local.0), ("p99", times.api.1, times.local.1)] {
        let baseline = format!("started in process, {p}");
        let what = format!("service: POST …/runs to the first attempt's start, {p} (journal on)");
        report.time(&what, api, Some((&baseline, local)));
    }
    report.time(
        "service: signed webhook to the first attempt's start, p50",
        times.webhook,
        Some(("POST …/runs, p50", times.api.0)),
    );
    report.step(
        &format!("service: {runs} one-step runs through the API from 50 clients"),
        times.api_per_run,
        Some(("started in process by 50 tasks", times.local_per_run)),
        Target::None,
    );
    Ok(())
}

/// What watching a run costs: the wide graph (journal on) with metrics
/// recorded and every span exported over OTLP to a receiver in this
/// process, against the same graph unwatched, in turns: the median of
/// each turn's ratio. The spans left when a watched run ends are exported
/// after it, untimed.
async fn observe_rows(report: &mut Report, sizes: Sizes, progress: &impl Fn(&str)) -> anyhow::Result<()> {
    use anyhow::Context as _;
    /// Turns of one run each way: on a shared machine two runs of the same
    /// graph can differ by a fifth, and two turns in a row by less.
    const TURNS: usize = 9;
    progress("metrics and traces");
    let dir = tempfile::tempdir()?;
    let sandbox = sandbox(dir.path())?;
    sandbox.load(Path::new(guests::NOOP))?;
    let n = sizes.graph;
    let endpoint = otlp_sink().await?;
    // A first run warms what the others share.
    let warm = workflow("warm", n, false)?;
    timed_run(&sandbox, warm, sqlite(&dir.path().join("warm"))?).await?;
    let mut turns = Vec::new();
    for turn in 0..TURNS {
        let mut times = [Duration::ZERO; 2];
        // Which goes first alternates, so neither side always runs after
        // the other (its files, its cache, its exporter's last post).
        for on in if turn % 2 == 0 { [false, true] } else { [true, false] } {
            stepbox::metrics::record(on);
            let exporting = match on {
                true => Some(
                    stepbox::traces::export(Some(&endpoint))
                        .map_err(anyhow::Error::msg)?
                        .context("no trace exporter")?,
                ),
                false => None,
            };
            let name = format!("{}-{turn}", if on { "watched" } else { "plain" });
            let (time, _) = timed_run(&sandbox, workflow(&name, n, false)?, sqlite(&dir.path().join(&name))?).await?;
            times[usize::from(on)] = time;
            drop(exporting);
        }
        turns.push(times);
    }
    stepbox::metrics::record(false);
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let ratio = median(turns.iter().map(|[plain, watched]| watched.as_secs_f64() / plain.as_secs_f64()).collect());
    let watched = median(turns.iter().map(|[_, watched]| watched.as_secs_f64()).collect());
    report.paired(
        &format!("{n} independent no-op steps (journal on): metrics recorded and traces exported over OTLP"),
        per_step(Duration::from_secs_f64(watched), n),
        &format!("the same unwatched (the median of {TURNS} turns' ratios)"),
        ratio,
        Target::AtMost(1.1),
    );
    Ok(())
}

/// An OTLP/HTTP receiver that takes every export and keeps nothing; its
/// base address. It reads each body to its end and drops it a chunk at a
/// time: a collector is another process, and what it does with the bytes
/// is not what watching costs stepbox.
pub(crate) async fn otlp_sink() -> anyhow::Result<String> {
    let drain = |mut body: axum::body::Body| async move {
        while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
    };
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(drain));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{address}"))
}

/// The cluster's rows: attempts through the PostgreSQL queue to workers.
async fn cluster_rows(report: &mut Report, sizes: Sizes, progress: &impl Fn(&str)) -> anyhow::Result<()> {
    progress("cluster");
    let (steps, samples) = sizes.cluster;
    let times = cluster::measure(steps, samples).await?;
    let one = times.runs[0].per_step;
    for scaled in &times.runs {
        let workers = scaled.workers;
        let what = format!(
            "cluster: {steps} I/O-bound steps ({} ms each in a host call) on {workers} worker(s) of {} slots",
            cluster::WAIT_MS,
            cluster::SLOTS
        );
        if workers == 1 {
            report.step(&what, scaled.per_step, None, Target::None);
        } else {
            report.speedup(
                &what,
                scaled.per_step,
                ("one worker (throughput ×)", one),
                Target::AtLeast(0.8 * workers as f64),
            );
        }
        report.count(&format!("cluster, {workers} worker(s): share of the machine's CPU busy"), scaled.busy, None);
        report.count(&format!("cluster, {workers} worker(s): PostgreSQL transactions per step"), scaled.commits, None);
    }
    for (p, queued, local) in [("p50", times.queued.0, times.local.0), ("p99", times.queued.1, times.local.1)] {
        let what = format!("cluster: a step's start to its attempt's start on an idle worker, {p}");
        report.time(&what, queued, Some((&format!("in process, {p}"), local)));
    }
    Ok(())
}

/// A sandbox whose data directory (and so compile cache) is `data_dir`.
fn sandbox(data_dir: &Path) -> anyhow::Result<Sandbox> {
    let config = EngineConfig { data_dir: Some(data_dir.to_owned()), ..EngineConfig::default() };
    Sandbox::new(config, Arc::new(MemoryKeyValueStore::new()))
}

/// `n` no-op steps, independent or each depending on the one before.
fn workflow(name: &str, n: usize, chain: bool) -> anyhow::Result<Workflow> {
    let mut builder = WorkflowBuilder::new(name).component("noop", guests::NOOP);
    for i in 0..n {
        let mut step = StepBuilder::new(format!("s{i}"), "noop").with(json!(null));
        if chain && i > 0 {
            step = step.depends_on([format!("s{}", i - 1)]);
        }
        builder = builder.step(step);
    }
    Ok(builder.build()?)
}

async fn run(sandbox: &Sandbox, workflow: Arc<Workflow>, options: RunOptions) -> anyhow::Result<()> {
    let inputs = workflow.bind_inputs(&Default::default())?;
    let report = scheduler::run(sandbox, workflow, inputs, options).await?;
    anyhow::ensure!(report.run.status == RunStatus::Succeeded, "a benchmark run failed: {:?}", report.run.error);
    Ok(())
}

/// Runs `workflow` (recording it in `store` when given, as the CLI does)
/// and returns its wall time and how many journal transactions it
/// committed.
async fn timed_run(
    sandbox: &Sandbox,
    workflow: Workflow,
    store: Option<Arc<dyn Store>>,
) -> anyhow::Result<(Duration, u64)> {
    let mut options = RunOptions::new(workflow.name.clone());
    if let Some(store) = &store {
        journal_in(store, &mut options, &workflow.name).await?;
    }
    let started = Instant::now();
    run(sandbox, Arc::new(workflow), options).await?;
    let elapsed = started.elapsed();
    Ok((elapsed, store.map_or(0, |store| store.journal_commits())))
}

/// Records the run of `options` in `store`, as the CLI does: its row
/// first, then every record of the run.
async fn journal_in(store: &Arc<dyn Store>, options: &mut RunOptions, workflow: &str) -> anyhow::Result<()> {
    let run = Run::new(options.run_id.clone(), workflow, "", "default", Default::default());
    let (_, created) = store.create_run(&run, &json!({}));
    created.await?;
    options.journal = Some(store.clone());
    Ok(())
}

/// The faster of two runs of `n` no-op steps (as the floor is the fastest
/// of two turns), each recorded, when `journal` is given, in a fresh SQLite
/// store beneath it: the time per step and the journal commits per step.
async fn fastest_run(
    sandbox: &Sandbox,
    name: &str,
    n: usize,
    chain: bool,
    journal: Option<std::path::PathBuf>,
) -> anyhow::Result<(Duration, u64)> {
    let mut fastest = (Duration::MAX, 0);
    for turn in 0..2 {
        let store = match &journal {
            Some(dir) => sqlite(&dir.join(turn.to_string()))?,
            None => None,
        };
        let (time, commits) = timed_run(sandbox, workflow(name, n, chain)?, store).await?;
        fastest = fastest.min((per_step(time, n), commits));
    }
    Ok(fastest)
}

/// The SQLite store of a fresh data directory `dir`.
fn sqlite(dir: &Path) -> anyhow::Result<Option<Arc<dyn Store>>> {
    Ok(Some(Arc::new(Database::open(dir)?)))
}

/// A run of a one-step workflow using `component`, by a new sandbox (as a
/// new process would make) with its data directory, and so its compile
/// cache, in `data_dir`.
async fn start(component: &str, data_dir: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let sandbox = sandbox(data_dir)?;
    let order = json!({ "id": "o-1", "customer": { "first_name": "Ada", "last_name": "Lovelace" },
                        "items": [{ "sku": "tea", "quantity": 2, "unit_price_cents": 250 }] });
    let limits = stepbox::workflow::spec::LimitsSpec {
        fuel: Some(20_000_000_000),
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let step = StepBuilder::new("invoice", "transform").with(order).config("currency", "EUR").limits(limits);
    let workflow = WorkflowBuilder::new("start").component("transform", component).step(step);
    run(&sandbox, Arc::new(workflow.build()?), RunOptions::new("start")).await?;
    Ok(started.elapsed())
}

/// `n` processes of `/bin/true`, `parallel` at a time.
async fn process_per_step(n: usize, parallel: usize) -> anyhow::Result<Duration> {
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let slot = slots.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let status = tokio::process::Command::new("/bin/true").status().await;
            drop(slot);
            status
        });
    }
    while let Some(status) = tasks.join_next().await {
        anyhow::ensure!(status??.success(), "/bin/true failed");
    }
    Ok(started.elapsed())
}
