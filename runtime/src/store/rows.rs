//! What both stores write and read, apart from their SQL: the columns of a
//! record as owned values (so a record can be written again if its batch is
//! retried), the caps on what an attempt keeps, how a lease is judged live,
//! and how rows nest back into a report.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

use super::lease::is_gone;
use crate::run::{
    Attempt, Captured, ExecutionReport, Failure, FailureKind, Outcome, RunStatus, StepPath, StepReport, StepStatus,
    now_ms,
};

/// Bytes of stdout, stderr and logs kept per attempt in the journal.
const MAX_CAPTURE: usize = 64 * 1024;

/// Bytes of an execution's input kept in the journal: a longer one (a
/// template may build up to 16 MiB) is kept as a string saying its size.
const MAX_INPUT: usize = 64 * 1024;

/// An execution's input (JSON text) as the journal keeps it.
pub(crate) fn kept_input(input: &str) -> String {
    if input.len() <= MAX_INPUT {
        input.to_owned()
    } else {
        Value::from(format!("[an input of {} bytes, not kept]", input.len())).to_string()
    }
}

/// An attempt as read back: its execution's key and path, the attempt, and
/// the input it was recorded with.
pub(crate) type AttemptRecord = (String, StepPath, Attempt, Option<Value>);

/// JSON as stored: text, so a value reads back with its keys in the order
/// they were written.
pub(crate) fn text(value: &Value) -> String {
    value.to_string()
}

/// Stored text back to JSON.
pub(crate) fn json(text: Option<String>) -> Option<Value> {
    text.and_then(|text| serde_json::from_str(&text).ok())
}

/// Stored text back to a JSON object, if it is one.
pub(crate) fn object(text: Option<String>) -> Option<serde_json::Map<String, Value>> {
    match json(text) {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Free text as stored: a NUL (which PostgreSQL's text cannot hold, and a
/// guest can print) becomes U+FFFD, on both stores alike.
pub(crate) fn clean(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

fn capped(text: &str) -> String {
    let text = &clean(text);
    if text.len() <= MAX_CAPTURE {
        return text.to_owned();
    }
    let mut end = MAX_CAPTURE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[... {} more bytes not kept in the journal]", &text[..end], text.len() - end)
}

fn capped_logs(attempt: &Attempt) -> String {
    let logs = serde_json::to_value(&attempt.logs).unwrap_or(Value::Null);
    let all = text(&logs);
    if all.len() <= MAX_CAPTURE {
        return all;
    }
    // Keep whole records, as many as fit.
    let mut kept = Vec::new();
    let mut size = 0;
    for record in logs.as_array().into_iter().flatten() {
        size += text(record).len();
        if size > MAX_CAPTURE {
            break;
        }
        kept.push(record.clone());
    }
    let dropped = attempt.logs.len() - kept.len();
    kept.push(serde_json::json!({ "level": "warn", "context": "stepbox", "message": format!("{dropped} more log records not kept in the journal") }));
    text(&Value::Array(kept))
}

/// An attempt's fields in a log record ([`super::log`]), and its columns
/// in the tables of the stores' earlier schemas.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct AttemptRow {
    #[serde(rename = "attempt")]
    pub(crate) number: u32,
    #[serde(deserialize_with = "status_named")]
    pub(crate) status: StatusName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<FailureKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<String>,
    #[serde(default, deserialize_with = "number")]
    pub(crate) started: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) finished: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    pub(crate) delay: f64,
    #[serde(default)]
    pub(crate) fuel: i64,
    #[serde(default)]
    pub(crate) peak_memory: i64,
    /// The log records' JSON text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) logs: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) stdout: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) stderr: String,
}

/// A number as JSON holds it, where `null` (serde_json's text for a
/// number that is not finite) reads as 0: no number can make a log
/// unreadable.
pub(crate) fn number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(deserializer)?.unwrap_or_default())
}

/// An attempt's status as [`attempt_status`] names it. An alias, so that
/// serde does not take the field for text borrowed from the input.
pub(crate) type StatusName = &'static str;

fn status_named<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<&'static str, D::Error> {
    let stored: std::borrow::Cow<'de, str> = serde::Deserialize::deserialize(deserializer)?;
    Ok(attempt_status(&stored))
}

impl AttemptRow {
    pub(crate) fn of(attempt: &Attempt) -> Self {
        let failure = attempt.failure();
        AttemptRow {
            number: attempt.attempt,
            status: attempt.outcome.as_str(),
            kind: failure.map(|f| f.kind),
            message: failure.map(|f| clean(&f.message)),
            started: attempt.started_ms,
            finished: attempt.finished_ms,
            delay: attempt.delay_before_ms,
            fuel: i64::try_from(attempt.fuel_consumed).unwrap_or(i64::MAX),
            peak_memory: i64::try_from(attempt.peak_memory).unwrap_or(i64::MAX),
            logs: capped_logs(attempt),
            stdout: capped(&attempt.stdout.text),
            stderr: capped(&attempt.stderr.text),
        }
    }

