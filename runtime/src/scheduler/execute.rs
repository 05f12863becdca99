//! Running one step: its fan-out items, each with its own attempts, retried
//! by the step's policy; or an included workflow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use rand::RngExt;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::policy::Admission;
use super::{Base, GraphReport, Prepared, RunEvent, Shared, Started, run_graph};
use crate::failpoint::failpoint;
use crate::run::{Attempt, ExecutionReport, Failure, FailureKind, RunStatus, StepPath, StepReport, StepStatus, now_ms};
use crate::sandbox::{AttemptRequest, StepContext};
use crate::traces::Span;
use crate::workflow::{Action, FanOut, Workflow, template};

/// Step `i`, under its own span (`span`).
pub(super) async fn step(shared: Arc<Shared>, i: usize, cancel: CancellationToken, span: Span) -> (usize, StepReport) {
    let step = &shared.workflow.steps[i];
    let mut report = StepReport::pending(shared.path(i), step.required);
    report.status = StepStatus::Running;
    report.started_ms = Some(now_ms());
    match &step.action {
        Action::Include { path, workflow } => {
            include(&shared, i, path, workflow.as_ref(), &cancel, &span, &mut report).await
        }
        Action::Wait { event, timeout } => super::wait::step(&shared, i, event, *timeout, &cancel, &mut report).await,
        Action::Run { component } => match items(&shared, i).and_then(|items| admit(&shared, items)) {
            Ok(items) => fan_out(&shared, i, component, items, &cancel, &span, &mut report).await,
            Err(reason) => {
                report.status = StepStatus::Failed;
                report.reason = Some(reason);
            }
        },
    }
    report.finished_ms = Some(now_ms());
    (i, report)
}

/// The items of a fan-out; one `None` for a plain step. More than the
/// tenant's `max_items`, or more executions than its `max_executions` left
/// to the run, fail the step before any runs.
fn items(shared: &Shared, i: usize) -> Result<Vec<Option<Value>>, String> {
    let max = shared.base.tenant.spec.run.max_items;
    let too_many = |count: String| {
        format!(
            "the fan-out has {count} items, over tenant `{}`'s ceiling of {max} (max_items)",
            shared.base.tenant.name
        )
    };
    let list = |value: &Value, what: &str| -> Result<Vec<Value>, String> {
        let value = match value {
            Value::String(text) => {
                template::evaluate(text, &shared.context.with_item(None)).map_err(|err| format!("`{what}`: {err}"))?
            }
            other => other.clone(),
        };
        match value {
            Value::Array(items) => Ok(items),
            other => Err(format!("`{what}` must give a list, but gave {other}")),
        }
    };
    match &shared.workflow.steps[i].fan_out {
        FanOut::None => Ok(vec![None]),
        FanOut::ForEach(value) => {
            let items = list(value, "for_each")?;
            if items.len() > max {
                return Err(too_many(items.len().to_string()));
            }
            Ok(items.into_iter().map(Some).collect())
        }
        FanOut::Matrix(axes) => {
            let axes = axes
                .iter()
                .map(|(key, value)| Ok((key, list(value, &format!("matrix.{key}"))?)))
                .collect::<Result<Vec<_>, String>>()?;
            // Counted before the combinations are built, which could not fit
            // in memory.
            let count = axes.iter().try_fold(1usize, |count, (_, values)| count.checked_mul(values.len()));
            if count.is_none_or(|count| count > max) {
                return Err(too_many(count.map_or_else(|| "more than 2^64".into(), |count| count.to_string())));
            }
            let mut combinations = vec![serde_json::Map::new()];
            for (key, values) in axes {
                combinations = combinations
                    .into_iter()
                    .flat_map(|combination| {
                        values.iter().map(move |v| {
                            let mut next = combination.clone();
                            next.insert(key.clone(), v.clone());
                            next
                        })
                    })
                    .collect();
            }
            Ok(combinations.into_iter().map(|c| Some(Value::Object(c))).collect())
        }
    }
}

/// Counts `items` more executions against the run's `max_executions`.
fn admit(shared: &Shared, items: Vec<Option<Value>>) -> Result<Vec<Option<Value>>, String> {
    count_executions(shared, items.len())?;
    Ok(items)
}

