//! One attempt of one execution: the sandbox runs it and measures it, the
//! scheduler numbers and times it, the journal records it, and reports and
//! `stepbox show` print it, all as the same [`Attempt`].

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    /// 1 for an execution's first attempt; numbers count on across resumes.
    pub attempt: u32,
    /// How it ended (`running` until it does).
    #[serde(flatten)]
    pub outcome: Outcome,
    /// When it started, in unix milliseconds: when it got its slot, or when
    /// it was refused (an open circuit) or cancelled before it could run.
    pub started_ms: f64,
    /// When it ended, in unix milliseconds; `None` while it runs.
    pub finished_ms: Option<f64>,
    /// The backoff waited before it, in milliseconds.
    pub delay_before_ms: f64,
    /// Fuel used, about one unit per wasm instruction.
    pub fuel_consumed: u64,
    /// The most linear memory the instance held at once, in bytes.
    pub peak_memory: u64,
    /// What the step logged through `wasi:logging`.
    pub logs: Vec<LogRecord>,
    /// What the step wrote to stdout (a command's stdout is its output and
    /// is not kept twice).
    pub stdout: Captured,
    /// What the step wrote to stderr.
    pub stderr: Captured,
}

impl Attempt {
    /// Lets go of the logs, stdout and stderr once the journal holds them,
    /// so a run's memory does not grow with what its attempts printed. The
    /// counts of dropped bytes stay.
    pub fn forget_records(&mut self) {
        self.logs = Vec::new();
        self.stdout.text = String::new();
        self.stderr.text = String::new();
    }

    /// An attempt that has started at `started_ms` and measured nothing yet.
    pub fn started(attempt: u32, started_ms: f64) -> Self {
        Attempt {
            attempt,
            outcome: Outcome::Running,
            started_ms,
            finished_ms: None,
            delay_before_ms: 0.0,
            fuel_consumed: 0,
            peak_memory: 0,
            logs: Vec::new(),
            stdout: Captured::default(),
            stderr: Captured::default(),
        }
    }

    /// An attempt that ended at once with `failure`, without running.
    pub fn refused(attempt: u32, at_ms: f64, failure: Failure) -> Self {
        Attempt { outcome: Outcome::Failed { failure }, finished_ms: Some(at_ms), ..Attempt::started(attempt, at_ms) }
    }

    /// The output, when it succeeded.
    pub fn output(&self) -> Option<&Value> {
        match &self.outcome {
            Outcome::Succeeded { output } => Some(output),
            _ => None,
        }
    }

    /// Why it failed, when it did.
    pub fn failure(&self) -> Option<&Failure> {
        match &self.outcome {
            Outcome::Failed { failure } => Some(failure),
            _ => None,
        }
    }

    /// How long it ran, in milliseconds (so far, while it runs: 0).
    pub fn duration_ms(&self) -> f64 {
        self.finished_ms.map_or(0.0, |finished| (finished - self.started_ms).max(0.0))
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// It has not ended (or its process died before it did).
    Running,
    /// The step returned this output.
    Succeeded {
        /// The step's output.
        output: Value,
    },
    /// It failed, for this reason.
    Failed {
        /// Its class and message.
        failure: Failure,
    },
}

impl Outcome {
    /// `running`, `succeeded` or `failed`: how the journal stores it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed { .. } => "failed",
        }
    }
}

/// Why an attempt failed. Retry policies decide by this class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The attempt ran past its wall-clock timeout.
    Timeout,
    /// The attempt used up its fuel.
    OutOfFuel,
    /// The attempt tried to grow its memory (or a table) past its limit.
    MemoryLimit,
    /// The guest's call stack overflowed.
    StackOverflow,
    /// The guest trapped: a panic, an out-of-bounds access, an exit call.
    Trap,
    /// The step returned more output than allowed.
    OutputLimit,
    /// The step reported a failure worth retrying.
    Retryable,
    /// The step reported a permanent failure.
    Fatal,
    /// The component could not be loaded as a step.
    InvalidComponent,
    /// The attempt was stopped because the run was cancelled.
    Cancelled,
    /// The component's circuit breaker was open, so the attempt did not run.
    CircuitOpen,
    /// The worker running the attempt stopped (killed, paused, cut off)
    /// before it reported, and another worker ran the execution again: the
    /// attempt counts, like one a crash interrupted, but no policy decides
    /// about it.
    Lost,
}

impl FailureKind {
    /// Every class, in the order of the documentation.
    pub const ALL: [FailureKind; 12] = [
        FailureKind::Timeout,
        FailureKind::OutOfFuel,
        FailureKind::MemoryLimit,
        FailureKind::StackOverflow,
        FailureKind::Trap,
        FailureKind::OutputLimit,
        FailureKind::Retryable,
        FailureKind::Fatal,
        FailureKind::InvalidComponent,
        FailureKind::Cancelled,
        FailureKind::CircuitOpen,
        FailureKind::Lost,
    ];

    /// Whether another attempt might succeed when nothing else is said: the
    /// step asked for it, or the failure may be transient. Limits that a
    /// deterministic guest hits the same way every time are not retried.
    pub fn retryable_by_default(self) -> bool {
        matches!(self, FailureKind::Retryable | FailureKind::Timeout | FailureKind::Trap)
    }

    /// The class as written in workflow files and records.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::OutOfFuel => "out-of-fuel",
            FailureKind::MemoryLimit => "memory-limit",
            FailureKind::StackOverflow => "stack-overflow",
            FailureKind::Trap => "trap",
            FailureKind::OutputLimit => "output-limit",
            FailureKind::Retryable => "retryable",
            FailureKind::Fatal => "fatal",
            FailureKind::InvalidComponent => "invalid-component",
            FailureKind::Cancelled => "cancelled",
            FailureKind::CircuitOpen => "circuit-open",
            FailureKind::Lost => "lost",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FailureKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        FailureKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| format!("`{text}` is not a failure class"))
    }
}

/// A failed attempt: its class and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Failure {
    /// The class retry policies decide by.
    pub kind: FailureKind,
    /// What happened, for people.
    pub message: String,
}

impl Failure {
    /// A failure of class `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure { kind, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// What a guest wrote to one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Captured {
    /// The kept bytes as text (invalid UTF-8 replaced), ending with a
    /// `[... N more bytes dropped]` marker when the stream went over its cap.
    pub text: String,
    /// How many bytes were dropped.
    pub dropped_bytes: u64,
}

impl Captured {
    /// Whether some of what was written was dropped.
    pub fn is_truncated(&self) -> bool {
        self.dropped_bytes > 0
    }
}

/// A log message a step sent through `wasi:logging`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogRecord {
    /// How severe.
    pub level: LogLevel,
    /// The context the step gave (its step id when it gave none).
    pub context: String,
    /// The message.
    pub message: String,
}

/// The level of a log message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)] // the levels of `wasi:logging`
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
        })
    }
}
