//! `stepbox resume` and `stepbox retry`: continuing a recorded run.

use std::path::PathBuf;
use std::sync::Arc;

use super::run::{HowToRun, Owned, execute};
use super::{CliError, Place, admit, open_database};
use crate::run::{Run, RunStatus, StepPath};
use crate::store::{History, Journal, LEASE_TTL, this_owner};
use crate::workflow::{Workflow, fingerprint_changes};

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
    let run = db.load_run(run_id)?;
    if retry && !matches!(run.status, RunStatus::Failed | RunStatus::Cancelled) {
        return Err(CliError::Usage(format!(
            "run {run_id} is {}; only a failed or cancelled run can be retried",
            run.status
        )));
    }
    if !retry && run.status == RunStatus::Succeeded {
        return Err(CliError::Usage(format!(
            "run {run_id} already succeeded; there is nothing to resume (`stepbox retry --from STEP` runs steps again)"
        )));
    }
    // Held from here, so no other process continues it at the same time;
    // refused while the process running it lives.
    let lease = db.acquire_lease(run_id, this_owner(), LEASE_TTL)?;
    let workflow = Arc::new(load_unchanged(&run, &db.fingerprint(run_id)?)?);
    let tenant = admit(place, &run.tenant, &workflow)?;
    // Bound when the run was created; bound again here because a stored
    // record is data from disk, not a checked value.
    let inputs = workflow.bind_inputs(&run.inputs)?;
    if let Some(from) = from {
        let Some(start) = workflow.step_index(from) else {
            let ids: Vec<&str> = workflow.steps.iter().map(|step| step.id.as_str()).collect();
            return Err(CliError::Usage(format!(
                "the workflow has no step `{from}`; its steps are: {}",
                ids.join(", ")
            )));
        };
        let paths: Vec<StepPath> = workflow.downstream(start).map(|i| StepPath::root(&workflow.steps[i].id)).collect();
        db.forget_steps(run_id, &paths)?;
    }
    db.reopen_run(run_id)?;
    execute(db, Owned { workflow, run, inputs, tenant, lease }, how, place.secrets_dir).await
}

/// The run's workflow, if neither it nor its components changed since the
/// run was created with `fingerprint`.
fn load_unchanged(run: &Run, fingerprint: &serde_json::Value) -> Result<Workflow, CliError> {
    let path = PathBuf::from(&run.workflow_path);
    let workflow = Workflow::load(&path)
        .map_err(|err| CliError::Invalid(format!("error: the run's workflow no longer loads:\n{err}")))?;
    let now = workflow
        .fingerprint()
        .map_err(|err| CliError::Invalid(format!("error: cannot read the workflow's files: {err}")))?;
    let changes = fingerprint_changes(fingerprint, &now);
    if !changes.is_empty() {
        return Err(CliError::Invalid(format!(
            "error: run {} cannot continue: since it started, {} ({}); start a new run with `stepbox run`",
            run.id,
            changes.join(", "),
            path.display()
        )));
    }
    Ok(workflow)
}
