//! The run journal on PostgreSQL. Each record is a [`Record`], data rather
//! than a closure, written by the group-committing writer; creating,
//! reopening and trimming runs and taking leases commit on their own.

use std::time::Duration;

use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::PgStore;
use super::listen::CANCELS;
use crate::failpoint::failpoint;
use crate::run::{Attempt, Run, RunStatus, StepPath, StepReport, now_ms};
use crate::store::group::Kind;
use crate::store::lease::{LEASE_TTL, leased};
use crate::store::rows::{AttemptRow, ExecutionRow, clean, expiry, held, kept_input, text};
use crate::store::{Durable, Journal, Lease, Renewed, ResumeState, StoreError};

/// One journal record, as the writer commits it.
pub(super) enum Record {
    CreateRun {
        run: Run,
        fingerprint: String,
    },
    ReleaseLease(Lease),
    AttemptStarted {
        run_id: String,
        key: String,
        path: String,
        number: i64,
        started: f64,
        delay: f64,
        input: Option<String>,
    },
    AttemptFinished {
        run_id: String,
        key: String,
        path: StepPath,
        row: AttemptRow,
        execution: Option<ExecutionRow>,
    },
    IncludeLoaded {
        run_id: String,
        path: String,
        fingerprint: String,
    },
    WaitStarted {
        run_id: String,
        key: String,
        path: String,
        event: String,
        started: f64,
        deadline: Option<f64>,
    },
    WaitEnded {
        run_id: String,
        key: String,
    },
    RunParked {
        run_id: String,
    },
    RunTraced {
        run_id: String,
        trace: String,
    },
    StepFinished {
        run_id: String,
        step: StepRow,
    },
    RunFinished {
        run_id: String,
        status: RunStatus,
        outputs: String,
        error: Option<String>,
    },
}

/// A step's columns.
pub(super) struct StepRow {
    path: String,
    position: i64,
    status: &'static str,
    required: bool,
    reason: Option<String>,
    output: Option<String>,
    started: Option<f64>,
    finished: Option<f64>,
}

/// The journal's statements, each prepared once per connection.
const RELEASE_LEASE: &str = "UPDATE runs SET lease_owner = NULL, lease_expires_ms = NULL
                     WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3";
const ATTEMPT_STARTED: &str = "INSERT INTO attempts (run_id, key, attempt, step_id, status, started_ms, delay_before_ms, input)
                     VALUES ($1, $2, $3, $4, 'running', $5, $6, $7)
                     ON CONFLICT (run_id, key, attempt) DO UPDATE SET status = 'running', started_ms = excluded.started_ms,
                                                                  input = excluded.input";
const ATTEMPT_FINISHED: &str = "INSERT INTO attempts (run_id, key, attempt, step_id, status, kind, message, started_ms, finished_ms,
                                           fuel, peak_memory, logs, stdout, stderr, delay_before_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                     ON CONFLICT (run_id, key, attempt) DO UPDATE SET status = excluded.status, kind = excluded.kind,
                         message = excluded.message, started_ms = excluded.started_ms, finished_ms = excluded.finished_ms,
                         fuel = excluded.fuel, peak_memory = excluded.peak_memory, logs = excluded.logs,
                         stdout = excluded.stdout, stderr = excluded.stderr, delay_before_ms = excluded.delay_before_ms";
const EXECUTION: &str = "INSERT INTO executions (run_id, key, step_id, status, output) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (run_id, key) DO UPDATE SET status = excluded.status, output = excluded.output";
const INCLUDE_LOADED: &str =
    "INSERT INTO includes (run_id, step_id, fingerprint) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
const WAIT_STARTED: &str = "INSERT INTO waits (run_id, key, step_id, event, started_ms, deadline_ms)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING";
const WAIT_ENDED: &str = "UPDATE waits SET ended = TRUE WHERE run_id = $1 AND key = $2";
const RUN_PARKED: &str = "UPDATE runs SET status = $2, updated_ms = $3 WHERE id = $1";
const RUN_TRACED: &str = "UPDATE runs SET trace = $2 WHERE id = $1 AND trace IS NULL";
const STEP_FINISHED: &str =
    "INSERT INTO steps (run_id, step_id, position, status, reason, output, started_ms, finished_ms, required)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (run_id, step_id) DO UPDATE SET status = excluded.status, reason = excluded.reason,
                         output = excluded.output, started_ms = excluded.started_ms,
                         finished_ms = excluded.finished_ms, required = excluded.required";
