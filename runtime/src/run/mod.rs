//! What a run is and what it did: its steps' paths, statuses, attempts and
//! reports. One type per concept from the sandbox (which runs an
//! [`Attempt`]) through the scheduler and the journal to the reports and
//! the CLI. Plain data: this module depends on nothing else of stepbox.

mod attempt;
mod path;
mod report;
mod status;

pub use attempt::{Attempt, Captured, Failure, FailureKind, LogLevel, LogRecord, Outcome};
pub use path::StepPath;
pub use report::{ExecutionReport, Run, RunReport, StepReport};
pub use status::{RunStatus, StepStatus};

/// The current time in unix milliseconds, as every record keeps it.
pub fn now_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}
