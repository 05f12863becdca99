//! The read side of the SQLite store: runs and their reports, rebuilt from
//! the journal's rows into the same types the scheduler reports.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{OptionalExtension, Row, params};
use serde_json::Value;

use super::Database;
use crate::run::{
    Attempt, Captured, ExecutionReport, Failure, FailureKind, Outcome, Run, RunReport, RunStatus, StepPath, StepReport,
    StepStatus,
};
use crate::store::{History, RunFilter, StoreError};

const RUN_COLUMNS: &str = "id, workflow, workflow_path, tenant, inputs, status, outputs, error, created_ms, finished_ms, \
     lease_owner, lease_expires_ms, version";

/// A run from a row of [`RUN_COLUMNS`], without its labels. A running run
/// whose lease is not live is `interrupted`.
fn run_from(row: &Row<'_>) -> rusqlite::Result<Run> {
    let (owner, expires): (Option<String>, Option<i64>) = (row.get(10)?, row.get(11)?);
    let live = super::journal::held(owner.as_deref(), expires);
    let status = match row.get(5)? {
        RunStatus::Running if !live => RunStatus::Interrupted,
        status => status,
    };
    Ok(Run {
        id: row.get(0)?,
        workflow: row.get(1)?,
        workflow_path: row.get(2)?,
        tenant: row.get(3)?,
        labels: BTreeMap::new(),
        inputs: object(Database::json(row.get(4)?)).unwrap_or_default(),
        status,
        outputs: object(Database::json(row.get(6)?)),
        error: row.get(7)?,
        created_ms: row.get(8)?,
        finished_ms: row.get(9)?,
        owner: owner.filter(|_| live),
        version: row.get(12)?,
    })
}

fn object(value: Option<Value>) -> Option<serde_json::Map<String, Value>> {
    match value {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    }
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
        Ok(Database::json(Some(text)).unwrap_or(Value::Null))
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
        let run = self.load_run(run_id)?;
        let steps: Vec<(i64, StepReport)> = self.read(|conn| {
            let mut statement = conn.prepare(
                "SELECT step_id, position, status, reason, output, started_ms, finished_ms, required FROM steps
                 WHERE run_id = ?1",
            )?;
            let rows = statement.query_map(params![run_id], |row| {
                Ok((
                    row.get(1)?,
                    StepReport {
                        id: row.get(0)?,
                        status: row.get(2)?,
                        reason: row.get(3)?,
                        required: row.get(7)?,
                        output: Database::json(row.get(4)?),
                        started_ms: row.get(5)?,
                        finished_ms: row.get(6)?,
                        executions: Vec::new(),
                        steps: Vec::new(),
                    },
                ))
            })?;
            rows.collect()
        })?;
        let executions: Vec<ExecutionReport> = self.read(|conn| {
            let mut statement =
                conn.prepare("SELECT key, step_id, status, output, error FROM executions WHERE run_id = ?1")?;
            let rows = statement.query_map(params![run_id], |row| {
                Ok(ExecutionReport {
                    idempotency_key: row.get(0)?,
                    path: row.get(1)?,
                    status: row.get(2)?,
                    output: Database::json(row.get(3)?),
                    error: row.get(4)?,
                    item: None,
                    reused: false,
                    attempts: Vec::new(),
                })
            })?;
            rows.collect()
        })?;
        let attempts: Vec<(String, StepPath, Attempt)> = self.read(|conn| {
            let mut statement = conn.prepare(
                "SELECT key, step_id, attempt, status, kind, message, started_ms, finished_ms, fuel, peak_memory,
                        logs, stdout, stderr, delay_before_ms
                 FROM attempts WHERE run_id = ?1 ORDER BY key, attempt",
            )?;
            let rows = statement.query_map(params![run_id], |row| {
                let status: String = row.get(3)?;
                let kind: Option<FailureKind> = row.get(4)?;
                let message: Option<String> = row.get(5)?;
                let outcome = match (status.as_str(), kind) {
                    ("running", _) => Outcome::Running,
                    // The output is the execution's; filled in below.
                    ("succeeded", _) => Outcome::Succeeded { output: Value::Null },
                    (_, kind) => Outcome::Failed {
                        failure: Failure::new(kind.unwrap_or(FailureKind::Trap), message.unwrap_or_default()),
                    },
                };
                let text = |index| -> rusqlite::Result<Captured> {
                    let text: Option<String> = row.get(index)?;
                    Ok(Captured { text: text.unwrap_or_default(), dropped_bytes: 0 })
                };
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    Attempt {
                        attempt: row.get(2)?,
                        outcome,
                        started_ms: row.get::<_, Option<f64>>(6)?.unwrap_or_default(),
                        finished_ms: row.get(7)?,
                        delay_before_ms: row.get(13)?,
                        fuel_consumed: row.get::<_, Option<i64>>(8)?.unwrap_or_default().max(0) as u64,
                        peak_memory: row.get::<_, Option<i64>>(9)?.unwrap_or_default().max(0) as u64,
                        logs: Database::json(row.get(10)?)
                            .and_then(|logs| serde_json::from_value(logs).ok())
                            .unwrap_or_default(),
                        stdout: text(11)?,
                        stderr: text(12)?,
                    },
                ))
            })?;
            rows.collect()
        })?;
        Ok(RunReport { run, output_errors: Vec::new(), steps: assemble(steps, executions, attempts) })
    }
}