/// Counts `count` more executions (an include counts as one, so includes
/// cannot multiply without bound either) against `max_executions`.
fn count_executions(shared: &Shared, count: usize) -> Result<(), String> {
    let max = shared.base.tenant.spec.run.max_executions;
    let before = shared.base.executions.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
    let total = before.saturating_add(count);
    if total > max {
        shared.base.executions.fetch_sub(count, std::sync::atomic::Ordering::Relaxed);
        return Err(format!(
            "this step's {count} executions would make the run's {total}, over tenant `{}`'s ceiling of {max} \
             (max_executions)",
            shared.base.tenant.name
        ));
    }
    Ok(())
}

async fn fan_out(
    shared: &Arc<Shared>,
    i: usize,
    component: &str,
    items: Vec<Option<Value>>,
    cancel: &CancellationToken,
    span: &Span,
    report: &mut StepReport,
) {
    let step = &shared.workflow.steps[i];
    let fanned = step.fan_out != FanOut::None;
    if fanned {
        // Items start as earlier ones finish, at most `window` at once (the
        // step's max_concurrent, else the attempt slots): the rest wait as
        // values, not as tasks.
        let window = step.max_concurrent.map_or_else(|| shared.base.dispatcher.slots(), |n| n as usize).max(1);
        let count = items.len();
        let mut pending = items.into_iter().enumerate();
        let mut tasks = JoinSet::new();
        let mut executions: Vec<Option<ExecutionReport>> = vec![None; count];
        loop {
            while tasks.len() < window {
                let Some((k, item)) = pending.next() else { break };
                let (shared, cancel, component, span) =
                    (shared.clone(), cancel.clone(), component.to_owned(), span.clone());
                tasks.spawn(async move { (k, execution(&shared, i, &component, Some(k), item, &cancel, &span).await) });
            }
            let Some(joined) = tasks.join_next().await else { break };
            match joined {
                Ok((k, execution)) => executions[k] = Some(execution),
                Err(err) => {
                    report.status = StepStatus::Failed;
                    report.reason = Some(format!("internal error while running an item: {err}"));
                }
            }
        }
        report.executions = executions.into_iter().flatten().collect();
    } else {
        // A plain step is one execution, run in the step's own task.
        report.executions.reserve_exact(items.len());
        for item in items {
            report.executions.push(execution(shared, i, component, None, item, cancel, span).await);
        }
    }
    if report.status == StepStatus::Failed {
        return;
    }
    let unfinished = report.executions.iter().find(|e| e.status != StepStatus::Succeeded);
    match unfinished {
        None => {
            report.status = StepStatus::Succeeded;
            let outputs = report.executions.iter().map(|e| e.output.clone().unwrap_or(Value::Null));
            report.output = Some(if fanned {
                Value::Array(outputs.collect())
            } else {
                outputs.into_iter().next().unwrap_or(Value::Null)
            });
        }
        Some(execution) => {
            let cancelled = report.executions.iter().any(|e| e.status == StepStatus::Cancelled);
            report.status = if cancelled { StepStatus::Cancelled } else { StepStatus::Failed };
            let reason = execution.error.clone();
            let reason =
                reason.or_else(|| execution.attempts.last().and_then(Attempt::failure).map(ToString::to_string));
            let reason = reason.unwrap_or_else(|| execution.status.to_string());
            report.reason = Some(match execution.path.index() {
                Some(index) => format!("item {index}: {reason}"),
                None => reason,
            });
        }
    }
}