    /// An attempt that started and has not ended.
    pub(crate) fn running(number: u32, started: f64, delay: f64) -> Self {
        AttemptRow {
            number,
            status: "running",
            kind: None,
            message: None,
            started,
            finished: None,
            delay,
            fuel: 0,
            peak_memory: 0,
            logs: String::new(),
            stdout: String::new(),
            stderr: String::new(),
        }
    }

    /// Without its logs, stdout and stderr: what a summary keeps.
    pub(crate) fn drop_bulk(&mut self) {
        (self.logs, self.stdout, self.stderr) = (String::new(), String::new(), String::new());
    }

    /// The attempt back from its columns. A succeeded attempt's output is
    /// its execution's, filled in by [`assemble`].
    pub(crate) fn read(self) -> Attempt {
        let outcome = match (self.status, self.kind) {
            ("running", _) => Outcome::Running,
            ("succeeded", _) => Outcome::Succeeded { output: Value::Null },
            (_, kind) => Outcome::Failed {
                failure: Failure::new(kind.unwrap_or(FailureKind::Trap), self.message.unwrap_or_default()),
            },
        };
        Attempt {
            attempt: self.number,
            outcome,
            started_ms: self.started,
            finished_ms: self.finished,
            delay_before_ms: self.delay,
            fuel_consumed: self.fuel.max(0) as u64,
            peak_memory: self.peak_memory.max(0) as u64,
            logs: json(Some(self.logs)).and_then(|logs| serde_json::from_value(logs).ok()).unwrap_or_default(),
            stdout: Captured { text: self.stdout, dropped_bytes: 0 },
            stderr: Captured { text: self.stderr, dropped_bytes: 0 },
        }
    }
}

/// A stored attempt status as the `'static` name [`AttemptRow`] holds.
pub(crate) fn attempt_status(stored: &str) -> &'static str {
    match stored {
        "running" => "running",
        "succeeded" => "succeeded",
        _ => "failed",
    }
}

/// Whether a lease held by `owner` until `expires_ms` is live: not
/// expired, and its process not known to be gone.
pub(crate) fn held(owner: Option<&str>, expires_ms: Option<i64>) -> bool {
    owner.is_some_and(|owner| expires_ms.is_some_and(|expires| expires as f64 > now_ms()) && !is_gone(owner))
}

/// A lease's expiry `ttl` from now, in unix ms.
pub(crate) fn expiry(ttl: Duration) -> i64 {
    (now_ms() + ttl.as_secs_f64() * 1000.0) as i64
}

/// A run's status as read: a running run whose lease is not live is
/// `interrupted`. With the owner, if its lease is live.
pub(crate) fn run_status(
    stored: RunStatus,
    owner: Option<String>,
    expires_ms: Option<i64>,
) -> (RunStatus, Option<String>) {
    let live = held(owner.as_deref(), expires_ms);
    let status = match stored {
        RunStatus::Running if !live => RunStatus::Interrupted,
        status => status,
    };
    (status, owner.filter(|_| live))
}

/// Nests recorded rows into a report: attempts into their executions,
/// executions into their steps, the steps of included workflows into their
/// include steps. What was recorded only in part (a step still running, an
/// execution between attempts) appears as running.
pub(crate) fn assemble(
    steps: Vec<(i64, StepReport)>,
    executions: Vec<ExecutionReport>,
    attempts: Vec<AttemptRecord>,
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
    for (key, path, mut attempt, input) in attempts {
        let execution = executions.entry(key.clone()).or_insert_with(|| ExecutionReport {
            path,
            item: None,
            idempotency_key: key,
            status: StepStatus::Running,
            output: None,
            error: None,
            reused: false,
            input: None,
            attempts: Vec::new(),
        });
        if let Outcome::Succeeded { output } = &mut attempt.outcome {
            *output = execution.output.clone().unwrap_or(Value::Null);
        }
        if let Some(input) = input {
            execution.input.get_or_insert(input);
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
            input: None,
            reused: false,
            attempts: Vec::new(),
        };
        let attempt = |path: &str, n| {
            let outcome = Outcome::Succeeded { output: Value::Null };
            (format!("r/{path}"), path.parse().unwrap(), Attempt { outcome, ..Attempt::started(n, 1.0) }, None)
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
