use std::fmt;

use crate::bindings::stepbox::step::types::StepError as WitStepError;

/// Why a step failed: either worth another attempt or not.
///
/// `?` converts any [`std::error::Error`] into a fatal `StepError`, so that an
/// unexpected error never causes blind retries; mark transient failures with
/// [`StepError::retryable`] (or [`StepError::into_retryable`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    retryable: bool,
    message: String,
}

impl StepError {
    /// A transient failure: the retry policy may run another attempt.
    pub fn retryable(message: impl fmt::Display) -> Self {
        StepError { retryable: true, message: message.to_string() }
    }

    /// A permanent failure: retrying will not help, so stepbox does not.
    pub fn fatal(message: impl fmt::Display) -> Self {
        StepError { retryable: false, message: message.to_string() }
    }

    /// The same error, marked retryable.
    pub fn into_retryable(self) -> Self {
        StepError { retryable: true, ..self }
    }

    /// Whether another attempt could succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message the step gave.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn into_wit(self) -> WitStepError {
        if self.retryable { WitStepError::Retryable(self.message) } else { WitStepError::Fatal(self.message) }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable { "retryable" } else { "fatal" };
        write!(f, "{kind}: {}", self.message)
    }
}

/// Any error becomes a fatal step error; its sources are kept in the message.
/// (`StepError` itself does not implement `std::error::Error`, which is what
/// makes this blanket conversion possible, as with `anyhow::Error`.)
impl<E: std::error::Error> From<E> for StepError {
    fn from(err: E) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        StepError::fatal(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_makes_any_error_fatal() {
        fn parse(text: &str) -> Result<u32, StepError> {
            Ok(text.parse::<u32>()?)
        }
        let err = parse("x").unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.message(), "invalid digit found in string");
    }

    #[test]
    fn retryable_errors_map_to_the_retryable_case() {
        let err = StepError::fatal("busy").into_retryable();
        assert_eq!(err.to_string(), "retryable: busy");
        assert!(matches!(err.into_wit(), WitStepError::Retryable(m) if m == "busy"));
    }
}
