//! `stepbox worker`: claims attempts from the queue, runs them in its own
//! sandbox and reports their results, while its claims stay its own.
//!
//! A claim is renewed every third of its lease. When a renewal finds the
//! claim gone (another worker took the task after this one stopped
//! renewing, or the coordinator withdrew it), the attempt is stopped and
//! its result dropped: the store would refuse it anyway.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::wire::{TaskRequest, TaskResult};
use crate::run::{Attempt, Failure, FailureKind, now_ms};
use crate::sandbox::{Sandbox, StepComponent};
use crate::store::{Claim, Claimed, Room, Shares, Store, StoreError};
use crate::tenant::{Tenant, Tenants};

/// How often an idle worker looks for work: at first often, then less
/// while there is none. Where the store wakes it for every new task, only
/// now and then (for claims that expired, which nobody announces): each
/// look in vain takes the claims' turn from every other worker.
const IDLE: (Duration, Duration) = (Duration::from_millis(2), Duration::from_millis(100));
const IDLE_WOKEN: Duration = Duration::from_secs(1);
/// How often a worker with only its reserve free looks for a tenant that
/// may use it without being told (a notice missed, a tenant's claims
/// expired, another's attempts ended).
const RESERVE_LOOK: Duration = Duration::from_secs(1);

/// Components kept compiled, by digest.
const COMPONENTS: NonZeroUsize = NonZeroUsize::new(64).unwrap();

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Attempts run at once.
    pub slots: usize,
    /// Attempts run at once beyond `slots`, for tenants holding less than
    /// the busiest one only ([`Room`]): a newcomer starts at once beside a
    /// tenant that keeps every slot busy.
    pub reserve: usize,
    /// How long a claim holds without renewal: after it, another worker
    /// may take the task.
    pub lease: Duration,
    /// Who this worker is in its claims.
    pub owner: String,
    /// Tenants' ceilings and shares, as the service's own tenants file
    /// sets them. Without one, the worker runs tenant `default` only,
    /// unconstrained, as `stepbox run` does without one.
    pub tenants: Option<Arc<Tenants>>,
    /// Where `{ file: NAME }` secrets are read from.
    pub secrets_dir: Option<PathBuf>,
}

/// What every attempt of a worker shares.
struct Worker {
    store: Arc<dyn Store>,
    sandbox: Sandbox,
    config: WorkerConfig,
    components: Mutex<LruCache<String, StepComponent>>,
}

/// Claims and runs attempts until `stop` is cancelled, then finishes the
/// ones it holds. Store failures are reported and tried again; they never
/// end the worker.
pub async fn work(store: Arc<dyn Store>, sandbox: Sandbox, config: WorkerConfig, stop: CancellationToken) {
    let shares = config.tenants.as_deref().map(Tenants::shares).unwrap_or_default();
    let worker = Arc::new(Worker { store, sandbox, config, components: Mutex::new(LruCache::new(COMPONENTS)) });
    let mut running = JoinSet::new();
    // The queue's task each of them runs.
    let mut holding: HashMap<tokio::task::Id, i64> = HashMap::new();
    let (soon, most_idle) = if worker.store.signals().shared { (IDLE_WOKEN, IDLE_WOKEN) } else { IDLE };
    let mut idle = soon;
    let mut woken = worker.store.signals().tasks.subscribe();
    // A completion anywhere may let a tenant at its max_concurrent go on;
    // looked for only when the last claim left such a tenant's tasks (on
    // every completion, each idle worker would claim in vain: a storm of
    // claims, one at a time, that slowed every worker).
    let mut freed = worker.store.signals().results.subscribe();
    let mut held_back = false;
    // With its own slots full, the worker claims for its reserve only when
    // a tenant its last claim did not pass over has new tasks, or once a
    // while (for notices missed): on every enqueue of the tenants keeping
    // the cluster busy, it would claim in vain.
    let mut announced = worker.store.signals().tenants.subscribe();
    let mut passed_over: HashSet<String> = HashSet::new();
    let mut newcomer = false;
    let mut next_look = Instant::now() + RESERVE_LOOK;
    loop {
        // Seen before claiming, so a task enqueued meanwhile wakes us.
        woken.borrow_and_update();
        freed.borrow_and_update();
        loop {
            match announced.try_recv() {
                Ok(tenant) => newcomer |= may_want_reserve(&passed_over, tenant.as_deref()),
                Err(TryRecvError::Lagged(_)) => newcomer = true,
                Err(_) => break,
            }
        }
        let room = worker.room(running.len());
        let mut claimed = 0;
        if (room.general > 0 || (room.reserve > 0 && newcomer)) && !stop.is_cancelled() {
            newcomer = false;
            next_look = Instant::now() + RESERVE_LOOK;
            match worker.claim(room, &shares).await {
                Ok(claims) => {
                    claimed = claims.claims.len();
                    held_back = claims.held_back;
                    passed_over = claims.passed_over;
                    // The reserve filled up: the newcomer may have more.
                    newcomer = claimed > room.general && claimed == room.total();
                    for claim in claims.claims {
                        // Held here already: the database lost the claim
                        // it runs under in a crash (claims commit without
                        // waiting for the disk) and handed the task out
                        // again, to this worker, under the same token; the
                        // run going on renews and reports it.
                        if holding.values().any(|id| *id == claim.id) {
                            continue;
                        }
                        let id = claim.id;
                        holding.insert(running.spawn(worker.clone().handle(claim)).id(), id);
                    }
                }
                Err(err) => {
                    eprintln!("stepbox worker: cannot claim attempts: {err}; trying again");
                    held_back = true;
                }
            }
        }
        if stop.is_cancelled() && running.is_empty() {
            return;
        }
        if claimed > 0 {
            idle = soon;
            continue;
        }
        let stopping = stop.is_cancelled();
        let room = worker.room(running.len());
        let full = room.general == 0 || stopping;
        let reserve_only = room.general == 0 && room.reserve > 0 && !stopping;
        tokio::select! {
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                holding.remove(&done.map_or_else(|err| err.id(), |(id, ())| id));
                idle = soon;
            }
            () = tokio::time::sleep(idle), if !full => idle = (idle * 2).min(most_idle),
            Ok(()) = woken.changed(), if !full => idle = soon,
            Ok(()) = freed.changed(), if !full && held_back => idle = soon,
            heard = announced.recv(), if reserve_only => {
                newcomer |= heard.map_or(true, |tenant| may_want_reserve(&passed_over, tenant.as_deref()));
            }
            () = tokio::time::sleep_until(next_look.into()), if reserve_only => newcomer = true,
            () = stop.cancelled(), if !stopping => {}
        }
    }
}

