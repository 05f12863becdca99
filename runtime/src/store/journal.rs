//! The run journal: every transition of a run, written before the scheduler
//! acts on it, so a run killed at any moment can resume without repeating
//! what finished.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use super::sqlite::{Database, now_ms};
use super::writer::Kind;
use super::{Durable, StoreError};

/// What the scheduler records. Implemented by [`Database`]; a server-backed
/// store (PostgreSQL) implements the same trait.
///
/// Recording queues: each method returns at once, with a [`Durable`] that
/// resolves when the record is committed. A run's records commit in the
/// order they were queued, and after one fails every later one of the run
/// fails, so awaiting a record vouches for all before it. Finish records
/// are not waited for: they commit with the run's next start record, or
/// within a few milliseconds.
pub trait Journal: Send + Sync {
    /// What an interrupted run already did.
    fn resume_state(&self, run_id: &str) -> Result<ResumeState, StoreError>;
    /// An attempt may start. Awaited before the attempt runs, so a crash
    /// leaves a trace of every attempt that could have had effects.
    fn attempt_started(&self, run_id: &str, row: &AttemptRow<'_>) -> Durable;
    /// An attempt ended; when it was the last of its execution, the
    /// execution's result is committed with it.
    fn attempt_finished(&self, run_id: &str, attempt: &AttemptRow<'_>, execution: Option<&ExecutionRow<'_>>)
    -> Durable;
    /// A step reached its final status. Durable before any dependent runs,
    /// since a dependent awaits its own later start record.
    fn step_finished(&self, run_id: &str, step: &StepRow<'_>) -> Durable;
    /// The run's final record.
    fn run_finished(&self, run_id: &str, status: &str, outputs: &Value) -> Durable;
}

/// Executions that succeeded (their outputs, by idempotency key) and how
/// many attempts every execution had.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResumeState {
    pub completed: HashMap<String, Value>,
    pub attempts: HashMap<String, u32>,
}

#[derive(Debug, Clone)]
pub struct AttemptRow<'a> {
    pub step_id: &'a str,
    pub key: &'a str,
    pub attempt: u32,
    /// `running`, `succeeded`, `failed`.
    pub status: &'a str,
    pub kind: Option<&'a str>,
    pub message: Option<&'a str>,
    /// Unix milliseconds.
    pub started_ms: f64,
    pub finished_ms: Option<f64>,
    pub fuel: u64,
    pub peak_memory: u64,
    pub logs: Value,
    pub stdout: &'a str,
    pub stderr: &'a str,
}

