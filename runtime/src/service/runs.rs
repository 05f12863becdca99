//! Runs in the service: started from a deployed version, driven in the
//! background, listed, read, cancelled, resumed and retried, each call
//! within the caller's scope.

use crate::traces::TraceParent;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::owned::{CancelLook, cancel_elsewhere};
use super::{
    Claim, Continue, EventLog, LiveRun, Owned, Reservation, Scope, Service, ServiceError, continue_run, finished,
    no_run,
};
use crate::run::{Outcome, Run, RunReport, RunStatus};
use crate::scheduler::{self, RunEvent};
use crate::store::{Heartbeat, LEASE_TTL, RunFilter, Started, WorkflowVersion, new_run_id};

/// Labels a run may carry.
const MAX_LABELS: usize = 32;
/// The longest label key, in bytes.
const MAX_LABEL_KEY: usize = 64;
/// The longest label value, in bytes.
const MAX_LABEL_VALUE: usize = 256;
/// The longest event name, in bytes.
const MAX_EVENT_NAME: usize = 128;
/// The longest idempotency key, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// What starts a run.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// The run's inputs, by name.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub inputs: serde_json::Map<String, serde_json::Value>,
    /// Labels to find the run by (at most 32; keys up to 64 bytes, values
    /// up to 256).
    #[serde(default)]
    #[schema(schema_with = labels_schema)]
    pub labels: BTreeMap<String, String>,
    /// The deployed version to run; the newest when left out.
    #[serde(default)]
    pub version: Option<u32>,
}

/// What makes a start happen once: its key, the hash of what was asked
/// (a different request with the same key is refused), and what the key is
/// called in messages.
pub(super) struct Once {
    pub(super) key: String,
    pub(super) request: String,
    pub(super) named: &'static str,
}

/// One page of runs, newest first.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunPage {
    /// The runs.
    pub runs: Vec<Run>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The schema of a run's labels, with their limits.
fn labels_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
    let text = |min: usize, max: usize| {
        ObjectBuilder::new().schema_type(Type::String).min_length(Some(min)).max_length(Some(max)).build()
    };
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(text(1, MAX_LABEL_KEY)))
        .additional_properties(Some(AdditionalProperties::RefOr(text(0, MAX_LABEL_VALUE).into())))
        .max_properties(Some(MAX_LABELS))
        .build()
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ServiceError> {
    let bad = |message: String| ServiceError::Invalid { code: "invalid_labels", message };
    if labels.len() > MAX_LABELS {
        return Err(bad(format!("a run may have at most {MAX_LABELS} labels; this one has {}", labels.len())));
    }
    for (key, value) in labels {
        if key.chars().any(char::is_control) || value.contains('\0') {
            return Err(bad(format!(
                "label `{}` holds a control character; keys take none, values no NUL",
                key.escape_debug()
            )));
        }
        if key.is_empty() || key.len() > MAX_LABEL_KEY || value.len() > MAX_LABEL_VALUE {
            return Err(bad(format!(
                "label `{}` is too long or empty: keys take 1 to {MAX_LABEL_KEY} bytes, values up to {MAX_LABEL_VALUE}",
                key.chars().take(MAX_LABEL_KEY).collect::<String>()
            )));
        }
    }
    Ok(())
}

impl Service {
    /// Starts a run of the scope's tenant's workflow `name`. With an
    /// idempotency key, a request repeated with the same key returns the
    /// run the first one started (and `false`: nothing new started).
    pub async fn start_run(
        self: &Arc<Self>,
        scope: &Scope,
        name: &str,
        request: StartRun,
        idempotency_key: Option<String>,
        trace_parent: Option<TraceParent>,
    ) -> Result<(Run, bool), ServiceError> {
        self.accepting()?;
        scope.tenant()?;
        if let Some(key) = idempotency_key.as_ref().filter(|key| key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY) {
            return Err(ServiceError::BadRequest {
                code: "invalid_idempotency_key",
                message: format!(
                    "an Idempotency-Key takes 1 to {MAX_IDEMPOTENCY_KEY} bytes; this one has {}",
                    key.len()
                ),
            });
        }
        check_labels(&request.labels)?;
        let version = self.workflow(scope, name, request.version).await?;
        let once = idempotency_key.map(|key| {
            let asked = serde_json::json!({ "workflow": name, "request": request });
            Once {
                key,
                request: format!("{:x}", Sha256::digest(asked.to_string().as_bytes())),
                named: "Idempotency-Key",
            }
        });
        self.start_version(&version, &request.inputs, request.labels.clone(), once, trace_parent).await
    }

