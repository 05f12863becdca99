//! Instructions per no-op step, counted by valgrind's callgrind. A clock on
//! a shared machine moves by a fifth from one run to the next; a count of
//! the same build moves by far less, so a check can hold the scheduler's
//! cost to a recorded figure.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::Context as _;
use bytesize::ByteSize;
use stepbox::sandbox::{EngineConfig, Sandbox};
use stepbox::scheduler::RunOptions;
use stepbox::store::{Database, MemoryKeyValueStore, Store};
use stepbox_tests::guests;

/// What is counted, per no-op step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// wasmtime alone on stepbox's engine: instantiate and call, one at a
    /// time (the floor, as [`crate::floor::Floor`] runs it).
    Floor,
    /// Independent no-op steps.
    Wide,
    /// No-op steps, each depending on the one before.
    Chain,
    /// Independent no-op steps, each recorded in a SQLite journal (its
    /// writer's thread counted too; the disk's time is not an instruction).
    WideJournal,
    /// Independent no-op steps, metrics recorded and every span exported
    /// over OTLP to a receiver in the process (the exporter's thread and
    /// the receiver counted too).
    WideWatched,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Floor => "floor",
            Shape::Wide => "wide",
            Shape::Chain => "chain",
            Shape::WideJournal => "wide-journal",
            Shape::WideWatched => "wide-watched",
        }
    }
}

/// The graphs of a count: `small` and `large` steps.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Steps of the graph run first, to warm up, and of the baseline.
    pub small: usize,
    /// Steps of the graph counted against the baseline.
    pub large: usize,
}

/// What `stepbox-bench --count SHAPE --small S --large L [--measure-large]
/// --data-dir DIR` runs under callgrind: graphs of `S` and `L` no-op steps
/// built, the small one run to warm up, then the small one again (the
/// baseline) or the large one, without the journal, the component loaded
/// from the compile cache in `data_dir`.
///
/// valgrind gives a process 128 GiB of address space, in two halves:
/// stepbox's default pool of 64 slots reserves 4 TiB, and even one slot's
/// 16 memories of 4 GiB do not fit in a half. So one attempt runs at a
/// time (valgrind runs one thread at a time anyway) and a memory reserves
/// 1 GiB, which makes the no-op guest's few memory accesses check their
/// bounds in code. And a slot's memory is given back to the kernel after
/// each attempt, not kept resident and reset with `memset`: valgrind
/// counts the `rep stosb` of a `memset` as one instruction a byte, which
/// made nine tenths of the count.
pub async fn workload(shape: Shape, sizes: Sizes, large: bool, data_dir: &Path) -> anyhow::Result<()> {
    let config = EngineConfig {
        max_concurrent_attempts: 1,
        max_memory: ByteSize::gib(1),
        memory_reservation: ByteSize::gib(1),
        keep_resident: ByteSize(0),
        data_dir: Some(data_dir.to_owned()),
    };
    let sandbox = Sandbox::new(config, Arc::new(MemoryKeyValueStore::new()))?;
    let measured = if large { sizes.large } else { sizes.small };
    if shape == Shape::Floor {
        let floor = crate::floor::Floor::new(sandbox.engine(), guests::NOOP, true)?;
        for n in [sizes.small, measured] {
            floor.run(n, 1).await?;
        }
        return Ok(());
    }
    let chain = shape == Shape::Chain;
    // Both graphs are built in both processes, whichever runs last.
    let small = Arc::new(crate::workflow(shape.name(), sizes.small, chain)?);
    let large_graph = Arc::new(crate::workflow(shape.name(), sizes.large, chain)?);
    // Each run's journal in a database of its own, gone with the process.
    let journals = tempfile::tempdir()?;
    let exporting = match shape {
        Shape::WideWatched => {
            stepbox::metrics::record(true);
            let endpoint = crate::otlp_sink().await?;
            Some(stepbox::traces::export(Some(&endpoint)).map_err(anyhow::Error::msg)?.context("no trace exporter")?)
        }
        _ => None,
    };
    for (turn, workflow) in [&small, if large { &large_graph } else { &small }].into_iter().enumerate() {
        let mut options = RunOptions { max_parallel: 1, ..RunOptions::new(shape.name()) };
        if shape == Shape::WideJournal {
            let store: Arc<dyn Store> = Arc::new(Database::open(&journals.path().join(turn.to_string()))?);
            crate::journal_in(&store, &mut options, shape.name()).await?;
        }
        crate::run(&sandbox, workflow.clone(), options).await?;
    }
    // Every span exported before the count ends.
    drop(exporting);
    Ok(())
}

