//! `stepbox resume` and `stepbox retry`: continuing a recorded run.

use super::run::{HowToRun, execute};
use super::{CliError, Place, admit, open_database};
use crate::service::{self, ContinueError};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox resume 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47

Steps that succeeded keep their recorded outputs and do not run again; interrupted attempts run again
with the same idempotency key. A run whose workflow file or components changed since it started is
refused.")]
pub(crate) struct ResumeArgs {
    /// The run to continue (see `stepbox runs`).
    run_id: String,
    #[command(flatten)]
    how: HowToRun,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox retry 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47
  stepbox retry 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47 --from charge

Without --from, the failed steps run again and what succeeded is reused. With --from, that step and
every step after it run again too.")]
pub(crate) struct RetryArgs {
    /// The failed run (see `stepbox runs --status failed`).
    run_id: String,
    /// Run this step and everything that depends on it again.
    #[arg(long, value_name = "STEP")]
    from: Option<String>,
    #[command(flatten)]
    how: HowToRun,
}

pub(crate) async fn resume(args: ResumeArgs, place: &Place<'_>) -> Result<u8, CliError> {
    continue_run(&args.run_id, None, &args.how, place, false).await
}

pub(crate) async fn retry(args: RetryArgs, place: &Place<'_>) -> Result<u8, CliError> {
    continue_run(&args.run_id, args.from.as_deref(), &args.how, place, true).await
}

async fn continue_run(
    run_id: &str,
    from: Option<&str>,
    how: &HowToRun,
    place: &Place<'_>,
    retry: bool,
) -> Result<u8, CliError> {
    let db = open_database(place.data_dir)?;
    let owned = service::continue_run(&db, run_id, from, retry, |run, workflow| admit(place, &run.tenant, workflow))
        .map_err(|err| match err {
            ContinueError::Changed(message) => CliError::Invalid(message),
            ContinueError::Invalid(err) => CliError::from(err),
            ContinueError::Store(err) => CliError::from(err),
            err @ (ContinueError::NotRetryable { .. }
            | ContinueError::Succeeded(_)
            | ContinueError::NoSuchStep { .. }) => CliError::Usage(err.to_string()),
        })?;
    execute(db, owned, how, place.secrets_dir).await
}