    /// Starts a run of a deployed version with `inputs` (bound here) and
    /// `labels`; with `once`, only the first start with its key does.
    pub(super) async fn start_version(
        self: &Arc<Self>,
        version: &WorkflowVersion,
        inputs: &serde_json::Map<String, serde_json::Value>,
        labels: BTreeMap<String, String>,
        once: Option<Once>,
        trace_parent: Option<TraceParent>,
    ) -> Result<(Run, bool), ServiceError> {
        let tenant_name = version.tenant.clone();
        let deployed = self.deployed(version).await?;
        let tenant = Arc::new(self.tenant(&tenant_name)?.for_bundle(&deployed.dir));
        tenant.check(&deployed.workflow).map_err(ServiceError::invalid_workflow)?;
        let inputs = deployed
            .workflow
            .bind_inputs(inputs)
            .map_err(|err| ServiceError::Invalid { code: "invalid_inputs", message: err.to_string() })?;
        let reservation = match Reservation::take(&self.live, &tenant_name, Some(self.config.max_active_runs)) {
            Ok(reservation) => reservation,
            // A repeated request starts nothing, so it is answered anyway.
            Err(err) => {
                let Some(once) = once else { return Err(err) };
                let tenant = tenant_name.clone();
                let earlier = self.blocking(move |db| Ok(db.idempotency_key(&tenant, &once.key)?)).await?;
                return match earlier {
                    Some((id, earlier)) if earlier == once.request => {
                        Ok((self.blocking(move |db| Ok(db.load_run(&id)?)).await?, false))
                    }
                    _ => Err(err),
                };
            }
        };
        let path = deployed.workflow.file.display().to_string();
        let mut run = Run::new(new_run_id(), &version.name, &path, &tenant_name, inputs.as_map().clone());
        run.labels = labels;
        run.version = Some(version.version);
        let fingerprint = &deployed.fingerprint;
        let (lease, created) = match once {
            Some(once) => match self.db.create_run_once(&run, fingerprint, &once.key, &once.request).await? {
                Started::Created(lease) => (lease, None),
                Started::Existing(id) => return Ok((self.blocking(move |db| Ok(db.load_run(&id)?)).await?, false)),
                Started::Conflict(id) => {
                    return Err(ServiceError::Conflict {
                        code: "idempotency_key_reused",
                        message: format!(
                            "this {} started run {id} with a different request; use a new one for a new run",
                            once.named
                        ),
                    });
                }
            },
            None => {
                let (lease, created) = self.db.create_run(&run, fingerprint);
                (lease, Some(created))
            }
        };
        let owned = Owned { workflow: deployed.workflow.clone(), run: run.clone(), inputs, tenant, lease };
        self.launch(owned, reservation, Arc::default(), trace_parent);
        // A run without a key starts while its record commits: its first
        // attempt's start record commits after it, often in the same group
        // commit. The caller hears of the run once it is durable.
        if let Some(created) = created {
            created.await?;
        }
        Ok((run, true))
    }

    /// Drives an owned run in the background until it ends or is
    /// interrupted.
    fn launch(
        self: &Arc<Self>,
        owned: Owned,
        reservation: Reservation,
        events: Arc<EventLog>,
        trace_parent: Option<TraceParent>,
    ) {
        let live = Arc::new(LiveRun {
            waits: Arc::default(),
            cancel: tokio_util::sync::CancellationToken::new(),
            interrupt: self.interrupt.child_token(),
            events,
        });
        self.live.lock().runs.insert(owned.run.id.clone(), live.clone());
        self.tasks.spawn(self.clone().drive(owned, live, reservation, trace_parent));
    }

