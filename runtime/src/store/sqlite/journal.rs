//! The write side of the SQLite store: the run journal. Records of attempts,
//! executions, steps and the run's end go through the group-committing
//! writer; creating, reopening and trimming runs commit on their own.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::Database;
use super::writer::{Job, Kind, append};
use crate::failpoint::failpoint;
use crate::run::{Attempt, Run, RunStatus, StepPath, StepReport, now_ms};
use crate::store::lease::{LEASE_TTL, leased};
use crate::store::log::{Chunks, Folded, Record};
use crate::store::rows::{clean, expiry, held, json, text};
use crate::store::{Durable, Journal, Lease, Renewed, ResumeState, StoreError};

/// Inserts a new run's row and its labels, its lease held by this process
/// from the start ([`Lease::created`]).
pub(super) fn insert_run(conn: &Connection, run: &Run, fingerprint: &Value) -> rusqlite::Result<()> {
    let lease = Lease::created(&run.id);
    conn.execute(
        "INSERT INTO runs (id, workflow, workflow_path, fingerprint, tenant, inputs, status, created_ms, updated_ms, version,
                           lease_owner, lease_expires_ms, lease_epoch)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11, ?12)",
        params![
            run.id,
            run.workflow,
            run.workflow_path,
            text(fingerprint),
            run.tenant,
            text(&Value::Object(run.inputs.clone())),
            run.status,
            run.created_ms as i64,
            run.version,
            lease.owner,
            expiry(LEASE_TTL),
            lease.epoch.cast_signed()
        ],
    )?;
    for (key, value) in &run.labels {
        conn.execute("INSERT INTO run_labels (run_id, key, value) VALUES (?1, ?2, ?3)", params![run.id, key, value])?;
    }
    Ok(())
}

impl Journal for Database {
    fn create_run(&self, run: &Run, fingerprint: &Value) -> (Lease, Durable) {
        let lease = Lease::created(&run.id);
        let (record, fingerprint) = (run.clone(), fingerprint.clone());
        self.writer.held.forget(&run.id);
        let created = self.queue(
            &run.id,
            Kind::Awaited,
            Job::Statements(Box::new(move |conn| insert_run(conn, &record, &fingerprint))),
        );
        self.writer.held.hold(&lease);
        let durable = Box::pin(async move {
            created.await?;
            failpoint!("run.created");
            Ok(())
        });
        (lease, durable)
    }

