//! What a run did, step by step, execution by execution and attempt by
//! attempt: built by the scheduler as it runs, and rebuilt from the journal
//! by `stepbox show`. Times are unix milliseconds.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attempt, RunStatus, StepPath, StepStatus};

/// A run as recorded: what it runs, for whom, and how it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Run {
    /// The run id (a UUIDv7).
    pub id: String,
    /// The workflow's name.
    pub workflow: String,
    /// The workflow file it runs.
    pub workflow_path: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// Labels to find it by.
    pub labels: BTreeMap<String, String>,
    /// Its inputs, as bound.
    #[schema(value_type = Object)]
    pub inputs: serde_json::Map<String, Value>,
    /// Where it stands.
    pub status: RunStatus,
    /// The workflow's outputs, once it finished.
    #[schema(value_type = Option<Object>)]
    pub outputs: Option<serde_json::Map<String, Value>>,
    /// Why it stopped, when that was not a step's doing (its journal failed,
    /// its fuel budget ran out).
    pub error: Option<String>,
    /// When it was created.
    pub created_ms: f64,
    /// When it last finished.
    pub finished_ms: Option<f64>,
    /// The process that holds it while it runs (`HOST:PID:NONCE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The deployed version of its workflow it runs, for a run started
    /// through `stepbox serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// A cancel was asked for while another process ran it: that process
    /// stops it soon (or the next one to take it up records it cancelled).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
}

impl Run {
    /// A run created now, about to start, without labels.
    pub fn new(
        id: String,
        workflow: &str,
        workflow_path: &str,
        tenant: &str,
        inputs: serde_json::Map<String, Value>,
    ) -> Self {
        Run {
            id,
            workflow: workflow.to_owned(),
            workflow_path: workflow_path.to_owned(),
            tenant: tenant.to_owned(),
            labels: BTreeMap::new(),
            inputs,
            status: RunStatus::Running,
            outputs: None,
            error: None,
            created_ms: super::now_ms(),
            finished_ms: None,
            owner: None,
            version: None,
            cancel_requested: false,
        }
    }

    /// How long it ran, from creation to its last finish, in milliseconds.
    pub fn duration_ms(&self) -> Option<f64> {
        self.finished_ms.map(|finished| (finished - self.created_ms).max(0.0))
    }
}

/// A run with everything it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunReport {
    /// The run itself.
    #[serde(flatten)]
    pub run: Run,
    /// Problems computing the outputs.
    pub output_errors: Vec<String>,
    /// The steps of the workflow, in file order.
    pub steps: Vec<StepReport>,
}

impl RunReport {
    /// Puts back the logs, stdout and stderr that left memory once recorded
    /// (see [`Attempt::forget_records`]), and the executions' inputs, which
    /// only the journal holds, from the run's report as the journal holds
    /// it.
    pub fn restore_records(&mut self, recorded: RunReport) {
        let mut kept: HashMap<(String, u32), Attempt> = HashMap::new();
        let mut inputs: HashMap<String, Value> = HashMap::new();
        let mut pending: Vec<StepReport> = recorded.steps;
        while let Some(step) = pending.pop() {
            for execution in step.executions {
                if let Some(input) = execution.input {
                    inputs.insert(execution.idempotency_key.clone(), input);
                }
                for attempt in execution.attempts {
                    kept.insert((execution.idempotency_key.clone(), attempt.attempt), attempt);
                }
            }
            pending.extend(step.steps);
        }
        let mut steps: Vec<&mut StepReport> = self.steps.iter_mut().collect();
        while let Some(step) = steps.pop() {
            for execution in &mut step.executions {
                if let Some(input) = inputs.remove(&execution.idempotency_key) {
                    execution.input = Some(input);
                }
                for attempt in &mut execution.attempts {
                    if let Some(recorded) = kept.remove(&(execution.idempotency_key.clone(), attempt.attempt)) {
                        attempt.logs = recorded.logs;
                        attempt.stdout = recorded.stdout;
                        attempt.stderr = recorded.stderr;
                    }
                }
            }
            steps.extend(step.steps.iter_mut());
        }
    }

    /// Every step, each included workflow's steps after their include
    /// step.
    pub fn all_steps(&self) -> Vec<&StepReport> {
        fn walk<'a>(steps: &'a [StepReport], all: &mut Vec<&'a StepReport>) {
            for step in steps {
                all.push(step);
                walk(&step.steps, all);
            }
        }
        let mut all = Vec::new();
        walk(&self.steps, &mut all);
        all
    }

    /// The step at `path` (its text, like `billing.charge`), at any depth.
    pub fn step(&self, path: &str) -> Option<&StepReport> {
        fn find<'a>(steps: &'a [StepReport], path: &str) -> Option<&'a StepReport> {
            steps.iter().find_map(|step| if step.id.to_string() == path { Some(step) } else { find(&step.steps, path) })
        }
        find(&self.steps, path)
    }
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepReport {
    /// Its path in the run: its id, under its include steps.
    pub id: StepPath,
    /// Where it stands.
    pub status: StepStatus,
    /// Why it was skipped, failed or cancelled.
    pub reason: Option<String>,
    /// Whether its failure fails the run.
    pub required: bool,
    /// Its output: an execution's, or the list of a fan-out's, in order.
    pub output: Option<Value>,
    /// When it started.
    pub started_ms: Option<f64>,
    /// When it finished.
    pub finished_ms: Option<f64>,
    /// Its executions: one, or one per item of a fan-out.
    pub executions: Vec<ExecutionReport>,
    /// The steps of an included workflow.
    #[schema(no_recursion)]
    pub steps: Vec<StepReport>,
}

impl StepReport {
    /// A step that has not started.
    pub fn pending(id: StepPath, required: bool) -> Self {
        StepReport {
            id,
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

    /// Every attempt of its executions.
    pub fn attempts(&self) -> impl Iterator<Item = &Attempt> {
        self.executions.iter().flat_map(|e| &e.attempts)
    }

    /// Fuel used by all its attempts.
    pub fn fuel_consumed(&self) -> u64 {
        self.attempts().map(|a| a.fuel_consumed).sum()
    }

    /// The most memory any of its attempts held.
    pub fn peak_memory(&self) -> u64 {
        self.attempts().map(|a| a.peak_memory).max().unwrap_or(0)
    }

    /// How long it ran, in milliseconds.
    pub fn duration_ms(&self) -> Option<f64> {
        Some((self.finished_ms? - self.started_ms?).max(0.0))
    }
}

/// One execution of a step: the whole step, or one item of a fan-out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecutionReport {
    /// Its path: the step's, with the item for a fan-out.
    pub path: StepPath,
    /// The item of a fan-out.
    pub item: Option<Value>,
    /// The same for every attempt and every resume: `<run id>/<path>`.
    pub idempotency_key: String,
    /// Where it stands.
    pub status: StepStatus,
    /// Its output (its last attempt's).
    pub output: Option<Value>,
    /// Why it failed before any attempt ran (a template error).
    pub error: Option<String>,
    /// The input its attempts were given, as the journal keeps it (a
    /// string saying its size for one over 64 KiB). Read from the journal,
    /// not held while the run goes on.
    #[serde(default)]
    pub input: Option<Value>,
    /// It succeeded in an earlier process of this run (before a crash, or a
    /// retry); its output was reused and it did not run again.
    pub reused: bool,
    /// Its attempts, in order.
    pub attempts: Vec<Attempt>,
}

impl ExecutionReport {
    /// The idempotency key of the execution at `path` in run `run_id`.
    pub fn key(run_id: &str, path: &StepPath) -> String {
        format!("{run_id}/{path}")
    }
}
