//! Where a run's attempts run: in this process's sandbox ([`Local`]), or
//! on worker processes through the store's queue ([`crate::cluster`]). The
//! scheduler decides what runs and records it; an executor only runs it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::run::{Attempt, Failure, FailureKind, now_ms};
use crate::sandbox::{AttemptRequest, Sandbox, StepComponent};
use crate::workflow::{StepSecret, resolve_secrets};

/// An attempt ready to run, its secrets still names: their values are read
/// where the attempt runs, so a coordinator that hands the attempt to a
/// worker never holds them, nor writes them anywhere.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Everything the attempt needs; its grants have no secrets yet.
    pub request: AttemptRequest,
    /// The secrets to add to its grants, by name.
    pub secrets: BTreeMap<String, StepSecret>,
}

impl Prepared {
    /// The request with its secrets' values, read from the host's
    /// environment or `secrets_dir`; a secret that cannot be read is a
    /// fatal failure of the attempt, which does not run.
    pub fn resolve(self, secrets_dir: Option<&std::path::Path>) -> Result<AttemptRequest, Box<Attempt>> {
        let Prepared { mut request, secrets } = self;
        match resolve_secrets(&secrets, secrets_dir, &mut request.grants) {
            Ok(()) => Ok(request),
            Err(why) => Err(Box::new(Attempt::refused(
                request.context.attempt,
                now_ms(),
                Failure::new(FailureKind::Fatal, why),
            ))),
        }
    }
}

/// The future of one attempt.
pub type Running<'a> = Pin<Box<dyn Future<Output = Attempt> + Send + 'a>>;

/// Told when an attempt starts to run where it runs: a component's rate
/// limit counts its starts by it.
pub type Started<'a> = Box<dyn FnOnce() + Send + 'a>;

/// Runs attempts. Never fails: every way an attempt can end, here or on a
/// worker, is an outcome of the [`Attempt`]. An executor may report an
/// attempt with a higher number than it was given when the tries before it
/// were lost (the worker running them stopped); the scheduler records
/// those as [`FailureKind::Lost`].
pub trait Executor: Send + Sync {
    /// Runs `attempt` of `component`; dropping the future stops it. Calls
    /// `started`, when given, as the attempt starts to run (on a worker,
    /// once the worker says so), or if it ends without being seen to
    /// start.
    fn run<'a>(&'a self, component: &'a StepComponent, attempt: Prepared, started: Option<Started<'a>>) -> Running<'a>;

    /// Waits for attempt `attempt` of execution `key` of run `run_id`, which
    /// an earlier driver of the run started and did not see end, if it
    /// still runs somewhere: its outcome, as [`Executor::run`] gives it.
    /// `None` when it does not (an attempt in a process that died dies with
    /// it), and the scheduler counts it as interrupted.
    fn reattach<'a>(&'a self, run_id: &'a str, key: &'a str, attempt: u32) -> Reattached<'a> {
        let _ = (run_id, key, attempt);
        Box::pin(std::future::ready(None))
    }
}

/// The future of an attempt taken up again, if it still runs.
pub type Reattached<'a> = Pin<Box<dyn Future<Output = Option<Attempt>> + Send + 'a>>;

/// Runs attempts in this process's sandbox, reading secrets from this
/// host.
pub struct Local {
    /// The sandbox.
    pub sandbox: Sandbox,
    /// Where `{ file: NAME }` secrets are read from.
    pub secrets_dir: Option<PathBuf>,
}

impl Executor for Local {
    /// Starts at once (the attempt runs here, so its start is now) and
    /// boxes the sandbox's future itself, not one wrapped around it: an
    /// attempt's future is kilobytes, copied whole each time it is moved.
    fn run<'a>(&'a self, component: &'a StepComponent, attempt: Prepared, started: Option<Started<'a>>) -> Running<'a> {
        if let Some(started) = started {
            started();
        }
        match attempt.resolve(self.secrets_dir.as_deref()) {
            Ok(request) => Box::pin(self.sandbox.run(component, request)),
            Err(refused) => Box::pin(std::future::ready(*refused)),
        }
    }
}
