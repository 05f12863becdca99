//! The suite at its smoke size, so it cannot rot: every comparison runs and
//! gives a reading. The ratios themselves are not asserted here; on a
//! shared machine they are for `BENCHMARKS.md`, not for pass or fail.

use stepbox_bench::{SMOKE, Target, suite};

#[tokio::test(flavor = "multi_thread")]
async fn every_comparison_runs_and_gives_a_reading() {
    let report = suite(SMOKE, None, |_| {}).await.unwrap();
    let find = |what: &str| {
        report.rows.iter().find(|row| row.what.contains(what)).unwrap_or_else(|| panic!("no row for {what}"))
    };
    for what in [
        "wasmtime, wasmtime's default settings: instantiate + call",
        "wasmtime, pooled instances kept resident, no fuel or epochs: the same",
        "wasmtime, stepbox's engine settings (pool, fuel in slices, the yield hook): instantiate + call",
        "wasmtime, pooled, only written pages reset (PAGEMAP_SCAN; unsafe between tenants in wasmtime 48): the same",
        "floor, one at a time: the fastest",
        "floor, parallel: the fastest",
        "independent no-op steps, no journal",
        "independent no-op steps, journal",
        "chain of 100 no-op steps, no journal",
        "chain of 100 no-op steps, journal",
        "durable SQLite commit",
        "journal commits per step, independent steps",
        "journal commits per link, chain",
        "process per step",
        "naive embedding",
        "warm start",
        "cold start",
        "JSON step: fuel on",
        "JSON step: epoch interruption on",
        "sieve: fuel on",
        "sieve: epoch interruption on",
        "empty loop: fuel on",
        "empty loop: epoch interruption on",
        "JSON step: fuel and epochs on (what stepbox ran until 2026-12-05)",
        "sieve: fuel and epochs on (what stepbox ran until 2026-12-05)",
        "empty loop: fuel and epochs on (what stepbox ran until 2026-12-05)",
        "JSON step: fuel in slices of",
        "sieve: fuel in slices of",
        "empty loop: fuel in slices of",
        "resident memory after 100 sequential steps",
        "peak resident memory",
        "POST …/runs to the first attempt's start, p50",
        "POST …/runs to the first attempt's start, p99",
        "signed webhook to the first attempt's start",
        "one-step runs through the API from 50 clients",
        "on 1 worker(s)",
        "on 2 worker(s)",
        "on 4 worker(s)",
        "metrics recorded and traces exported over OTLP",
        "start on an idle worker, p50",
        "start on an idle worker, p99",
    ] {
        let row = find(what);
        match row.value {
            stepbox_bench::Value::Time(time) | stepbox_bench::Value::PerStep(time) => {
                assert!(!time.is_zero(), "{what}: {row:?}")
            }
            stepbox_bench::Value::Bytes(bytes) => assert!(bytes > 0, "{what}: {row:?}"),
            stepbox_bench::Value::Count(count) => assert!(count > 0.0, "{what}: {row:?}"),
        }
        if let Some((_, ratio)) = &row.ratio {
            assert!(ratio.is_finite() && *ratio > 0.0, "{what}: {row:?}");
        }
    }
    // Every target of the issue is attached to its comparison.
    let targets = report.rows.iter().filter(|row| row.target != Target::None).count();
    assert_eq!(targets, 12, "{}", report.markdown());
    assert!(report.markdown().contains("| measurement | value | ratio | to | target |"));
}
