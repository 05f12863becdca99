//! A run's step records as a log: what the SQLite journal appends for each
//! attempt and step, and how a run's log folds back into reports and resume
//! state.
//!
//! Why a log and not a row per attempt, execution and step: a row is an
//! indexed upsert, about 12,000 instructions in SQLite whatever it holds,
//! and a step wrote four. Appended records are serialized where they are
//! made, and all of one run's records in a group commit become one row, so
//! a wide graph pays SQLite's per-statement cost once per batch, not four
//! times per step. Records are folded back in the order they were written:
//! a later record of the same attempt, execution or step replaces what an
//! earlier one said, as the upserts did.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ResumeState;
use super::rows::{self, AttemptRecord, AttemptRow};
use crate::run::{Attempt, ExecutionReport, StepPath, StepReport, StepStatus};

/// One record of a run's log, as its JSON is written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Record {
    /// An attempt of the execution at `path` may start.
    AttemptStarted {
        path: StepPath,
        attempt: u32,
        #[serde(default, deserialize_with = "rows::number")]
        started_ms: f64,
        #[serde(default, deserialize_with = "rows::number")]
        delay_before_ms: f64,
        /// The JSON text it is given, cut as [`rows::kept_input`] says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
    },
    /// An attempt ended; when it was the `last` of its execution, its
    /// status and `output` (JSON text) are the execution's result.
    AttemptFinished {
        path: StepPath,
        last: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        attempt: AttemptRow,
    },
    /// A step reached its final status.
    StepFinished(StepRow),
    /// `stepbox retry --from`: the results of these steps, their
    /// executions and everything inside them are forgotten (their attempts
    /// stay, so new ones number on).
    Forgotten { steps: Vec<StepPath> },
}

impl Record {
    /// The record's JSON, made by the caller's thread rather than the
    /// writer's.
    pub(crate) fn text(&self) -> String {
        serde_json::to_string(self).expect("a record serializes: its maps have string keys")
    }

    pub(crate) fn started(path: &StepPath, attempt: &Attempt, input: Option<&str>) -> Self {
        Record::AttemptStarted {
            path: path.clone(),
            attempt: attempt.attempt,
            started_ms: attempt.started_ms,
            delay_before_ms: attempt.delay_before_ms,
            input: input.map(rows::kept_input),
        }
    }

    pub(crate) fn finished(path: &StepPath, attempt: &Attempt, last: bool) -> Self {
        let output = if last { attempt.output().map(rows::text) } else { None };
        Record::AttemptFinished { path: path.clone(), last, output, attempt: AttemptRow::of(attempt) }
    }

    pub(crate) fn step(position: usize, step: &StepReport) -> Self {
        Record::StepFinished(StepRow {
            path: step.id.clone(),
            position: position as i64,
            status: step.status,
            reason: step.reason.as_deref().map(rows::clean),
            output: step.output.as_ref().map(rows::text),
            started_ms: step.started_ms,
            finished_ms: step.finished_ms,
            required: step.required,
        })
    }
}

/// A step's final record.
///
/// Outputs are kept as JSON text, as the stores' columns keep them: a record
/// then nests no deeper than its own fields, so no output, however deep,
/// can make a run's log unreadable (serde_json stops at 128 levels), and
/// one that cannot be read back reads as missing, as from a column.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StepRow {
    pub(crate) path: StepPath,
    pub(crate) position: i64,
    pub(crate) status: StepStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) started_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) finished_ms: Option<f64>,
    pub(crate) required: bool,
}

/// A run's log records in a batch go into one row until it holds this many
/// bytes, then into another: bounds a row, and the memory to build it.
const CHUNK_BYTES: usize = 1 << 20;

/// A batch's log records gathered into rows, one per run (and another each
/// [`CHUNK_BYTES`]), each a JSON array of records in the order queued.
#[derive(Default)]
pub(crate) struct Chunks<'a> {
    open: HashMap<&'a str, Row<'a>>,
}

/// One row of a run's log.
pub(crate) struct Row<'a> {
    pub(crate) run_id: &'a str,
    /// The index in its batch of the row's first record: if the row cannot
    /// be written, its run fails from there.
    pub(crate) first: usize,
    /// The records, as a JSON array.
    pub(crate) records: String,
}

impl<'a> Chunks<'a> {
    /// Adds `record`, the `index`th of its batch; returns its run's row if
    /// that is now full.
    pub(crate) fn push(&mut self, run_id: &'a str, index: usize, record: &str) -> Option<Row<'a>> {
        let row = self.open.entry(run_id).or_insert_with(|| Row { run_id, first: index, records: String::new() });
        row.records.push(if row.records.is_empty() { '[' } else { ',' });
        row.records.push_str(record);
        if row.records.len() < CHUNK_BYTES {
            return None;
        }
        self.open.remove(run_id).map(Row::closed)
    }

    /// The rows not yet full.
    pub(crate) fn rows(self) -> impl Iterator<Item = Row<'a>> {
        self.open.into_values().map(Row::closed)
    }
}