impl<'a> AttemptRow<'a> {
    /// An attempt that is starting: nothing measured yet.
    pub fn running(step_id: &'a str, key: &'a str, attempt: u32, started_ms: f64) -> Self {
        AttemptRow {
            step_id,
            key,
            attempt,
            status: "running",
            kind: None,
            message: None,
            started_ms,
            finished_ms: None,
            fuel: 0,
            peak_memory: 0,
            logs: Value::Null,
            stdout: "",
            stderr: "",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExecutionRow<'a> {
    pub step_id: &'a str,
    pub key: &'a str,
    pub status: &'a str,
    pub output: Option<&'a Value>,
    pub error: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct StepRow<'a> {
    pub step_id: &'a str,
    pub position: usize,
    pub status: &'a str,
    pub reason: Option<&'a str>,
    pub output: Option<&'a Value>,
    pub started_ms: Option<f64>,
    pub finished_ms: Option<f64>,
}

/// A run as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredRun {
    pub id: String,
    pub workflow: String,
    pub workflow_path: String,
    /// Hashes of the workflow file and its components, to refuse resuming a
    /// run whose files changed.
    pub fingerprint: Value,
    pub tenant: String,
    pub inputs: Value,
    pub labels: BTreeMap<String, String>,
    pub status: String,
    pub outputs: Option<Value>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

/// One line of `stepbox runs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub workflow: String,
    pub tenant: String,
    pub status: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<String>,
    pub workflow: Option<String>,
    pub labels: Vec<(String, String)>,
    pub limit: usize,
}

/// A step as recorded, with its attempts, for `stepbox show` and `logs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredStep {
    pub id: String,
    pub status: String,
    pub reason: Option<String>,
    pub output: Option<Value>,
    pub started_ms: Option<f64>,
    pub finished_ms: Option<f64>,
    pub attempts: Vec<StoredAttempt>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredAttempt {
    pub key: String,
    pub attempt: u32,
    pub status: String,
    pub kind: Option<String>,
    pub message: Option<String>,
    pub started_ms: Option<f64>,
    pub finished_ms: Option<f64>,
    pub fuel: Option<i64>,
    pub peak_memory: Option<i64>,
    pub logs: Option<Value>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
}

/// Bytes of stdout, stderr and logs kept per attempt in the journal.
const MAX_CAPTURE: usize = 64 * 1024;

fn capped(text: &str) -> String {
    if text.len() <= MAX_CAPTURE {
        return text.to_owned();
    }
    let mut end = MAX_CAPTURE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[... {} more bytes not kept in the journal]", &text[..end], text.len() - end)
}

fn capped_logs(logs: &Value) -> String {
    let text = Database::text(logs);
    if text.len() <= MAX_CAPTURE {
        return text;
    }
    // Keep whole records, as many as fit.
    let mut kept = Vec::new();
    let mut size = 0;
    for record in logs.as_array().into_iter().flatten() {
        size += Database::text(record).len();
        if size > MAX_CAPTURE {
            break;
        }
        kept.push(record.clone());
    }
    let dropped = logs.as_array().map_or(0, Vec::len) - kept.len();
    kept.push(serde_json::json!({ "level": "warn", "context": "stepbox", "message": format!("{dropped} more log records not kept in the journal") }));
    Database::text(&Value::Array(kept))
}

/// A new run, recorded before it starts.
#[derive(Debug, Clone)]
pub struct NewRun<'a> {
    pub id: &'a str,
    pub workflow: &'a str,
    pub workflow_path: &'a str,
    pub fingerprint: &'a Value,
    pub tenant: &'a str,
    pub inputs: &'a Value,
    pub labels: &'a [(String, String)],
}