/// Every run with a record in a batch, marked as recently active (the
/// `updated_ms` column, for whoever reads the table) once per batch: a
/// wide graph's step records would otherwise update the run's row hundreds
/// of times in one transaction.
pub(super) const RUNS_TOUCHED: &str = "UPDATE runs SET updated_ms = $2 WHERE id = ANY($1)";
const RUN_FINISHED: &str = "UPDATE runs SET status = $2, outputs = $3, error = $4, updated_ms = $5, finished_ms = $5,
     cancel_requested = FALSE WHERE id = $1";
const RUN_TASKS_DELETED: &str = "DELETE FROM tasks WHERE run_id = $1";
const RUN_CREATED: &str =
    "INSERT INTO runs (id, workflow, workflow_path, fingerprint, tenant, inputs, status, created_ms, updated_ms,
                           version, lease_owner, lease_expires_ms, lease_epoch)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, $12)
         ON CONFLICT (id) DO NOTHING";
/// The lease epochs of the batch's runs, locked against a taking-over
/// until the batch commits (see [`crate::store::lease::Held`]).
pub(super) const LEASE_EPOCHS: &str = "SELECT id, lease_epoch FROM runs WHERE id = ANY($1) FOR KEY SHARE";
const RUN_LABEL: &str = "INSERT INTO run_labels (run_id, key, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

/// Every statement a batch may run, prepared in this order before a batch
/// is sent, so a record never overtakes one queued before it while its
/// statement is being prepared.
pub(super) const STATEMENTS: &[&str] = &[
    RELEASE_LEASE,
    ATTEMPT_STARTED,
    ATTEMPT_FINISHED,
    EXECUTION,
    INCLUDE_LOADED,
    WAIT_STARTED,
    RUN_PARKED,
    RUN_TRACED,
    STEP_FINISHED,
    RUNS_TOUCHED,
    RUN_FINISHED,
    RUN_TASKS_DELETED,
    RUN_CREATED,
    RUN_LABEL,
    LEASE_EPOCHS,
];

impl Record {
    pub(super) async fn write(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        match self {
            Record::CreateRun { run, fingerprint } => insert_run(tx, run, fingerprint).await,
            Record::ReleaseLease(lease) => {
                failpoint!("lease.before-release");
                exec(tx, RELEASE_LEASE, &[&lease.run_id, &lease.owner, &lease.epoch.cast_signed()]).await.map(drop)
            }
            Record::AttemptStarted { run_id, key, path, number, started, delay, input } => {
                exec(tx, ATTEMPT_STARTED, &[run_id, key, number, path, started, delay, input]).await.map(drop)
            }
            Record::AttemptFinished { run_id, key, path, row, execution } => {
                exec(
                    tx,
                    ATTEMPT_FINISHED,
                    &[
                        run_id,
                        key,
                        &i64::from(row.number),
                        &path.to_string(),
                        &row.status,
                        &row.kind.map(|kind| kind.as_str()),
                        &row.message,
                        &row.started,
                        &row.finished,
                        &row.fuel,
                        &row.peak_memory,
                        &row.logs,
                        &row.stdout,
                        &row.stderr,
                        &row.delay,
                    ],
                )
                .await?;
                if let Some(execution) = execution {
                    exec(
                        tx,
                        EXECUTION,
                        &[run_id, key, &execution.path.to_string(), &execution.status, &execution.output],
                    )
                    .await?;
                }
                Ok(())
            }
            Record::IncludeLoaded { run_id, path, fingerprint } => {
                exec(tx, INCLUDE_LOADED, &[run_id, path, fingerprint]).await.map(drop)
            }
            Record::WaitStarted { run_id, key, path, event, started, deadline } => {
                exec(tx, WAIT_STARTED, &[run_id, key, path, event, started, deadline]).await.map(drop)
            }
            Record::WaitEnded { run_id, key } => exec(tx, WAIT_ENDED, &[run_id, key]).await.map(drop),
            Record::RunTraced { run_id, trace } => exec(tx, RUN_TRACED, &[run_id, trace]).await.map(drop),
            Record::RunParked { run_id } => {
                exec(tx, RUN_PARKED, &[run_id, &RunStatus::Waiting.as_str(), &(now_ms() as i64)]).await.map(drop)
            }
            Record::StepFinished { run_id, step } => exec(
                tx,
                STEP_FINISHED,
                &[
                    run_id,
                    &step.path,
                    &step.position,
                    &step.status,
                    &step.reason,
                    &step.output,
                    &step.started,
                    &step.finished,
                    &step.required,
                ],
            )
            .await
            .map(drop),
            Record::RunFinished { run_id, status, outputs, error } => {
                exec(tx, RUN_FINISHED, &[run_id, &status.as_str(), outputs, error, &(now_ms() as i64)]).await?;
                // A finished run has no work out: what an earlier driver
                // left in the queue goes, its holders fenced off.
                exec(tx, RUN_TASKS_DELETED, &[run_id]).await.map(drop)
            }
        }
    }
}

