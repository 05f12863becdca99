//! What an attempt produced: its output or a classified failure, and what it
//! used.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::capture::Captured;
use super::host::logging::LogRecord;

/// Why an attempt failed. Retry policies decide by this class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
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
}

impl FailureKind {
    /// Every class, in the order of the documentation.
    pub const ALL: [FailureKind; 11] = [
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
    ];

    /// Whether another attempt might succeed when nothing else is said: the
    /// step asked for it, or the failure may be transient. Limits that a
    /// deterministic guest hits the same way every time are not retried.
    pub fn retryable_by_default(self) -> bool {
        matches!(self, FailureKind::Retryable | FailureKind::Timeout | FailureKind::Trap)
    }

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
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed attempt: its class and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure { kind, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Succeeded { output: serde_json::Value },
    Failed(Failure),
}

/// Everything known about one finished attempt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptReport {
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Wall-clock time from instantiation to the end of the call.
    #[serde(rename = "duration_ms", serialize_with = "as_millis")]
    pub duration: Duration,
    pub fuel_consumed: u64,
    /// The most linear memory the instance held at once, in bytes.
    pub peak_memory: u64,
    pub logs: Vec<LogRecord>,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl AttemptReport {
    pub fn output(&self) -> Option<&serde_json::Value> {
        match &self.outcome {
            Outcome::Succeeded { output } => Some(output),
            Outcome::Failed(_) => None,
        }
    }

    pub fn failure(&self) -> Option<&Failure> {
        match &self.outcome {
            Outcome::Succeeded { .. } => None,
            Outcome::Failed(failure) => Some(failure),
        }
    }
}

fn as_millis<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64() * 1000.0)
}
