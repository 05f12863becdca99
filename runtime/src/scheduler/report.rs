//! What a run did, step by step and attempt by attempt. Times are
//! milliseconds since the run started, so overlaps and delays can be read
//! off directly.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::sandbox::{Captured, Failure, LogRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Succeeded,
    Failed,
    Cancelled,
}

/// One attempt of one execution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    /// The backoff waited before this attempt.
    pub delay_before_ms: f64,
    pub started_ms: f64,
    pub finished_ms: f64,
    /// `None` when the attempt succeeded.
    pub failure: Option<Failure>,
    pub fuel_consumed: u64,
    pub peak_memory: u64,
    pub logs: Vec<LogRecord>,
    pub stdout: Captured,
    pub stderr: Captured,
    /// The output, until the execution takes it over.
    #[serde(skip)]
    pub(crate) output_value: Option<Value>,
}

impl AttemptRecord {
    pub(crate) fn empty(
        attempt: u32,
        delay_before: Duration,
        started_ms: f64,
        finished_ms: f64,
        failure: Failure,
    ) -> Self {
        AttemptRecord {
            attempt,
            delay_before_ms: delay_before.as_secs_f64() * 1000.0,
            started_ms,
            finished_ms,
            failure: Some(failure),
            fuel_consumed: 0,
            peak_memory: 0,
            logs: Vec::new(),
            stdout: Captured::default(),
            stderr: Captured::default(),
            output_value: None,
        }
    }
}

/// One execution of a step: the whole step, or one item of a fan-out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecutionReport {
    /// The item's position in a fan-out.
    pub index: Option<usize>,
    pub item: Option<Value>,
    /// The same for every attempt (and, with a durable store, every resume).
    pub idempotency_key: String,
    pub status: StepStatus,
    pub output: Option<Value>,
    /// Why it failed before any attempt ran (a template error).
    pub error: Option<String>,
    /// It succeeded in an earlier process of this run (before a crash or a
    /// retry); its output was reused and it did not run again.
    pub reused: bool,
    pub attempts: Vec<AttemptRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    pub id: String,
    pub status: StepStatus,
    /// Why it was skipped, failed or cancelled.
    pub reason: Option<String>,
    pub required: bool,
    pub output: Option<Value>,
    pub started_ms: Option<f64>,
    pub finished_ms: Option<f64>,
    pub executions: Vec<ExecutionReport>,
    /// The steps of an included workflow, with ids `<this id>.<their id>`.
    pub steps: Vec<StepReport>,
}

impl StepReport {
    pub(crate) fn pending(id: &str, required: bool) -> Self {
        StepReport {
            id: id.to_owned(),
            status: StepStatus::Pending,
            reason: None,
            required,
            output: None,
            started_ms: None,
            finished_ms: None,
            executions: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// Attempts over all executions.
    pub fn attempts(&self) -> usize {
        self.executions.iter().map(|e| e.attempts.len()).sum()
    }

    pub fn fuel_consumed(&self) -> u64 {
        self.executions.iter().flat_map(|e| &e.attempts).map(|a| a.fuel_consumed).sum()
    }

    pub fn peak_memory(&self) -> u64 {
        self.executions.iter().flat_map(|e| &e.attempts).map(|a| a.peak_memory).max().unwrap_or(0)
    }

    pub fn duration(&self) -> Option<Duration> {
        Some(Duration::from_secs_f64((self.finished_ms? - self.started_ms?).max(0.0) / 1000.0))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub workflow: String,
    pub status: RunStatus,
    pub duration_ms: f64,
    pub inputs: serde_json::Map<String, Value>,
    pub outputs: serde_json::Map<String, Value>,
    /// Problems computing the outputs.
    pub output_errors: Vec<String>,
    /// Why the run stopped, when it was not a step's doing.
    pub error: Option<String>,
    pub steps: Vec<StepReport>,
}

impl RunReport {
    pub fn step(&self, id: &str) -> Option<&StepReport> {
        fn find<'a>(steps: &'a [StepReport], id: &str) -> Option<&'a StepReport> {
            steps.iter().find_map(|step| if step.id == id { Some(step) } else { find(&step.steps, id) })
        }
        find(&self.steps, id)
    }
}