impl Database {
    pub fn create_run(&self, run: &NewRun<'_>) -> Result<(), StoreError> {
        let now = now_ms();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO runs (id, workflow, workflow_path, fingerprint, tenant, inputs, status, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7, ?7)",
                params![
                    run.id,
                    run.workflow,
                    run.workflow_path,
                    Database::text(run.fingerprint),
                    run.tenant,
                    Database::text(run.inputs),
                    now
                ],
            )?;
            for (key, value) in run.labels {
                tx.execute("INSERT INTO run_labels (run_id, key, value) VALUES (?1, ?2, ?3)", params![run.id, key, value])?;
            }
            Ok(())
        })
    }

    pub fn load_run(&self, run_id: &str) -> Result<StoredRun, StoreError> {
        let run = self.read(|conn| {
            conn.query_row(
                "SELECT id, workflow, workflow_path, fingerprint, tenant, inputs, status, outputs, created_ms, finished_ms
                 FROM runs WHERE id = ?1",
                params![run_id],
                |row| {
                    Ok(StoredRun {
                        id: row.get(0)?,
                        workflow: row.get(1)?,
                        workflow_path: row.get(2)?,
                        fingerprint: Database::json(row.get(3)?).unwrap_or(Value::Null),
                        tenant: row.get(4)?,
                        inputs: Database::json(row.get(5)?).unwrap_or(Value::Null),
                        labels: BTreeMap::new(),
                        status: row.get(6)?,
                        outputs: Database::json(row.get(7)?),
                        created_ms: row.get(8)?,
                        finished_ms: row.get(9)?,
                    })
                },
            )
            .optional()
        })?;
        let mut run = run.ok_or_else(|| StoreError::NoSuchRun(run_id.to_owned()))?;
        run.labels = self.labels(run_id)?;
        Ok(run)
    }

    fn labels(&self, run_id: &str) -> Result<BTreeMap<String, String>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached("SELECT key, value FROM run_labels WHERE run_id = ?1")?;
            let rows = statement.query_map(params![run_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
    }

    /// Marks a run as running again (resume, retry).
    pub fn reopen_run(&self, run_id: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET status = 'running', finished_ms = NULL, updated_ms = ?2 WHERE id = ?1",
                params![run_id, now_ms()],
            )
            .map(drop)
        })
    }

    /// Forgets the results of these steps (and their executions), so they
    /// run again: `stepbox retry --from`.
    pub fn forget_steps(&self, run_id: &str, step_ids: &[String]) -> Result<(), StoreError> {
        self.write(|tx| {
            for step in step_ids {
                // Fan-out items are `<step>[<n>]`, include children `<step>.<child>`.
                let items = format!("{step}[%");
                let children = format!("{step}.%");
                tx.execute(
                    "DELETE FROM executions WHERE run_id = ?1 AND (step_id = ?2 OR step_id LIKE ?3 OR step_id LIKE ?4)",
                    params![run_id, step, items, children],
                )?;
                tx.execute(
                    "DELETE FROM steps WHERE run_id = ?1 AND (step_id = ?2 OR step_id LIKE ?3)",
                    params![run_id, step, children],
                )?;
            }
            Ok(())
        })
    }

    pub fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let mut runs: Vec<RunSummary> = self.read(|conn| {
            let mut statement = conn.prepare(
                "SELECT id, workflow, tenant, status, created_ms, finished_ms FROM runs
                 WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR workflow = ?2)
                 ORDER BY created_ms DESC, id DESC",
            )?;
            let rows = statement.query_map(params![filter.status, filter.workflow], |row| {
                Ok(RunSummary {
                    id: row.get(0)?,
                    workflow: row.get(1)?,
                    tenant: row.get(2)?,
                    status: row.get(3)?,
                    created_ms: row.get(4)?,
                    finished_ms: row.get(5)?,
                    labels: BTreeMap::new(),
                })
            })?;
            rows.collect()
        })?;
        let mut kept = Vec::new();
        for mut run in runs.drain(..) {
            run.labels = self.labels(&run.id)?;
            if filter.labels.iter().all(|(key, value)| run.labels.get(key) == Some(value)) {
                kept.push(run);
                if filter.limit > 0 && kept.len() == filter.limit {
                    break;
                }
            }
        }
        Ok(kept)
    }

    /// The steps of a run in workflow order, each with its attempts.
    pub fn run_steps(&self, run_id: &str) -> Result<Vec<StoredStep>, StoreError> {
        let mut steps: Vec<StoredStep> = self.read(|conn| {
            let mut statement = conn.prepare(
                "SELECT step_id, status, reason, output, started_ms, finished_ms FROM steps
                 WHERE run_id = ?1 ORDER BY position, step_id",
            )?;
            let rows = statement.query_map(params![run_id], |row| {
                Ok(StoredStep {
                    id: row.get(0)?,
                    status: row.get(1)?,
                    reason: row.get(2)?,
                    output: Database::json(row.get(3)?),
                    started_ms: row.get(4)?,
                    finished_ms: row.get(5)?,
                    attempts: Vec::new(),
                })
            })?;
            rows.collect()
        })?;
        let mut attempts: Vec<(String, StoredAttempt)> = self.read(|conn| {
            let mut statement = conn.prepare(
                "SELECT step_id, key, attempt, status, kind, message, started_ms, finished_ms, fuel, peak_memory, logs, stdout, stderr
                 FROM attempts WHERE run_id = ?1 ORDER BY started_ms, key, attempt",
            )?;
            let rows = statement.query_map(params![run_id], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    StoredAttempt {
                        key: row.get(1)?,
                        attempt: row.get(2)?,
                        status: row.get(3)?,
                        kind: row.get(4)?,
                        message: row.get(5)?,
                        started_ms: row.get(6)?,
                        finished_ms: row.get(7)?,
                        fuel: row.get(8)?,
                        peak_memory: row.get(9)?,
                        logs: Database::json(row.get(10)?),
                        stdout: row.get(11)?,
                        stderr: row.get(12)?,
                    },
                ))
            })?;
            rows.collect()
        })?;
        // Attempts of fan-out items belong to their step.
        let base = |step_id: &str| step_id.split('[').next().unwrap_or(step_id).to_owned();
        for (step_id, attempt) in attempts.drain(..) {
            let owner = base(&step_id);
            match steps.iter_mut().find(|step| step.id == owner) {
                Some(step) => step.attempts.push(attempt),
                None => steps.push(StoredStep {
                    id: owner,
                    status: "running".into(),
                    reason: None,
                    output: None,
                    started_ms: attempt.started_ms,
                    finished_ms: None,
                    attempts: vec![attempt],
                }),
            }
        }
        Ok(steps)
    }

    /// Deletes runs created before `before_ms` (unix ms) and all their
    /// records; returns how many.
    pub fn gc(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM runs WHERE created_ms < ?1 AND status != 'running'", params![before_ms])
        })
    }
}

