//! The read side of the SQLite store: runs and their reports, rebuilt from
//! the journal's rows into the same types the scheduler reports.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, Row, params};
use serde_json::Value;

use super::Database;
use crate::run::{Run, RunReport, RunStatus};
use crate::store::rows;
use crate::store::{History, RunFilter, StoreError};

const RUN_COLUMNS: &str = "id, workflow, workflow_path, tenant, inputs, status, outputs, error, created_ms, finished_ms, \
     lease_owner, lease_expires_ms, version, cancel_requested";

/// A run from a row of [`RUN_COLUMNS`], without its labels.
fn run_from(row: &Row<'_>) -> rusqlite::Result<Run> {
    let (status, owner) = rows::run_status(row.get(5)?, row.get(10)?, row.get(11)?);
    Ok(Run {
        id: row.get(0)?,
        workflow: row.get(1)?,
        workflow_path: row.get(2)?,
        tenant: row.get(3)?,
        labels: BTreeMap::new(),
        inputs: rows::object(row.get(4)?).unwrap_or_default(),
        status,
        outputs: rows::object(row.get(6)?),
        error: row.get(7)?,
        created_ms: row.get(8)?,
        finished_ms: row.get(9)?,
        owner,
        version: row.get(12)?,
        cancel_requested: row.get(13)?,
    })
}

impl Database {
    fn labels(&self, run_id: &str) -> Result<BTreeMap<String, String>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached("SELECT key, value FROM run_labels WHERE run_id = ?1")?;
            let rows = statement.query_map(params![run_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
    }
}

impl History for Database {
    fn load_run(&self, run_id: &str) -> Result<Run, StoreError> {
        let run = self.read(|conn| {
            conn.query_row(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"), params![run_id], run_from)
                .optional()
        })?;
        let mut run = run.ok_or_else(|| StoreError::NoSuchRun(run_id.to_owned()))?;
        run.labels = self.labels(run_id)?;
        Ok(run)
    }

    fn fingerprint(&self, run_id: &str) -> Result<Value, StoreError> {
        let text: Option<String> = self.read(|conn| {
            conn.query_row("SELECT fingerprint FROM runs WHERE id = ?1", params![run_id], |row| row.get(0)).optional()
        })?;
        let text = text.ok_or_else(|| StoreError::NoSuchRun(run_id.to_owned()))?;
        Ok(rows::json(Some(text)).unwrap_or(Value::Null))
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        // An interrupted run is stored as running: which running runs are
        // interrupted is known only once their leases are read.
        let stored = filter.status.map(|status| match status {
            RunStatus::Interrupted => RunStatus::Running,
            status => status,
        });
        let by_lease = matches!(filter.status, Some(RunStatus::Running | RunStatus::Interrupted));
        let before = match &filter.before {
            Some(id) => Some(
                self.read(|conn| {
                    conn.query_row("SELECT created_ms FROM runs WHERE id = ?1", params![id], |row| row.get::<_, f64>(0))
                        .optional()
                })?
                .ok_or_else(|| StoreError::NoSuchRun(id.clone()))?,
            ),
            None => None,
        };
        let mut sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR workflow = ?2)
             AND (?3 IS NULL OR tenant = ?3) AND (?4 IS NULL OR created_ms < ?4 OR (created_ms = ?4 AND id < ?5))"
        );
        let mut values: Vec<Box<dyn rusqlite::ToSql>> = vec![
            Box::new(stored),
            Box::new(filter.workflow.clone()),
            Box::new(filter.tenant.clone()),
            Box::new(before),
            Box::new(filter.before.clone()),
        ];
        for (key, value) in &filter.labels {
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM run_labels WHERE run_id = runs.id AND key = ?{} AND value = ?{})",
                values.len() + 1,
                values.len() + 2
            ));
            values.push(Box::new(key.clone()));
            values.push(Box::new(value.clone()));
        }
        sql.push_str(" ORDER BY created_ms DESC, id DESC");
        if filter.limit > 0 && !by_lease {
            sql.push_str(&format!(" LIMIT {}", filter.limit));
        }
        let runs: Vec<Run> = self.read(|conn| {
            let mut statement = conn.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values.iter()), run_from)?;
            rows.collect()
        })?;
        let mut kept = Vec::new();
        for mut run in runs.into_iter().filter(|run| filter.status.is_none_or(|status| run.status == status)) {
            run.labels = self.labels(&run.id)?;
            kept.push(run);
            if filter.limit > 0 && kept.len() == filter.limit {
                break;
            }
        }
        Ok(kept)
    }

    fn run_report(&self, run_id: &str) -> Result<RunReport, StoreError> {
        self.report(run_id, true)
    }

    fn run_summary(&self, run_id: &str) -> Result<RunReport, StoreError> {
        self.report(run_id, false)
    }
}

impl Database {
    /// A run's report; without `bulk`, without its attempts' logs, stdout,
    /// stderr and inputs.
    fn report(&self, run_id: &str, bulk: bool) -> Result<RunReport, StoreError> {
        let run = self.load_run(run_id)?;
        let folded = self.read(|conn| super::journal::fold(conn, run_id, bulk))?;
        Ok(RunReport { run, output_errors: Vec::new(), steps: folded.steps(run_id) })
    }
}
