//! Workflows run through the scheduler: data flow, parallelism, fan-out,
//! retries, failure policies, breakers, rate limits, cancellation, includes,
//! and the validation errors of bad files. Timing is checked from the
//! recorded start and end of attempts, not from wall-clock thresholds.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::sandbox;
use serde_json::{Value, json};
use stepbox::run::{Attempt, FailureKind, RunReport, RunStatus, StepReport, StepStatus};
use stepbox::scheduler::{self, RunEvent, RunOptions};
use stepbox::workflow::{StepBuilder, Workflow, WorkflowBuilder, WorkflowError};
use stepbox_tests::guests;

/// A fresh directory for one test's files.
fn temp_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "stepbox-wf-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The components every test workflow can use, by name.
fn components() -> String {
    let mut text = String::from("components:\n");
    for (name, path) in [
        ("hello", guests::HELLO),
        ("echo", guests::ECHO),
        ("flaky", guests::FLAKY),
        ("sleepy", guests::SLEEPY),
        ("transform", guests::TRANSFORM),
        ("counter", guests::COUNTER),
        ("fs-read", guests::FS_READ),
        ("wordcount", guests::WORDCOUNT),
        ("wordcount-wasip1", guests::WORDCOUNT_WASIP1),
        ("probe", guests::PROBE),
        ("host-abuse", guests::HOST_ABUSE),
        ("net-probe", guests::NET_PROBE),
    ] {
        text.push_str(&format!("  {name}: {path}\n"));
    }
    text
}

/// Writes a workflow (with the components prepended after the name line)
/// and returns its path.
fn write(dir: &Path, file: &str, yaml: &str) -> PathBuf {
    let (first, rest) = yaml.split_once('\n').unwrap();
    let path = dir.join(file);
    std::fs::write(&path, format!("{first}\n{}{rest}", components())).unwrap();
    path
}

fn load(yaml: &str) -> Workflow {
    let path = write(&temp_dir(), "workflow.yaml", yaml);
    Workflow::load(&path).unwrap_or_else(|err| panic!("{err}"))
}

async fn run_with(workflow: Workflow, inputs: Value, options: RunOptions) -> RunReport {
    let inputs = inputs.as_object().cloned().unwrap_or_default();
    let inputs = workflow.bind_inputs(&inputs).unwrap_or_else(|err| panic!("{err}"));
    scheduler::run(sandbox(), Arc::new(workflow), inputs, options).await.unwrap_or_else(|err| panic!("{err}"))
}

async fn run(yaml: &str) -> RunReport {
    run_with(load(yaml), json!({}), RunOptions::new("run-test")).await
}

fn step<'a>(report: &'a RunReport, id: &str) -> &'a StepReport {
    report.step(id).unwrap_or_else(|| panic!("no step {id} in {report:#?}"))
}

fn attempts(report: &RunReport, id: &str) -> Vec<Attempt> {
    step(report, id).executions.iter().flat_map(|e| e.attempts.clone()).collect()
}

/// Whether two attempts ran at the same time at some point.
fn overlap(a: &Attempt, b: &Attempt) -> bool {
    a.started_ms < b.finished_ms.unwrap() && b.started_ms < a.finished_ms.unwrap()
}

/// The most attempts that ran at once.
fn max_overlap(attempts: &[Attempt]) -> usize {
    attempts
        .iter()
        .map(|a| {
            attempts.iter().filter(|b| b.started_ms <= a.started_ms && a.started_ms < b.finished_ms.unwrap()).count()
        })
        .max()
        .unwrap_or(0)
}

fn validation_error(yaml: &str) -> WorkflowError {
    let path = write(&temp_dir(), "bad.yaml", yaml);
    Workflow::load(&path).expect_err("the workflow must not validate")
}

fn assert_error(err: &WorkflowError, line: u64, message: &str, help: Option<&str>) {
    let found = err.diagnostics.iter().find(|d| d.message.contains(message));
    let diagnostic = found.unwrap_or_else(|| panic!("no error containing {message:?} in:\n{err}"));
    // Lines count from the name line; the components block comes after it.
    let shift = components().lines().count() as u64;
    assert_eq!(diagnostic.line, if line == 0 { 0 } else { line + shift }, "{diagnostic}");
    if let Some(help) = help {
        assert!(diagnostic.help.as_deref().is_some_and(|h| h.contains(help)), "{diagnostic}");
    }
    assert!(diagnostic.to_string().starts_with(&diagnostic.file.display().to_string()), "names the file: {diagnostic}");
}