/// Instructions per step of `shape`, counted by callgrind in two runs of
/// `exe --count` (a build of this suite): the count of the process whose
/// last run has `large` steps less that of the one whose last run has
/// `small`, over the difference. Everything else the two do alike
/// (starting, building both graphs, loading the component, a run's own
/// cost, the first run's warming up) cancels out.
pub fn per_step(exe: &Path, shape: Shape, sizes: Sizes) -> anyhow::Result<f64> {
    anyhow::ensure!(sizes.small < sizes.large, "the large graph must have more steps than the small");
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    // Compiled once, under valgrind (whose CPU, with fewer features than
    // the machine's, keys the compile cache), uncounted: both counted runs
    // load it.
    let mut warm_up = Command::new("valgrind");
    warm_up.args(["--tool=none", "-q"]).arg(exe);
    run(warm_up, shape, Sizes { small: 1, large: 2 }, false, &data_dir).map_err(missing_valgrind)?;
    let mut counts = [0u64; 2];
    for (count, large) in counts.iter_mut().zip([false, true]) {
        let out = dir.path().join(format!("callgrind.{large}"));
        let mut valgrind = Command::new("valgrind");
        valgrind.arg("--tool=callgrind").arg(format!("--callgrind-out-file={}", out.display())).arg(exe);
        run(valgrind, shape, sizes, large, &data_dir).map_err(missing_valgrind)?;
        *count = totals(&std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?)?;
    }
    let [small, large] = counts;
    anyhow::ensure!(large > small, "{} steps counted {large} instructions, {} steps {small}", sizes.large, sizes.small);
    Ok((large - small) as f64 / (sizes.large - sizes.small) as f64)
}

/// Runs the counted workload by `command` (the suite itself, or valgrind
/// running it); its own output is kept for the error if it fails.
fn run(mut command: Command, shape: Shape, sizes: Sizes, large: bool, data_dir: &Path) -> anyhow::Result<()> {
    // A backtrace captured whenever a store is dropped would be counted.
    command.env_remove("RUST_BACKTRACE").arg("--count").arg(shape.name());
    // A queue that holds every span of the counted runs: none is dropped
    // (and so not counted) when the exporter falls behind under valgrind.
    command.env("OTEL_BSP_MAX_QUEUE_SIZE", "1000000");
    command.arg("--small").arg(sizes.small.to_string()).arg("--large").arg(sizes.large.to_string());
    if large {
        command.arg("--measure-large");
    }
    command.arg("--data-dir").arg(data_dir);
    let output = command.output().with_context(|| format!("could not start {command:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// `err`, or that valgrind is missing when it is.
fn missing_valgrind(err: anyhow::Error) -> anyhow::Error {
    match Command::new("valgrind").arg("--version").output() {
        Ok(output) if output.status.success() => err,
        _ => anyhow::anyhow!("valgrind is not installed; the instruction counts need it (`apt-get install valgrind`)"),
    }
}

/// The instructions a callgrind output file counts in all.
fn totals(callgrind: &str) -> anyhow::Result<u64> {
    callgrind
        .lines()
        .find_map(|line| line.strip_prefix("totals:").or_else(|| line.strip_prefix("summary:")))
        .and_then(|count| count.trim().parse().ok())
        .context("callgrind's output has no `totals:` line")
}