    async fn drive(
        self: Arc<Self>,
        owned: Owned,
        live: Arc<LiveRun>,
        reservation: Reservation,
        trace_parent: Option<TraceParent>,
    ) {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let mut options = owned.options(self.db.clone(), self.dispatcher.clone());
        options.secrets_dir = self.config.secrets_dir.clone();
        options.cancel = live.cancel.clone();
        options.interrupt = live.interrupt.clone();
        options.waits = live.waits.clone();
        options.events = Some(sender);
        options.trace_parent = trace_parent;
        if let Some(queue) = &self.queue {
            options.executor = Some(queue.clone());
        }
        let Owned { workflow, inputs, lease, run, .. } = owned;
        // A lease lost to another process interrupts the run here: that
        // process goes on with it. A cancel asked through another node
        // cancels it here.
        let heartbeat = Heartbeat::start(self.db.clone(), lease, live.interrupt.clone(), live.cancel.clone());
        let events = live.events.clone();
        let forward = tokio::spawn(async move {
            while let Some(event) = receiver.recv().await {
                events.push(&event);
            }
        });
        let result = scheduler::run(&self.sandbox, workflow, inputs, options).await;
        let _ = forward.await;
        let parked = matches!(&result, Ok(report) if report.run.status == RunStatus::Waiting);
        if let Err(err) = result {
            // It could not start (its resume state could not be read):
            // record why, so it does not hang as interrupted.
            let message = format!("the run could not start: {err}");
            tracing::error!(run = run.id, "{message}");
            let record = self.db.run_finished(&run.id, RunStatus::Failed, &serde_json::Map::new(), Some(&message));
            if let Err(err) = record.await {
                tracing::error!(run = run.id, "cannot record the run's failure: {err}");
            }
            live.events.push(&RunEvent::RunFinished { status: RunStatus::Failed });
        }
        heartbeat.release().await;
        live.events.finish();
        self.finished.lock().put(run.id.clone(), live.events.clone());
        {
            // Only this drive's entry: a later drive of the run may be live.
            let mut state = self.live.lock();
            if state.runs.get(&run.id).is_some_and(|entry| Arc::ptr_eq(entry, &live)) {
                state.runs.remove(&run.id);
            }
        }
        drop(reservation);
        // Cancelled as it parked, too late for the scheduler to see: here,
        // or through another node (whose notice may come after the lease
        // went, so the run's record says).
        let asked = parked && {
            let wanted = run.id.clone();
            live.cancel.is_cancelled()
                || self.blocking(move |db| Ok(db.load_run(&wanted)?.cancel_requested)).await.unwrap_or(false)
        };
        if asked {
            match cancel_elsewhere(self.db.clone(), &run.id).await {
                Err(err) => tracing::error!(run = run.id, "cannot record the run's cancel: {err}"),
                Ok(CancelLook::Moved) => {
                    tracing::error!(run = run.id, "the run was taken up as it was cancelled; cancel it again");
                }
                Ok(_) => {}
            }
        } else if parked {
            // An event may have come as it parked.
            self.wake.notify_one();
        }
    }

