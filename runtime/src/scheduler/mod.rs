//! Runs a [`Workflow`]: a ready queue over the dependency graph, parallel up
//! to a limit, with retries, fan-out, failure policies, per-component
//! circuit breakers and rate limits, and cancellation.

mod budget;
mod context;
mod dispatch;
mod execute;
mod executor;
mod policy;
mod wait;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use dispatch::{Dispatcher, Slot};
pub use executor::{Executor, Local, Prepared, Reattached, Running, Started};
pub use wait::Waits;

use crate::run::{Failure, Run, RunReport, RunStatus, StepPath, StepReport, StepStatus, now_ms};
use crate::sandbox::{Sandbox, StepComponent};
use crate::store::{Durable, Journal, ResumeState, StoreError};
use crate::tenant::Tenant;
use crate::workflow::{Diagnostic, Inputs, Workflow, WorkflowError, template};
use budget::FuelBudget;
use context::{RunContext, StepsView};
use policy::{CircuitBreaker, RateLimiter};

/// Something that happened during a run, for progress displays, the
/// service's live event streams and embedders.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    /// An attempt of the execution at `path` started.
    AttemptStarted {
        /// The execution: its step, with the item of a fan-out.
        path: StepPath,
        /// Its number, from 1.
        attempt: u32,
    },
    /// An attempt failed and another follows after `delay`.
    Retrying {
        /// The execution: its step, with the item of a fan-out.
        path: StepPath,
        /// The number of the attempt that failed.
        attempt: u32,
        /// The backoff before the next attempt.
        #[serde(rename = "delay_ms", serialize_with = "millis", deserialize_with = "from_millis")]
        #[schema(value_type = f64)]
        delay: Duration,
        /// Why it failed.
        failure: Failure,
    },
    /// A step reached its final status.
    StepFinished {
        /// The step.
        path: StepPath,
        /// Its status.
        status: StepStatus,
        /// Why it was skipped, failed or cancelled.
        reason: Option<String>,
    },
    /// A waiting step started waiting for `event`.
    WaitStarted {
        /// The step.
        path: StepPath,
        /// The event it waits for.
        event: String,
    },
    /// The run ended (or, `interrupted` or `waiting`, stopped to be resumed
    /// later).
    RunFinished {
        /// How it ended.
        status: RunStatus,
    },
}

fn millis<S: serde::Serializer>(delay: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(delay.as_secs_f64() * 1000.0)
}

fn from_millis<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let ms = <f64 as serde::Deserialize>::deserialize(deserializer)?;
    Duration::try_from_secs_f64(ms / 1000.0).map_err(serde::de::Error::custom)
}

/// How to run.
#[derive(Clone)]
pub struct RunOptions {
    /// The run's id; see [`crate::store::new_run_id`].
    pub run_id: String,
    /// The tenant the run belongs to, with its ceilings: its steps' default
    /// limits, its fuel budget per run, and what a workflow included by a
    /// templated path is checked against when it is reached.
    pub tenant: Arc<Tenant>,
    /// Where `{ file: NAME }` secrets are read from; without it, such a
    /// secret fails its step. Read by the [`Local`] executor only: another
    /// reads them where it runs the attempt.
    pub secrets_dir: Option<PathBuf>,
    /// Where the run's attempts run; without one, in `sandbox` ([`Local`]).
    pub executor: Option<Arc<dyn Executor>>,
    /// Labels to find the run by, echoed in its report.
    pub labels: BTreeMap<String, String>,
    /// When the run was created (unix ms): now for a new run, the recorded
    /// time for a resumed one.
    pub created_ms: f64,
    /// The deployed version of the workflow, for a run of `stepbox serve`.
    pub version: Option<u32>,
    /// Attempts running at once, over the whole run.
    pub max_parallel: usize,
    /// Cancel running steps as soon as a required step fails (`always`
    /// steps still run).
    pub fail_fast: bool,
    /// Where events go, for progress displays.
    pub events: Option<mpsc::UnboundedSender<RunEvent>>,
    /// Cancel to stop the run: running attempts end as `cancelled` and no
    /// more steps start.
    pub cancel: CancellationToken,
    /// The events sent to the run's waiting steps while it runs (the
    /// events recorded before it started are delivered when it starts).
    pub waits: Arc<Waits>,
    /// Cancel to stop the run without ending it (the process is shutting
    /// down): running attempts end as `cancelled` and are recorded, but the
    /// run is not; it stays unfinished, for a resume to continue.
    pub interrupt: CancellationToken,
    /// Attempt slots shared with other runs, handed out fairly across
    /// tenants; a run without one gets its own `max_parallel` slots.
    pub dispatcher: Option<Arc<Dispatcher>>,
    /// Where every transition is recorded before the scheduler acts on it.
    /// A run with a journal resumes: executions it records as succeeded
    /// are not run again. Its attempts' logs, stdout and stderr leave
    /// memory once recorded: the report [`run`] returns has none; read the
    /// run's report from the store's history for them.
    pub journal: Option<Arc<dyn Journal>>,
    /// The span the run's trace continues (a request's or a webhook's
    /// `traceparent`); without one, the run starts a trace of its own.
    pub trace_parent: Option<crate::traces::TraceParent>,
}

