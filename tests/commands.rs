//! Programs that were never written for stepbox run as steps: a
//! `wasi:cli/command` component and a WASI preview1 module (`_start`) get
//! the input on stdin, give their output on stdout, and fail by exit code,
//! under the same limits and grants as any step.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{request, run, sandbox};
use serde_json::json;
use stepbox::run::FailureKind;
use stepbox::sandbox::{ExitCodes, StepComponent};
use stepbox_tests::guests;

/// The same Rust `fn main` program, as a command component and as a
/// preview1 module.
const PROGRAMS: [&str; 2] = [guests::WORDCOUNT, guests::WORDCOUNT_WASIP1];

/// A preview1 module, written in WAT, whose `_start` runs `body`.
fn preview1(body: &str) -> StepComponent {
    let text = format!(
        r#"(module
             (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start") {body}))"#
    );
    sandbox().load_bytes(Path::new("program.wasm"), &wat::parse_str(text).unwrap()).unwrap()
}

#[tokio::test]
async fn programs_read_the_input_on_stdin_and_write_the_output_on_stdout() {
    for program in PROGRAMS {
        assert!(common::load(program).is_command());
        let mut req = request(json!({ "text": "one two three\nfour" }));
        req.grants.args = vec!["--verbose".into()];
        req.grants.env.insert("GREETING".into(), "hi".into());
        let report = run(program, req).await;
        assert_eq!(
            report.output(),
            Some(&json!({ "words": 4, "lines": 2, "args": ["wordcount", "--verbose"], "greeting": "hi" })),
            "{program}: {report:?}"
        );
        assert!(report.stdout.text.is_empty(), "stdout is the output, not kept twice");

        let report = run(program, request(json!({ "text": "a b", "plain": true }))).await;
        assert_eq!(report.output(), Some(&json!("2 words")), "output that is not JSON is kept as text");
    }
}

#[tokio::test]
async fn a_non_zero_exit_fails_as_its_exit_code_is_classified() {
    let exit = |code: i32| preview1(&format!("(call $proc_exit (i32.const {code}))"));
    let report = sandbox().run(&exit(0), request(json!({}))).await;
    assert_eq!(report.output(), Some(&json!("")), "{report:?}");

    let report = sandbox().run(&exit(75), request(json!({}))).await;
    let failure = report.failure().unwrap();
    assert_eq!((failure.kind, failure.message.as_str()), (FailureKind::Retryable, "the command exited with code 75"));

    let report = sandbox().run(&exit(3), request(json!({}))).await;
    assert_eq!(report.failure().unwrap().kind, FailureKind::Fatal, "{report:?}");
    let mut req = request(json!({}));
    req.exit_codes = ExitCodes { retryable: vec![3] };
    let report = sandbox().run(&exit(3), req).await;
    assert_eq!(report.failure().unwrap().kind, FailureKind::Retryable, "{report:?}");

    // A preview1 module's exit code arrives intact; Rust's standard library
    // on WASI 0.2 reports every failing exit as 1. The reason is the last
    // line on stderr.
    for (program, code) in [(guests::WORDCOUNT_WASIP1, 9), (guests::WORDCOUNT, 1)] {
        let report = run(program, request(json!({ "exit": 9 }))).await;
        let failure = report.failure().unwrap();
        assert_eq!(failure.kind, FailureKind::Fatal, "{program}: {report:?}");
        assert_eq!(failure.message, format!("the command exited with code {code}: asked to exit with 9"));
    }
}

#[tokio::test]
async fn programs_are_held_to_the_same_limits() {
    let spin = preview1("(loop $forever (br $forever))");
    let mut req = request(json!({}));
    req.limits.timeout = Duration::from_millis(200);
    req.limits.fuel = u64::MAX / 2;
    assert_eq!(sandbox().run(&spin, req).await.failure().unwrap().kind, FailureKind::Timeout);
    let mut req = request(json!({}));
    req.limits.fuel = 1_000_000;
    assert_eq!(sandbox().run(&spin, req).await.failure().unwrap().kind, FailureKind::OutOfFuel);

    let grow = preview1("(loop $more (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable");
    let report = sandbox().run(&grow, request(json!({}))).await;
    assert_eq!(report.failure().unwrap().kind, FailureKind::MemoryLimit, "{report:?}");

    // More output than the stdout cap is an output-limit failure, not a
    // truncated result.
    let text = "word ".repeat(100_000);
    let mut req = request(json!({ "text": text, "plain": false }));
    req.limits.stdio = bytesize::ByteSize::kib(1);
    req.grants.args = vec!["x".repeat(4096)];
    let report = run(guests::WORDCOUNT, req).await;
    assert_eq!(report.failure().unwrap().kind, FailureKind::OutputLimit, "{report:?}");
}

#[tokio::test]
async fn a_program_cannot_also_be_given_stdin() {
    let mut req = request(json!({ "text": "x" }));
    req.grants.stdin = b"other".to_vec();
    let failure = run(guests::WORDCOUNT, req).await.failure().cloned().unwrap();
    assert_eq!(failure.kind, FailureKind::Fatal);
    assert!(failure.message.contains("cannot also be given `stdin`"), "{failure}");
}