    /// Sends the event `name` with `payload` to a run: a step waiting for
    /// it wakes (the run resumes if it parked), and one that reaches it
    /// later finds it. Recorded before anything else, so it survives a
    /// restart; the first event of a name is kept.
    pub async fn send_event(
        &self,
        scope: &Scope,
        id: &str,
        name: &str,
        payload: serde_json::Value,
    ) -> Result<Run, ServiceError> {
        let run = self.run(scope, id).await?;
        if name.is_empty() || name.len() > MAX_EVENT_NAME || name.chars().any(char::is_control) {
            return Err(ServiceError::Invalid {
                code: "invalid_event_name",
                message: format!("an event name takes 1 to {MAX_EVENT_NAME} bytes without control characters"),
            });
        }
        if finished(run.status) {
            return Err(ServiceError::Conflict {
                code: "run_finished",
                message: format!("run {id} already {}; no step waits for events any more", run.status),
            });
        }
        let version = run.version.ok_or_else(|| ServiceError::Conflict {
            code: "not_a_service_run",
            message: format!("run {id} was not started through the service, so no event can be sent to it"),
        })?;
        let scope_of_run = Scope::Tenant(run.tenant.clone());
        let deployed = self.deployed(&self.workflow(&scope_of_run, &run.workflow, Some(version)).await?).await?;
        if let Some(events) = deployed.workflow.wait_events().filter(|events| !events.contains(name)) {
            let known: Vec<&str> = events.iter().map(String::as_str).collect();
            return Err(ServiceError::Invalid {
                code: "no_such_event",
                message: if known.is_empty() {
                    format!("no step of workflow `{}` waits for an event", run.workflow)
                } else {
                    format!(
                        "no step of workflow `{}` waits for `{name}`; its steps wait for: {}",
                        run.workflow,
                        known.join(", ")
                    )
                },
            });
        }
        let (run_id, event, value) = (id.to_owned(), name.to_owned(), payload.clone());
        let added = self.blocking(move |db| Ok(db.event_received(&run_id, &event, &value)?)).await?;
        if !added {
            return Err(ServiceError::Conflict {
                code: "event_already_sent",
                message: format!("the event `{name}` was sent to run {id} before; the first one is kept"),
            });
        }
        let live = self.live.lock().runs.get(id).map(|live| live.waits.clone());
        match live {
            Some(waits) => waits.deliver(name, payload),
            None => self.wake.notify_one(),
        }
        self.run(scope, id).await
    }