impl RunOptions {
    /// A run with this id, for the unconstrained tenant `default`, with the
    /// default parallelism and nothing else.
    pub fn new(run_id: impl Into<String>) -> Self {
        RunOptions {
            run_id: run_id.into(),
            tenant: Arc::new(Tenant::unconstrained("default")),
            secrets_dir: None,
            executor: None,
            labels: BTreeMap::new(),
            created_ms: now_ms(),
            version: None,
            max_parallel: default_max_parallel(),
            fail_fast: false,
            events: None,
            cancel: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            waits: Arc::default(),
            dispatcher: None,
            journal: None,
            trace_parent: None,
        }
    }
}

/// Twice the CPU cores, and at least 4: steps that wait (on a clock, on
/// I/O) leave cores free for others.
pub fn default_max_parallel() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    (2 * cores).max(4)
}

/// Compiles every component of a workflow, in parallel. A component pinned
/// by [`Workflow::pin`] that the sandbox holds is taken from memory without
/// reading its file. Errors point at where each component is declared.
pub async fn compile(workflow: &Workflow, sandbox: &Sandbox) -> Result<HashMap<String, StepComponent>, WorkflowError> {
    let mut compiled = HashMap::new();
    let mut tasks = JoinSet::new();
    for component in workflow.components.values() {
        if let Some(loaded) = component.digest.and_then(|digest| sandbox.loaded(&component.path, &digest)) {
            compiled.insert(component.name.clone(), loaded);
            continue;
        }
        let sandbox = sandbox.clone();
        let component = component.clone();
        tasks.spawn_blocking(move || {
            let loaded = match &component.digest {
                Some(digest) => sandbox.load_pinned(&component.path, digest),
                None => sandbox.load(&component.path),
            };
            (loaded, component)
        });
    }
    let mut diagnostics = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((Ok(loaded), component)) => {
                compiled.insert(component.name, loaded);
            }
            Ok((Err(err), component)) => diagnostics.push(Diagnostic {
                file: workflow.file.clone(),
                line: component.location.line(),
                column: component.location.column(),
                message: format!("component `{}`: {err}", component.name),
                help: None,
            }),
            Err(err) => diagnostics.push(Diagnostic {
                file: workflow.file.clone(),
                line: 0,
                column: 0,
                message: format!("compiling a component failed: {err}"),
                help: None,
            }),
        }
    }
    if diagnostics.is_empty() { Ok(compiled) } else { Err(WorkflowError { diagnostics }) }
}

