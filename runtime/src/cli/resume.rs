//! `stepbox resume` and `stepbox retry`: continuing a recorded run.

use std::path::PathBuf;
use std::sync::Arc;

use crate::store::StoredRun;
use crate::workflow::{Workflow, fingerprint_changes};

use super::run::{HowToRun, execute};
use super::{Place, exit, open_database, tenant_policy};

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

pub(crate) async fn resume(args: ResumeArgs, place: &Place<'_>) -> u8 {
    continue_run(&args.run_id, None, &args.how, place, false).await
}

pub(crate) async fn retry(args: RetryArgs, place: &Place<'_>) -> u8 {
    continue_run(&args.run_id, args.from.as_deref(), &args.how, place, true).await
}

async fn continue_run(run_id: &str, from: Option<&str>, how: &HowToRun, place: &Place<'_>, retry: bool) -> u8 {
    let Some(db) = open_database(place.data_dir) else { return exit::STEP_FAILED };
    let run = match db.load_run(run_id) {
        Ok(run) => run,
        Err(err) => {
            eprintln!("error: {err}");
            return exit::USAGE;
        }
    };
    if retry && !matches!(run.status.as_str(), "failed" | "cancelled") {
        eprintln!("error: run {run_id} is {}; only a failed or cancelled run can be retried", run.status);
        return exit::USAGE;
    }
    if !retry && run.status == "succeeded" {
        eprintln!(
            "error: run {run_id} already succeeded; there is nothing to resume (`stepbox retry --from STEP` runs steps again)"
        );
        return exit::USAGE;
    }
    let workflow = match load_unchanged(&run) {
        Ok(workflow) => Arc::new(workflow),
        Err(message) => {
            eprintln!("error: {message}");
            return exit::INVALID_COMPONENT;
        }
    };
    let policy = match tenant_policy(place, &run.tenant, &workflow) {
        Ok(policy) => policy,
        Err(code) => return code,
    };
    // Bound when the run was created; bound again here because a stored
    // record is data from disk, not a checked value.
    let inputs = match workflow.bind_inputs(&run.inputs.as_object().cloned().unwrap_or_default()) {
        Ok(inputs) => inputs,
        Err(err) => {
            eprintln!("{err}");
            return exit::INVALID_COMPONENT;
        }
    };
    if let Some(from) = from {
        let Some(start) = workflow.step_index(from) else {
            let ids: Vec<&str> = workflow.steps.iter().map(|step| step.id.as_str()).collect();
            eprintln!("error: the workflow has no step `{from}`; its steps are: {}", ids.join(", "));
            return exit::USAGE;
        };
        let ids: Vec<String> = workflow.downstream(start).map(|i| workflow.steps[i].id.clone()).collect();
        if let Err(err) = db.forget_steps(run_id, &ids) {
            eprintln!("error: {err}");
            return exit::STEP_FAILED;
        }
    }
    if let Err(err) = db.reopen_run(run_id) {
        eprintln!("error: {err}");
        return exit::STEP_FAILED;
    }
    execute(db, workflow, run.id.clone(), run.tenant.clone(), inputs, how, policy).await
}

/// The run's workflow, if neither it nor its components changed.
fn load_unchanged(run: &StoredRun) -> Result<Workflow, String> {
    let path = PathBuf::from(&run.workflow_path);
    let workflow = Workflow::load(&path).map_err(|err| format!("the run's workflow no longer loads:\n{err}"))?;
    let now = workflow.fingerprint().map_err(|err| format!("cannot read the workflow's files: {err}"))?;
    let changes = fingerprint_changes(&run.fingerprint, &now);
    if !changes.is_empty() {
        return Err(format!(
            "run {} cannot continue: since it started, {} ({}); start a new run with `stepbox run`",
            run.id,
            changes.join(", "),
            path.display()
        ));
    }
    Ok(workflow)
}