    /// Resumes parked runs whose event came or whose wait timed out, at
    /// start and whenever a run parks, an event comes or a deadline
    /// passes, until the service shuts down.
    pub(super) async fn wake_parked_runs(self: Arc<Self>) {
        /// How long it sleeps at most, in case a wake-up was missed.
        const AT_MOST: std::time::Duration = std::time::Duration::from_secs(60);
        // Runs that could not be resumed, not tried again by this process.
        let mut given_up = std::collections::HashSet::new();
        loop {
            let woken = self.wake.notified();
            let now = crate::run::now_ms();
            let due = self.blocking(move |db| Ok((db.runs_to_wake(now)?, db.next_wait_deadline()?))).await;
            let next = match due {
                Ok((runs, next)) => {
                    let runs =
                        runs.into_iter().filter(|id| !given_up.contains(id) && !self.live.lock().runs.contains_key(id));
                    for id in runs.collect::<Vec<_>>() {
                        let run = match self
                            .blocking({
                                let id = id.clone();
                                move |db| Ok(db.load_run(&id)?)
                            })
                            .await
                        {
                            Ok(run) => run,
                            Err(err) => {
                                tracing::warn!(run = id, "cannot read a parked run: {err}");
                                continue;
                            }
                        };
                        // Woken runs count against their tenant's active runs;
                        // past it they wait for the next round.
                        match self.continue_owned(&run, None, false, Some(self.config.max_active_runs)).await {
                            Ok(()) | Err(ServiceError::TooManyRuns { .. } | ServiceError::Conflict { .. }) => {}
                            Err(err) => {
                                tracing::warn!(run = id, "cannot resume a parked run: {err}");
                                given_up.insert(id);
                            }
                        }
                    }
                    next
                }
                Err(err) => {
                    tracing::error!("cannot read the parked runs: {err}");
                    None
                }
            };
            let sleep = next.map_or(AT_MOST, |deadline| {
                std::time::Duration::from_secs_f64(((deadline - crate::run::now_ms()) / 1000.0).clamp(1.0, 60.0))
            });
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(sleep) => {}
                () = self.closing.cancelled() => return,
            }
        }
    }

    /// Resumes the runs of deployed workflows that a crash left
    /// interrupted (their owner died, or its lease expired), except those
    /// in `given_up`, to which it adds the runs that cannot be resumed.
    pub(super) async fn resume_interrupted(self: &Arc<Self>, given_up: &mut HashSet<String>) {
        let filter = RunFilter { status: Some(RunStatus::Interrupted), ..RunFilter::default() };
        let runs = match self.blocking(move |db| Ok(db.list_runs(&filter)?)).await {
            Ok(runs) => runs,
            Err(err) => {
                tracing::error!("cannot list interrupted runs to resume them: {err}");
                return;
            }
        };
        for run in runs {
            if run.version.is_none() || given_up.contains(&run.id) {
                continue;
            }
            match self.continue_owned(&run, None, false, None).await {
                Ok(()) => tracing::info!(run = run.id, "resumed a run a crash interrupted"),
                // Another node, or a call of this one, took it first.
                Err(ServiceError::Conflict { .. }) => {}
                // The database is away, or this node is stopping: the next
                // sweep tries again.
                Err(err @ (ServiceError::Store(_) | ServiceError::Internal(_) | ServiceError::ShuttingDown)) => {
                    tracing::warn!(run = run.id, "cannot resume an interrupted run yet: {err}");
                }
                Err(err) => {
                    tracing::warn!(run = run.id, "cannot resume an interrupted run: {err}");
                    given_up.insert(run.id);
                }
            }
        }
    }

    /// Takes over, every third of a lease, the runs whose owner died while
    /// this service runs: another node of the service sharing the database,
    /// or this one's own run whose lease lapsed while the database was away.
    pub(super) async fn take_over_interrupted(self: Arc<Self>, mut given_up: HashSet<String>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(LEASE_TTL / 3) => {}
                () = self.closing.cancelled() => return,
            }
            self.resume_interrupted(&mut given_up).await;
        }
    }

    /// A run in the caller's scope.
    pub async fn run(&self, scope: &Scope, id: &str) -> Result<Run, ServiceError> {
        let wanted = id.to_owned();
        let run = self.blocking(move |db| Ok(db.load_run(&wanted)?)).await?;
        if !scope.sees(&run.tenant) {
            return Err(ServiceError::NotFound(no_run(id)));
        }
        Ok(run)
    }

    /// A run's report: its steps, executions and attempts as recorded.
    pub async fn report(&self, scope: &Scope, id: &str) -> Result<RunReport, ServiceError> {
        self.run(scope, id).await?;
        let wanted = id.to_owned();
        self.blocking(move |db| Ok(db.run_report(&wanted)?)).await
    }

    /// A run's report without its attempts' logs, stdout and stderr and its
    /// executions' inputs ([`crate::store::History::run_summary`]).
    pub async fn summary(&self, scope: &Scope, id: &str) -> Result<RunReport, ServiceError> {
        self.run(scope, id).await?;
        let wanted = id.to_owned();
        self.blocking(move |db| Ok(db.run_summary(&wanted)?)).await
    }

    /// Runs in the caller's scope that match `filter`, a page of at most
    /// `filter.limit`.
    pub async fn runs(&self, scope: &Scope, mut filter: RunFilter) -> Result<RunPage, ServiceError> {
        if let Scope::Tenant(tenant) = scope {
            filter.tenant = Some(tenant.clone());
        }
        if let Some(cursor) = filter.before.clone() {
            // A cursor is a run id: one the caller cannot see is no cursor.
            self.run(scope, &cursor).await.map_err(|_| ServiceError::BadRequest {
                code: "invalid_cursor",
                message: format!("`{cursor}` is not a cursor from an earlier page; start again without one"),
            })?;
        }
        let limit = filter.limit;
        let runs = self.blocking(move |db| Ok(db.list_runs(&filter)?)).await?;
        let next_cursor = runs.last().filter(|_| runs.len() == limit).map(|run| run.id.clone());
        Ok(RunPage { runs, next_cursor })
    }

    /// Cancels a run: a running one stops its attempts and ends as
    /// `cancelled` (one another process runs, once it hears of it: the run
    /// shows `cancel_requested` until then); an interrupted or waiting one
    /// is recorded as cancelled at once.
    pub async fn cancel(&self, scope: &Scope, id: &str) -> Result<Run, ServiceError> {
        let finished = |status: RunStatus| ServiceError::Conflict {
            code: "run_finished",
            message: format!("run {id} already {status}; there is nothing to cancel"),
        };
        let mut run = self.run(scope, id).await?;
        // A run can change hands while this looks: each turn looks again.
        for _ in 0..3 {
            // Its drive may still be leaving the map after its last record.
            if matches!(run.status, RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled) {
                return Err(finished(run.status));
            }
            // Under the lock a drive leaves the map by: either it sees this
            // cancel as it ends, or this finds it gone.
            let driven = self.live.lock().runs.get(id).map(|live| live.cancel.cancel()).is_some();
            if driven {
                return Ok(run);
            }
            // No drive of this service starts it meanwhile (one that is
            // starting is looked at again next turn).
            if let Ok(_claim) = Claim::take(&self.live, id) {
                match cancel_elsewhere(self.db.clone(), id).await? {
                    CancelLook::Recorded | CancelLook::Asked => return self.run(scope, id).await,
                    CancelLook::Finished(status) => return Err(finished(status)),
                    CancelLook::Moved => {}
                }
            }
            run = self.run(scope, id).await?;
        }
        Err(ServiceError::Conflict {
            code: "run_busy",
            message: format!("run {id} kept changing hands while it was being cancelled; try again"),
        })
    }

    /// Continues a run: `resume` runs what did not succeed; `retry` runs a
    /// failed or cancelled run again from its failed steps, or from step
    /// `from` and everything after it.
    pub async fn continue_run(
        self: &Arc<Self>,
        scope: &Scope,
        id: &str,
        retry: bool,
        from: Option<String>,
    ) -> Result<Run, ServiceError> {
        self.accepting()?;
        let run = self.run(scope, id).await?;
        if run.version.is_none() {
            return Err(ServiceError::Conflict {
                code: "not_a_service_run",
                message: format!("run {id} was not started through the service; continue it with `stepbox resume`"),
            });
        }
        self.continue_owned(&run, from, retry, Some(self.config.max_active_runs)).await?;
        self.run(scope, id).await
    }

    /// Takes `run` over and drives it again.
    async fn continue_owned(
        self: &Arc<Self>,
        run: &Run,
        from: Option<String>,
        retry: bool,
        limit: Option<usize>,
    ) -> Result<(), ServiceError> {
        let claim = Claim::take(&self.live, &run.id)?;
        let reservation = Reservation::take(&self.live, &run.tenant, limit)?;
        let version = run.version.ok_or_else(|| ServiceError::Internal("not a service run".into()))?;
        let scope = Scope::Tenant(run.tenant.clone());
        let deployed = self.deployed(&self.workflow(&scope, &run.workflow, Some(version)).await?).await?;
        let tenant = Arc::new(self.tenant(&run.tenant)?.for_bundle(&deployed.dir));
        let (id, file, seen) = (run.id.clone(), deployed.workflow.file.clone(), run.status);
        // Kept where readers find it until the new drive is live.
        let earlier = self.finished.lock().get(&run.id).cloned();
        let (owned, events) = self
            .blocking(move |db| {
                // Read before it changes: the events so far, numbered as
                // a reader of its earlier drives saw them.
                let events = match earlier {
                    Some(events) => events,
                    None => Arc::new(recorded_events(&db.run_report(&id)?)),
                };
                // This node's copy of the bundle, wherever the run began;
                // the run as this call saw it, whatever happened since.
                let how = Continue { retry, from: from.as_deref(), file: Some(&file), seen: Some(seen) };
                let owned = continue_run(db, &id, how, |_, workflow| {
                    tenant.check(workflow)?;
                    Ok(tenant)
                })?;
                Ok((owned, events))
            })
            .await?;
        events.reopen();
        // A run taken up again continues its first drive's trace (the
        // journal keeps where), not a request's.
        self.launch(owned, reservation, events, None);
        drop(claim);
        Ok(())
    }

    /// A run's events: live while this service drives it; followed through
    /// the journal while another node does; else what its report records.
    pub async fn events(self: &Arc<Self>, scope: &Scope, id: &str) -> Result<Arc<EventLog>, ServiceError> {
        self.run(scope, id).await?;
        let live = self.live.lock().runs.get(id).map(|live| live.events.clone());
        if let Some(events) = live.or_else(|| self.finished.lock().get(id).cloned()) {
            return Ok(events);
        }
        let report = self.summary(scope, id).await?;
        if report.run.status == RunStatus::Running {
            return Ok(self.follow(&report));
        }
        Ok(Arc::new(recorded_events(&report)))
    }

    /// The events of a run another node drives, read from the journal as
    /// its records commit (every [`FOLLOW_EVERY`]) until it stops running
    /// there; readers of one run on this node share one log.
    fn follow(self: &Arc<Self>, report: &RunReport) -> Arc<EventLog> {
        let id = report.run.id.clone();
        let mut followed = self.followed.lock();
        followed.retain(|_, log| log.strong_count() > 0);
        // A log that stopped following (the run stopped there) is not
        // handed out again: the run may go on.
        if let Some(log) = followed.get(&id).and_then(std::sync::Weak::upgrade).filter(|log| !log.is_finished()) {
            return log;
        }
        let log = Arc::new(EventLog::rebuilt());
        followed.insert(id.clone(), Arc::downgrade(&log));
        drop(followed);
        let mut seen = HashSet::new();
        push_unseen(&log, &mut seen, report);
        let (service, weak) = (self.clone(), Arc::downgrade(&log));
        self.tasks.spawn(async move {
            let mut pause = FOLLOW_EVERY;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = service.closing.cancelled() => return,
                }
                // Followed while someone reads it.
                let Some(log) = weak.upgrade() else { return };
                let wanted = id.clone();
                let read = std::time::Instant::now();
                let Ok(report) = service.blocking(move |db| Ok(db.run_summary(&wanted)?)).await else { continue };
                // A big run's report takes long to read: read it less often,
                // so following costs the node a tenth of its time at most.
                pause = FOLLOW_EVERY.max(read.elapsed() * 10);
                push_unseen(&log, &mut seen, &report);
                if report.run.status != RunStatus::Running || service.live.lock().runs.contains_key(&id) {
                    // Over, parked, or taken up (by this node too): a
                    // reader that comes back finds where it went on.
                    log.finish();
                    return;
                }
            }
        });
        log
    }
}

