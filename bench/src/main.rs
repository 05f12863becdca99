//! `cargo run --release -p stepbox-bench` runs the whole suite and prints
//! its table; `--smoke` runs every comparison at a small size.

use clap::Parser;

/// The allocator the `stepbox` binary uses, so the suite measures what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The stepbox benchmark suite: every comparison side by side with its
/// baseline, in one process, reported as ratios.
#[derive(Parser)]
#[command(name = "stepbox-bench")]
struct Args {
    /// Run every comparison at a small size (seconds, not minutes).
    #[arg(long)]
    smoke: bool,
    /// Steps in the wide graph and the chain (10,000 in the full suite);
    /// more gives a profiler more to look at.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    steps: Option<u32>,
    /// Run only this part of the suite.
    #[arg(long, value_enum, value_name = "PART")]
    only: Option<stepbox_bench::Part>,
    /// Only run the graphs whose instructions are counted, as the suite
    /// does under callgrind (see `counts::workload`).
    #[arg(long, value_enum, value_name = "SHAPE", hide = true, requires_all = ["small", "large", "data_dir"])]
    count: Option<stepbox_bench::counts::Shape>,
    /// Steps of the counted run's small graph.
    #[arg(long, value_name = "N", hide = true)]
    small: Option<usize>,
    /// Steps of the counted run's large graph.
    #[arg(long, value_name = "N", hide = true)]
    large: Option<usize>,
    /// Run the large graph last, not the small one again.
    #[arg(long, hide = true)]
    measure_large: bool,
    /// The data directory of the counted run, and so its compile cache.
    #[arg(long, value_name = "DIR", hide = true)]
    data_dir: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut sizes = if args.smoke { stepbox_bench::SMOKE } else { stepbox_bench::FULL };
    if let Some(steps) = args.steps {
        sizes.graph = steps as usize;
    }
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|value| value != "0") {
        eprintln!(
            "warning: RUST_BACKTRACE is set, so wasmtime captures a backtrace whenever a store is dropped; \
             attempts run about twice as slow (unset it for numbers like BENCHMARKS.md's)"
        );
    }
    if let (Some(shape), Some(small), Some(large), Some(data_dir)) =
        (args.count, args.small, args.large, &args.data_dir)
    {
        // Two workers whatever the machine, so the count does not depend
        // on how many cores it has.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let sizes = stepbox_bench::counts::Sizes { small, large };
        return runtime.block_on(stepbox_bench::counts::workload(shape, sizes, args.measure_large, data_dir));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(stepbox_bench::suite(sizes, args.only, |what| eprintln!("running: {what}")))?;
    print!("{}", report.markdown());
    Ok(())
}