impl Journal for Database {
    fn resume_state(&self, run_id: &str) -> Result<ResumeState, StoreError> {
        self.read(|conn| {
            let mut state = ResumeState::default();
            let mut statement =
                conn.prepare("SELECT key, output FROM executions WHERE run_id = ?1 AND status = 'succeeded'")?;
            for row in statement.query_map(params![run_id], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))? {
                let (key, output) = row?;
                state.completed.insert(key, Database::json(output).unwrap_or(Value::Null));
            }
            let mut statement =
                conn.prepare("SELECT key, MAX(attempt) FROM attempts WHERE run_id = ?1 GROUP BY key")?;
            for row in statement.query_map(params![run_id], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))? {
                let (key, attempts) = row?;
                state.attempts.insert(key, attempts);
            }
            Ok(state)
        })
    }

    fn attempt_started(&self, run_id: &str, row: &AttemptRow<'_>) -> Durable {
        let (id, key, attempt, step_id, started) =
            (run_id.to_owned(), row.key.to_owned(), row.attempt, row.step_id.to_owned(), row.started_ms);
        self.queue(
            run_id,
            Kind::Awaited,
            Box::new(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO attempts (run_id, key, attempt, step_id, status, started_ms) VALUES (?1, ?2, ?3, ?4, 'running', ?5)
                     ON CONFLICT DO UPDATE SET status = 'running', started_ms = excluded.started_ms",
                )?
                .execute(params![id, key, attempt, step_id, started])
                .map(drop)
            }),
        )
    }

    fn attempt_finished(&self, run_id: &str, row: &AttemptRow<'_>, execution: Option<&ExecutionRow<'_>>) -> Durable {
        let id = run_id.to_owned();
        let (key, attempt, step_id, status) =
            (row.key.to_owned(), row.attempt, row.step_id.to_owned(), row.status.to_owned());
        let (kind, message) = (row.kind.map(str::to_owned), row.message.map(str::to_owned));
        let (started, finished, fuel, peak_memory) =
            (row.started_ms, row.finished_ms, row.fuel as i64, row.peak_memory as i64);
        let (logs, stdout, stderr) = (capped_logs(&row.logs), capped(row.stdout), capped(row.stderr));
        let execution = execution.map(|e| {
            (
                e.key.to_owned(),
                e.step_id.to_owned(),
                e.status.to_owned(),
                e.output.map(Database::text),
                e.error.map(str::to_owned),
            )
        });
        self.queue(
            run_id,
            Kind::Lazy,
            Box::new(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO attempts (run_id, key, attempt, step_id, status, kind, message, started_ms, finished_ms,
                                           fuel, peak_memory, logs, stdout, stderr)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                     ON CONFLICT DO UPDATE SET status = excluded.status, kind = excluded.kind, message = excluded.message,
                         started_ms = excluded.started_ms, finished_ms = excluded.finished_ms, fuel = excluded.fuel,
                         peak_memory = excluded.peak_memory, logs = excluded.logs, stdout = excluded.stdout,
                         stderr = excluded.stderr",
                )?
                .execute(params![
                    id, key, attempt, step_id, status, kind, message, started, finished, fuel, peak_memory, logs, stdout,
                    stderr
                ])?;
                if let Some((key, step_id, status, output, error)) = &execution {
                    conn.prepare_cached(
                        "INSERT INTO executions (run_id, key, step_id, status, output, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT DO UPDATE SET status = excluded.status, output = excluded.output, error = excluded.error",
                    )?
                    .execute(params![id, key, step_id, status, output, error])?;
                }
                Ok(())
            }),
        )
    }

    fn step_finished(&self, run_id: &str, step: &StepRow<'_>) -> Durable {
        let id = run_id.to_owned();
        let (step_id, position, status) = (step.step_id.to_owned(), step.position as i64, step.status.to_owned());
        let (reason, output) = (step.reason.map(str::to_owned), step.output.map(Database::text));
        let (started, finished) = (step.started_ms, step.finished_ms);
        self.queue(
            run_id,
            Kind::Lazy,
            Box::new(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO steps (run_id, step_id, position, status, reason, output, started_ms, finished_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT DO UPDATE SET status = excluded.status, reason = excluded.reason, output = excluded.output,
                         started_ms = excluded.started_ms, finished_ms = excluded.finished_ms",
                )?
                .execute(params![id, step_id, position, status, reason, output, started, finished])?;
                touch(conn, &id)
            }),
        )
    }

    fn run_finished(&self, run_id: &str, status: &str, outputs: &Value) -> Durable {
        let (id, status, outputs) = (run_id.to_owned(), status.to_owned(), Database::text(outputs));
        self.queue(
            run_id,
            Kind::Last,
            Box::new(move |conn| {
                conn.execute(
                    "UPDATE runs SET status = ?2, outputs = ?3, updated_ms = ?4, finished_ms = ?4 WHERE id = ?1",
                    params![id, status, outputs, now_ms()],
                )
                .map(drop)
            }),
        )
    }
}