impl Row<'_> {
    fn closed(mut self) -> Self {
        self.records.push(']');
        self
    }
}

/// A run's log folded: the latest word on each attempt, execution and step.
#[derive(Debug, Default)]
pub(crate) struct Folded {
    steps: HashMap<StepPath, StepRow>,
    /// Executions that ended: their status and output.
    executions: HashMap<StepPath, (StepStatus, Option<String>)>,
    attempts: BTreeMap<(StepPath, u32), (AttemptRow, Option<String>)>,
}

impl Folded {
    /// Folds in one chunk of the log, in order. Without `bulk`, attempts'
    /// logs, stdout and stderr and inputs are dropped as they are read.
    pub(crate) fn read(&mut self, chunk: &str, bulk: bool) -> serde_json::Result<()> {
        for record in serde_json::from_str::<Vec<Record>>(chunk)? {
            self.apply(record, bulk);
        }
        Ok(())
    }

    fn apply(&mut self, record: Record, bulk: bool) {
        match record {
            Record::AttemptStarted { path, attempt, started_ms, delay_before_ms, input } => {
                let input = input.filter(|_| bulk);
                let (row, kept) = self
                    .attempts
                    .entry((path, attempt))
                    .or_insert_with(|| (AttemptRow::running(attempt, started_ms, delay_before_ms), None));
                (row.status, row.started) = ("running", started_ms);
                *kept = input;
            }
            Record::AttemptFinished { path, last, output, mut attempt } => {
                if !bulk {
                    attempt.drop_bulk();
                }
                if last {
                    let status = attempt.status.parse().unwrap_or(StepStatus::Failed);
                    self.executions.insert(path.clone(), (status, output));
                }
                match self.attempts.entry((path, attempt.number)) {
                    std::collections::btree_map::Entry::Occupied(mut entry) => entry.get_mut().0 = attempt,
                    std::collections::btree_map::Entry::Vacant(entry) => {
                        entry.insert((attempt, None));
                    }
                }
            }
            Record::StepFinished(step) => {
                self.steps.insert(step.path.clone(), step);
            }
            Record::Forgotten { steps } => {
                let forgotten = |path: &StepPath| steps.iter().any(|step| path.is_within(step));
                self.steps.retain(|path, _| !forgotten(path));
                self.executions.retain(|path, _| !forgotten(path));
            }
        }
    }

    /// What a resume needs from the log: the outputs of the executions
    /// that succeeded and the highest attempt number of each execution, by
    /// idempotency key, and each step's recorded status.
    pub(crate) fn resume(self, run_id: &str) -> ResumeState {
        let completed = self
            .executions
            .into_iter()
            .filter(|(_, (status, _))| *status == StepStatus::Succeeded)
            .map(|(path, (_, output))| (ExecutionReport::key(run_id, &path), rows::json(output).unwrap_or(Value::Null)))
            .collect();
        let mut attempts = HashMap::new();
        for (path, number) in self.attempts.into_keys() {
            attempts.insert(ExecutionReport::key(run_id, &path), number);
        }
        let steps = self.steps.into_iter().map(|(path, row)| (path, row.status)).collect();
        ResumeState { completed, attempts, steps, ..ResumeState::default() }
    }

