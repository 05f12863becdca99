//! A recorded run this process owns: how a new, resumed or retried run is
//! readied for the scheduler, the same for `stepbox run` and `stepbox
//! serve`.

use std::path::Path;
use std::sync::Arc;

use crate::run::{Run, RunStatus, StepPath};
use crate::scheduler::{Dispatcher, RunOptions};
use crate::store::{Journal, LEASE_TTL, Lease, Store, StoreError, this_owner};
use crate::tenant::Tenant;
use crate::workflow::{Inputs, Workflow, WorkflowError, fingerprint_changes};

/// A recorded run this process owns, ready to go: its workflow, its inputs
/// bound, its tenant admitted, its lease held.
pub struct Owned {
    /// The workflow it runs.
    pub workflow: Arc<Workflow>,
    /// The run as recorded.
    pub run: Run,
    /// Its inputs, bound to the workflow's declarations.
    pub inputs: Inputs,
    /// Its tenant, with the ceilings that apply.
    pub tenant: Arc<Tenant>,
    /// The lease this process holds on it.
    pub lease: Lease,
}

impl Owned {
    /// The scheduler's options for this run, journaled to `journal`, its
    /// attempts taking `dispatcher`'s slots at its tenant's share.
    pub fn options(&self, journal: Arc<dyn Journal>, dispatcher: Arc<Dispatcher>) -> RunOptions {
        dispatcher.set_share(&self.tenant.name, self.tenant.share());
        let mut options = RunOptions::new(self.run.id.clone());
        options.labels = self.run.labels.clone();
        options.created_ms = self.run.created_ms;
        options.version = self.run.version;
        options.journal = Some(journal);
        options.max_parallel = dispatcher.slots();
        options.dispatcher = Some(dispatcher);
        options.tenant = self.tenant.clone();
        options
    }
}

