//! `cargo run --release -p stepbox-bench` runs the whole suite and prints
//! its table; `--smoke` runs every comparison at a small size.

use clap::Parser;

/// The stepbox benchmark suite: every comparison side by side with its
/// baseline, in one process, reported as ratios.
#[derive(Parser)]
#[command(name = "stepbox-bench")]
struct Args {
    /// Run every comparison at a small size (seconds, not minutes).
    #[arg(long)]
    smoke: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes = if args.smoke { stepbox_bench::SMOKE } else { stepbox_bench::FULL };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(stepbox_bench::suite(sizes, |what| eprintln!("running: {what}")))?;
    print!("{}", report.markdown());
    Ok(())
}
