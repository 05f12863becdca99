use super::{StepState, truncate_with_marker};
use crate::run::{LogLevel, LogRecord};
use crate::sandbox::bindings::wasi::logging::logging::{Host, Level};
use crate::sandbox::host_memory::{HostMemory, HostMemorySpent};
use crate::sandbox::redact::Redactor;

/// Longest single message kept; the rest is cut with a marker.
const MAX_MESSAGE: usize = 16 * 1024;
/// Longest context kept.
const MAX_CONTEXT: usize = 256;

impl From<Level> for LogLevel {
    fn from(level: Level) -> Self {
        match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
            Level::Critical => LogLevel::Critical,
        }
    }
}

/// The log records of one attempt, capped in total bytes and charged to
/// the attempt's host memory.
#[derive(Debug)]
pub(crate) struct LogBuffer {
    step_id: String,
    redactor: Redactor,
    budget: usize,
    memory: HostMemory,
    records: Vec<LogRecord>,
    dropped: u64,
}

impl LogBuffer {
    pub(crate) fn new(step_id: String, budget: usize, redactor: Redactor, memory: HostMemory) -> Self {
        LogBuffer { step_id, redactor, budget, memory, records: Vec::new(), dropped: 0 }
    }

    /// The kept records, plus a final warning record when some were
    /// dropped; the buffer is left empty.
    pub(crate) fn take_records(&mut self) -> Vec<LogRecord> {
        let dropped = std::mem::take(&mut self.dropped);
        if dropped > 0 {
            self.records.push(LogRecord {
                level: LogLevel::Warn,
                context: "stepbox".into(),
                message: format!("{dropped} more log messages dropped: the attempt's log limit was reached"),
            });
        }
        std::mem::take(&mut self.records)
    }

    fn push(&mut self, level: Level, context: String, message: String) -> Result<(), HostMemorySpent> {
        // Redacted before they are cut, so a secret across the cut is
        // replaced whole.
        let (mut context, mut message) = (self.redactor.text(&context), self.redactor.text(&message));
        truncate_with_marker(&mut context, MAX_CONTEXT);
        truncate_with_marker(&mut message, MAX_MESSAGE);
        // At debug level whatever the guest's level: a guest must not be
        // able to flood stepbox's own stderr. The records are in the
        // journal, for `stepbox logs`.
        let step = self.step_id.as_str();
        let level_name = LogLevel::from(level).to_string();
        tracing::debug!(target: "stepbox::guest", step, level = level_name, context, "{message}");
        // A record costs its text and its own size, so empty messages are
        // not free.
        let size = context.len() + message.len() + std::mem::size_of::<LogRecord>();
        if size > self.budget {
            self.dropped += 1;
            return Ok(());
        }
        self.memory.take(size, "log records")?;
        self.budget -= size;
        self.records.push(LogRecord { level: level.into(), context, message });
        Ok(())
    }
}

impl Host for StepState {
    async fn log(&mut self, level: Level, context: String, message: String) -> wasmtime::Result<()> {
        Ok(self.logs.push(level, context, message)?)
    }
}