/// Whether new tasks of `tenant` (`None`: of any tenant) may be for this
/// worker's reserve: the last claim did not leave that tenant's tasks.
fn may_want_reserve(passed_over: &HashSet<String>, tenant: Option<&str>) -> bool {
    tenant.is_none_or(|tenant| !passed_over.contains(tenant))
}

impl Worker {
    /// The room for claims while `running` attempts run.
    fn room(&self, running: usize) -> Room {
        let slots = self.config.slots;
        Room {
            general: slots.saturating_sub(running),
            reserve: slots.saturating_add(self.config.reserve).saturating_sub(running.max(slots)),
        }
    }

    async fn claim(&self, room: Room, shares: &Shares) -> Result<Claimed, StoreError> {
        let (store, owner, lease, shares) =
            (self.store.clone(), self.config.owner.clone(), self.config.lease, shares.clone());
        blocking(move || store.claim(&owner, room, lease, &shares)).await?
    }

    /// Runs one claimed attempt while renewing its claim, and reports it.
    async fn handle(self: Arc<Self>, claim: Claim) {
        let fenced = CancellationToken::new();
        let renewing = tokio::spawn(renew(self.store.clone(), claim.clone(), self.config.lease, fenced.clone()));
        let attempt = tokio::select! {
            attempt = self.attempt(&claim) => Some(attempt),
            () = fenced.cancelled() => None,
        };
        if let Some(attempt) = attempt {
            self.report(&claim, &attempt, &fenced).await;
        }
        renewing.abort();
        if fenced.is_cancelled() {
            eprintln!(
                "stepbox worker: task {} (attempt of {}) was claimed again or its run ended; its work here is dropped",
                claim.id, claim.task.key
            );
        }
    }

    /// The attempt, run; or, when it cannot run, why.
    async fn attempt(&self, claim: &Claim) -> Attempt {
        // Claims lost before this one were attempts too.
        let number = claim.task.attempt.saturating_add(claim.claims.saturating_sub(1));
        match self.prepare(claim, number).await {
            // Traced where the run is: the worker's span joins the
            // coordinator's attempt span, and denials are its events. A
            // worker that does not export hands the coordinator's on.
            Ok((component, mut request)) => {
                let span = request.span.child("worker attempt", |span| {
                    span.text("stepbox.step", &request.context.step_id)
                        .int("stepbox.attempt", i64::from(number))
                        .text("stepbox.tenant", &request.context.tenant)
                        .text("stepbox.worker", &self.config.owner);
                });
                if span.traceparent().is_some() {
                    request.span = span.clone();
                }
                let attempt = self.sandbox.run(&component, request).await;
                span.record_failure(&attempt);
                attempt
            }
            Err(failure) => Attempt::refused(number, now_ms(), failure),
        }
    }