/// Checks the workflow against its tenant's ceilings, compiles its
/// components and runs it with inputs bound by [`Workflow::bind_inputs`].
pub async fn run(
    sandbox: &Sandbox,
    workflow: Arc<Workflow>,
    inputs: Inputs,
    options: RunOptions,
) -> Result<RunReport, WorkflowError> {
    options.tenant.check(&workflow)?;
    let components = compile(&workflow, sandbox).await?;
    let resume = match &options.journal {
        Some(journal) => {
            let (journal, run_id) = (journal.clone(), options.run_id.clone());
            let state = tokio::task::spawn_blocking(move || journal.resume_state(&run_id).map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|err| Err(err.to_string()));
            state.map_err(|message| WorkflowError::single(&workflow.file, message, None))?
        }
        None => ResumeState::default(),
    };
    for (name, payload) in &resume.events {
        options.waits.deliver(name, payload.clone());
    }
    let dispatcher = options.dispatcher.clone().unwrap_or_else(|| Dispatcher::new(options.max_parallel));
    let stop = options.cancel.child_token();
    let interrupted = {
        let (interrupt, stop) = (options.interrupt.clone(), stop.clone());
        tokio::spawn(async move {
            interrupt.cancelled().await;
            stop.cancel();
        })
    };
    let base = Base {
        dispatcher,
        resume: Arc::new(resume),
        stop,
        stop_error: Arc::new(parking_lot::Mutex::new(None)),
        interrupt: options.interrupt.clone(),
        fuel: options.tenant.spec.max_run_fuel.map(|fuel| Arc::new(FuelBudget::new(fuel))),
        executions: Arc::default(),
        limits: Arc::new(options.tenant.default_limits()),
        tenant: options.tenant.clone(),
        executor: options
            .executor
            .clone()
            .unwrap_or_else(|| Arc::new(Local { sandbox: sandbox.clone(), secrets_dir: options.secrets_dir.clone() })),
        waits: options.waits.clone(),
    };
    // A run taken up again continues the trace of its first drive,
    // beneath it; the first drive records where that is.
    let first_drive = base.resume.trace.clone();
    let span = crate::traces::Span::root("run", first_drive.as_ref().or(options.trace_parent.as_ref()), |span| {
        span.text("stepbox.run_id", &options.run_id)
            .text("stepbox.workflow", &workflow.name)
            .text("stepbox.tenant", &options.tenant.name);
    });
    let shared =
        Shared::new(sandbox.clone(), workflow.clone(), components, &inputs, &options, base, None, span.clone());
    if first_drive.is_none()
        && let Some(trace) = span.traceparent()
    {
        drop(shared.record(|journal, run_id| journal.run_traced(run_id, trace)));
    }
    // Driven on the runtime's workers, not wherever the caller awaits (a
    // `block_on` thread): a step's task then starts and ends on the worker
    // that drives the graph, without two cross-thread wake-ups per step.
    // Dropping the run's future still stops the graph.
    let driving = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(run_graph(shared.clone(), options.fail_fast)));
    // `shut_down`: the async runtime is shutting down under the run, so
    // nothing more is recorded and a resume continues it, as when
    // interrupted.
    let (graph, shut_down) = match driving.await {
        Ok(graph) => (graph, false),
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => {
            let (outputs, output_errors, steps) = (Default::default(), Vec::new(), Vec::new());
            (GraphReport { status: RunStatus::Interrupted, outputs, output_errors, steps }, true)
        }
    };
    interrupted.abort();
    let mut status = graph.status;
    let stopped =
        |shared: &Shared| shared.base.stop_error.lock().clone().map(|why| format!("the run stopped because {why}"));
    let mut error = stopped(&shared);
    if error.is_some() {
        status = RunStatus::Failed;
    }
    // Not finished: what it did is recorded, and a resume goes on.
    let stopped_here = shut_down || options.interrupt.is_cancelled();
    let recorded = if stopped_here {
        true
    } else if status == RunStatus::Waiting {
        let record = shared.record(|journal, run_id| journal.run_parked(run_id));
        shared.durable(record).await
    } else {
        let record =
            shared.record(|journal, run_id| journal.run_finished(run_id, status, &graph.outputs, error.as_deref()));
        shared.durable(record).await
    };
    if stopped_here {
        // Interrupted, or taken over as it ended: its end is for whoever
        // takes it up to record.
        status = RunStatus::Interrupted;
    } else if !recorded {
        // The end could not be recorded: the run is not done as far as
        // anyone reading the journal can tell, and a resume finishes it.
        status = RunStatus::Failed;
        error = stopped(&shared);
    }
    shared.emit(RunEvent::RunFinished { status });
    span.record(|span| {
        span.text("stepbox.status", status.as_str());
    });
    let run = Run {
        id: options.run_id,
        workflow: workflow.name.clone(),
        workflow_path: workflow.file.display().to_string(),
        tenant: options.tenant.name.clone(),
        labels: options.labels,
        inputs: inputs.as_map().clone(),
        status,
        outputs: Some(graph.outputs),
        error,
        created_ms: options.created_ms,
        finished_ms: Some(now_ms()),
        owner: None,
        version: options.version,
        cancel_requested: false,
    };
    Ok(RunReport { run, output_errors: graph.output_errors, steps: graph.steps })
}

