//! The run journal on PostgreSQL. Each record is a [`Record`], data rather
//! than a closure, written by the group-committing writer; creating,
//! reopening and trimming runs and taking leases commit on their own.

use std::time::Duration;

use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::PgStore;
use super::listen::CANCELS;
use super::writer::Entry;
use crate::failpoint::failpoint;
use crate::run::{Attempt, Run, RunStatus, StepPath, StepReport, now_ms};
use crate::store::group::Kind;
use crate::store::lease::{LEASE_TTL, leased};
use crate::store::log;
use crate::store::rows::{clean, expiry, held, text};
use crate::store::{Durable, Journal, Lease, Renewed, ResumeState, StoreError};

/// One journal record, as the writer commits it.
pub(super) enum Record {
    CreateRun { run: Run, fingerprint: String },
    ReleaseLease(Lease),
    IncludeLoaded { run_id: String, path: String, fingerprint: String },
    WaitStarted { run_id: String, key: String, path: String, event: String, started: f64, deadline: Option<f64> },
    WaitEnded { run_id: String, key: String },
    RunParked { run_id: String },
    RunTraced { run_id: String, trace: String },
    RunFinished { run_id: String, status: RunStatus, outputs: String, error: Option<String> },
}

/// The journal's statements, each prepared once per connection.
const RELEASE_LEASE: &str = "UPDATE runs SET lease_owner = NULL, lease_expires_ms = NULL
                     WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3";
const INCLUDE_LOADED: &str =
    "INSERT INTO includes (run_id, step_id, fingerprint) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
const WAIT_STARTED: &str = "INSERT INTO waits (run_id, key, step_id, event, started_ms, deadline_ms)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (run_id, key) DO UPDATE SET ended = FALSE";
const WAIT_ENDED: &str = "UPDATE waits SET ended = TRUE WHERE run_id = $1 AND key = $2";
const RUN_PARKED: &str = "UPDATE runs SET status = $2, updated_ms = $3 WHERE id = $1";
const RUN_TRACED: &str = "UPDATE runs SET trace = $2 WHERE id = $1 AND trace IS NULL";
const RUN_LOG: &str = "INSERT INTO run_log (run_id, records) VALUES ($1, $2)";
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
    INCLUDE_LOADED,
    WAIT_STARTED,
    WAIT_ENDED,
    RUN_PARKED,
    RUN_TRACED,
    RUN_LOG,
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

/// Appends a row to its run's log.
pub(super) async fn append(tx: &Transaction<'_>, row: &log::Row<'_>) -> Result<u64, tokio_postgres::Error> {
    exec(tx, RUN_LOG, &[&row.run_id, &row.records]).await
}

/// Runs `sql` in `tx` as a statement prepared once per connection (the
/// pool's statement cache keeps it), so the records of a batch, sent
/// together, cost one round trip between them rather than two each.
async fn exec(tx: &Transaction<'_>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, params).await
}

impl PgStore {
    /// A run's log, folded; without `bulk`, without the attempts' logs,
    /// stdout, stderr and inputs. Its rows stream to this thread one at a
    /// time, so a long log neither waits whole in memory nor takes the
    /// store's runtime to fold.
    pub(super) fn fold(&self, run_id: &str, bulk: bool) -> Result<log::Folded, StoreError> {
        let (rows, received) = std::sync::mpsc::sync_channel::<String>(2);
        let (pool, id) = (self.pool.clone(), run_id.to_owned());
        let place = self.place().to_owned();
        let read = self.handle.spawn(async move {
            let client = pool.get().await.map_err(|err| super::pool_error(&place, err))?;
            let err = |err: tokio_postgres::Error| super::pg_error(&place, &err);
            let stream = client
                .query_raw("SELECT records FROM run_log WHERE run_id = $1 ORDER BY id", [&id as &(dyn ToSql + Sync)])
                .await
                .map_err(err)?;
            let mut stream = std::pin::pin!(stream);
            while let Some(row) = futures_util::StreamExt::next(&mut stream).await {
                let row = row.map_err(err)?;
                // The reader stopped (an unreadable row): so does this.
                let sent = tokio::task::block_in_place(|| rows.send(row.get(0)));
                if sent.is_err() {
                    break;
                }
            }
            Ok::<(), StoreError>(())
        });
        let mut folded = log::Folded::default();
        let mut unreadable = None;
        for chunk in &received {
            if let Err(err) = folded.read(&chunk, bulk) {
                unreadable = Some(err);
                break;
            }
        }
        drop(received);
        let read = super::block(&self.handle, async move { read.await.unwrap_or(Err(StoreError::WriterStopped)) });
        if let Some(err) = unreadable {
            return Err(StoreError::Database {
                place: self.place().to_owned(),
                detail: format!("the log of run {run_id} cannot be read ({err})"),
            });
        }
        read?;
        Ok(folded)
    }
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
            for table in ["includes", "waits"] {
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
            let mut chunks = log::Chunks::default();
            chunks.push(&run_id, 0, &log::Record::Forgotten { steps }.text());
            for row in chunks.rows() {
                append(&tx, &row).await?;
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
        let mut state = self.fold(run_id, false)?.resume(run_id);
        let run_id = run_id.to_owned();
        self.call(move |client| async move {
            let id = &run_id;
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
        _key: &str,
        attempt: &Attempt,
        input: Option<&str>,
    ) -> Durable {
        self.writer.queue(run_id, Kind::Awaited, Entry::Log(log::Record::started(path, attempt, input).text()))
    }

    fn attempt_finished(&self, run_id: &str, path: &StepPath, _key: &str, attempt: &Attempt, last: bool) -> Durable {
        self.writer.queue(run_id, Kind::Lazy, Entry::Log(log::Record::finished(path, attempt, last).text()))
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
        self.writer.queue(run_id, Kind::Lazy, Entry::Log(log::Record::step(position, step).text()))
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