    fn reopen_run(&self, run_id: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET status = ?2, error = NULL, finished_ms = NULL, updated_ms = ?3 WHERE id = ?1",
                params![run_id, RunStatus::Running, now_ms() as i64],
            )
            .map(drop)
        })
    }

    fn forget_steps(&self, run_id: &str, steps: &[StepPath]) -> Result<(), StoreError> {
        self.write(|tx| {
            for table in ["includes", "waits"] {
                let recorded: Vec<StepPath> = {
                    let mut statement = tx.prepare(&format!("SELECT step_id FROM {table} WHERE run_id = ?1"))?;
                    statement.query_map(params![run_id], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?
                };
                let mut delete = tx.prepare(&format!("DELETE FROM {table} WHERE run_id = ?1 AND step_id = ?2"))?;
                for path in recorded.iter().filter(|path| steps.iter().any(|step| path.is_within(step))) {
                    delete.execute(params![run_id, path])?;
                }
            }
            let mut chunks = Chunks::default();
            chunks.push(run_id, 0, &Record::Forgotten { steps: steps.to_vec() }.text());
            chunks.rows().try_for_each(|row| append(tx, &row))
        })
    }

    fn gc(&self, before_ms: f64, interrupted: bool) -> Result<usize, StoreError> {
        self.write(|tx| {
            let finished = tx.execute(
                "DELETE FROM runs WHERE created_ms < ?1 AND status NOT IN (?2, ?3)",
                params![before_ms as i64, RunStatus::Running, RunStatus::Waiting],
            )?;
            // Tasks of runs no longer kept go with them.
            let orphans = "DELETE FROM tasks WHERE run_id NOT IN (SELECT id FROM runs)";
            if !interrupted {
                tx.execute(orphans, [])?;
                return Ok(finished);
            }
            let running: Vec<(String, Option<String>, Option<i64>)> = {
                let mut statement = tx.prepare(
                    "SELECT id, lease_owner, lease_expires_ms FROM runs WHERE created_ms < ?1 AND status = ?2",
                )?;
                let rows = statement.query_map(params![before_ms as i64, RunStatus::Running], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut removed = finished;
            for (id, owner, expires) in running {
                if !held(owner.as_deref(), expires) {
                    removed += tx.execute("DELETE FROM runs WHERE id = ?1", params![id])?;
                }
            }
            tx.execute(orphans, [])?;
            Ok(removed)
        })
    }

    fn acquire_lease(&self, run_id: &str, owner: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let taken = self.write(|tx| {
            let current: Option<(Option<String>, Option<i64>, i64)> = tx
                .query_row(
                    "SELECT lease_owner, lease_expires_ms, lease_epoch FROM runs WHERE id = ?1",
                    params![run_id],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?;
            let Some((holder, expires, epoch)) = current else { return Ok(None) };
            if let Some(holder) = holder.filter(|holder| holder != owner && held(Some(holder), expires)) {
                return Ok(Some(Err((holder, expires.unwrap_or_default()))));
            }
            let epoch = epoch + 1;
            tx.execute(
                "UPDATE runs SET lease_owner = ?2, lease_expires_ms = ?3, lease_epoch = ?4 WHERE id = ?1",
                params![run_id, owner, expiry(ttl), epoch],
            )?;
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
        let renewed = self.write(|tx| {
            tx.query_row(
                "UPDATE runs SET lease_expires_ms = ?4 WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3
                 RETURNING cancel_requested",
                params![lease.run_id, lease.owner, lease.epoch.cast_signed(), expiry(ttl)],
                |row| row.get(0),
            )
            .optional()
        })?;
        match renewed {
            Some(cancel_requested) => Ok(Renewed { cancel_requested }),
            None => Err(StoreError::LeaseLost(lease.run_id.clone())),
        }
    }

    fn request_cancel(&self, run_id: &str) -> Result<bool, StoreError> {
        let (first, asked) = self.write(|tx| {
            let first = tx.execute(
                "UPDATE runs SET cancel_requested = 1 WHERE id = ?1 AND status = 'running' AND NOT cancel_requested",
                params![run_id],
            )? > 0;
            let asked = tx
                .query_row(
                    "SELECT cancel_requested FROM runs WHERE id = ?1 AND status = 'running'",
                    params![run_id],
                    |row| row.get::<_, bool>(0),
                )
                .optional()?;
            Ok((first, asked.unwrap_or(false)))
        })?;
        if first {
            // This process's holder hears it at once; another process's
            // finds it when it renews its lease.
            self.signals.cancel(run_id);
        }
        Ok(asked)
    }

    fn release_lease(&self, lease: &Lease) -> Durable {
        self.writer.held.release(lease);
        let (run_id, lease) = (lease.run_id.clone(), lease.clone());
        self.queue(
            &run_id,
            Kind::Last,
            Job::Statements(Box::new(move |conn| {
                failpoint!("lease.before-release");
                conn.execute(
                    "UPDATE runs SET lease_owner = NULL, lease_expires_ms = NULL
                     WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3",
                    params![lease.run_id, lease.owner, lease.epoch.cast_signed()],
                )
                .map(drop)
            })),
        )
    }

    fn resume_state(&self, run_id: &str) -> Result<ResumeState, StoreError> {
        self.read(|conn| {
            let mut state = fold(conn, run_id, false)?.resume(run_id);
            let mut statement = conn.prepare("SELECT step_id, fingerprint FROM includes WHERE run_id = ?1")?;
            for row in statement.query_map(params![run_id], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))? {
                let (path, fingerprint) = row?;
                state.includes.insert(path, json(Some(fingerprint)).unwrap_or(Value::Null));
            }
            let mut statement = conn.prepare("SELECT key, started_ms FROM waits WHERE run_id = ?1")?;
            for row in statement.query_map(params![run_id], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))? {
                let (key, started) = row?;
                state.waits.insert(key, started);
            }
            let mut statement = conn.prepare("SELECT name, payload FROM run_events WHERE run_id = ?1")?;
            for row in statement.query_map(params![run_id], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))? {
                let (name, payload) = row?;
                state.events.insert(name, json(Some(payload)).unwrap_or(Value::Null));
            }
            let trace: Option<String> = conn
                .query_row("SELECT trace FROM runs WHERE id = ?1", params![run_id], |row| row.get(0))
                .optional()?
                .flatten();
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
        self.queue(run_id, Kind::Awaited, Job::Log(Record::started(path, attempt, input).text()))
    }

    fn attempt_finished(&self, run_id: &str, path: &StepPath, _key: &str, attempt: &Attempt, last: bool) -> Durable {
        self.queue(run_id, Kind::Lazy, Job::Log(Record::finished(path, attempt, last).text()))
    }

    fn include_loaded(&self, run_id: &str, path: &StepPath, fingerprint: &Value) -> Durable {
        let (id, path, fingerprint) = (run_id.to_owned(), path.clone(), text(fingerprint));
        self.queue(
            run_id,
            Kind::Awaited,
            Job::Statements(Box::new(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO includes (run_id, step_id, fingerprint) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                )?
                .execute(params![id, path, fingerprint])
                .map(drop)
            })),
        )
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
        let (id, path, key, event) = (run_id.to_owned(), path.clone(), key.to_owned(), event.to_owned());
        self.queue(
            run_id,
            Kind::Awaited,
            Job::Statements(Box::new(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO waits (run_id, key, step_id, event, started_ms, deadline_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT DO UPDATE SET ended = 0",
                )?
                .execute(params![id, key, path, event, started_ms, deadline_ms])
                .map(drop)
            })),
        )
    }

    fn wait_ended(&self, run_id: &str, key: &str) -> Durable {
        let (id, key) = (run_id.to_owned(), key.to_owned());
        self.queue(
            run_id,
            Kind::Lazy,
            Job::Statements(Box::new(move |conn| {
                conn.prepare_cached("UPDATE waits SET ended = 1 WHERE run_id = ?1 AND key = ?2")?
                    .execute(params![id, key])
                    .map(drop)
            })),
        )
    }

    fn run_parked(&self, run_id: &str) -> Durable {
        let id = run_id.to_owned();
        self.queue(
            run_id,
            Kind::Last,
            Job::Statements(Box::new(move |conn| {
                conn.execute(
                    "UPDATE runs SET status = ?2, updated_ms = ?3 WHERE id = ?1",
                    params![id, RunStatus::Waiting, now_ms() as i64],
                )
                .map(drop)
            })),
        )
    }

    fn run_traced(&self, run_id: &str, trace: &crate::traces::TraceParent) -> Durable {
        let (id, trace) = (run_id.to_owned(), trace.as_str().to_owned());
        self.queue(
            run_id,
            Kind::Lazy,
            Job::Statements(Box::new(move |conn| {
                conn.execute("UPDATE runs SET trace = ?2 WHERE id = ?1 AND trace IS NULL", params![id, trace]).map(drop)
            })),
        )
    }

    fn event_received(&self, run_id: &str, name: &str, payload: &Value) -> Result<bool, StoreError> {
        self.write(|tx| {
            let added = tx.execute(
                "INSERT INTO run_events (run_id, name, payload, received_ms) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                params![run_id, name, text(payload), now_ms()],
            )?;
            Ok(added > 0)
        })
    }

    fn step_finished(&self, run_id: &str, position: usize, step: &StepReport) -> Durable {
        self.queue(run_id, Kind::Lazy, Job::Log(Record::step(position, step).text()))
    }

    fn run_finished(
        &self,
        run_id: &str,
        status: RunStatus,
        outputs: &serde_json::Map<String, Value>,
        error: Option<&str>,
    ) -> Durable {
        let (id, outputs, error) = (run_id.to_owned(), text(&Value::Object(outputs.clone())), error.map(clean));
        self.queue(
            run_id,
            Kind::Last,
            Job::Statements(Box::new(move |conn| {
                conn.execute(
                    "UPDATE runs SET status = ?2, outputs = ?3, error = ?4, updated_ms = ?5, finished_ms = ?5,
                     cancel_requested = 0 WHERE id = ?1",
                    params![id, status, outputs, error, now_ms() as i64],
                )?;
                // A finished run has no work out: what an earlier driver
                // left in the queue goes, its holders fenced off.
                conn.execute("DELETE FROM tasks WHERE run_id = ?1", params![id]).map(drop)
            })),
        )
    }
}

/// A run's log, folded; without `bulk`, without the attempts' logs,
/// stdout, stderr and inputs.
pub(super) fn fold(conn: &Connection, run_id: &str, bulk: bool) -> rusqlite::Result<Folded> {
    let mut folded = Folded::default();
    let mut statement = conn.prepare_cached("SELECT records FROM run_log WHERE run_id = ?1 ORDER BY id")?;
    let mut rows = statement.query(params![run_id])?;
    while let Some(row) = rows.next()? {
        let chunk = row.get_ref(0)?.as_str()?;
        folded
            .read(chunk, bulk)
            .map_err(|err| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(err)))?;
    }
    Ok(folded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::wait;

    fn open() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        for id in ["a", "b"] {
            let run = Run::new(id.into(), "w", "w.yaml", "t", Default::default());
            let (lease, created) = db.create_run(&run, &Value::Null);
            wait(created).unwrap();
            // As a process that created its run and let go of it.
            release(&db, &lease);
        }
        (dir, db)
    }

    /// Releases `lease` and waits for it, from sync and async tests alike.
    fn release(db: &Database, lease: &Lease) {
        wait(db.release_lease(lease)).unwrap();
    }

    /// Queues the start of attempt `attempt` of the execution `key`.
    fn start(db: &Database, run_id: &str, key: &str, attempt: u32) -> Durable {
        let path: StepPath = key.rsplit_once('/').map_or(key, |(_, path)| path).parse().unwrap();
        db.attempt_started(run_id, &path, key, &Attempt::started(attempt, 0.0), None)
    }

    #[tokio::test]
    async fn a_failed_record_fails_the_later_records_of_its_run_only() {
        let (_dir, db) = open();
        let before = start(&db, "a", "a/first", 1);
        let broken = db.queue(
            "a",
            Kind::Awaited,
            Job::Statements(Box::new(|conn| conn.execute("INSERT INTO nowhere VALUES (1)", []).map(drop))),
        );
        let after = start(&db, "a", "a/s", 1);
        let other = start(&db, "b", "b/s", 1);
        before.await.unwrap();
        assert!(broken.await.unwrap_err().to_string().contains("no such table: nowhere"));
        // The later record would have committed alone; it fails with the
        // first failure, so awaiting it vouches for everything before it.
        assert!(after.await.unwrap_err().to_string().contains("no such table: nowhere"));
        other.await.unwrap();
        // The run's last record ends that: a resume in the same process can
        // record again.
        assert!(db.run_finished("a", RunStatus::Failed, &Default::default(), None).await.is_err());
        start(&db, "a", "a/s", 2).await.unwrap();
        assert_eq!(db.resume_state("a").unwrap().attempts["a/s"], 2);
        assert_eq!(db.resume_state("a").unwrap().attempts["a/first"], 1);
        assert_eq!(db.resume_state("b").unwrap().attempts["b/s"], 1);
    }
}