/// What running a workflow's graph gave: the run's report, and an
/// include step's.
pub(crate) struct GraphReport {
    status: RunStatus,
    outputs: serde_json::Map<String, serde_json::Value>,
    output_errors: Vec<String>,
    steps: Vec<StepReport>,
}

/// What a run and the runs of its includes share.
#[derive(Clone)]
pub(crate) struct Base {
    dispatcher: Arc<Dispatcher>,
    resume: Arc<ResumeState>,
    /// Cancelled by the caller's token, or when the run must stop (its
    /// journal failed, its fuel budget ran out).
    stop: CancellationToken,
    /// Why the run stopped, when it was not a step's doing.
    stop_error: Arc<parking_lot::Mutex<Option<String>>>,
    /// The caller's [`RunOptions::interrupt`]: cancelled here too when the
    /// journal refuses the run's records because another process took it
    /// over, as the lease's heartbeat would at its next renewal.
    interrupt: CancellationToken,
    /// The run's fuel budget, if its tenant has one.
    fuel: Option<Arc<FuelBudget>>,
    /// Executions the run has created, held to its tenant's
    /// `max_executions`.
    executions: Arc<std::sync::atomic::AtomicUsize>,
    /// The limits of a step that sets none (its tenant's defaults).
    limits: Arc<crate::sandbox::Limits>,
    tenant: Arc<Tenant>,
    executor: Arc<dyn Executor>,
    /// Events for the run's waiting steps, and whether it parked.
    waits: Arc<Waits>,
}

/// Everything the tasks of one run share.
pub(crate) struct Shared {
    sandbox: Sandbox,
    workflow: Arc<Workflow>,
    components: HashMap<String, StepComponent>,
    breakers: HashMap<String, CircuitBreaker>,
    limiters: HashMap<String, RateLimiter>,
    base: Base,
    run_id: String,
    events: Option<mpsc::UnboundedSender<RunEvent>>,
    journal: Option<Arc<dyn Journal>>,
    context: RunContext,
    /// The include step this workflow runs under, if it is included.
    parent: Option<StepPath>,
    /// What this workflow's steps' spans hang beneath: the run's span, or
    /// the include step's.
    span: crate::traces::Span,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    fn new(
        sandbox: Sandbox,
        workflow: Arc<Workflow>,
        components: HashMap<String, StepComponent>,
        inputs: &Inputs,
        options: &RunOptions,
        base: Base,
        parent: Option<StepPath>,
        span: crate::traces::Span,
    ) -> Arc<Self> {
        let breakers = workflow
            .components
            .values()
            .filter_map(|c| c.breaker.map(|spec| (c.name.clone(), CircuitBreaker::new(spec))))
            .collect();
        let limiters = workflow
            .components
            .values()
            .filter_map(|c| c.rate_limit.map(|spec| (c.name.clone(), RateLimiter::new(spec))))
            .collect();
        let steps = Arc::new(StepsView::new(workflow.steps.iter().map(|step| step.id.as_str())));
        let context = RunContext::new(
            template::to_jinja(inputs.as_map()),
            template::to_jinja(&workflow.vars),
            minijinja::context! { id => options.run_id.clone(), workflow => workflow.name.clone(), tenant => options.tenant.name.clone() },
            steps,
        );
        Arc::new(Shared {
            sandbox,
            components,
            breakers,
            limiters,
            base,
            run_id: options.run_id.clone(),
            events: options.events.clone(),
            journal: options.journal.clone(),
            context,
            parent,
            span,
            workflow,
        })
    }