/// One execution: render its input, then attempt until success, a failure
/// the policy does not retry, or cancellation.
async fn execution(
    shared: &Shared,
    i: usize,
    name: &str,
    index: Option<usize>,
    item: Option<Value>,
    cancel: &CancellationToken,
    span: &Span,
) -> ExecutionReport {
    let step = &shared.workflow.steps[i];
    let path = match index {
        Some(index) => shared.path(i).item(index),
        None => shared.path(i),
    };
    let idempotency_key = ExecutionReport::key(&shared.run_id, &path);
    let mut report = ExecutionReport {
        path: path.clone(),
        item: item.clone(),
        idempotency_key: idempotency_key.clone(),
        status: StepStatus::Running,
        output: None,
        error: None,
        reused: false,
        input: None,
        attempts: Vec::new(),
    };
    if let Some(output) = shared.base.resume.completed.get(&idempotency_key) {
        report.status = StepStatus::Succeeded;
        report.output = Some(output.clone());
        report.reused = true;
        return report;
    }
    let context = shared.context.with_item(item.as_ref());
    let prepared =
        template::render_value(&step.with, &context).map_err(|err| format!("`with`: {err}")).and_then(|input| {
            let mut grants = step.grants.render(&context, &input)?;
            grants.dirs = shared.base.tenant.confine(grants.dirs)?;
            Ok((grants, input))
        });
    let (grants, input) = match prepared {
        Ok((grants, input)) => (grants, input.to_string()),
        Err(err) => {
            report.status = StepStatus::Failed;
            report.error = Some(format!("template error in {err}"));
            return report;
        }
    };
    let Some(component) = shared.components.get(name) else {
        report.status = StepStatus::Failed;
        report.error = Some(format!("component `{name}` was not compiled"));
        return report;
    };
    let first_start = Instant::now();
    let mut delay_before = Duration::ZERO;
    // Attempts of an interrupted run count on from where it stopped.
    let earlier = shared.base.resume.attempts.get(&idempotency_key).copied().unwrap_or(0);
    let mut number = earlier + 1;
    // The last attempt the run's earlier driver started may still run (on
    // a worker): its outcome is then this execution's next, not a new try,
    // and the retry policy counts it as this process's first.
    let mut reattached = None;
    let mut counted_from = earlier;
    if earlier > 0 {
        tokio::select! {
            found = shared.base.executor.reattach(&shared.run_id, &idempotency_key, earlier) => reattached = found,
            // Stopped while waiting: no new attempt is started or recorded;
            // the one out is left for whoever takes the run over next.
            () = cancel.cancelled() => {
                report.status = StepStatus::Cancelled;
                return report;
            }
        }
        if reattached.is_some() {
            number = earlier;
            counted_from = earlier - 1;
        }
    }
    loop {
        let breaker = shared.breakers.get(name);
        let admitted = match reattached {
            Some(_) => Admission::Run,
            None => breaker.map_or(Admission::Run, |breaker| breaker.admit(Instant::now())),
        };
        let mut attempt = match admitted {
            Admission::Refuse(message) => {
                span.event("circuit open", || {
                    vec![
                        KeyValue::new("stepbox.step", path.to_string()),
                        KeyValue::new("stepbox.component", name.to_owned()),
                    ]
                });
                Attempt::refused(number, now_ms(), Failure::new(FailureKind::CircuitOpen, message))
            }
            Admission::Run => {
                let mut limits = step.limits.over(&shared.base.limits);
                let reserved = match &shared.base.fuel {
                    Some(budget) => match budget.reserve(limits.fuel).await {
                        Some(granted) => Some(budget.clone()).zip(Some(granted)),
                        None => {
                            shared.stop_run("it used up its tenant's fuel budget (max_run_fuel)".into());
                            report.status = StepStatus::Cancelled;
                            return report;
                        }
                    },
                    None => None,
                };
                if let Some((_, granted)) = reserved {
                    limits.fuel = granted;
                }
                let step_id = path.to_string();
                let attempt_span = span.child("attempt", |span| {
                    span.text("stepbox.step", &step_id)
                        .text("stepbox.tenant", &shared.base.tenant.name)
                        .text("stepbox.component", name)
                        .text("stepbox.component_digest", component.digest());
                });
                let request = AttemptRequest {
                    context: StepContext {
                        run_id: shared.run_id.clone(),
                        step_id,
                        attempt: number,
                        idempotency_key: idempotency_key.clone(),
                        tenant: shared.base.tenant.name.clone(),
                        workflow: shared.workflow.name.clone(),
                        kv_quota: shared.base.tenant.spec.kv,
                    },
                    input: input.clone(),
                    limits,
                    grants: grants.clone(),
                    exit_codes: step.exit_codes.clone(),
                    // For the step to read, its HTTP requests and its events.
                    span: attempt_span.clone(),
                };
                let attempt = match reattached.take() {
                    Some(attempt) => attempt,
                    None => {
                        let prepared = Prepared { request, secrets: step.grants.secrets.clone() };
                        // The journal keeps the input once per execution (and
                        // once more for each process that takes it up).
                        let keep_input = number == counted_from + 1;
                        attempt_once(shared, name, component, prepared, &path, keep_input, cancel).await
                    }
                };
                // A worker's attempt counts on past the tries lost before it.
                attempt_span.record(|span| {
                    span.int("stepbox.attempt", i64::from(attempt.attempt))
                        .int("stepbox.fuel", crate::traces::count(attempt.fuel_consumed))
                        .int("stepbox.peak_memory", crate::traces::count(attempt.peak_memory));
                });
                attempt_span.record_failure(&attempt);
                drop(attempt_span);
                // Tries an executor lost (their worker stopped) before this
                // one ran: each counts, as a crashed attempt does on resume.
                for lost in number..attempt.attempt {
                    let failure = Failure::new(
                        FailureKind::Lost,
                        "the worker running this attempt stopped renewing its claim; it ran again on another",
                    );
                    span.event("lost", || {
                        vec![
                            KeyValue::new("stepbox.step", path.to_string()),
                            KeyValue::new("stepbox.attempt", i64::from(lost)),
                        ]
                    });
                    let lost = Attempt { started_ms: attempt.started_ms, ..Attempt::refused(lost, now_ms(), failure) };
                    if let Some(metrics) = crate::metrics::recording() {
                        metrics.attempt_ended(&shared.base.tenant.name, name, &lost);
                    }
                    drop(shared.record(|journal, run_id| {
                        journal.attempt_finished(run_id, &path, &idempotency_key, &lost, false)
                    }));
                    report.attempts.push(lost);
                }
                number = number.max(attempt.attempt);
                if let Some((budget, granted)) = reserved {
                    budget.give_back(granted, attempt.fuel_consumed);
                }
                if let Some(breaker) = breaker {
                    let counts = attempt.failure().is_some_and(|f| {
                        !matches!(f.kind, FailureKind::Fatal | FailureKind::Cancelled | FailureKind::CircuitOpen)
                    });
                    breaker.record(counts, Instant::now());
                }
                attempt
            }
        };
        attempt.delay_before_ms = delay_before.as_secs_f64() * 1000.0;
        // An interrupted run's attempt is counted by whoever takes the run
        // up and finds how it ended.
        if let Some(metrics) = crate::metrics::recording().filter(|_| !shared.base.interrupt.is_cancelled()) {
            metrics.attempt_ended(&shared.base.tenant.name, name, &attempt);
        }
        // Decided once, so the journal marks the execution's last attempt
        // exactly when the loop stops.
        let retry = attempt.failure().and_then(|f| retry_delay(step, f, number - counted_from, first_start));
        if let (Some(delay), Some(failure)) = (retry, attempt.failure()) {
            span.event("retry", || {
                vec![
                    KeyValue::new("stepbox.step", path.to_string()),
                    KeyValue::new("stepbox.attempt", i64::from(number)),
                    KeyValue::new("stepbox.failure_class", failure.kind.as_str()),
                    KeyValue::new("stepbox.delay_ms", crate::traces::count(delay.as_millis() as u64)),
                ]
            });
        }
        let ran = !matches!(attempt.failure(), Some(f) if f.kind == FailureKind::CircuitOpen);
        if ran {
            let recorded = shared.record(|journal, run_id| {
                journal.attempt_finished(run_id, &path, &idempotency_key, &attempt, retry.is_none())
            });
            // The journal holds them now.
            if recorded.is_some() {
                attempt.forget_records();
            }
        }
        let failure = attempt.failure().cloned();
        if let Some(output) = attempt.output() {
            report.output = Some(output.clone());
        }
        report.attempts.push(attempt);
        let Some(failure) = failure else {
            report.status = StepStatus::Succeeded;
            return report;
        };
        let Some(delay) = retry else {
            report.status =
                if failure.kind == FailureKind::Cancelled { StepStatus::Cancelled } else { StepStatus::Failed };
            return report;
        };
        shared.emit(RunEvent::Retrying { path: path.clone(), attempt: number, delay, failure });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => {
                report.status = StepStatus::Cancelled;
                return report;
            }
        }
        delay_before = delay;
        number += 1;
    }
}

