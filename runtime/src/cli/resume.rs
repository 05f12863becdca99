//! `stepbox resume` and `stepbox retry`: continuing a recorded run.

use super::client::Client;
use super::run::{HowToRun, execute, follow};
use super::{CliError, Place, admit, open_database};
use crate::run::Run;
use crate::service::{self, CancelLook, Continue, ContinueError};
use crate::store::LEASE_TTL;

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

pub(crate) async fn resume(args: ResumeArgs, place: &Place<'_>, remote: Option<&Client>) -> Result<u8, CliError> {
    match remote {
        Some(client) => continue_remote(client, &args.run_id, "resume", &serde_json::json!({}), &args.how).await,
        None => continue_run(&args.run_id, None, &args.how, place, false).await,
    }
}

pub(crate) async fn retry(args: RetryArgs, place: &Place<'_>, remote: Option<&Client>) -> Result<u8, CliError> {
    match remote {
        Some(client) => {
            let body = serde_json::json!({ "from": args.from });
            continue_remote(client, &args.run_id, "retry", &body, &args.how).await
        }
        None => continue_run(&args.run_id, args.from.as_deref(), &args.how, place, true).await,
    }
}

/// `resume` or `retry` on a server: asks it to continue the run, then
/// follows the run to its end as a local one would be shown.
async fn continue_remote(
    client: &Client,
    run_id: &str,
    action: &str,
    body: &serde_json::Value,
    how: &HowToRun,
) -> Result<u8, CliError> {
    how.local_only()?;
    let _: (Run, bool) = client.post(&["runs", run_id, action], body).await?;
    follow(client, run_id, how.json).await
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox cancel 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47
  stepbox cancel 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47 --server http://127.0.0.1:7433

An interrupted or waiting run is recorded as cancelled at once. A run another stepbox process runs (a
`stepbox run`, a server, a node of a cluster) is asked to stop: that process stops its attempts and
records the run cancelled when it next renews its lease on the run (at once on PostgreSQL).")]
pub(crate) struct CancelArgs {
    /// The run to cancel.
    run_id: String,
}

pub(crate) async fn cancel(args: CancelArgs, place: &Place<'_>, remote: Option<&Client>) -> Result<u8, CliError> {
    let id = &args.run_id;
    if let Some(client) = remote {
        let (run, _): (Run, bool) = client.post(&["runs", id, "cancel"], &serde_json::json!({})).await?;
        eprintln!("cancelling run {}: its running attempts stop", run.id);
        return Ok(0);
    }
    let db = open_database(place)?;
    // A run can change hands while this looks: each turn looks again.
    for _ in 0..3 {
        match service::cancel_elsewhere(db.clone(), id).await? {
            CancelLook::Recorded => {
                eprintln!("run {id} was cancelled");
                return Ok(0);
            }
            CancelLook::Asked => {
                eprintln!(
                    "cancelling run {id}: the process running it stops its attempts and records it cancelled \
                     (within {} at the latest)",
                    humantime::format_duration(LEASE_TTL / 3)
                );
                return Ok(0);
            }
            CancelLook::Finished(status) => {
                return Err(CliError::Usage(format!("run {id} already {status}; there is nothing to cancel")));
            }
            CancelLook::Moved => {}
        }
    }
    Err(CliError::Usage(format!("run {id} kept changing hands while it was being cancelled; try again")))
}

async fn continue_run(
    run_id: &str,
    from: Option<&str>,
    how: &HowToRun,
    place: &Place<'_>,
    retry: bool,
) -> Result<u8, CliError> {
    // Bound before the run is taken over: a bad address leaves it as it was.
    let metrics = how.bind_metrics().await?;
    let db = open_database(place)?;
    let owned =
        service::continue_run(&*db, run_id, Continue { retry, from, ..Continue::default() }, |run, workflow| {
            admit(place, &run.tenant, workflow)
        })
        .map_err(|err| match err {
            ContinueError::Changed(message) => CliError::Invalid(message),
            ContinueError::Invalid(err) => CliError::from(err),
            ContinueError::Store(err) => CliError::from(err),
            err @ (ContinueError::NotRetryable { .. }
            | ContinueError::Succeeded(_)
            | ContinueError::NoSuchStep { .. }
            | ContinueError::Moved { .. }) => CliError::Usage(err.to_string()),
        })?;
    execute(db, owned, how, metrics, place).await
}