    /// The path of step `i` of this workflow in the run.
    /// How many workflows deep this one is: 1 for the run's own.
    fn depth(&self) -> usize {
        self.parent.as_ref().map_or(1, |parent| parent.depth() + 1)
    }

    fn path(&self, i: usize) -> StepPath {
        let id = &self.workflow.steps[i].id;
        match &self.parent {
            Some(parent) => parent.child(id),
            None => StepPath::root(id),
        }
    }

    /// Queues a record in the journal, if there is one. The caller awaits
    /// the returned handle with [`Shared::durable`] when what it does next
    /// must not be lost, and may drop it otherwise: the run's next awaited
    /// record then reports any failure.
    fn record(&self, write: impl FnOnce(&dyn Journal, &str) -> Durable) -> Option<Durable> {
        self.journal.as_deref().map(|journal| write(journal, &self.run_id))
    }

    /// Waits until a queued record is durable. A failed write stops the
    /// run: going on would do work that a resume cannot know about.
    async fn durable(&self, record: Option<Durable>) -> bool {
        let Some(record) = record else { return true };
        match record.await {
            Ok(()) => true,
            // Not a failure of the run: it goes on in the process that
            // took it over, and stops here as interrupted.
            Err(err @ StoreError::LeaseLost(_)) => {
                tracing::warn!("the run stopped here because {err}");
                self.base.interrupt.cancel();
                self.base.stop.cancel();
                false
            }
            Err(err) => {
                self.stop_run(format!("its journal could not be written: {err}"));
                false
            }
        }
    }

    /// Stops the whole run (not just this step), saying why.
    fn stop_run(&self, why: String) {
        tracing::error!("the run stopped because {why}");
        self.base.stop_error.lock().get_or_insert(why);
        self.base.stop.cancel();
    }