    async fn prepare(
        &self,
        claim: &Claim,
        number: u32,
    ) -> Result<(StepComponent, crate::sandbox::AttemptRequest), Failure> {
        let fatal = |why: String| Failure::new(FailureKind::Fatal, why);
        let request: TaskRequest = serde_json::from_value(claim.task.request.clone())
            .map_err(|err| fatal(format!("the task's request could not be read: {err}")))?;
        let tenant = self.tenant(&request.tenant).map_err(fatal)?;
        let component = self.component(&request.component).await?;
        let secrets_dir = self.config.secrets_dir.clone();
        let announce = request.announce_start;
        let request = blocking(move || request.into_request(number, &tenant, secrets_dir.as_deref()))
            .await
            .map_err(|err| fatal(err.to_string()))?
            .map_err(fatal)?;
        if announce {
            let (store, held) = (self.store.clone(), claim.clone());
            match blocking(move || store.start(&held)).await.and_then(|started| started) {
                Ok(()) => {}
                // Another worker holds it now: not run here.
                Err(err @ StoreError::Fenced { .. }) => {
                    return Err(Failure::new(FailureKind::Retryable, err.to_string()));
                }
                // Unsaid, the coordinator counts the start when the
                // attempt ends (its rate limit waits that long).
                Err(err) => eprintln!("stepbox worker: cannot say that task {} started: {err}", claim.id),
            }
        }
        Ok((component, request))
    }

    /// The tenant as this worker's tenants file has it.
    fn tenant(&self, name: &str) -> Result<Tenant, String> {
        match &self.config.tenants {
            Some(tenants) => tenants.get(name).map_err(|err| err.to_string()),
            None if name == "default" => Ok(Tenant::unconstrained("default")),
            None => Err(format!(
                "this worker has no tenants file, so it runs tenant `default` only, not `{name}`; \
                 start it with --tenants FILE"
            )),
        }
    }

    /// The component with `digest`: compiled already, or loaded from the
    /// store and compiled (through this machine's compile cache).
    async fn component(&self, digest: &str) -> Result<StepComponent, Failure> {
        if let Some(component) = self.components.lock().get(digest) {
            return Ok(component.clone());
        }
        let invalid = |why: String| Failure::new(FailureKind::InvalidComponent, why);
        let (store, sandbox, wanted) = (self.store.clone(), self.sandbox.clone(), digest.to_owned());
        let loaded = blocking(move || {
            let bytes = store
                .blob(&wanted)
                .map_err(|err| Failure::new(FailureKind::Retryable, format!("cannot load component {wanted}: {err}")))?
                .ok_or_else(|| invalid(format!("component {wanted} is not in the store")))?;
            let found = crate::sandbox::component_digest(&bytes);
            if found != wanted {
                return Err(invalid(format!("the store's bytes for component {wanted} have digest {found}")));
            }
            sandbox.load_bytes(Path::new(&format!("sha256:{wanted}")), &bytes).map_err(|err| invalid(err.to_string()))
        })
        .await
        .map_err(|err| Failure::new(FailureKind::Retryable, err.to_string()))??;
        self.components.lock().put(digest.to_owned(), loaded.clone());
        Ok(loaded)
    }

    /// Records the result while the claim is this worker's; a store that
    /// is away is tried again until the claim would have expired.
    async fn report(&self, claim: &Claim, attempt: &Attempt, fenced: &CancellationToken) {
        let result = match serde_json::to_value(TaskResult { attempt: attempt.clone() }) {
            Ok(result) => result,
            Err(err) => {
                eprintln!("stepbox worker: task {}'s result cannot be written: {err}", claim.id);
                return;
            }
        };
        let deadline = Instant::now() + self.config.lease;
        loop {
            let (store, held, value): (_, _, Value) = (self.store.clone(), claim.clone(), result.clone());
            match blocking(move || store.complete(&held, &value)).await {
                Ok(Ok(())) => return,
                Ok(Err(StoreError::Fenced { .. })) => {
                    fenced.cancel();
                    return;
                }
                Ok(Err(err)) if Instant::now() < deadline && !fenced.is_cancelled() => {
                    eprintln!("stepbox worker: cannot record task {}'s result: {err}; trying again", claim.id);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(Err(err)) => {
                    eprintln!("stepbox worker: task {}'s result is lost: {err}", claim.id);
                    return;
                }
                Err(err) => {
                    eprintln!("stepbox worker: task {}'s result is lost: {err}", claim.id);
                    return;
                }
            }
        }
    }
}

/// Renews `claim` every third of `lease` until aborted; cancels `fenced`
/// when the claim is no longer this worker's, or when the store was away
/// for longer than the lease (another worker may have the task by then).
async fn renew(store: Arc<dyn Store>, claim: Claim, lease: Duration, fenced: CancellationToken) {
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(lease / 3).await;
        // Paused (SIGSTOP) or starved past the lease: the claim may be
        // another worker's already, so stop without asking the store.
        if renewed.elapsed() >= lease {
            break;
        }
        let (store, held) = (store.clone(), claim.clone());
        match blocking(move || store.renew(&held, lease)).await {
            Ok(Ok(())) => renewed = Instant::now(),
            Ok(Err(StoreError::Fenced { .. })) => break,
            Ok(Err(err)) if renewed.elapsed() < lease => {
                eprintln!("stepbox worker: cannot renew the claim on task {}: {err}; trying again", claim.id);
            }
            _ => break,
        }
    }
    fenced.cancel();
}

/// Runs a store call off the async threads: every store call may block.
async fn blocking<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| StoreError::Database { place: "the worker".into(), detail: err.to_string() })
}