    /// The run's steps, nested as [`rows::assemble`] does.
    pub(crate) fn steps(self, run_id: &str) -> Vec<StepReport> {
        let steps = self
            .steps
            .into_values()
            .map(|row| {
                let report = StepReport {
                    status: row.status,
                    reason: row.reason,
                    output: rows::json(row.output),
                    started_ms: row.started_ms,
                    finished_ms: row.finished_ms,
                    ..StepReport::pending(row.path, row.required)
                };
                (row.position, report)
            })
            .collect();
        let executions = self
            .executions
            .into_iter()
            .map(|(path, (status, output))| ExecutionReport {
                idempotency_key: ExecutionReport::key(run_id, &path),
                path,
                status,
                output: rows::json(output),
                error: None,
                item: None,
                input: None,
                reused: false,
                attempts: Vec::new(),
            })
            .collect();
        let attempts: Vec<AttemptRecord> = self
            .attempts
            .into_iter()
            .map(|((path, _), (row, input))| (ExecutionReport::key(run_id, &path), path, row.read(), rows::json(input)))
            .collect();
        rows::assemble(steps, executions, attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{Failure, FailureKind, Outcome};

    fn chunk(records: &[Record]) -> String {
        let mut chunks = Chunks::default();
        for (index, record) in records.iter().enumerate() {
            assert!(chunks.push("r", index, &record.text()).is_none());
        }
        let mut rows: Vec<Row<'_>> = chunks.rows().collect();
        assert_eq!((rows.len(), rows[0].first), (1, 0));
        rows.remove(0).records
    }

    #[test]
    fn a_log_folds_back_into_the_report_and_resume_state_it_recorded() {
        let path: StepPath = "a".parse().unwrap();
        let failed = Attempt {
            outcome: Outcome::Failed { failure: Failure::new(FailureKind::Trap, "boom") },
            finished_ms: Some(2.0),
            stdout: crate::run::Captured { text: "out\0".into(), dropped_bytes: 0 },
            ..Attempt::started(1, 1.0)
        };
        let succeeded = Attempt {
            outcome: Outcome::Succeeded { output: Value::from(7) },
            finished_ms: Some(4.0),
            delay_before_ms: 0.5,
            ..Attempt::started(2, 3.0)
        };
        let step = StepReport {
            status: StepStatus::Succeeded,
            output: Some(Value::from(7)),
            started_ms: Some(1.0),
            finished_ms: Some(4.0),
            ..StepReport::pending(path.clone(), true)
        };
        let mut folded = Folded::default();
        let first =
            chunk(&[Record::started(&path, &failed, Some("{\"n\":1}")), Record::finished(&path, &failed, false)]);
        folded.read(&first, true).unwrap();
        let second = chunk(&[
            Record::started(&path, &succeeded, Some("{\"n\":1}")),
            Record::finished(&path, &succeeded, true),
            Record::step(0, &step),
        ]);
        folded.read(&second, true).unwrap();
        let steps = folded.steps("r");
        assert_eq!(steps.len(), 1);
        assert_eq!((steps[0].status, steps[0].output.clone()), (StepStatus::Succeeded, Some(Value::from(7))));
        let execution = &steps[0].executions[0];
        assert_eq!(execution.idempotency_key, "r/a");
        assert_eq!(execution.input, Some(serde_json::json!({"n": 1})));
        assert_eq!(execution.attempts.len(), 2);
        assert_eq!(execution.attempts[0].failure().unwrap().message, "boom");
        assert_eq!(execution.attempts[0].stdout.text, "out\u{FFFD}", "a NUL is stored as U+FFFD");
        assert_eq!(execution.attempts[1].output(), Some(&Value::from(7)));
        assert_eq!(execution.attempts[1].delay_before_ms, 0.5);

        let mut folded = Folded::default();
        folded.read(&first, false).unwrap();
        folded.read(&second, false).unwrap();
        folded.read(&chunk(&[Record::Forgotten { steps: vec![path.clone()] }]), false).unwrap();
        let state = folded.resume("r");
        assert!(state.completed.is_empty(), "a forgotten step's result is not reused");
        assert!(state.steps.is_empty(), "nor its status");
        assert_eq!(state.attempts["r/a"], 2, "its attempts still count");
    }

    #[test]
    fn a_runs_records_fill_a_row_up_to_a_mebibyte_then_another() {
        let record = Record::Forgotten { steps: vec!["x".parse().unwrap(); 300] }.text();
        let mut chunks = Chunks::default();
        let mut full = Vec::new();
        for index in 0..2000 {
            full.extend(chunks.push(if index % 2 == 0 { "a" } else { "b" }, index, &record));
        }
        assert_eq!(full.len(), 2, "a's and b's 1,000 records of about 1.2 KB each fill a row each");
        let filled = |run| full.iter().find(|row| row.run_id == run).unwrap();
        assert_eq!((filled("a").first, filled("b").first), (0, 1));
        let rest: Vec<Row<'_>> = chunks.rows().collect();
        let a = rest.iter().find(|row| row.run_id == "a").unwrap();
        assert_eq!(a.first, filled("a").records.matches("forgotten").count() * 2, "the next row starts after it");
        for row in full.iter().chain(&rest) {
            let records: Vec<Record> = serde_json::from_str(&row.records).unwrap();
            assert!(!records.is_empty());
        }
    }

    #[test]
    fn an_output_too_deep_to_read_back_leaves_the_rest_of_the_log_readable() {
        let mut deep = Value::from(1);
        for _ in 0..200 {
            deep = Value::Array(vec![deep]);
        }
        let (path, other): (StepPath, StepPath) = ("deep".parse().unwrap(), "fine".parse().unwrap());
        let outcome = |output| Outcome::Succeeded { output };
        let deep_attempt = Attempt { outcome: outcome(deep), finished_ms: Some(2.0), ..Attempt::started(1, 1.0) };
        let fine = Attempt { outcome: outcome(Value::from("ok")), finished_ms: Some(2.0), ..Attempt::started(1, 1.0) };
        let mut folded = Folded::default();
        let log = chunk(&[Record::finished(&path, &deep_attempt, true), Record::finished(&other, &fine, true)]);
        folded.read(&log, true).unwrap();
        let steps = folded.steps("r");
        assert_eq!(steps.len(), 2);
        let output = |i: usize| steps[i].executions[0].output.clone();
        assert_eq!((output(0), output(1)), (None, Some(Value::from("ok"))), "read as missing, as from a column");
    }
}