/// Inserts a new run's row and its labels, its lease held by this process
/// from the start ([`Lease::created`]).
pub(super) async fn insert_run(
    tx: &Transaction<'_>,
    run: &Run,
    fingerprint: &str,
) -> Result<(), tokio_postgres::Error> {
    let lease = Lease::created(&run.id);
    exec(
        tx,
        RUN_CREATED,
        &[
            &run.id,
            &run.workflow,
            &run.workflow_path,
            &fingerprint,
            &run.tenant,
            &text(&Value::Object(run.inputs.clone())),
            &run.status.as_str(),
            &(run.created_ms as i64),
            &run.version.map(i64::from),
            &lease.owner,
            &expiry(LEASE_TTL),
            &lease.epoch.cast_signed(),
        ],
    )
    .await?;
    for (key, value) in &run.labels {
        exec(tx, RUN_LABEL, &[&run.id, key, value]).await?;
    }
    Ok(())
}

/// Runs `sql` in `tx` as a statement prepared once per connection (the
/// pool's statement cache keeps it), so the records of a batch, sent
/// together, cost one round trip between them rather than two each.
async fn exec(tx: &Transaction<'_>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, params).await
}

impl Journal for PgStore {
    fn create_run(&self, run: &Run, fingerprint: &Value) -> (Lease, Durable) {
        let record = Record::CreateRun { run: run.clone(), fingerprint: text(fingerprint) };
        let lease = Lease::created(&run.id);
        self.writer.held.forget(&run.id);
        let created = self.writer.queue(&run.id, Kind::Awaited, record);
        self.writer.held.hold(&lease);
        let durable: Durable = Box::pin(async move {
            created.await?;
            failpoint!("run.created");
            Ok(())
        });
        (lease, durable)
    }

    fn reopen_run(&self, run_id: &str) -> Result<(), StoreError> {
        let run_id = run_id.to_owned();
        self.call(move |client| async move {
            client
                .execute(
                    "UPDATE runs SET status = $2, error = NULL, finished_ms = NULL, updated_ms = $3 WHERE id = $1",
                    &[&run_id, &RunStatus::Running.as_str(), &(now_ms() as i64)],
                )
                .await
                .map(drop)
        })
    }