/// Why a recorded run cannot continue.
#[derive(Debug, thiserror::Error)]
pub enum ContinueError {
    /// `retry` of a run that did not fail.
    #[error("run {run_id} is {status}; only a failed or cancelled run can be retried")]
    NotRetryable {
        /// The run.
        run_id: String,
        /// Where it stands.
        status: RunStatus,
    },
    /// `resume` of a run that succeeded.
    #[error("run {0} already succeeded; there is nothing to resume (retry it from a step to run steps again)")]
    Succeeded(String),
    /// `retry --from` a step the workflow does not have.
    #[error("the workflow has no step `{step}`; its steps are: {steps}")]
    NoSuchStep {
        /// The step asked for.
        step: String,
        /// The workflow's steps.
        steps: String,
    },
    /// The run's workflow or components changed, or no longer load.
    #[error("{0}")]
    Changed(String),
    /// Another process changed the run while this one took it over.
    #[error("run {run_id} became {status} while it was being taken over; look at it again")]
    Moved {
        /// The run.
        run_id: String,
        /// Where it stands now.
        status: RunStatus,
    },
    /// The workflow is over its tenant's ceilings, or the inputs no longer
    /// bind.
    #[error("{0}")]
    Invalid(#[from] WorkflowError),
    /// The store failed, or another process holds the run.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// How a recorded run is continued.
#[derive(Debug, Clone, Copy, Default)]
pub struct Continue<'a> {
    /// `retry` (a failed or cancelled run) rather than `resume` (what did
    /// not succeed runs).
    pub retry: bool,
    /// With `retry`, the step to run again, with everything after it.
    pub from: Option<&'a str>,
    /// This process's copy of the workflow file (a service node's copy of
    /// the deployed bundle); else where the run recorded it.
    pub file: Option<&'a Path>,
    /// The status the caller saw when it chose to continue the run: the run
    /// is let go if it is not so once its lease is held (another process
    /// finished, resumed or cancelled it meanwhile). `None`: as read here.
    pub seen: Option<RunStatus>,
}

/// Takes over run `run_id` to continue it as `how` says. `admit` gives the
/// run's tenant with its ceilings. The lease is taken before anything is
/// changed, so no other process continues the run at the same time.
pub fn continue_run(
    db: &dyn Store,
    run_id: &str,
    how: Continue<'_>,
    admit: impl FnOnce(&Run, &Workflow) -> Result<Arc<Tenant>, WorkflowError>,
) -> Result<Owned, ContinueError> {
    let Continue { retry, from, file, seen } = how;
    let run = db.load_run(run_id)?;
    if retry && !matches!(run.status, RunStatus::Failed | RunStatus::Cancelled) {
        return Err(ContinueError::NotRetryable { run_id: run_id.to_owned(), status: run.status });
    }
    if !retry && run.status == RunStatus::Succeeded {
        return Err(ContinueError::Succeeded(run_id.to_owned()));
    }
    let lease = db.acquire_lease(run_id, this_owner(), LEASE_TTL)?;
    // Go on only from what the caller looked at.
    let now = db.load_run(run_id)?;
    if !same_standing(now.status, seen.unwrap_or(run.status)) {
        // Queued at once; it commits with the next batch.
        drop(db.release_lease(&lease));
        return Err(ContinueError::Moved { run_id: run_id.to_owned(), status: now.status });
    }
    // A cancel asked of the run's last holder, which stopped before it
    // heard it: the run ends as asked, rather than going on.
    // Queued at once, in order; if they do not commit, the run stays asked
    // and interrupted, for the next to take it up.
    if now.cancel_requested {
        drop(record_cancelled(db, run_id));
        drop(db.release_lease(&lease));
        return Err(ContinueError::Moved { run_id: run_id.to_owned(), status: RunStatus::Cancelled });
    }
    let file = file.unwrap_or(Path::new(&run.workflow_path));
    let workflow = Arc::new(load_unchanged(&run, file, &db.fingerprint(run_id)?)?);
    let tenant = admit(&run, &workflow)?;
    // Bound when the run was created; bound again here because a stored
    // record is data from disk, not a checked value.
    let inputs = workflow.bind_inputs(&run.inputs)?;
    if let Some(from) = from {
        let Some(start) = workflow.step_index(from) else {
            let steps: Vec<&str> = workflow.steps.iter().map(|step| step.id.as_str()).collect();
            return Err(ContinueError::NoSuchStep { step: from.to_owned(), steps: steps.join(", ") });
        };
        let paths: Vec<StepPath> = workflow.downstream(start).map(|i| StepPath::root(&workflow.steps[i].id)).collect();
        db.forget_steps(run_id, &paths)?;
    } else if retry {
        // A waiting step that timed out (or was cancelled) waits afresh,
        // its timeout counted from the retry.
        let report = db.run_report(run_id)?;
        let unsettled: Vec<StepPath> = wait_paths(&workflow, None)
            .into_iter()
            .filter(|path| {
                report.step(&path.to_string()).is_some_and(|step| {
                    matches!(step.status, crate::run::StepStatus::Failed | crate::run::StepStatus::Cancelled)
                })
            })
            .collect();
        db.forget_steps(run_id, &unsettled)?;
    }
    db.reopen_run(run_id)?;
    Ok(Owned { workflow, run, inputs, tenant, lease })
}

/// Whether a run that was `seen` so still stands as it did: an interrupted
/// run is a running one whose holder is gone.
pub(crate) fn same_standing(now: RunStatus, seen: RunStatus) -> bool {
    let settled = |status| if status == RunStatus::Interrupted { RunStatus::Running } else { status };
    settled(now) == settled(seen)
}

/// What one look at cancelling a run that this process does not drive
/// came to.
pub(crate) enum CancelLook {
    /// It was interrupted or waiting, and is now recorded cancelled.
    Recorded,
    /// Another process runs it and was asked to cancel it: it does when it
    /// hears, at its next lease renewal at the latest.
    Asked,
    /// It had finished, as this.
    Finished(RunStatus),
    /// It changed hands while this looked (taken up, resumed or finished
    /// meanwhile): look again.
    Moved,
}

/// Looks at run `id` once and cancels it as it stands: an interrupted or
/// waiting run is recorded cancelled under its lease, if it still stands
/// so once the lease is held (a resume or a finished retry meanwhile is
/// not overwritten); a running one's holder is asked to cancel it. Shared
/// by `stepbox cancel` and the service, whose own drives it stops itself.
pub(crate) async fn cancel_elsewhere(db: Arc<dyn Store>, id: &str) -> Result<CancelLook, StoreError> {
    let wanted = id.to_owned();
    let store = db.clone();
    let looked = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let seen = store.load_run(&wanted)?.status;
        match seen {
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled => Ok((CancelLook::Finished(seen), None)),
            RunStatus::Running => {
                let asked = store.request_cancel(&wanted)?;
                Ok((if asked { CancelLook::Asked } else { CancelLook::Moved }, None))
            }
            RunStatus::Interrupted | RunStatus::Waiting => {
                let lease = match store.acquire_lease(&wanted, this_owner(), LEASE_TTL) {
                    Err(StoreError::Leased { .. }) => return Ok((CancelLook::Moved, None)),
                    lease => lease?,
                };
                let standing = same_standing(store.load_run(&wanted)?.status, seen);
                Ok((if standing { CancelLook::Recorded } else { CancelLook::Moved }, Some(lease)))
            }
        }
    })
    .await
    .map_err(|err| StoreError::Database { place: "the cancel".into(), detail: err.to_string() })??;
    let (look, lease) = looked;
    if let Some(lease) = lease {
        if matches!(look, CancelLook::Recorded) {
            record_cancelled(&*db, id).await?;
        }
        db.release_lease(&lease).await?;
    }
    Ok(look)
}

