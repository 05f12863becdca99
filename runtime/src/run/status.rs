//! The statuses of runs, steps and executions, as one enum each from the
//! scheduler to the journal (where they are stored as their names) to the
//! CLI.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Started and not finished, and held by a live process.
    Running,
    /// Started and not finished, but the process that ran it is gone (its
    /// lease expired, or it died on this machine): `stepbox resume`
    /// continues it. Never stored; read from a running run's lease.
    Interrupted,
    /// Every required step succeeded.
    Succeeded,
    /// A required step failed, or the run had to stop.
    Failed,
    /// It was cancelled (Ctrl-C, SIGTERM, an API call).
    Cancelled,
    /// Unfinished, parked until an event it waits for is sent to it (or its
    /// wait times out): no process holds it meanwhile.
    Waiting,
}

/// Where a step, or one execution of it, stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Waiting for its dependencies.
    Pending,
    /// Started and not finished.
    Running,
    /// It succeeded.
    Succeeded,
    /// It failed.
    Failed,
    /// It did not run: `when` was false, a dependency failed, or it is an
    /// `on_failure` handler of a step that did not fail.
    Skipped,
    /// The run was cancelled before or while it ran.
    Cancelled,
    /// A waiting step whose event has not come; the run is parked.
    Waiting,
}

/// The name of each variant, as serde writes it, both ways.
macro_rules! named {
    ($type:ident { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $type {
            /// Every value.
            pub const ALL: &[$type] = &[$($type::$variant),*];

            /// The name, as stored and printed.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($type::$variant => $name),*
                }
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $type {
            type Err = String;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                $type::ALL.iter().copied().find(|value| value.as_str() == text).ok_or_else(|| {
                    let names: Vec<&str> = $type::ALL.iter().map(|value| value.as_str()).collect();
                    format!("`{text}` is not a status; use one of {}", names.join(", "))
                })
            }
        }
    };
}

named!(RunStatus {
    Running => "running",
    Interrupted => "interrupted",
    Succeeded => "succeeded",
    Failed => "failed",
    Cancelled => "cancelled",
    Waiting => "waiting",
});
named!(StepStatus {
    Pending => "pending",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Skipped => "skipped",
    Cancelled => "cancelled",
    Waiting => "waiting",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for &status in StepStatus::ALL {
            assert_eq!(status.as_str().parse::<StepStatus>(), Ok(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        for &status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>(), Ok(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        assert!(
            "done".parse::<RunStatus>().unwrap_err().contains("running, interrupted, succeeded, failed, cancelled")
        );
    }
}