    fn forget_steps(&self, run_id: &str, steps: &[StepPath]) -> Result<(), StoreError> {
        let (run_id, steps) = (run_id.to_owned(), steps.to_vec());
        self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            for table in ["steps", "executions", "includes", "waits"] {
                let recorded = tx.query(&format!("SELECT step_id FROM {table} WHERE run_id = $1"), &[&run_id]).await?;
                for path in recorded.iter().map(|row| row.get::<_, &str>(0)) {
                    let within =
                        path.parse::<StepPath>().is_ok_and(|path| steps.iter().any(|step| path.is_within(step)));
                    if within {
                        tx.execute(
                            &format!("DELETE FROM {table} WHERE run_id = $1 AND step_id = $2"),
                            &[&run_id, &path],
                        )
                        .await?;
                    }
                }
            }
            tx.commit().await
        })
    }

    fn gc(&self, before_ms: f64, interrupted: bool) -> Result<usize, StoreError> {
        self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            let finished = tx
                .execute(
                    "DELETE FROM runs WHERE created_ms < $1 AND status NOT IN ($2, $3)",
                    &[&(before_ms as i64), &RunStatus::Running.as_str(), &RunStatus::Waiting.as_str()],
                )
                .await?;
            let mut removed = finished;
            if interrupted {
                let running = tx
                    .query(
                        "SELECT id, lease_owner, lease_expires_ms FROM runs WHERE created_ms < $1 AND status = $2
                         FOR UPDATE",
                        &[&(before_ms as i64), &RunStatus::Running.as_str()],
                    )
                    .await?;
                for row in running {
                    if !held(row.get(1), row.get(2)) {
                        removed += tx.execute("DELETE FROM runs WHERE id = $1", &[&row.get::<_, &str>(0)]).await?;
                    }
                }
            }
            // Tasks of runs no longer kept go with them.
            tx.execute("DELETE FROM tasks WHERE run_id NOT IN (SELECT id FROM runs)", &[]).await?;
            tx.commit().await?;
            Ok(usize::try_from(removed).unwrap_or(usize::MAX))
        })
    }

    fn acquire_lease(&self, run_id: &str, owner: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let (id, holder_wanted) = (run_id.to_owned(), owner.to_owned());
        let taken = self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            let Some(row) = tx
                .query_opt(
                    "SELECT lease_owner, lease_expires_ms, lease_epoch FROM runs WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?
            else {
                return Ok(None);
            };
            let (holder, expires, epoch): (Option<String>, Option<i64>, i64) = (row.get(0), row.get(1), row.get(2));
            if let Some(holder) = holder.filter(|holder| *holder != holder_wanted && held(Some(holder), expires)) {
                return Ok(Some(Err((holder, expires.unwrap_or_default()))));
            }
            let epoch = epoch + 1;
            tx.execute(
                "UPDATE runs SET lease_owner = $2, lease_expires_ms = $3, lease_epoch = $4 WHERE id = $1",
                &[&id, &holder_wanted, &expiry(ttl), &epoch],
            )
            .await?;
            tx.commit().await?;
            Ok(Some(Ok(epoch)))
        })?;
        match taken {
            None => Err(StoreError::NoSuchRun(run_id.to_owned())),
            Some(Err((holder, until))) => Err(leased(run_id, &holder, until as f64)),
            Some(Ok(epoch)) => {
                let lease = Lease { run_id: run_id.to_owned(), owner: owner.to_owned(), epoch: epoch.cast_unsigned() };
                self.writer.held.hold(&lease);
                Ok(lease)
            }
        }
    }

    fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Renewed, StoreError> {
        let held = lease.clone();
        let renewed = self.call(move |client| async move {
            client
                .query_opt(
                    "UPDATE runs SET lease_expires_ms = $4 WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
                     RETURNING cancel_requested",
                    &[&held.run_id, &held.owner, &held.epoch.cast_signed(), &expiry(ttl)],
                )
                .await
        })?;
        match renewed {
            Some(row) => Ok(Renewed { cancel_requested: row.get(0) }),
            None => Err(StoreError::LeaseLost(lease.run_id.clone())),
        }
    }

    fn request_cancel(&self, run_id: &str) -> Result<bool, StoreError> {
        let id = run_id.to_owned();
        // Notified once, when first asked; asked again, it still stands.
        let asked = self.call(move |client| async move {
            client
                .query_one(
                    &format!(
                        "WITH asked AS (
                             UPDATE runs SET cancel_requested = TRUE
                             WHERE id = $1 AND status = 'running' AND NOT cancel_requested
                             RETURNING pg_notify('{CANCELS}', id)::text
                         )
                         SELECT EXISTS (SELECT 1 FROM asked)
                             OR EXISTS (SELECT 1 FROM runs WHERE id = $1 AND status = 'running' AND cancel_requested)"
                    ),
                    &[&id],
                )
                .await
        })?;
        Ok(asked.get(0))
    }

    fn release_lease(&self, lease: &Lease) -> Durable {
        self.writer.held.release(lease);
        self.writer.queue(&lease.run_id, Kind::Last, Record::ReleaseLease(lease.clone()))
    }

    fn resume_state(&self, run_id: &str) -> Result<ResumeState, StoreError> {
        let run_id = run_id.to_owned();
        self.call(move |client| async move {
            let mut state = ResumeState::default();
            let id = &run_id;
            for row in client
                .query("SELECT key, output FROM executions WHERE run_id = $1 AND status = 'succeeded'", &[id])
                .await?
            {
                state.completed.insert(row.get(0), crate::store::rows::json(row.get(1)).unwrap_or(Value::Null));
            }
            for row in
                client.query("SELECT key, MAX(attempt) FROM attempts WHERE run_id = $1 GROUP BY key", &[id]).await?
            {
                state.attempts.insert(row.get(0), u32::try_from(row.get::<_, i64>(1)).unwrap_or(u32::MAX));
            }
            for row in client.query("SELECT step_id, fingerprint FROM includes WHERE run_id = $1", &[id]).await? {
                state.includes.insert(row.get(0), crate::store::rows::json(row.get(1)).unwrap_or(Value::Null));
            }
            for row in client.query("SELECT key, started_ms FROM waits WHERE run_id = $1", &[id]).await? {
                state.waits.insert(row.get(0), row.get(1));
            }
            for row in client.query("SELECT name, payload FROM run_events WHERE run_id = $1", &[id]).await? {
                state.events.insert(row.get(0), crate::store::rows::json(row.get(1)).unwrap_or(Value::Null));
            }
            let trace = client.query_opt("SELECT trace FROM runs WHERE id = $1", &[id]).await?;
            let trace: Option<String> = trace.and_then(|row| row.get(0));
            state.trace = trace.as_deref().and_then(crate::traces::TraceParent::parse);
            Ok(state)
        })
    }

    fn attempt_started(
        &self,
        run_id: &str,
        path: &StepPath,
        key: &str,
        attempt: &Attempt,
        input: Option<&str>,
    ) -> Durable {
        let record = Record::AttemptStarted {
            run_id: run_id.to_owned(),
            key: key.to_owned(),
            path: path.to_string(),
            number: i64::from(attempt.attempt),
            started: attempt.started_ms,
            delay: attempt.delay_before_ms,
            input: input.map(kept_input),
        };
        self.writer.queue(run_id, Kind::Awaited, record)
    }

    fn attempt_finished(&self, run_id: &str, path: &StepPath, key: &str, attempt: &Attempt, last: bool) -> Durable {
        let record = Record::AttemptFinished {
            run_id: run_id.to_owned(),
            key: key.to_owned(),
            path: path.clone(),
            row: AttemptRow::of(attempt),
            execution: last.then(|| ExecutionRow::of(path, attempt)),
        };
        self.writer.queue(run_id, Kind::Lazy, record)
    }

    fn include_loaded(&self, run_id: &str, path: &StepPath, fingerprint: &Value) -> Durable {
        let record =
            Record::IncludeLoaded { run_id: run_id.to_owned(), path: path.to_string(), fingerprint: text(fingerprint) };
        self.writer.queue(run_id, Kind::Awaited, record)
    }

    fn wait_started(
        &self,
        run_id: &str,
        path: &StepPath,
        key: &str,
        event: &str,
        started_ms: f64,
        deadline_ms: Option<f64>,
    ) -> Durable {
        let record = Record::WaitStarted {
            run_id: run_id.to_owned(),
            key: key.to_owned(),
            path: path.to_string(),
            event: event.to_owned(),
            started: started_ms,
            deadline: deadline_ms,
        };
        self.writer.queue(run_id, Kind::Awaited, record)
    }

    fn wait_ended(&self, run_id: &str, key: &str) -> Durable {
        self.writer.queue(run_id, Kind::Lazy, Record::WaitEnded { run_id: run_id.to_owned(), key: key.to_owned() })
    }

    fn run_parked(&self, run_id: &str) -> Durable {
        self.writer.queue(run_id, Kind::Last, Record::RunParked { run_id: run_id.to_owned() })
    }

    fn run_traced(&self, run_id: &str, trace: &crate::traces::TraceParent) -> Durable {
        let record = Record::RunTraced { run_id: run_id.to_owned(), trace: trace.as_str().to_owned() };
        self.writer.queue(run_id, Kind::Lazy, record)
    }

    fn event_received(&self, run_id: &str, name: &str, payload: &Value) -> Result<bool, StoreError> {
        let (run_id, name, payload) = (run_id.to_owned(), name.to_owned(), text(payload));
        self.call(move |client| async move {
            let added = client
                .execute(
                    "INSERT INTO run_events (run_id, name, payload, received_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                    &[&run_id, &name, &payload, &now_ms()],
                )
                .await?;
            Ok(added > 0)
        })
    }

    fn step_finished(&self, run_id: &str, position: usize, step: &StepReport) -> Durable {
        let step = StepRow {
            path: step.id.to_string(),
            position: i64::try_from(position).unwrap_or(i64::MAX),
            status: step.status.as_str(),
            required: step.required,
            reason: step.reason.as_deref().map(clean),
            output: step.output.as_ref().map(text),
            started: step.started_ms,
            finished: step.finished_ms,
        };
        self.writer.queue(run_id, Kind::Lazy, Record::StepFinished { run_id: run_id.to_owned(), step })
    }

    fn run_finished(
        &self,
        run_id: &str,
        status: RunStatus,
        outputs: &serde_json::Map<String, Value>,
        error: Option<&str>,
    ) -> Durable {
        let record = Record::RunFinished {
            run_id: run_id.to_owned(),
            status,
            outputs: text(&Value::Object(outputs.clone())),
            error: error.map(clean),
        };
        self.writer.queue(run_id, Kind::Last, record)
    }
}