/// Records run `run_id`, whose lease the caller holds and which no process
/// runs, as cancelled.
fn record_cancelled(db: &dyn Journal, run_id: &str) -> crate::store::Durable {
    db.run_finished(run_id, RunStatus::Cancelled, &serde_json::Map::new(), Some("cancelled while it did not run"))
}

/// The run's workflow from `path`, if neither it nor its components
/// changed since the run was created with `fingerprint`.
fn load_unchanged(run: &Run, path: &Path, fingerprint: &serde_json::Value) -> Result<Workflow, ContinueError> {
    let mut workflow = Workflow::load(path)
        .map_err(|err| ContinueError::Changed(format!("error: the run's workflow no longer loads:\n{err}")))?;
    let now = workflow
        .pin()
        .map_err(|err| ContinueError::Changed(format!("error: cannot read the workflow's files: {err}")))?;
    let changes = fingerprint_changes(fingerprint, &now);
    if !changes.is_empty() {
        return Err(ContinueError::Changed(format!(
            "error: run {} cannot continue: since it started, {} ({}); start a new run",
            run.id,
            changes.join(", "),
            path.display()
        )));
    }
    Ok(workflow)
}

/// The paths of `workflow`'s waiting steps, in its literal includes too.
fn wait_paths(workflow: &Workflow, parent: Option<&StepPath>) -> Vec<StepPath> {
    let mut paths = Vec::new();
    for step in &workflow.steps {
        let path = parent.map_or_else(|| StepPath::root(&step.id), |parent| parent.child(&step.id));
        match &step.action {
            crate::workflow::Action::Wait { .. } => paths.push(path),
            crate::workflow::Action::Include { workflow: Some(included), .. } => {
                paths.extend(wait_paths(included, Some(&path)));
            }
            _ => {}
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Database, History, wait};

    /// A store holding run `r` (of a workflow file that is gone), created
    /// and held by this process.
    fn created(dir: &Path) -> (Database, Lease) {
        let db = Database::open(dir).unwrap();
        let run = Run::new("r".into(), "w", "/nowhere/w.yaml", "t", Default::default());
        let (lease, created) = db.create_run(&run, &serde_json::Value::Null);
        wait(created).unwrap();
        (db, lease)
    }

    #[test]
    fn a_run_another_process_finished_after_it_was_seen_interrupted_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let (db, lease) = created(dir.path());
        wait(db.release_lease(&lease)).unwrap();
        assert_eq!(db.load_run("r").unwrap().status, RunStatus::Interrupted);
        // Seen interrupted; finished by another process before the lease.
        wait(db.run_finished("r", RunStatus::Failed, &serde_json::Map::new(), None)).unwrap();
        let seen = Continue { seen: Some(RunStatus::Interrupted), ..Continue::default() };
        let err = continue_run(&db, "r", seen, |_, _| unreachable!("never admitted")).err().unwrap();
        assert!(matches!(err, ContinueError::Moved { status: RunStatus::Failed, .. }), "{err}");
        assert_eq!(db.load_run("r").unwrap().status, RunStatus::Failed, "left as it was");
        // The lease was let go: another process may take the run.
        std::thread::sleep(std::time::Duration::from_millis(50));
        db.acquire_lease("r", "another:1:abcdef12", LEASE_TTL).unwrap();
    }

    #[test]
    fn a_run_whose_holder_died_before_it_heard_a_cancel_is_recorded_cancelled_by_whoever_takes_it_up() {
        let dir = tempfile::tempdir().unwrap();
        let (db, lease) = created(dir.path());
        assert!(db.request_cancel("r").unwrap());
        // Its holder dies without renewing: the run is interrupted, asked.
        wait(db.release_lease(&lease)).unwrap();
        assert_eq!(db.load_run("r").unwrap().status, RunStatus::Interrupted);
        let err = continue_run(&db, "r", Continue::default(), |_, _| unreachable!("never admitted")).err().unwrap();
        assert!(matches!(err, ContinueError::Moved { status: RunStatus::Cancelled, .. }), "{err}");
        // Queued records: a later one commits after them.
        wait(db.run_parked("elsewhere")).unwrap();
        let now = db.load_run("r").unwrap();
        assert_eq!((now.status, now.cancel_requested), (RunStatus::Cancelled, false));
        assert_eq!(now.error.as_deref(), Some("cancelled while it did not run"));
        // Retried, it runs again: the ask ended with the run.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let retry = Continue { retry: true, ..Continue::default() };
        let err = continue_run(&db, "r", retry, |_, _| unreachable!("the file is gone")).err().unwrap();
        assert!(matches!(err, ContinueError::Changed(_)), "it went on to load the workflow: {err}");
    }
}
