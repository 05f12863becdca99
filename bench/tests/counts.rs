//! Instructions per no-op step, counted by callgrind in this build of the
//! suite, may not grow more than 10% over the figures BENCHMARKS.md records
//! for this build: the check behind the scheduler's cost that a noisy clock
//! cannot make.

use std::path::Path;

use stepbox_bench::counts::{Shape, Sizes, per_step};

/// Steps of the counted graphs: enough that the difference is the steps'
/// own cost, few enough for valgrind in an unoptimized build.
const SIZES: Sizes = Sizes { small: 20, large: 120 };

/// The build this test runs in, as BENCHMARKS.md names it.
const BUILD: &str = if cfg!(debug_assertions) { "test build" } else { "release build" };

/// The figure BENCHMARKS.md records for `shape` in this build: its row of
/// the instruction-count table, `| BUILD | FLOOR | WIDE | CHAIN | WIDE, JOURNAL | WIDE, WATCHED |`.
fn recorded(shape: Shape) -> f64 {
    let benchmarks = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md")).unwrap();
    let row = benchmarks
        .lines()
        .find(|line| line.starts_with(&format!("| {BUILD} |")))
        .unwrap_or_else(|| panic!("BENCHMARKS.md has no `| {BUILD} | … |` row of instruction counts"));
    let column = match shape {
        Shape::Floor => 2,
        Shape::Wide => 3,
        Shape::Chain => 4,
        Shape::WideJournal => 5,
        Shape::WideWatched => 6,
    };
    let cell = row.split('|').nth(column).unwrap_or_default().replace([',', ' '], "");
    cell.parse().unwrap_or_else(|err| panic!("BENCHMARKS.md's `{row}`: column {column} is not a count: {err}"))
}

fn check(shape: Shape) {
    let counted = per_step(Path::new(env!("CARGO_BIN_EXE_stepbox-bench")), shape, SIZES).unwrap();
    let recorded = recorded(shape);
    let ratio = counted / recorded;
    eprintln!("{shape:?}, {BUILD}: {counted:.0} instructions per step, {ratio:.3}× the recorded {recorded:.0}");
    assert!(
        ratio <= 1.1,
        "a no-op step of the {shape:?} graph costs {counted:.0} instructions in the {BUILD}, {ratio:.2}× the \
         {recorded:.0} BENCHMARKS.md records: find what grew (`valgrind --tool=callgrind` and \
         `callgrind_annotate` show where), or record the new figure with the reason"
    );
    assert!(
        ratio >= 0.8,
        "a no-op step of the {shape:?} graph costs {counted:.0} instructions in the {BUILD}, {ratio:.2}× the \
         {recorded:.0} BENCHMARKS.md records: record the lower figure, so the check holds it"
    );
}

#[test]
fn instructions_per_step_of_the_wide_graph_stay_within_a_tenth_of_the_record() {
    check(Shape::Wide);
}

#[test]
fn instructions_per_step_of_the_chain_stay_within_a_tenth_of_the_record() {
    check(Shape::Chain);
}

#[test]
fn instructions_per_journaled_step_of_the_wide_graph_stay_within_a_tenth_of_the_record() {
    check(Shape::WideJournal);
}

#[test]
fn instructions_per_watched_step_of_the_wide_graph_stay_within_a_tenth_of_the_record() {
    check(Shape::WideWatched);
}