#[tokio::test]
async fn outputs_flow_along_a_diamond_and_independent_steps_run_in_parallel() {
    let report = run("name: diamond
steps:
  - id: a
    uses: hello
    with: { name: A }
  - id: b1
    uses: sleepy
    depends_on: [a]
    with: { millis: 300 }
  - id: b2
    uses: sleepy
    depends_on: [a]
    with: { millis: 300 }
  - id: c
    uses: echo
    depends_on: [b1, b2]
    with: { from_a: '{{ steps.a.output.greeting }}', slept: '{{ steps.b1.output + steps.b2.output }}' }
outputs:
  c: '{{ steps.c.output }}'
")
    .await;
    assert_eq!(report.run.status, RunStatus::Succeeded);
    assert_eq!(report.run.outputs.as_ref().unwrap()["c"], json!({ "from_a": "Hello, A!", "slept": 600 }));
    let (b1, b2, c) = (&attempts(&report, "b1")[0], &attempts(&report, "b2")[0], &attempts(&report, "c")[0]);
    assert!(overlap(b1, b2), "b1 and b2 ran at the same time: {b1:?} {b2:?}");
    assert!(c.started_ms >= b1.finished_ms.unwrap() && c.started_ms >= b2.finished_ms.unwrap(), "c waited for both");
    assert!(b1.started_ms >= attempts(&report, "a")[0].finished_ms.unwrap());
}

#[tokio::test]
async fn max_parallel_one_runs_one_attempt_at_a_time() {
    let workflow = load(
        "name: serial
steps:
  - id: x
    uses: sleepy
    with: { millis: 150 }
  - id: y
    uses: sleepy
    with: { millis: 150 }
",
    );
    let mut options = RunOptions::new("serial");
    options.max_parallel = 1;
    let report = run_with(workflow, json!({}), options).await;
    assert!(!overlap(&attempts(&report, "x")[0], &attempts(&report, "y")[0]));
}

#[tokio::test]
async fn for_each_collects_outputs_in_order_within_max_concurrent() {
    let report = run("name: fan-out
inputs:
  waits: { type: array, default: [250, 50, 150, 100, 200] }
steps:
  - id: wait
    uses: sleepy
    for_each: '{{ inputs.waits }}'
    max_concurrent: 2
    with: { millis: '{{ item }}' }
  - id: sum
    uses: echo
    depends_on: [wait]
    with: { total: '{{ steps.wait.output | sum }}', first: '{{ steps.wait.output[0] }}' }
")
    .await;
    assert_eq!(step(&report, "wait").output, Some(json!([250, 50, 150, 100, 200])), "outputs keep the list's order");
    assert_eq!(step(&report, "sum").output, Some(json!({ "total": 750, "first": 250 })));
    let runs = attempts(&report, "wait");
    assert_eq!(runs.len(), 5);
    assert_eq!(max_overlap(&runs), 2, "at most 2 at once, and they did overlap: {runs:#?}");
    let keys: Vec<&str> = step(&report, "wait").executions.iter().map(|e| e.idempotency_key.as_str()).collect();
    assert_eq!(
        keys,
        ["run-test/wait[0]", "run-test/wait[1]", "run-test/wait[2]", "run-test/wait[3]", "run-test/wait[4]"]
    );
}

#[tokio::test]
async fn minijinja_functions_such_as_range_work_in_templates() {
    let report = run("name: range
steps:
  - id: square
    uses: echo
    for_each: '{{ range(16)|list }}'
    with: '{{ item * item }}'
  - id: total
    uses: echo
    depends_on: [square]
    with: { sum: '{{ steps.square.output|sum }}', pairs: '{{ dict(n=range(2)|list) }}' }
")
    .await;
    assert_eq!(step(&report, "square").executions.len(), 16);
    assert_eq!(step(&report, "total").output, Some(json!({ "sum": 1240, "pairs": { "n": [0, 1] } })));
}

#[tokio::test]
async fn matrix_runs_every_combination() {
    let report = run("name: matrix
steps:
  - id: m
    uses: echo
    matrix: { size: [s, l], color: [red, blue, green] }
    with: '{{ item.color }}-{{ item.size }}'
")
    .await;
    let output = step(&report, "m").output.clone().unwrap();
    let mut combos: Vec<&str> = output.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    combos.sort();
    assert_eq!(combos, ["blue-l", "blue-s", "green-l", "green-s", "red-l", "red-s"]);
}

#[tokio::test]
async fn retries_back_off_as_configured() {
    let report = run("name: retry
steps:
  - id: constant
    uses: flaky
    with: { succeed_on_attempt: 3 }
    retry: { attempts: 5, backoff: constant, initial: 100ms, jitter: false }
  - id: exponential
    uses: flaky
    with: { succeed_on_attempt: 3 }
    retry: { attempts: 3, backoff: exponential, initial: 50ms, multiplier: 3, jitter: false }
")
    .await;
    assert_eq!(report.run.status, RunStatus::Succeeded);
    for (id, delays) in [("constant", [100.0, 100.0]), ("exponential", [50.0, 150.0])] {
        let runs = attempts(&report, id);
        assert_eq!(runs.len(), 3, "{id}");
        assert_eq!(runs.iter().map(|a| a.attempt).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(runs[0].failure().unwrap().kind, FailureKind::Retryable);
        for (k, delay) in delays.into_iter().enumerate() {
            assert_eq!(runs[k + 1].delay_before_ms, delay, "{id}");
            assert!(
                runs[k + 1].started_ms - runs[k].finished_ms.unwrap() >= delay,
                "{id}: waited at least {delay}ms: {runs:#?}"
            );
        }
        assert_eq!(step(&report, id).output, Some(json!({ "succeeded_on_attempt": 3 })));
    }
}

#[tokio::test]
async fn retries_stop_at_classes_not_listed_and_at_the_deadline() {
    let report = run("name: retry-limits
steps:
  - id: wrong-class
    uses: flaky
    required: false
    with: { succeed_on_attempt: 3 }
    retry: { attempts: 5, on: [timeout], initial: 10ms }
  - id: deadline
    uses: flaky
    required: false
    with: { succeed_on_attempt: 100 }
    retry: { attempts: 100, backoff: constant, initial: 200ms, jitter: false, deadline: 500ms }
")
    .await;
    assert_eq!(attempts(&report, "wrong-class").len(), 1, "retryable is not in `on`");
    let runs = attempts(&report, "deadline");
    assert!((2..=3).contains(&runs.len()), "the deadline stops retrying: {} attempts", runs.len());
    assert!(runs.last().unwrap().started_ms - runs[0].started_ms < 500.0);
    assert_eq!(step(&report, "deadline").status, StepStatus::Failed);
}

#[tokio::test]
async fn a_failed_required_step_skips_its_dependents_but_not_always_steps() {
    let report = run("name: skip
steps:
  - id: work
    uses: flaky
    with: { succeed_on_attempt: 9 }
  - id: next
    uses: hello
    depends_on: [work]
    with: { name: x }
  - id: after-next
    uses: hello
    depends_on: [next]
    with: { name: x }
  - id: independent
    uses: hello
    with: { name: x }
  - id: cleanup
    uses: echo
    depends_on: [after-next]
    always: true
    with: { work: '{{ steps.work.status }}', next: '{{ steps.next.status }}' }
")
    .await;
    assert_eq!(report.run.status, RunStatus::Failed);
    assert_eq!(step(&report, "work").status, StepStatus::Failed);
    assert!(step(&report, "work").reason.as_deref().unwrap().starts_with("retryable: attempt 1 of 9"));
    assert_eq!(step(&report, "next").status, StepStatus::Skipped);
    assert_eq!(step(&report, "next").reason.as_deref(), Some("dependency `work` failed"));
    assert_eq!(step(&report, "after-next").reason.as_deref(), Some("dependency `next` skipped"));
    assert_eq!(step(&report, "independent").status, StepStatus::Succeeded);
    assert_eq!(step(&report, "cleanup").output, Some(json!({ "work": "failed", "next": "skipped" })));
}

#[tokio::test]
async fn an_optional_failure_lets_dependents_run_and_the_run_succeed() {
    let report = run("name: optional
steps:
  - id: maybe
    uses: flaky
    required: false
    with: { succeed_on_attempt: 9 }
  - id: fallback
    uses: hello
    depends_on: [maybe]
    when: \"steps.maybe.status == 'failed'\"
    with: { name: fallback }
  - id: not-needed
    uses: hello
    depends_on: [maybe]
    when: \"steps.maybe.status == 'succeeded'\"
    with: { name: x }
  - id: join
    uses: echo
    depends_on: [fallback, not-needed]
    with: { got: '{{ steps.fallback.output.greeting }}' }
")
    .await;
    assert_eq!(report.run.status, RunStatus::Succeeded);
    assert_eq!(step(&report, "not-needed").status, StepStatus::Skipped);
    assert!(step(&report, "not-needed").reason.as_deref().unwrap().starts_with("`when` is false"));
    assert_eq!(
        step(&report, "join").output,
        Some(json!({ "got": "Hello, fallback!" })),
        "a step skipped by `when` does not block"
    );
}

#[tokio::test]
async fn on_failure_handlers_run_only_when_their_step_fails() {
    let report = run("name: handlers
steps:
  - id: good
    uses: hello
    with: { name: x }
    on_failure: [undo-good]
  - id: bad
    uses: flaky
    with: { succeed_on_attempt: 9 }
    on_failure: [undo-bad]
  - id: undo-good
    uses: hello
    with: { name: x }
  - id: undo-bad
    uses: echo
    with: { bad: '{{ steps.bad.status }}' }
")
    .await;
    assert_eq!(step(&report, "undo-bad").output, Some(json!({ "bad": "failed" })));
    assert_eq!(step(&report, "undo-good").status, StepStatus::Skipped);
    assert_eq!(step(&report, "undo-good").reason.as_deref(), Some("on_failure handler: `good` did not fail"));
    assert_eq!(report.run.status, RunStatus::Failed, "handling a failure does not hide it");
}

const SLOW_AND_FAILING: &str = "name: slow-and-failing
steps:
  - id: slow
    uses: sleepy
    with: { seconds: 30 }
    limits: { timeout: 2m }
  - id: fails
    uses: flaky
    with: { succeed_on_attempt: 9 }
  - id: later
    uses: hello
    depends_on: [slow]
    with: { name: x }
  - id: cleanup
    uses: hello
    depends_on: [slow, fails]
    always: true
    with: { name: x }
";

#[tokio::test]
async fn fail_fast_cancels_running_steps_but_still_runs_always_steps() {
    let mut options = RunOptions::new("ff");
    options.fail_fast = true;
    let report = run_with(load(SLOW_AND_FAILING), json!({}), options).await;
    assert_eq!(report.run.status, RunStatus::Failed);
    assert_eq!(step(&report, "slow").status, StepStatus::Cancelled);
    assert_eq!(attempts(&report, "slow")[0].failure().unwrap().kind, FailureKind::Cancelled);
    assert_eq!(step(&report, "later").status, StepStatus::Skipped);
    assert_eq!(step(&report, "cleanup").status, StepStatus::Succeeded);
    assert!(report.run.duration_ms().unwrap() < 30_000.0);
}

#[tokio::test]
async fn cancelling_a_run_stops_running_attempts_and_records_them() {
    let options = RunOptions::new("cancel");
    let cancel = options.cancel.clone();
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let options = RunOptions { events: Some(events), ..options };
    let run = tokio::spawn(run_with(load(SLOW_AND_FAILING), json!({}), options));
    // Cancel once the slow step is running.
    while let Some(event) = received.recv().await {
        if matches!(&event, RunEvent::AttemptStarted { path, .. } if path.to_string() == "slow") {
            cancel.cancel();
            break;
        }
    }
    let report = run.await.unwrap();
    assert_eq!(report.run.status, RunStatus::Cancelled);
    assert_eq!(step(&report, "slow").status, StepStatus::Cancelled);
    assert_eq!(step(&report, "cleanup").status, StepStatus::Cancelled, "nothing starts after a cancel");
    // The step's own timeout is two minutes and its sleep 30 seconds: only
    // the cancel can have ended it, and soon.
    assert_eq!(attempts(&report, "slow")[0].failure().unwrap().kind, FailureKind::Cancelled);
    assert!(report.run.duration_ms().unwrap() < 10_000.0);
}

#[tokio::test]
async fn a_circuit_breaker_opens_after_consecutive_failures() {
    let dir = temp_dir();
    let path = dir.join("breaker.yaml");
    std::fs::write(
        &path,
        format!(
            "name: breaker
components:
  flaky: {{ path: {}, circuit_breaker: {{ failures: 2, cool_down: 1m }} }}
steps:
  - id: calls
    uses: flaky
    for_each: [1, 2, 3, 4, 5]
    max_concurrent: 1
    with: {{ succeed_on_attempt: 9 }}
",
            guests::FLAKY
        ),
    )
    .unwrap();
    let report = run_with(Workflow::load(&path).unwrap(), json!({}), RunOptions::new("breaker")).await;
    let kinds: Vec<FailureKind> = attempts(&report, "calls").iter().map(|a| a.failure().unwrap().kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == FailureKind::Retryable).count(), 2, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == FailureKind::CircuitOpen).count(), 3, "{kinds:?}");
    let refused =
        attempts(&report, "calls").into_iter().find(|a| a.failure().unwrap().kind == FailureKind::CircuitOpen);
    assert!(refused.unwrap().failure().unwrap().message.contains("open after 2 consecutive failures"));
}

#[tokio::test]
async fn a_rate_limit_spreads_attempt_starts() {
    let dir = temp_dir();
    let path = dir.join("rate.yaml");
    std::fs::write(
        &path,
        format!(
            "name: rate
components:
  hello: {{ path: {}, rate_limit: {{ starts: 2, per: 400ms }} }}
steps:
  - id: calls
    uses: hello
    for_each: [a, b, c, d, e]
    with: {{ name: '{{{{ item }}}}' }}
",
            guests::HELLO
        ),
    )
    .unwrap();
    let report = run_with(Workflow::load(&path).unwrap(), json!({}), RunOptions::new("rate")).await;
    let mut starts: Vec<f64> = attempts(&report, "calls").iter().map(|a| a.started_ms).collect();
    starts.sort_by(f64::total_cmp);
    // Any window of 400ms holds at most 2 starts.
    for k in 2..starts.len() {
        assert!(starts[k] - starts[k - 2] >= 399.0, "starts {starts:?}");
    }
}

#[tokio::test]
async fn an_included_workflow_runs_as_one_step_with_namespaced_steps() {
    let dir = temp_dir();
    write(
        &dir,
        "sub.yaml",
        "name: sub
inputs:
  who: { type: string, required: true }
steps:
  - id: greet
    uses: hello
    with: { name: '{{ inputs.who }}' }
outputs:
  greeting: '{{ steps.greet.output.greeting }}'
",
    );
    let main = write(
        &dir,
        "main.yaml",
        "name: main
inputs:
  sub: { type: string, default: sub.yaml }
steps:
  - id: static
    include: sub.yaml
    with: { who: static }
  - id: dynamic
    include: '{{ inputs.sub }}'
    with: { who: dynamic }
  - id: join
    uses: echo
    depends_on: [static, dynamic]
    with: ['{{ steps.static.output.greeting }}', '{{ steps.dynamic.output.greeting }}']
",
    );
    let report = run_with(Workflow::load(&main).unwrap(), json!({}), RunOptions::new("inc")).await;
    assert_eq!(report.run.status, RunStatus::Succeeded, "{report:#?}");
    assert_eq!(step(&report, "join").output, Some(json!(["Hello, static!", "Hello, dynamic!"])));
    assert_eq!(step(&report, "static.greet").status, StepStatus::Succeeded);
    assert_eq!(step(&report, "dynamic.greet").executions[0].idempotency_key, "inc/dynamic.greet");

    // A templated include is validated when it is reached.
    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, "name: broken\nsteps:\n  - id: x\n    uses: nothing\n").unwrap();
    let report =
        run_with(Workflow::load(&main).unwrap(), json!({ "sub": "broken.yaml" }), RunOptions::new("inc2")).await;
    assert_eq!(step(&report, "dynamic").status, StepStatus::Failed);
    assert!(
        step(&report, "dynamic").reason.as_deref().unwrap().contains("`uses: nothing` names no component"),
        "{report:#?}"
    );
}

#[tokio::test]
async fn a_workflow_built_in_code_runs_and_reports_events() {
    let workflow = WorkflowBuilder::new("built")
        .component("hello", guests::HELLO)
        .component("flaky", guests::FLAKY)
        .step(StepBuilder::new("greet", "hello").with(json!({ "name": "builder" })))
        .step(StepBuilder::new("flaky", "flaky").depends_on(["greet"]).with(json!({ "succeed_on_attempt": 2 })).retry(
            stepbox::workflow::spec::RetrySpec {
                attempts: Some(2),
                initial: Some(Duration::from_millis(10)),
                ..Default::default()
            },
        ))
        .output("greeting", "{{ steps.greet.output.greeting }}")
        .build()
        .unwrap();
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let options = RunOptions { events: Some(events), ..RunOptions::new("built") };
    let report = run_with(workflow, json!({}), options).await;
    assert_eq!(report.run.outputs.as_ref().unwrap()["greeting"], "Hello, builder!");
    let mut seen = Vec::new();
    while let Ok(event) = received.try_recv() {
        seen.push(event);
    }
    assert!(
        seen.iter().any(|e| matches!(e, RunEvent::Retrying { path, attempt: 1, .. } if path.to_string() == "flaky")),
        "{seen:#?}"
    );
    let finished: Vec<String> = seen
        .iter()
        .filter_map(|e| match e {
            RunEvent::StepFinished { path, status: StepStatus::Succeeded, .. } => Some(path.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(finished, ["greet", "flaky"]);
}

#[tokio::test]
async fn inputs_are_checked_and_defaulted() {
    let workflow = load(
        "name: inputs
inputs:
  who: { type: string, required: true }
  times: { type: integer, default: 2 }
steps:
  - id: greet
    uses: echo
    with: { who: '{{ inputs.who }}', times: '{{ inputs.times }}' }
",
    );
    let missing = workflow.bind_inputs(&Default::default()).unwrap_err();
    assert!(missing.to_string().contains("the required input `who` is missing"), "{missing}");
    let unknown = workflow.bind_inputs(json!({ "who": "x", "tmes": 3 }).as_object().unwrap()).unwrap_err();
    assert!(
        unknown.to_string().contains("unknown input `tmes`") && unknown.to_string().contains("did you mean `times`?")
    );
    let wrong = workflow.bind_inputs(json!({ "who": 7 }).as_object().unwrap()).unwrap_err();
    assert!(wrong.to_string().contains("input `who` must be of type string"), "{wrong}");
    let report = run_with(workflow, json!({ "who": "Ada" }), RunOptions::new("in")).await;
    assert_eq!(step(&report, "greet").output, Some(json!({ "who": "Ada", "times": 2 })));
}

#[tokio::test]
async fn steps_get_their_directories_config_and_environment() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/note.txt"), "from the workflow's directory").unwrap();
    let path = write(
        &dir,
        "grants.yaml",
        "name: grants
steps:
  - id: read
    uses: fs-read
    dirs: ['data:/data:ro']
    with: { path: /data/note.txt }
  - id: greet
    uses: hello
    env: { GREETING: \"{{ 'Bon' ~ 'jour' }}\" }
    with: { name: Ada }
  - id: invoice
    uses: transform
    config: { currency: '{{ run.workflow }}' }
    with: { id: o, customer: { first_name: a, last_name: b }, items: [{ sku: x, quantity: 1, unit_price_cents: 1 }] }
",
    );
    let report = run_with(Workflow::load(&path).unwrap(), json!({}), RunOptions::new("grants")).await;
    assert_eq!(step(&report, "read").output.as_ref().unwrap()["contents"], "from the workflow's directory");
    assert_eq!(step(&report, "greet").output, Some(json!({ "greeting": "Bonjour, Ada!" })));
    assert_eq!(step(&report, "invoice").output.as_ref().unwrap()["currency"], "grants");
}

#[tokio::test]
async fn plain_programs_run_as_steps_with_exit_codes_mapped() {
    let report = run("name: programs
steps:
  - id: component
    uses: wordcount
    with: { text: 'a command component' }
    args: [--from-workflow]
  - id: module
    uses: wordcount-wasip1
    with: { text: \"{{ steps.component.output.words }} words, {{ steps.component.output.args[1] }}\" }
    depends_on: [component]
  - id: busy
    uses: wordcount-wasip1
    with: { exit: 3 }
    exit_codes: { retryable: [3] }
    retry: { attempts: 2, initial: 1ms }
    required: false
  - id: broken
    uses: wordcount-wasip1
    with: { exit: 4 }
    exit_codes: { retryable: [3] }
    retry: { attempts: 2, initial: 1ms }
    required: false
")
    .await;
    let output = |id| step(&report, id).output.clone().unwrap();
    assert_eq!(output("component")["words"], 3);
    assert_eq!(output("component")["args"], json!(["wordcount", "--from-workflow"]));
    assert_eq!(output("module")["words"], 3, "{:?}", output("module"));
    let busy = attempts(&report, "busy");
    assert_eq!(busy.len(), 2, "exit code 3 is retryable here");
    let failure = busy[1].failure().unwrap();
    assert_eq!(failure.kind, FailureKind::Retryable);
    assert_eq!(failure.message, "the command exited with code 3: asked to exit with 3");
    let broken = attempts(&report, "broken");
    assert_eq!(broken.len(), 1, "exit code 4 is fatal");
    assert_eq!(broken[0].failure().unwrap().kind, FailureKind::Fatal);
}

#[tokio::test]
async fn json_workflow_files_work_too() {
    let dir = temp_dir();
    let path = dir.join("wf.json");
    let spec = json!({
        "name": "json",
        "components": { "echo": guests::ECHO },
        "steps": [ { "id": "a", "uses": "echo", "with": { "n": 1 } } ]
    });
    std::fs::write(&path, spec.to_string()).unwrap();
    let report = run_with(Workflow::load(&path).unwrap(), json!({}), RunOptions::new("json")).await;
    assert_eq!(step(&report, "a").output, Some(json!({ "n": 1 })));
}

#[tokio::test]
async fn wide_and_long_graphs_of_ten_thousand_steps_run() {
    const N: usize = 10_000;
    for chain in [false, true] {
        let mut yaml = String::from("name: big\nsteps:\n");
        for i in 0..N {
            yaml.push_str(&format!("  - id: s{i}\n    uses: echo\n    with: {i}\n"));
            if chain && i > 0 {
                yaml.push_str(&format!("    depends_on: [s{}]\n", i - 1));
            }
        }
        let report = run(&yaml).await;
        assert_eq!(report.run.status, RunStatus::Succeeded);
        assert_eq!(report.steps.len(), N);
        assert!(report.steps.iter().all(|s| s.status == StepStatus::Succeeded));
        assert_eq!(step(&report, &format!("s{}", N - 1)).output, Some(json!(N - 1)));
        if chain {
            let starts: Vec<f64> = (0..N).map(|i| attempts(&report, &format!("s{i}"))[0].started_ms).collect();
            assert!(starts.windows(2).all(|w| w[0] <= w[1]), "a chain runs in order");
        }
    }
}

#[test]
fn an_unknown_field_is_located_with_the_nearest_name() {
    let err = validation_error("name: x\nsteps:\n  - id: a\n    uses: hello\n    dependson: [b]\n");
    assert_error(&err, 5, "unknown field `dependson`", Some("did you mean `depends_on`?"));
}

#[test]
fn references_ids_and_cycles_are_checked() {
    let err = validation_error(
        "name: x
steps:
  - id: a
    uses: helo
  - id: b
    uses: hello
    depends_on: [a, zz]
  - id: b
    uses: hello
",
    );
    assert_error(&err, 4, "`uses: helo` names no component", Some("did you mean `hello`?"));
    assert_error(&err, 7, "step `b` depends on unknown step `zz`", None);
    let first_b = 5 + components().lines().count();
    assert_error(&err, 8, "duplicate step id `b`", Some(&format!("first used on line {first_b}")));

    let err = validation_error(
        "name: x
steps:
  - id: a
    uses: hello
    depends_on: [c]
  - id: b
    uses: hello
    depends_on: [a]
  - id: c
    uses: hello
    depends_on: [b]
",
    );
    let message = err.to_string();
    assert!(message.contains("in a cycle: "), "{message}");
    let rotations = ["a → c → b → a", "c → b → a → c", "b → a → c → b"];
    assert!(rotations.iter().any(|cycle| message.contains(cycle)), "{message}");
}

#[test]
fn templates_are_checked_before_anything_runs() {
    let err = validation_error(
        "name: x
inputs:
  who: { type: string }
steps:
  - id: a
    uses: hello
    with: { name: '{{ inputs.whom }}' }
  - id: b
    uses: hello
    with: { name: '{{ steps.a.output.greeting }} {{ steps.a.output.greeting }}' }
  - id: c
    uses: hello
    when: 'steps.a.status =='
  - id: d
    uses: hello
    with: { name: '{{ item }}' }
",
    );
    assert_error(&err, 7, "reads `inputs.whom`, which is not declared", Some("did you mean `who`?"));
    assert_error(&err, 10, "step `b` does not depend on `a`", Some("add `a` to its depends_on"));
    let reported = err.diagnostics.iter().filter(|d| d.message.contains("step `b` does not depend")).count();
    assert_eq!(reported, 1, "one problem, reported once:\n{err}");
    assert_error(&err, 13, "step `c`'s `when`: template error", None);
    assert_error(&err, 16, "reads `item`, but the step has no for_each or matrix", None);
}

#[test]
fn durations_past_what_the_clock_can_hold_are_refused_not_a_panic() {
    let err = validation_error(
        "name: x
defaults:
  circuit_breaker: { failures: 3, cool_down: 18446744073709551615s }
steps:
  - id: a
    uses: hello
    limits: { timeout: 300000000y }
    retry: { attempts: 3, initial: 1000y, max: 2000y, deadline: 5000y }
",
    );
    for what in [
        "defaults.circuit_breaker.cool_down",
        "step `a`: limits.timeout",
        "step `a`'s retry: initial",
        "step `a`'s retry: max",
        "step `a`'s retry: deadline",
    ] {
        assert_error(&err, 0, &format!("{what}: "), Some("use at most 366d"));
    }
}

#[test]
fn missing_files_and_bad_settings_are_named() {
    let err = validation_error(
        "name: x
steps:
  - id: a
    uses: missing.wasm
    retry: { attempts: 0 }
  - id: b
    uses: hello
    dirs: ['nowhere:/data']
    max_concurrent: 2
  - id: c
    uses: hello
    network:
      connect: ['example.com:80']
      http: ['GET@api.example.com', 'FETCH THIS@*']
",
    );
    assert_error(&err, 4, "missing.wasm does not exist", Some("relative to the workflow file"));
    assert_error(&err, 13, "`example.com:80` is not an IP:PORT address", Some("names are not resolved"));
    assert_error(&err, 14, "step `c`: `FETCH THIS@*` is not an HTTP grant", None);
    assert_error(&err, 0, "attempts must be at least 1", None);
    assert_error(&err, 8, "directory", Some("relative to the workflow file"));
    assert_error(&err, 3 + 3, "sets max_concurrent without for_each or matrix", None);
}

#[tokio::test]
async fn a_component_that_is_not_a_step_fails_compilation_at_its_declaration() {
    let dir = temp_dir();
    let path = dir.join("wf.yaml");
    std::fs::write(dir.join("library.wasm"), wat::parse_str("(component)").unwrap()).unwrap();
    std::fs::write(&path, "name: x\ncomponents:\n  cli: library.wasm\nsteps:\n  - id: a\n    uses: cli\n").unwrap();
    let workflow = Workflow::load(&path).unwrap();
    let err = scheduler::compile(&workflow, sandbox()).await.unwrap_err();
    let diagnostic = &err.diagnostics[0];
    assert_eq!((diagnostic.line, diagnostic.column), (3, 8));
    assert!(
        diagnostic.message.contains("component `cli`")
            && diagnostic.message.contains("exports neither `run` nor `wasi:cli/run`"),
        "{diagnostic}"
    );
}

#[tokio::test]
async fn grants_written_in_a_workflow_file_take_effect_when_it_runs() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let report = run(&format!(
        "name: granted
steps:
  - id: clock
    uses: probe
    deterministic: true
    with: {{ probe: clock-and-random }}
  - id: scratch
    uses: probe
    scratch: true
    with: {{ probe: scratch }}
  - id: stdin
    uses: host-abuse
    stdin: \"hello from {{{{ run.workflow }}}}\"
    with: {{ attack: stdin }}
  - id: connect
    uses: net-probe
    network: {{ connect: ['{address}'] }}
    with: {{ attack: connect, address: '{address}' }}
  - id: closed
    uses: net-probe
    with: {{ attack: connect, address: '{address}' }}
"
    ))
    .await;
    let output = |id: &str| {
        attempts(&report, id).last().and_then(|a| a.output().cloned()).unwrap_or_else(|| panic!("{id}: {report:#?}"))
    };
    assert_eq!(output("clock")["now"], 946_684_800, "a fixed clock: 2000-01-01T00:00:00Z");
    assert_eq!(output("scratch"), json!({ "before": [], "read": "scribbled" }));
    assert_eq!(output("stdin"), json!("hello from granted"));
    assert_eq!(output("connect"), json!({ "outcome": "done: connected" }));
    assert!(output("closed")["outcome"].as_str().unwrap().starts_with("refused: "), "no grant, no connection");
}

/// An executor that runs nothing: an attempt handed to it, or one an
/// earlier driver of the run left out, goes on until the run stops it.
#[derive(Default)]
struct Stalled {
    runs: AtomicUsize,
    reattached: tokio::sync::Notify,
}

impl scheduler::Executor for Stalled {
    fn run<'a>(
        &'a self,
        _: &'a stepbox::sandbox::StepComponent,
        _: scheduler::Prepared,
        _: Option<scheduler::Started<'a>>,
    ) -> scheduler::Running<'a> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::pending())
    }

    fn reattach<'a>(&'a self, _: &'a str, _: &'a str, _: u32) -> scheduler::Reattached<'a> {
        self.reattached.notify_one();
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn a_run_stopped_while_it_waits_for_an_attempt_an_earlier_driver_left_out_records_no_new_attempt() {
    use stepbox::store::{History, Journal};
    use tokio_util::sync::CancellationToken;
    let dir = temp_dir();
    let db = Arc::new(stepbox::store::Database::open(&dir.join("data")).unwrap());
    let workflow = Arc::new(load("name: left\nsteps:\n  - id: s\n    uses: hello\n    with: { name: x }\n"));
    let record = stepbox::run::Run::new("left".into(), "left", "", "default", Default::default());
    db.create_run(&record, &json!({})).1.await.unwrap();
    let executor = Arc::new(Stalled::default());
    let drive = |cancel: CancellationToken, interrupt: CancellationToken| {
        let journal: Arc<dyn Journal> = db.clone();
        let options = RunOptions {
            journal: Some(journal),
            executor: Some(executor.clone()),
            cancel,
            interrupt,
            ..RunOptions::new("left")
        };
        let inputs = workflow.bind_inputs(&Default::default()).unwrap();
        tokio::spawn(scheduler::run(sandbox(), workflow.clone(), inputs, options))
    };
    // The first driver hands attempt 1 out, then stops without ending the
    // run (its process shuts down).
    let interrupt = CancellationToken::new();
    let first = drive(CancellationToken::new(), interrupt.clone());
    let handed_out = async {
        while executor.runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), handed_out).await.expect("the first attempt was never handed out");
    interrupt.cancel();
    first.await.unwrap().unwrap();
    // The next driver waits for that attempt, and is cancelled meanwhile.
    let cancel = CancellationToken::new();
    let second = drive(cancel.clone(), CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(30), executor.reattached.notified())
        .await
        .expect("the second driver never waited for the attempt left out");
    cancel.cancel();
    let report = second.await.unwrap().unwrap();
    assert_eq!(report.run.status, RunStatus::Cancelled);
    assert_eq!(step(&report, "s").status, StepStatus::Cancelled);
    assert!(attempts(&report, "s").is_empty(), "{:?}", attempts(&report, "s"));
    assert_eq!(executor.runs.load(Ordering::SeqCst), 1, "no attempt was handed out again");
    let recorded = db.run_report("left").unwrap();
    let numbers: Vec<u32> = attempts(&recorded, "s").iter().map(|attempt| attempt.attempt).collect();
    assert_eq!(numbers, [1], "only the first driver's attempt is recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_records_are_refused_because_another_process_took_it_over_stops_as_interrupted() {
    use stepbox::store::{History, Journal};
    let dir = temp_dir();
    let paused = Arc::new(stepbox::store::Database::open(&dir.join("data")).unwrap());
    let workflow = Arc::new(load(
        "name: taken\nsteps:\n  - id: nap\n    uses: sleepy\n    with: { millis: 600 }\n  - id: after\n    uses: hello\n    depends_on: [nap]\n    with: { name: x }\n",
    ));
    let record = stepbox::run::Run::new("taken".into(), "taken", "", "default", Default::default());
    let (lease, created) = paused.create_run(&record, &json!({}));
    created.await.unwrap();
    let journal: Arc<dyn Journal> = paused.clone();
    let options = RunOptions { journal: Some(journal), ..RunOptions::new("taken") };
    let inputs = workflow.bind_inputs(&Default::default()).unwrap();
    let drive = tokio::spawn(scheduler::run(sandbox(), workflow.clone(), inputs, options));
    // While `nap` runs, its lease runs out (the process was paused) and
    // another process takes the run.
    tokio::time::sleep(Duration::from_millis(200)).await;
    paused.renew_lease(&lease, Duration::from_millis(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let taker = stepbox::store::Database::open(&dir.join("data")).unwrap();
    taker.acquire_lease("taken", "elsewhere:1:aaaaaaaa", Duration::from_secs(60)).unwrap();
    let report = drive.await.unwrap().unwrap();
    // Its end is the new holder's to record: not failed, and nothing of
    // `after` ran here.
    assert_eq!(report.run.status, RunStatus::Interrupted, "{:?}", report.run.error);
    let after = attempts(&report, "after");
    let ran_not = |attempt: &Attempt| attempt.failure().is_some_and(|failure| failure.kind == FailureKind::Cancelled);
    assert!(after.iter().all(ran_not), "{after:?}");
    let recorded = taker.load_run("taken").unwrap();
    assert_eq!(recorded.status, RunStatus::Running);
    assert_eq!(recorded.owner.as_deref(), Some("elsewhere:1:aaaaaaaa"));
    assert!(taker.resume_state("taken").unwrap().completed.is_empty(), "nap's end was refused");
}

/// An executor with a bug: every attempt panics.
struct Panicking;

impl scheduler::Executor for Panicking {
    fn run<'a>(
        &'a self,
        _: &'a stepbox::sandbox::StepComponent,
        _: scheduler::Prepared,
        _: Option<scheduler::Started<'a>>,
    ) -> scheduler::Running<'a> {
        Box::pin(async { panic!("a bug in the executor") })
    }
}

#[tokio::test]
async fn a_panic_while_running_a_step_fails_that_step_and_the_run_goes_on() {
    // `first` is the only step that can run, so it runs in the driver's
    // own task; `left` and `right` run side by side, in tasks of their own.
    let workflow = load(
        "name: panics
steps:
  - id: first
    uses: hello
    required: false
  - id: left
    uses: hello
    depends_on: [first]
  - id: right
    uses: hello
    depends_on: [first]
",
    );
    let options = RunOptions { executor: Some(Arc::new(Panicking)), ..RunOptions::new("panics") };
    let report = run_with(workflow, json!({}), options).await;
    assert_eq!(report.run.status, RunStatus::Failed);
    for id in ["first", "left", "right"] {
        let step = step(&report, id);
        assert_eq!(step.status, StepStatus::Failed, "{id}: {step:?}");
        let reason = step.reason.as_deref().unwrap_or_default();
        assert!(reason.starts_with("internal error while running the step: "), "{id}: {reason}");
        assert!(reason.contains("panicked with message \"a bug in the executor\""), "{id}: {reason}");
    }
}

/// `bytes` with a custom section named `name` appended: a component that
/// runs as `bytes` does but that no other test has loaded.
fn with_custom_section(bytes: &[u8], name: &str) -> Vec<u8> {
    let name_len = u8::try_from(name.len()).unwrap();
    assert!(name.len() < 127, "one-byte LEB128 sizes only");
    let mut out = bytes.to_vec();
    out.extend([0, name_len + 1, name_len]);
    out.extend(name.as_bytes());
    out
}

#[tokio::test]
async fn a_pinned_workflow_runs_the_bytes_it_pinned_and_refuses_a_file_changed_since() {
    let dir = temp_dir();
    let pinned = with_custom_section(&std::fs::read(guests::ECHO).unwrap(), &format!("pin-{}", dir.display()));
    std::fs::write(dir.join("step.wasm"), &pinned).unwrap();
    std::fs::write(
        dir.join("sub.yaml"),
        "name: sub\nsteps:\n  - id: inner\n    uses: step.wasm\n    with: { from: sub }\noutputs:\n  got: '{{ steps.inner.output }}'\n",
    )
    .unwrap();
    let main = dir.join("main.yaml");
    std::fs::write(&main, "name: main\nsteps:\n  - id: outer\n    uses: step.wasm\n    with: { from: main }\n  - id: sub\n    include: sub.yaml\n").unwrap();
    let mut workflow = Workflow::load(&main).unwrap();
    // The workflow file rewritten between load and pin: the fingerprint is
    // of the bytes that were parsed.
    let parsed = std::fs::read(&main).unwrap();
    std::fs::write(&main, "name: other\nsteps: []\n").unwrap();
    let fingerprint = workflow.pin().unwrap();
    assert_eq!(fingerprint["workflow"], json!(stepbox::sandbox::component_digest(&parsed)));
    assert_eq!(fingerprint["components"]["step.wasm"], json!(stepbox::sandbox::component_digest(&pinned)));
    assert_eq!(fingerprint["includes"]["sub"]["components"]["step.wasm"], fingerprint["components"]["step.wasm"]);

    // Rewritten after the pin, before the sandbox ever loaded it: refused,
    // not run.
    std::fs::copy(guests::HELLO, dir.join("step.wasm")).unwrap();
    let inputs = workflow.bind_inputs(&serde_json::Map::new()).unwrap();
    let workflow = Arc::new(workflow);
    let refused =
        scheduler::run(sandbox(), workflow.clone(), inputs.clone(), RunOptions::new("pin-1")).await.unwrap_err();
    assert!(refused.to_string().contains("changed since the run's workflow was read"), "{refused}");

    // Once the sandbox holds the pinned bytes, runs take them from memory
    // and never read the file (which still holds another component).
    sandbox().load_bytes(&dir.join("step.wasm"), &pinned).unwrap();
    let report = scheduler::run(sandbox(), workflow, inputs, RunOptions::new("pin-2")).await.unwrap();
    assert_eq!(report.run.status, RunStatus::Succeeded, "{report:#?}");
    assert_eq!(step(&report, "outer").output, Some(json!({ "from": "main" })));
    assert_eq!(step(&report, "sub.inner").output, Some(json!({ "from": "sub" })));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_run_records_again_no_step_it_only_reused() {
    use stepbox::store::{History, Journal};
    let dir = temp_dir();
    let db = Arc::new(stepbox::store::Database::open(&dir.join("data")).unwrap());
    let workflow = Arc::new(load(
        "name: again\nsteps:\n  - id: a\n    uses: hello\n    with: { name: x }\n  - id: b\n    uses: hello\n    depends_on: [a]\n    with: { name: z }\n",
    ));
    let record = stepbox::run::Run::new("again".into(), "again", "", "default", Default::default());
    let (_lease, created) = db.create_run(&record, &json!({}));
    created.await.unwrap();
    let inputs = workflow.bind_inputs(&Default::default()).unwrap();
    let drive = || {
        let journal: Arc<dyn Journal> = db.clone();
        let options = RunOptions { journal: Some(journal), ..RunOptions::new("again") };
        scheduler::run(sandbox(), workflow.clone(), inputs.clone(), options)
    };
    let report = drive().await.unwrap();
    assert_eq!(report.run.status, RunStatus::Succeeded, "{report:?}");
    let finished = |report: &RunReport| -> Vec<Option<f64>> { report.steps.iter().map(|s| s.finished_ms).collect() };
    let first = finished(&db.run_report("again").unwrap());
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        db.reopen_run("again").unwrap();
        let report = drive().await.unwrap();
        assert_eq!(report.run.status, RunStatus::Succeeded);
        assert!(report.steps.iter().all(|step| step.executions.iter().all(|e| e.reused)), "{report:?}");
        assert_ne!(finished(&report), first, "the resumed run's steps end anew");
    }
    assert_eq!(finished(&db.run_report("again").unwrap()), first, "as first recorded: not recorded again");
}
