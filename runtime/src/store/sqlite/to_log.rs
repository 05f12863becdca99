//! Schema version 17: the rows of attempts, executions and steps that
//! earlier versions wrote become each run's log ([`crate::store::log`]),
//! and their tables go.

use rusqlite::{Connection, params};

use super::writer::append;
use crate::run::{StepPath, StepStatus};
use crate::store::log::{Chunks, Record, StepRow};
use crate::store::rows::{self, AttemptRow};

/// Moves every run's rows into its log, a row of records at a time: a run
/// of any size moves in bounded memory. Rows of runs no longer there (left
/// by deletes made with foreign keys off) are dropped with their tables.
pub(super) fn move_rows(conn: &Connection) -> rusqlite::Result<()> {
    let runs: Vec<String> = {
        let mut statement = conn.prepare(
            "SELECT run_id FROM attempts UNION SELECT run_id FROM executions UNION SELECT run_id FROM steps
             INTERSECT SELECT id FROM runs",
        )?;
        statement.query_map([], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    for run_id in &runs {
        let mut chunks = Chunks::default();
        let mut index = 0;
        each_record(conn, run_id, |record| {
            index += 1;
            match chunks.push(run_id, index, &record.text()) {
                Some(row) => append(conn, &row),
                None => Ok(()),
            }
        })?;
        chunks.rows().try_for_each(|row| append(conn, &row))?;
    }
    conn.execute_batch("DROP TABLE attempts; DROP TABLE executions; DROP TABLE steps;")
}

/// A run's rows as records, in the order a fold reads them: each attempt's
/// start and end, the last one's carrying its execution's result, then the
/// steps. A row whose names no longer parse is left out, not the database.
fn each_record(
    conn: &Connection,
    run_id: &str,
    mut record: impl FnMut(Record) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let mut statement = conn.prepare(
        "SELECT a.step_id, a.attempt, a.status, a.kind, a.message, a.started_ms, a.finished_ms, a.fuel,
                a.peak_memory, a.logs, a.stdout, a.stderr, a.delay_before_ms, a.input,
                a.attempt = (SELECT MAX(attempt) FROM attempts WHERE run_id = a.run_id AND key = a.key),
                x.status IS NOT NULL, x.output
         FROM attempts AS a LEFT JOIN executions AS x ON x.run_id = a.run_id AND x.key = a.key
         WHERE a.run_id = ?1 ORDER BY a.key, a.attempt",
    )?;
    let mut rows = statement.query(params![run_id])?;
    while let Some(row) = rows.next()? {
        let Ok(path) = row.get::<_, String>(0)?.parse::<StepPath>() else { continue };
        let Ok(number) = u32::try_from(row.get::<_, i64>(1)?) else { continue };
        let attempt = AttemptRow {
            number,
            status: rows::attempt_status(&row.get::<_, String>(2)?),
            kind: row.get::<_, Option<String>>(3)?.and_then(|kind| kind.parse().ok()),
            message: row.get(4)?,
            started: row.get::<_, Option<f64>>(5)?.unwrap_or_default(),
            finished: row.get(6)?,
            fuel: row.get::<_, Option<i64>>(7)?.unwrap_or_default(),
            peak_memory: row.get::<_, Option<i64>>(8)?.unwrap_or_default(),
            logs: row.get::<_, Option<String>>(9)?.unwrap_or_default(),
            stdout: row.get::<_, Option<String>>(10)?.unwrap_or_default(),
            stderr: row.get::<_, Option<String>>(11)?.unwrap_or_default(),
            delay: row.get::<_, Option<f64>>(12)?.unwrap_or_default(),
        };
        record(Record::AttemptStarted {
            path: path.clone(),
            attempt: attempt.number,
            started_ms: attempt.started,
            delay_before_ms: attempt.delay,
            input: row.get(13)?,
        })?;
        let last = row.get::<_, bool>(14)? && row.get::<_, bool>(15)?;
        if attempt.status != "running" || last {
            let output = row.get::<_, Option<String>>(16)?.filter(|_| last);
            record(Record::AttemptFinished { path, last, output, attempt })?;
        }
    }
    let mut statement = conn.prepare(
        "SELECT step_id, position, status, reason, output, started_ms, finished_ms, required FROM steps
         WHERE run_id = ?1 ORDER BY position",
    )?;
    let mut rows = statement.query(params![run_id])?;
    while let Some(row) = rows.next()? {
        let path = row.get::<_, String>(0)?.parse::<StepPath>();
        let status = row.get::<_, String>(2)?.parse::<StepStatus>();
        let (Ok(path), Ok(status)) = (path, status) else { continue };
        record(Record::StepFinished(StepRow {
            path,
            position: row.get::<_, Option<i64>>(1)?.unwrap_or(i64::MAX),
            status,
            reason: row.get(3)?,
            output: row.get(4)?,
            started_ms: row.get(5)?,
            finished_ms: row.get(6)?,
            required: row.get::<_, Option<bool>>(7)?.unwrap_or(true),
        }))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{DATABASE_FILE, Database, SCHEMA};
    use crate::store::conformance::{OLD_ROWS, assert_moved_into_the_log};

    #[test]
    fn rows_of_a_version_16_database_move_into_its_run_logs() {
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        for migration in &SCHEMA.migrations[..16] {
            conn.execute_batch(migration).unwrap();
        }
        // Beside them, what only SQLite could hold: rows of a run deleted
        // with foreign keys off, and a step path no stepbox reads.
        let strays = "INSERT INTO attempts (run_id, key, attempt, step_id, status, started_ms)
                      VALUES ('gone', 'gone/x', 1, 'x', 'running', 1.0), ('r', 'r/bad path', 1, 'bad path', 'running', 1.0);
                      INSERT INTO steps (run_id, step_id, position, status) VALUES ('gone', 'x', 0, 'succeeded');";
        conn.execute_batch(&format!("PRAGMA foreign_keys = OFF; PRAGMA user_version = 16; {OLD_ROWS} {strays}"))
            .unwrap();
        drop(conn);
        let db = Database::open(dir.path()).unwrap();
        assert_moved_into_the_log(&db, "sqlite");
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
        let moved: i64 =
            db.read(|conn| conn.query_row("SELECT COUNT(DISTINCT run_id) FROM run_log", [], |row| row.get(0))).unwrap();
        assert_eq!(moved, 1, "the deleted run's rows went with their tables");
    }
}