/// Marks the run as recently active, for `stepbox runs`.
fn touch(conn: &rusqlite::Connection, run_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE runs SET updated_ms = ?2 WHERE id = ?1")?.execute(params![run_id, now_ms()]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        for id in ["a", "b"] {
            let empty = Value::Object(Default::default());
            let run = NewRun {
                id,
                workflow: "w",
                workflow_path: "w.yaml",
                fingerprint: &empty,
                tenant: "t",
                inputs: &empty,
                labels: &[],
            };
            db.create_run(&run).unwrap();
        }
        (dir, db)
    }

    fn started(key: &str, attempt: u32) -> AttemptRow<'_> {
        AttemptRow::running(key, key, attempt, 0.0)
    }

    #[tokio::test]
    async fn a_failed_record_fails_the_later_records_of_its_run_only() {
        let (_dir, db) = open();
        let before = db.attempt_started("a", &started("a/first", 1));
        let broken =
            db.queue("a", Kind::Awaited, Box::new(|conn| conn.execute("INSERT INTO nowhere VALUES (1)", []).map(drop)));
        let after = db.attempt_started("a", &started("a/s", 1));
        let other = db.attempt_started("b", &started("b/s", 1));
        before.await.unwrap();
        assert!(broken.await.unwrap_err().to_string().contains("no such table: nowhere"));
        // The later record would have committed alone; it fails with the
        // first failure, so awaiting it vouches for everything before it.
        assert!(after.await.unwrap_err().to_string().contains("no such table: nowhere"));
        other.await.unwrap();
        // The run's last record ends that: a resume in the same process can
        // record again.
        assert!(db.run_finished("a", "failed", &Value::Null).await.is_err());
        db.attempt_started("a", &started("a/s", 2)).await.unwrap();
        assert_eq!(db.resume_state("a").unwrap().attempts["a/s"], 2);
        assert_eq!(db.resume_state("a").unwrap().attempts["a/first"], 1);
        assert_eq!(db.resume_state("b").unwrap().attempts["b/s"], 1);
    }

    #[tokio::test]
    async fn awaiting_a_record_makes_every_earlier_one_durable() {
        let (_dir, db) = open();
        let keys: Vec<String> = (0..500).map(|n| format!("a/s[{n}]")).collect();
        for key in &keys {
            // Dropped without waiting.
            drop(db.attempt_started("a", &started(key, 1)));
        }
        db.run_finished("a", "succeeded", &Value::Null).await.unwrap();
        assert_eq!(db.resume_state("a").unwrap().attempts.len(), 500);
    }

    #[test]
    fn closing_the_database_commits_what_is_queued() {
        let (dir, db) = open();
        for n in 0..50 {
            drop(db.attempt_started("b", &started(&format!("b/s[{n}]"), 1)));
        }
        drop(db);
        let db = Database::open(dir.path()).unwrap();
        assert_eq!(db.resume_state("b").unwrap().attempts.len(), 50);
    }
}
