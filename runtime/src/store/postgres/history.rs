//! The read side of the PostgreSQL store: runs and their reports, rebuilt
//! from the journal's rows by the same code as on SQLite ([`rows`]).

use std::collections::BTreeMap;

use serde_json::Value;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::{Param, PgStore};
use crate::run::{Run, RunReport, RunStatus};
use crate::store::rows;
use crate::store::{History, RunFilter, StoreError};

const RUN_COLUMNS: &str = "id, workflow, workflow_path, tenant, inputs, status, outputs, error, created_ms, finished_ms, \
     lease_owner, lease_expires_ms, version, cancel_requested";

/// A stored name back to its type; a name no stepbox writes is an error.
fn parsed<T: std::str::FromStr<Err = String>>(row: &Row, index: usize) -> Result<T, String> {
    row.get::<_, &str>(index).parse()
}

/// A run from a row of [`RUN_COLUMNS`], without its labels.
fn run_from(row: &Row) -> Result<Run, String> {
    let (status, owner) = rows::run_status(parsed(row, 5)?, row.get(10), row.get(11));
    Ok(Run {
        id: row.get(0),
        workflow: row.get(1),
        workflow_path: row.get(2),
        tenant: row.get(3),
        labels: BTreeMap::new(),
        inputs: rows::object(row.get(4)).unwrap_or_default(),
        status,
        outputs: rows::object(row.get(6)),
        error: row.get(7),
        created_ms: row.get::<_, i64>(8) as f64,
        finished_ms: row.get::<_, Option<i64>>(9).map(|ms| ms as f64),
        owner,
        version: row.get::<_, Option<i64>>(12).and_then(|version| u32::try_from(version).ok()),
        cancel_requested: row.get(13),
    })
}

/// Rows read from the database, each checked on the way.
fn each<T>(rows: Vec<Row>, read: impl Fn(&Row) -> Result<T, String>) -> Result<Vec<T>, String> {
    rows.iter().map(read).collect()
}

impl PgStore {
    /// Runs `query` and reads its rows with `read`.
    pub(super) fn rows<T: Send + 'static>(
        &self,
        query: String,
        params: Vec<Param>,
        read: impl Fn(&Row) -> Result<T, String> + Send + 'static,
    ) -> Result<Vec<T>, StoreError> {
        let place = self.place.clone();
        let rows = self.call(move |client| async move {
            let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|param| &**param as _).collect();
            match client.query(&query, &params).await {
                // Text PostgreSQL cannot hold (a NUL, from an id in a
                // request) matches nothing stored, as on SQLite.
                Err(err) if err.code() == Some(&SqlState::CHARACTER_NOT_IN_REPERTOIRE) => Ok(Vec::new()),
                rows => rows,
            }
        })?;
        each(rows, read).map_err(|detail| StoreError::Database { place: place.to_string(), detail })
    }

    fn labels(&self, run_id: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let rows = self.rows(
            "SELECT key, value FROM run_labels WHERE run_id = $1".into(),
            vec![Box::new(run_id.to_owned())],
            |row| Ok((row.get(0), row.get(1))),
        )?;
        Ok(rows.into_iter().collect())
    }
}

impl History for PgStore {
    fn load_run(&self, run_id: &str) -> Result<Run, StoreError> {
        let run = self.rows(
            format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
            vec![Box::new(run_id.to_owned())],
            run_from,
        )?;
        let mut run = run.into_iter().next().ok_or_else(|| StoreError::NoSuchRun(run_id.to_owned()))?;
        run.labels = self.labels(run_id)?;
        Ok(run)
    }

    fn fingerprint(&self, run_id: &str) -> Result<Value, StoreError> {
        let found =
            self.rows("SELECT fingerprint FROM runs WHERE id = $1".into(), vec![Box::new(run_id.to_owned())], |row| {
                Ok(row.get::<_, String>(0))
            })?;
        let text = found.into_iter().next().ok_or_else(|| StoreError::NoSuchRun(run_id.to_owned()))?;
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
                self.rows("SELECT created_ms FROM runs WHERE id = $1".into(), vec![Box::new(id.clone())], |row| {
                    Ok(row.get::<_, i64>(0))
                })?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NoSuchRun(id.clone()))?,
            ),
            None => None,
        };
        let mut sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE ($1::TEXT IS NULL OR status = $1) AND ($2::TEXT IS NULL OR workflow = $2)
             AND ($3::TEXT IS NULL OR tenant = $3)
             AND ($4::BIGINT IS NULL OR created_ms < $4 OR (created_ms = $4 AND id < $5))"
        );
        let mut params: Vec<Param> = vec![
            Box::new(stored.map(RunStatus::as_str)),
            Box::new(filter.workflow.clone()),
            Box::new(filter.tenant.clone()),
            Box::new(before),
            Box::new(filter.before.clone()),
        ];
        for (key, value) in &filter.labels {
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM run_labels WHERE run_id = runs.id AND key = ${} AND value = ${})",
                params.len() + 1,
                params.len() + 2
            ));
            params.push(Box::new(key.clone()));
            params.push(Box::new(value.clone()));
        }
        sql.push_str(" ORDER BY created_ms DESC, id DESC");
        if filter.limit > 0 && !by_lease {
            sql.push_str(&format!(" LIMIT {}", filter.limit));
        }
        let runs = self.rows(sql, params, run_from)?;
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

impl PgStore {
    /// A run's report; without `bulk`, without its attempts' logs, stdout,
    /// stderr and inputs.
    fn report(&self, run_id: &str, bulk: bool) -> Result<RunReport, StoreError> {
        let run = self.load_run(run_id)?;
        let steps = self.fold(run_id, bulk)?.steps(run_id);
        Ok(RunReport { run, output_errors: Vec::new(), steps })
    }
}