/// The backoff before another attempt after `failure` on the execution's
/// `attempt`-th try in this process, or `None` when the policy (its classes,
/// attempts or deadline) says to stop. Cancellation always stops.
fn retry_delay(
    step: &crate::workflow::Step,
    failure: &Failure,
    attempt: u32,
    first_start: Instant,
) -> Option<Duration> {
    if failure.kind == FailureKind::Cancelled || !step.retry.retries(failure.kind, attempt) {
        return None;
    }
    let mut delay = step.retry.delay(attempt);
    if step.retry.jitter {
        delay = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
    }
    step.retry.deadline.is_none_or(|deadline| first_start.elapsed() + delay < deadline).then_some(delay)
}

/// One attempt: wait for the rate limit and a parallelism slot, and run;
/// cancellation stops it at any point.
async fn attempt_once(
    shared: &Shared,
    component_name: &str,
    component: &crate::sandbox::StepComponent,
    attempt: Prepared,
    path: &StepPath,
    keep_input: bool,
    cancel: &CancellationToken,
) -> Attempt {
    let number = attempt.request.context.attempt;
    let run = async {
        let turn = match shared.limiters.get(component_name) {
            Some(limiter) => Some(limiter.admit().await),
            None => None,
        };
        // Durable before the attempt can run, so a crash leaves a trace of
        // every attempt that could have had effects. Recorded before
        // waiting for a slot, so the commit does not hold one: the records
        // of attempts queued together commit together.
        let key = &attempt.request.context.idempotency_key;
        let input = keep_input.then_some(attempt.request.input.as_str());
        let started = shared.record(|journal, run_id| {
            journal.attempt_started(run_id, path, key, &Attempt::started(number, now_ms()), input)
        });
        if !shared.durable(started).await {
            return None;
        }
        let _slot = shared.base.dispatcher.acquire(&shared.base.tenant.name).await;
        shared.emit(RunEvent::AttemptStarted { path: path.clone(), attempt: number });
        failpoint!("attempt.before-run");
        // The rate limit counts the start as it happens where the attempt
        // runs: on a worker, when the worker says so, however long it
        // queued.
        let started = turn.map(|turn| Box::new(move || turn.start()) as Started<'_>);
        let attempt = shared.base.executor.run(component, attempt, started).await;
        // Its effects are done; its end is not recorded yet.
        failpoint!("attempt.after-run");
        Some(attempt)
    };
    let queued_ms = now_ms();
    tokio::select! {
        Some(attempt) = run => attempt,
        () = cancel.cancelled() => {
            let failure = Failure::new(FailureKind::Cancelled, "the run was cancelled while the attempt was running");
            Attempt { started_ms: queued_ms, ..Attempt::refused(number, now_ms(), failure) }
        }
    }
}

/// Runs an included workflow as this step; its steps are reported under
/// this one, its outputs are this step's output. `loaded` is the workflow
/// of a literal include, validated (and held to the tenant's ceilings) with
/// the run's own.
async fn include(
    shared: &Arc<Shared>,
    i: usize,
    path: &str,
    loaded: Option<&Arc<Workflow>>,
    cancel: &CancellationToken,
    span: &Span,
    report: &mut StepReport,
) {
    let step = &shared.workflow.steps[i];
    let context = shared.context.with_item(None);
    let result = async {
        count_executions(shared, 1)?;
        let workflow = match loaded {
            Some(workflow) => workflow.clone(),
            None => {
                let (workflow, fingerprint) = load_templated_include(shared, path, &context).await?;
                pin_templated_include(shared, &shared.path(i), fingerprint).await?;
                Arc::new(workflow)
            }
        };
        let inputs = match template::render_value(&step.with, &context).map_err(|err| format!("`with`: {err}"))? {
            Value::Object(map) => map,
            other => return Err(format!("`with` of an include must be a map of the workflow's inputs, not {other}")),
        };
        let inputs = workflow.bind_inputs(&inputs).map_err(|err| err.to_string())?;
        let components = super::compile(&workflow, &shared.sandbox).await.map_err(|err| err.to_string())?;
        // What the child's `Shared` reads; slots, fuel and the stop token
        // come from the run's `Base`.
        let options = super::RunOptions {
            tenant: shared.base.tenant.clone(),
            events: shared.events.clone(),
            journal: shared.journal.clone(),
            ..super::RunOptions::new(shared.run_id.clone())
        };
        let base = Base { stop: cancel.clone(), ..shared.base.clone() };
        let parent = Some(shared.path(i));
        let child =
            Shared::new(shared.sandbox.clone(), workflow, components, &inputs, &options, base, parent, span.clone());
        Ok(run_graph_boxed(child).await)
    }
    .await;
    match result {
        Ok(child) => {
            report.status = match child.status {
                RunStatus::Succeeded => StepStatus::Succeeded,
                RunStatus::Running | RunStatus::Interrupted | RunStatus::Failed => StepStatus::Failed,
                RunStatus::Cancelled => StepStatus::Cancelled,
                RunStatus::Waiting => StepStatus::Waiting,
            };
            if report.status == StepStatus::Succeeded {
                report.output = Some(Value::Object(child.outputs));
            } else if report.status == StepStatus::Waiting {
                report.reason = Some("a step of the included workflow waits for an event".into());
            } else {
                report.reason = Some("a step of the included workflow failed".into());
            }
            report.steps = child.steps;
        }
        Err(reason) => {
            report.status = StepStatus::Failed;
            report.reason = Some(reason);
        }
    }
}

/// The workflow of an include whose path is a template, known only now: a
/// file written by an earlier step is read and validated when reached, and
/// held to the tenant's ceilings then; with the hashes of its files. The
/// files are read on a blocking thread.
async fn load_templated_include(
    shared: &Shared,
    path: &str,
    context: &minijinja::Value,
) -> Result<(Workflow, Value), String> {
    let path = template::render_text(path, context).map_err(|err| format!("`include`: {err}"))?;
    let base_dir = shared.workflow.base_dir.clone();
    let (tenant, depth) = (shared.base.tenant.clone(), shared.depth() + 1);
    let load = move || {
        let path = base_dir.join(path);
        tenant.confine_include(&base_dir, &path)?;
        let mut workflow =
            Workflow::load_for(&path, &tenant).map_err(|err| format!("the included workflow is not valid:\n{err}"))?;
        tenant
            .check_at(&workflow, depth)
            .map_err(|err| format!("the included workflow goes over the tenant's ceilings:\n{err}"))?;
        let fingerprint = workflow.pin().map_err(|err| format!("cannot read the included workflow's files: {err}"))?;
        Ok((workflow, fingerprint))
    };
    tokio::task::spawn_blocking(load).await.map_err(|err| format!("loading the included workflow failed: {err}"))?
}

/// Holds a templated include to the files the run first read through it:
/// the first time, their fingerprint is journaled; on resume, files that
/// changed since are refused (a literal include is checked with the run's
/// own files before the resume starts).
async fn pin_templated_include(shared: &Shared, path: &StepPath, fingerprint: Value) -> Result<(), String> {
    let Some(journal) = &shared.journal else { return Ok(()) };
    if let Some(before) = shared.base.resume.includes.get(&path.to_string()) {
        let changes = crate::workflow::fingerprint_changes(before, &fingerprint);
        if !changes.is_empty() {
            return Err(format!(
                "the included workflow changed since the run started ({}); start a new run to use it",
                changes.join("; ")
            ));
        }
        return Ok(());
    }
    journal
        .include_loaded(&shared.run_id, path, &fingerprint)
        .await
        .map_err(|err| format!("cannot record the included workflow: {err}"))
}

/// The nested run of an include, boxed with an explicit `Send` so the
/// recursion (a step runs a graph that runs steps) has a nameable type.
fn run_graph_boxed(shared: Arc<Shared>) -> std::pin::Pin<Box<dyn std::future::Future<Output = GraphReport> + Send>> {
    Box::pin(run_graph(shared, false))
}
