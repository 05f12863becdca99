//! The one error type of the CLI: each command returns its exit code or a
//! [`CliError`], which is printed once, in one place, with its exit code.

use crate::sandbox::LoadError;
use crate::store::StoreError;
use crate::workflow::WorkflowError;

/// Exit codes shared by every command.
pub(crate) mod exit {
    /// A step or run failed (or the command could not do its work).
    pub(crate) const FAILED: u8 = 1;
    /// A bad flag, argument or input.
    pub(crate) const USAGE: u8 = 2;
    /// The workflow, a component or the tenants file is not valid.
    pub(crate) const INVALID: u8 = 3;
    /// The run waits for an event.
    pub(crate) const WAITING: u8 = 4;
    /// The run was cancelled.
    pub(crate) const CANCELLED: u8 = 130;
}

/// Why a command stopped without doing its work. Each message names the
/// problem and what to do about it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// A bad flag, argument or input (exit 2).
    #[error("error: {0}")]
    Usage(String),
    /// A workflow, component or tenants file that is not valid (exit 3):
    /// its diagnostics, each with its place.
    #[error("{0}")]
    Invalid(String),
    /// Anything else that stopped the command (exit 1).
    #[error("error: {0}")]
    Failed(String),
}

impl CliError {
    /// Prints the error on stderr; returns its exit code.
    pub(crate) fn print(self) -> u8 {
        eprintln!("{self}");
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Invalid(_) => exit::INVALID,
            CliError::Failed(_) => exit::FAILED,
        }
    }
}

impl From<WorkflowError> for CliError {
    fn from(err: WorkflowError) -> Self {
        CliError::Invalid(err.to_string())
    }
}

impl From<LoadError> for CliError {
    fn from(err: LoadError) -> Self {
        CliError::Invalid(format!("error: {err}"))
    }
}

impl From<StoreError> for CliError {
    fn from(err: StoreError) -> Self {
        match err {
            // The user named a run that is not there.
            StoreError::NoSuchRun(_) => CliError::Usage(err.to_string()),
            // Another process runs it: not now.
            StoreError::Leased { .. } => CliError::Usage(err.to_string()),
            _ => CliError::Failed(err.to_string()),
        }
    }
}