/// How often the events of a run another node drives are read, at most.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Adds to `log` the events of `report` it does not have yet (`seen`).
fn push_unseen(log: &EventLog, seen: &mut HashSet<String>, report: &RunReport) {
    for event in recorded(report) {
        if seen.insert(serde_json::to_string(&event).unwrap_or_default()) {
            log.push(&event);
        }
    }
}

/// The events a recorded run emitted, rebuilt from its report, as a log
/// that is complete.
fn recorded_events(report: &RunReport) -> EventLog {
    let log = EventLog::rebuilt();
    for event in recorded(report) {
        log.push(&event);
    }
    log.finish();
    log
}

/// The events a recorded run emitted, rebuilt from its report: each
/// attempt's start (and retry), each step's end, and the run's end.
fn recorded(report: &RunReport) -> Vec<RunEvent> {
    let mut log = Vec::new();
    for step in report.all_steps() {
        for execution in &step.executions {
            for (i, attempt) in execution.attempts.iter().enumerate() {
                log.push(RunEvent::AttemptStarted { path: execution.path.clone(), attempt: attempt.attempt });
                if let (Outcome::Failed { failure }, Some(next)) = (&attempt.outcome, execution.attempts.get(i + 1)) {
                    log.push(RunEvent::Retrying {
                        path: execution.path.clone(),
                        attempt: attempt.attempt,
                        delay: std::time::Duration::from_secs_f64(next.delay_before_ms.max(0.0) / 1000.0),
                        failure: failure.clone(),
                    });
                }
            }
        }
        if finished_step(step.status) {
            log.push(RunEvent::StepFinished {
                path: step.id.clone(),
                status: step.status,
                reason: step.reason.clone(),
            });
        }
    }
    // A run being taken up again has not finished: its stream ends
    // without an end, and a reader that comes back finds the new drive.
    if report.run.status != RunStatus::Running {
        log.push(RunEvent::RunFinished { status: report.run.status });
    }
    log
}

fn finished_step(status: crate::run::StepStatus) -> bool {
    !matches!(status, crate::run::StepStatus::Pending | crate::run::StepStatus::Running)
}