    fn emit(&self, event: RunEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

/// How the scheduler settles a step whose dependencies are done.
enum Decision {
    Start,
    Skip { reason: String, blocking: bool },
    Cancel(String),
    Fail(String),
}

pub(crate) async fn run_graph(shared: Arc<Shared>, fail_fast: bool) -> GraphReport {
    let cancel = shared.base.stop.clone();
    let steps = &shared.workflow.steps;
    let n = steps.len();
    let mut reports: Vec<StepReport> =
        steps.iter().enumerate().map(|(i, step)| StepReport::pending(shared.path(i), step.required)).collect();
    // A skipped step blocks its dependents only when it was skipped because
    // something upstream failed.
    let mut blocking = vec![false; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut remaining: Vec<usize> = steps.iter().map(|step| step.depends_on.len()).collect();
    for (i, step) in steps.iter().enumerate() {
        for &dep in &step.depends_on {
            dependents[dep].push(i);
        }
    }
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| remaining[i] == 0).collect();
    let fail_fast_token = cancel.child_token();
    let mut first_failure: Option<String> = None;
    let mut running: JoinSet<Finished> = JoinSet::new();
    // While this loop works, or a component step runs, the run does not
    // park (see `wait`). A step's work counts until this loop has taken in
    // its end.
    let waits = shared.base.waits.clone();
    let mut working = Some(waits.busy());
    let mut step_work: Vec<Option<wait::Busy<'_>>> = std::iter::repeat_with(|| None).take(n).collect();
    // Each step's task, to name the step of a task that ends without a
    // report (looked up only then).
    let mut tasks: Vec<Option<tokio::task::Id>> = vec![None; n];

    loop {
        // A step that finished in the driver's own task (see below).
        let mut inline = None;
        while let Some(i) = ready.pop_front() {
            let decision = decide(&shared, i, &reports, &blocking, &cancel, &fail_fast_token, first_failure.as_deref());
            let report = &mut reports[i];
            match decision {
                Decision::Start => {
                    report.status = StepStatus::Running;
                    report.started_ms = Some(now_ms());
                    shared.context.steps.set(i, StepStatus::Running, None);
                    // `always` steps outlive --fail-fast, not a cancelled run.
                    let token = if steps[i].always { cancel.clone() } else { fail_fast_token.clone() };
                    let span = shared.span.child("step", |span| {
                        span.text("stepbox.step", &shared.path(i).to_string());
                    });
                    let step = execute::step(shared.clone(), i, token, span);
                    let runs = matches!(steps[i].action, crate::workflow::Action::Run { .. });
                    if runs && running.is_empty() && ready.is_empty() {
                        // The only step that can run now (a link of a
                        // chain): nothing else can become ready until it
                        // ends, so it runs in this task, saving the wake-ups
                        // of a task of its own. (A waiting or included step
                        // gets a task: the run may park while it waits.)
                        inline = Some(caught(i, step).await);
                        // A step that ends without waiting (its output
                        // reused on resume, a failed template) does not
                        // let a long chain hold the worker without a yield.
                        tokio::task::coop::consume_budget().await;
                        break;
                    }
                    // Boxed: the task then moves a pointer, not the step's
                    // large future, each time tokio moves it.
                    tasks[i] = Some(running.spawn(caught(i, Box::pin(step))).id());
                    if runs {
                        step_work[i] = Some(waits.busy());
                    }
                    continue;
                }
                Decision::Skip { reason, blocking: blocks } => {
                    report.status = StepStatus::Skipped;
                    report.reason = Some(reason);
                    blocking[i] = blocks;
                }
                Decision::Cancel(reason) => {
                    report.status = StepStatus::Cancelled;
                    report.reason = Some(reason);
                }
                Decision::Fail(reason) => {
                    report.status = StepStatus::Failed;
                    report.reason = Some(reason);
                }
            }
            settle(&shared, i, &reports[i], &mut first_failure, fail_fast, &fail_fast_token);
            release(i, &dependents, &mut remaining, &mut ready);
        }
        let finished = match inline {
            Some(finished) => finished,
            None => {
                drop(working.take());
                let Some(joined) = running.join_next().await else { break };
                working.replace(waits.busy());
                // A step catches its own panics; its task can still end in
                // error (a panic while its future is dropped, the runtime
                // shutting down), and that is the step's failure.
                let finished = joined.or_else(|err| match tasks.iter().position(|&task| task == Some(err.id())) {
                    Some(i) => Ok(Err((i, err.to_string()))),
                    None => Err(err),
                });
                let Ok(finished) = finished else { continue };
                let i = match &finished {
                    Ok((i, _)) | Err((i, _)) => *i,
                };
                step_work[i] = None;
                finished
            }
        };
        let (i, report) = match finished {
            Ok(finished) => finished,
            Err((i, panic)) => {
                // A panic in the scheduler's own code: record it, keep going.
                let mut report = StepReport::pending(shared.path(i), steps[i].required);
                report.status = StepStatus::Failed;
                report.reason = Some(format!("internal error while running the step: {panic}"));
                (i, report)
            }
        };
        reports[i] = report;
        if reports[i].status == StepStatus::Waiting {
            // Parked: recorded as waiting; its dependents wait with it.
            shared.record(|journal, run_id| journal.step_finished(run_id, i, &reports[i]));
            continue;
        }
        settle(&shared, i, &reports[i], &mut first_failure, fail_fast, &fail_fast_token);
        release(i, &dependents, &mut remaining, &mut ready);
    }
    drop(working);

    let status = if cancel.is_cancelled() {
        RunStatus::Cancelled
    } else if reports.iter().any(|r| r.status == StepStatus::Waiting) {
        RunStatus::Waiting
    } else if reports.iter().any(|r| r.required && matches!(r.status, StepStatus::Failed | StepStatus::Cancelled)) {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    let (outputs, output_errors) = outputs(&shared);
    GraphReport { status, outputs, output_errors, steps: reports }
}

/// How step `i` ended: its report, or what it panicked with.
type Finished = Result<(usize, StepReport), (usize, String)>;

/// Step `i`'s future, a panic in it caught as the step's failure.
async fn caught(i: usize, step: impl Future<Output = (usize, StepReport)>) -> Finished {
    AssertUnwindSafe(step).catch_unwind().await.map_err(|panic| {
        let message = panic.downcast_ref::<&str>().copied().or(panic.downcast_ref::<String>().map(String::as_str));
        (i, format!("panicked with message {:?}", message.unwrap_or("Box<dyn Any>")))
    })
}

fn decide(
    shared: &Shared,
    i: usize,
    reports: &[StepReport],
    blocking: &[bool],
    cancel: &CancellationToken,
    fail_fast: &CancellationToken,
    first_failure: Option<&str>,
) -> Decision {
    let steps = &shared.workflow.steps;
    let step = &steps[i];
    if cancel.is_cancelled() {
        return Decision::Cancel("the run was cancelled before the step started".into());
    }
    if fail_fast.is_cancelled() && !step.always {
        let failed = first_failure.unwrap_or("a required step");
        return Decision::Skip { reason: format!("fail-fast: `{failed}` failed"), blocking: true };
    }
    if !step.handles.is_empty() && !step.handles.iter().any(|&h| reports[h].status == StepStatus::Failed) {
        let names: Vec<&str> = step.handles.iter().map(|&h| steps[h].id.as_str()).collect();
        return Decision::Skip {
            reason: format!("on_failure handler: `{}` did not fail", names.join("`, `")),
            blocking: false,
        };
    }
    let blocked = step.depends_on.iter().find(|&&dep| {
        let report = &reports[dep];
        !step.handles.contains(&dep)
            && match report.status {
                StepStatus::Failed => report.required,
                StepStatus::Cancelled => true,
                StepStatus::Skipped => blocking[dep],
                _ => false,
            }
    });
    if let Some(&dep) = blocked.filter(|_| !step.always) {
        return Decision::Skip {
            reason: format!("dependency `{}` {}", steps[dep].id, reports[dep].status.as_str()),
            blocking: true,
        };
    }
    if let Some(when) = &step.when {
        match template::is_true(when, &shared.context.with_item(None)) {
            Ok(true) => {}
            Ok(false) => return Decision::Skip { reason: format!("`when` is false: {when}"), blocking: false },
            Err(err) => return Decision::Fail(format!("`when` could not be evaluated: {err}")),
        }
    }
    Decision::Start
}

/// Records a step's final state in the journal, publishes it to templates
/// and events, and notes the first required failure (which triggers
/// --fail-fast). The record is not awaited here: a dependent's attempt
/// awaits its own start record, which commits after this one.
fn settle(
    shared: &Shared,
    i: usize,
    report: &StepReport,
    first_failure: &mut Option<String>,
    fail_fast: bool,
    fail_fast_token: &CancellationToken,
) {
    let id = &shared.workflow.steps[i].id;
    // A resumed step that only reused its executions ends as it was
    // recorded: recorded again, it would only grow the run's log.
    let unchanged = shared.base.resume.steps.get(&report.id) == Some(&report.status)
        && !report.executions.is_empty()
        && report.executions.iter().all(|execution| execution.reused);
    if !unchanged {
        shared.record(|journal, run_id| journal.step_finished(run_id, i, report));
    }
    shared.context.steps.set(i, report.status, report.output.clone());
    shared.emit(RunEvent::StepFinished {
        path: report.id.clone(),
        status: report.status,
        reason: report.reason.clone(),
    });
    if report.required && report.status == StepStatus::Failed && first_failure.is_none() {
        *first_failure = Some(id.clone());
        if fail_fast {
            fail_fast_token.cancel();
        }
    }
}

fn release(i: usize, dependents: &[Vec<usize>], remaining: &mut [usize], ready: &mut VecDeque<usize>) {
    for &dependent in &dependents[i] {
        remaining[dependent] -= 1;
        if remaining[dependent] == 0 {
            ready.push_back(dependent);
        }
    }
}

fn outputs(shared: &Shared) -> (serde_json::Map<String, serde_json::Value>, Vec<String>) {
    let context = shared.context.with_item(None);
    let mut outputs = serde_json::Map::new();
    let mut errors = Vec::new();
    for (name, text) in &shared.workflow.outputs {
        match template::render_string(text, &context) {
            Ok(value) => {
                outputs.insert(name.clone(), value);
            }
            Err(err) => {
                errors.push(format!("output `{name}`: {err}"));
                outputs.insert(name.clone(), serde_json::Value::Null);
            }
        }
    }
    (outputs, errors)
}
