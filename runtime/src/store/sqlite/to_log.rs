//! Schema version 17: the rows of attempts, executions and steps that
//! earlier versions wrote become each run's log ([`crate::store::log`]),
//! and their tables go.

use rusqlite::{Connection, params};

use super::writer::{CHUNK_BYTES, append};
use crate::run::{StepPath, StepStatus};
use crate::store::log::{Chunk, Record, StepRow};
use crate::store::rows::{self, AttemptRow};

/// Moves every run's rows into its log.
pub(super) fn move_rows(conn: &Connection) -> rusqlite::Result<()> {
    let runs: Vec<String> = {
        let mut statement = conn.prepare(
            "SELECT run_id FROM attempts UNION SELECT run_id FROM executions UNION SELECT run_id FROM steps",
        )?;
        statement.query_map([], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    for run_id in runs {
        let mut chunk = Chunk::new();
        for record in records(conn, &run_id)? {
            chunk.push(&record.text());
            if chunk.len() >= CHUNK_BYTES {
                append(conn, &run_id, &mut chunk)?;
            }
        }
        if !chunk.is_empty() {
            append(conn, &run_id, &mut chunk)?;
        }
    }
    conn.execute_batch("DROP TABLE attempts; DROP TABLE executions; DROP TABLE steps;")
}

/// A run's rows as records: each attempt's start and end, the last one's
/// carrying its execution's result, then the steps.
fn records(conn: &Connection, run_id: &str) -> rusqlite::Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut statement = conn.prepare(
        "SELECT a.step_id, a.attempt, a.status, a.kind, a.message, a.started_ms, a.finished_ms, a.fuel,
                a.peak_memory, a.logs, a.stdout, a.stderr, a.delay_before_ms, a.input,
                a.attempt = (SELECT MAX(attempt) FROM attempts WHERE run_id = a.run_id AND key = a.key),
                x.status, x.output
         FROM attempts AS a LEFT JOIN executions AS x ON x.run_id = a.run_id AND x.key = a.key
         WHERE a.run_id = ?1 ORDER BY a.key, a.attempt",
    )?;
    let mut rows = statement.query(params![run_id])?;
    while let Some(row) = rows.next()? {
        let path: StepPath = row.get(0)?;
        let attempt = AttemptRow {
            number: row.get(1)?,
            status: rows::attempt_status(&row.get::<_, String>(2)?),
            kind: row.get(3)?,
            message: row.get(4)?,
            started: row.get::<_, Option<f64>>(5)?.unwrap_or_default(),
            finished: row.get(6)?,
            fuel: row.get::<_, Option<i64>>(7)?.unwrap_or_default(),
            peak_memory: row.get::<_, Option<i64>>(8)?.unwrap_or_default(),
            logs: row.get::<_, Option<String>>(9)?.unwrap_or_default(),
            stdout: row.get::<_, Option<String>>(10)?.unwrap_or_default(),
            stderr: row.get::<_, Option<String>>(11)?.unwrap_or_default(),
            delay: row.get(12)?,
        };
        records.push(Record::AttemptStarted {
            path: path.clone(),
            attempt: attempt.number,
            started_ms: attempt.started,
            delay_before_ms: attempt.delay,
            input: row.get(13)?,
        });
        let result: Option<StepStatus> = row.get(15)?;
        let last = row.get::<_, bool>(14)? && result.is_some();
        if attempt.status != "running" || last {
            let output = rows::json(row.get(16)?).filter(|_| last);
            records.push(Record::AttemptFinished { path, last, output, attempt });
        }
    }
    let mut statement = conn.prepare(
        "SELECT step_id, position, status, reason, output, started_ms, finished_ms, required FROM steps
         WHERE run_id = ?1 ORDER BY position",
    )?;
    let mut rows = statement.query(params![run_id])?;
    while let Some(row) = rows.next()? {
        records.push(Record::StepFinished(StepRow {
            path: row.get(0)?,
            position: row.get(1)?,
            status: row.get(2)?,
            reason: row.get(3)?,
            output: rows::json(row.get(4)?),
            started_ms: row.get(5)?,
            finished_ms: row.get(6)?,
            required: row.get(7)?,
        }));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{DATABASE_FILE, Database, SCHEMA};
    use crate::run::{FailureKind, StepStatus};
    use crate::store::{History, Journal, Registry};

    #[test]
    fn rows_of_a_version_16_database_move_into_its_run_logs() {
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        for migration in &SCHEMA.migrations[..16] {
            conn.execute_batch(migration).unwrap();
        }
        // A for_each step whose second item failed once, a wait that
        // ended, an attempt left running, and a step retried with
        // `--from` (its attempt kept, its result forgotten).
        conn.execute_batch(
            r#"PRAGMA user_version = 16;
            INSERT INTO runs (id, workflow, workflow_path, fingerprint, tenant, inputs, status, created_ms, updated_ms)
            VALUES ('r', 'w', 'w.yaml', 'null', 't', '{}', 'waiting', 1, 1);
            INSERT INTO steps (run_id, step_id, position, status, reason, output, started_ms, finished_ms, required)
            VALUES ('r', 'a', 0, 'succeeded', NULL, '[1,2]', 1.0, 4.0, 1),
                   ('r', 'gate', 1, 'succeeded', NULL, '{"by":"ann"}', 5.0, 6.0, 0);
            INSERT INTO executions (run_id, key, step_id, status, output)
            VALUES ('r', 'r/a[0]', 'a[0]', 'succeeded', '1'), ('r', 'r/a[1]', 'a[1]', 'succeeded', '2'),
                   ('r', 'r/gate', 'gate', 'succeeded', '{"by":"ann"}');
            INSERT INTO attempts (run_id, key, attempt, step_id, status, kind, message, started_ms, finished_ms,
                                  fuel, peak_memory, logs, stdout, stderr, delay_before_ms, input)
            VALUES ('r', 'r/a[0]', 1, 'a[0]', 'succeeded', NULL, NULL, 1.0, 2.0, 10, 4096, '[]', 'hi', '', 0, '{"n":0}'),
                   ('r', 'r/a[1]', 1, 'a[1]', 'failed', 'trap', 'boom', 1.0, 2.0, 5, 4096, '[]', '', 'oops', 0, '{"n":1}'),
                   ('r', 'r/a[1]', 2, 'a[1]', 'succeeded', NULL, NULL, 3.0, 4.0, 7, 4096, '[]', '', '', 250, '{"n":1}'),
                   ('r', 'r/gate', 1, 'gate', 'succeeded', NULL, NULL, 5.0, 6.0, 0, 0, '[]', '', '', 0, NULL),
                   ('r', 'r/c', 1, 'c', 'failed', 'timeout', 'slow', 5.0, 6.0, 0, 0, '[]', '', '', 0, NULL),
                   ('r', 'r/b', 1, 'b', 'running', NULL, NULL, 7.0, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL);
            INSERT INTO waits (run_id, key, step_id, event, started_ms, deadline_ms)
            VALUES ('r', 'r/gate', 'gate', 'approve', 5.0, NULL);
            INSERT INTO run_events (run_id, name, payload, received_ms) VALUES ('r', 'approve', '{"by":"ann"}', 5.5);"#,
        )
        .unwrap();
        drop(conn);

        let db = Database::open(dir.path()).unwrap();
        let state = db.resume_state("r").unwrap();
        assert_eq!(state.completed.len(), 3);
        assert_eq!((&state.completed["r/a[1]"], &state.completed["r/gate"]), (&json!(2), &json!({"by": "ann"})));
        let attempts = [("r/a[0]", 1), ("r/a[1]", 2), ("r/gate", 1), ("r/c", 1), ("r/b", 1)];
        assert_eq!(state.attempts, attempts.into_iter().map(|(key, n)| (key.to_owned(), n)).collect());
        assert!(db.runs_to_wake(100.0).unwrap().is_empty(), "the ended wait wakes nothing");

        let report = db.run_report("r").unwrap();
        let ids: Vec<String> = report.steps.iter().map(|step| step.id.to_string()).collect();
        assert_eq!(ids, ["a", "gate", "b", "c"]);
        let (a, gate, b, c) = (&report.steps[0], &report.steps[1], &report.steps[2], &report.steps[3]);
        assert_eq!(
            (a.status, a.output.clone(), a.finished_ms),
            (StepStatus::Succeeded, Some(json!([1, 2])), Some(4.0))
        );
        assert!(!gate.required);
        let item = &a.executions[1];
        assert_eq!((item.idempotency_key.as_str(), item.input.clone()), ("r/a[1]", Some(json!({"n": 1}))));
        let failure = item.attempts[0].failure().unwrap();
        assert_eq!((failure.kind, failure.message.as_str()), (FailureKind::Trap, "boom"));
        assert_eq!((item.attempts[0].stderr.text.as_str(), item.attempts[0].fuel_consumed), ("oops", 5));
        assert_eq!((item.attempts[1].output(), item.attempts[1].delay_before_ms), (Some(&json!(2)), 250.0));
        assert_eq!(a.executions[0].attempts[0].stdout.text, "hi");
        assert_eq!((b.status, b.executions[0].attempts[0].finished_ms), (StepStatus::Running, None));
        assert_eq!((c.status, c.executions[0].status), (StepStatus::Running, StepStatus::Running), "forgotten");
        assert_eq!(c.executions[0].attempts[0].failure().unwrap().kind, FailureKind::Timeout);

        let tables: i64 = db
            .read(|conn| {
                conn.query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('steps', 'executions', 'attempts')",
                    [],
                    |row| row.get(0),
                )
            })
            .unwrap();
        assert_eq!(tables, 0, "the old tables are gone");
    }
}