/// Nests recorded rows into a report: attempts into their executions,
/// executions into their steps, the steps of included workflows into their
/// include steps. What was recorded only in part (a step still running, an
/// execution between attempts) appears as running.
fn assemble(
    steps: Vec<(i64, StepReport)>,
    executions: Vec<ExecutionReport>,
    attempts: Vec<(String, StepPath, Attempt)>,
) -> Vec<StepReport> {
    let mut positions: HashMap<StepPath, i64> = HashMap::new();
    let mut steps: BTreeMap<StepPath, StepReport> = steps
        .into_iter()
        .map(|(position, step)| {
            positions.insert(step.id.clone(), position);
            (step.id.clone(), step)
        })
        .collect();
    let mut executions: BTreeMap<String, ExecutionReport> =
        executions.into_iter().map(|execution| (execution.idempotency_key.clone(), execution)).collect();
    for (key, path, mut attempt) in attempts {
        let execution = executions.entry(key.clone()).or_insert_with(|| ExecutionReport {
            path,
            item: None,
            idempotency_key: key,
            status: StepStatus::Running,
            output: None,
            error: None,
            reused: false,
            attempts: Vec::new(),
        });
        if let Outcome::Succeeded { output } = &mut attempt.outcome {
            *output = execution.output.clone().unwrap_or(Value::Null);
        }
        execution.attempts.push(attempt);
    }
    for execution in executions.into_values() {
        let started = execution.attempts.first().map(|attempt| attempt.started_ms);
        let step = steps.entry(execution.path.step()).or_insert_with(|| StepReport {
            started_ms: started,
            status: StepStatus::Running,
            ..StepReport::pending(execution.path.step(), true)
        });
        step.executions.push(execution);
    }
    for step in steps.values_mut() {
        step.executions.sort_by_key(|execution| execution.path.index());
    }
    // Include steps hold their workflow's steps, deepest first so each
    // child is complete when it moves into its parent.
    let mut paths: Vec<StepPath> = steps.keys().cloned().collect();
    paths.sort_by_key(|path| std::cmp::Reverse(path.depth()));
    for path in paths {
        let Some(parent) = path.parent() else { continue };
        let Some(step) = steps.remove(&path) else { continue };
        let holder = steps
            .entry(parent.clone())
            .or_insert_with(|| StepReport { status: StepStatus::Running, ..StepReport::pending(parent, true) });
        holder.steps.push(step);
        holder.steps.sort_by_key(|child| positions.get(&child.id).copied().unwrap_or(i64::MAX));
    }
    let mut top: Vec<StepReport> = steps.into_values().collect();
    top.sort_by_key(|step| positions.get(&step.id).copied().unwrap_or(i64::MAX));
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_nest_into_steps_executions_and_includes() {
        let step = |path: &str, position| {
            let path: StepPath = path.parse().unwrap();
            (position, StepReport { status: StepStatus::Succeeded, ..StepReport::pending(path, true) })
        };
        let execution = |path: &str| ExecutionReport {
            path: path.parse().unwrap(),
            item: None,
            idempotency_key: format!("r/{path}"),
            status: StepStatus::Succeeded,
            output: Some(Value::from(path)),
            error: None,
            reused: false,
            attempts: Vec::new(),
        };
        let attempt = |path: &str, n| {
            let outcome = Outcome::Succeeded { output: Value::Null };
            (format!("r/{path}"), path.parse().unwrap(), Attempt { outcome, ..Attempt::started(n, 1.0) })
        };
        let steps = assemble(
            vec![step("b", 1), step("inc.x", 0), step("a", 0), step("inc", 2)],
            vec![execution("a[1]"), execution("a[0]"), execution("inc.x")],
            vec![attempt("a[0]", 1), attempt("inc.x", 1), attempt("c", 2)],
        );
        let ids: Vec<String> = steps.iter().map(|step| step.id.to_string()).collect();
        assert_eq!(ids, ["a", "b", "inc", "c"], "by position; an unfinished step last");
        let items: Vec<String> = steps[0].executions.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(items, ["a[0]", "a[1]"]);
        assert_eq!(steps[0].executions[0].attempts[0].output(), Some(&Value::from("a[0]")), "outputs rejoin");
        assert_eq!(steps[2].steps[0].id.to_string(), "inc.x");
        assert_eq!(steps[2].steps[0].executions[0].attempts.len(), 1);
        assert_eq!(steps[3].status, StepStatus::Running, "a step with only an attempt is running");
        assert_eq!(steps[3].executions[0].attempts[0].attempt, 2);
    }
}
