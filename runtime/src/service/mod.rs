//! The service: what `stepbox serve` does between its HTTP API and the
//! scheduler. It keeps deployed workflows (content-addressed bundles, each
//! deploy a version), starts runs of them for their tenants and drives
//! them in the background on one shared sandbox, with one set of attempt
//! slots shared fairly across tenants; it lists, cancels, resumes and
//! retries runs, and streams their events.
//!
//! Every call is scoped: a tenant sees only its own workflows and runs, and
//! another tenant's run is "not found", never "forbidden", so run ids
//! cannot be probed. Nothing here knows about HTTP ([`crate::server`]
//! does), so the CLI and tests can drive a service directly.

mod bundle;
mod clock;
mod events;
mod outline;
mod owned;
mod runs;
mod tokens;
mod triggers;
mod workflows;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use bundle::{Bundle, BundleUpload, Bundles, MAX_FILES};
pub use clock::{Clock, ManualClock, SystemClock};
pub use events::{Batch, EventLog, KEEP as EVENTS_KEPT, Numbered};
pub use outline::{Outline, ScheduleOutline, StepKind, StepOutline};
pub(crate) use owned::{CancelLook, cancel_elsewhere};
pub use owned::{Continue, ContinueError, Owned, continue_run};
pub use runs::{RunPage, StartRun};
pub(crate) use tokens::LiveTokens;
pub use tokens::{NewToken, Principal, TOKEN_PREFIX, TOKEN_TTL, authenticate, create as create_token};
pub use triggers::Delivery;
pub use workflows::Deployed;

use crate::cluster::QueueExecutor;
use crate::run::RunStatus;
use crate::sandbox::{EngineConfig, Sandbox};
use crate::scheduler::Dispatcher;
use crate::store::{Store, StoreError};
use crate::tenant::{Tenant, Tenants};
use crate::workflow::WorkflowError;

/// How a service is set up.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Where bundles and compiled code are kept, and runs too unless `db`
    /// names a database.
    pub data_dir: PathBuf,
    /// The PostgreSQL database (`postgres://…`) holding runs, tokens,
    /// versions and key-value state, shared with other processes.
    pub db: Option<String>,
    /// The tenants file; without one, every tenant has an empty entry's
    /// ceilings: no directories, network, HTTP hosts or secrets.
    pub tenants: Option<PathBuf>,
    /// Where `{ file: NAME }` secrets are read from.
    pub secrets_dir: Option<PathBuf>,
    /// Attempts running at once, over all tenants (with `queue`: handed
    /// to workers at once).
    pub slots: usize,
    /// Hand attempts to `stepbox worker` processes through the store's
    /// queue instead of running them in this process.
    pub queue: bool,
    /// Runs one tenant may have started and not finished; past it, new
    /// runs are refused until some finish.
    pub max_active_runs: usize,
    /// The largest bundle a deploy may upload, all files together.
    pub max_bundle_bytes: u64,
    /// The clock schedules read.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now_ms())
    }
}

impl ServiceConfig {
    /// The defaults for a data directory: twice the cores in slots, 1,000
    /// active runs per tenant, 64 MiB bundles.
    pub fn new(data_dir: PathBuf) -> Self {
        ServiceConfig {
            data_dir,
            db: None,
            tenants: None,
            secrets_dir: None,
            slots: crate::scheduler::default_max_parallel(),
            queue: false,
            max_active_runs: 1_000,
            max_bundle_bytes: 64 * 1024 * 1024,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Whose workflows and runs a call may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One tenant's.
    Tenant(String),
    /// Every tenant's: an admin not acting for a tenant.
    All,
}

impl Scope {
    /// Whether something of `tenant` is visible.
    pub fn sees(&self, tenant: &str) -> bool {
        match self {
            Scope::Tenant(own) => own == tenant,
            Scope::All => true,
        }
    }

    /// The tenant a write acts for.
    pub fn tenant(&self) -> Result<&str, ServiceError> {
        match self {
            Scope::Tenant(tenant) => Ok(tenant),
            Scope::All => Err(ServiceError::BadRequest {
                code: "tenant_required",
                message: "an admin token must name the tenant it acts for: send a `Stepbox-Tenant` header".into(),
            }),
        }
    }
}

/// Why a service call was refused. Each has a stable code for programs
/// and a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed.
    #[error("{message}")]
    BadRequest {
        /// Stable code.
        code: &'static str,
        /// What to fix.
        message: String,
    },
    /// No credentials, or not valid ones.
    #[error("{0}")]
    Unauthorized(String),
    /// The credentials are valid but do not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// Nothing by that name or id in the caller's scope.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but cannot be done as asked: a workflow
    /// or bundle that is not valid, inputs that do not bind.
    #[error("{message}")]
    Invalid {
        /// Stable code.
        code: &'static str,
        /// What is wrong, with every diagnostic.
        message: String,
    },
    /// The thing is not in a state that allows this.
    #[error("{message}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// Why, and what to do instead.
        message: String,
    },
    /// The tenant has as many active runs as it may.
    #[error("tenant `{tenant}` has {limit} runs started and not finished, as many as it may; wait for some to finish")]
    TooManyRuns {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: usize,
    },
    /// The service is shutting down.
    #[error("the service is shutting down; try again once it is back")]
    ShuttingDown,
    /// The store failed.
    #[error("{0}")]
    Store(StoreError),
    /// Anything else that is the service's fault.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::BadRequest { code, .. }
            | ServiceError::Invalid { code, .. }
            | ServiceError::Conflict { code, .. } => code,
            ServiceError::Unauthorized(_) => "unauthorized",
            ServiceError::Forbidden(_) => "forbidden",
            ServiceError::NotFound(_) => "not_found",
            ServiceError::TooManyRuns { .. } => "too_many_runs",
            ServiceError::ShuttingDown => "shutting_down",
            ServiceError::Store(_) => "store_failed",
            ServiceError::Internal(_) => "internal",
        }
    }

    fn invalid_workflow(err: WorkflowError) -> Self {
        ServiceError::Invalid { code: "invalid_workflow", message: err.to_string() }
    }
}

impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NoSuchRun(id) => ServiceError::NotFound(no_run(&id)),
            StoreError::Leased { .. } => ServiceError::Conflict { code: "run_held", message: format!("{err}") },
            err => ServiceError::Store(err),
        }
    }
}

impl From<ContinueError> for ServiceError {
    fn from(err: ContinueError) -> Self {
        match err {
            ContinueError::Store(err) => err.into(),
            ContinueError::Invalid(err) => ServiceError::invalid_workflow(err),
            ContinueError::Changed(message) => ServiceError::Conflict { code: "workflow_changed", message },
            err @ ContinueError::Moved { .. } => ServiceError::Conflict { code: "run_moved", message: err.to_string() },
            err @ ContinueError::NoSuchStep { .. } => {
                ServiceError::Invalid { code: "no_such_step", message: err.to_string() }
            }
            err @ (ContinueError::NotRetryable { .. } | ContinueError::Succeeded(_)) => {
                ServiceError::Conflict { code: "run_not_continuable", message: err.to_string() }
            }
        }
    }
}

/// The message for a run that is not there, or not the caller's: the same
/// words either way.
fn no_run(id: &str) -> String {
    format!("no run `{id}`; `GET /v1/runs` lists yours")
}

/// A running service. Cheap to share; drop the last handle after
/// [`Service::shutdown`].
pub struct Service {
    db: Arc<dyn Store>,
    sandbox: Sandbox,
    /// Where attempts run when not in this process's sandbox.
    queue: Option<Arc<QueueExecutor>>,
    dispatcher: Arc<Dispatcher>,
    tenants: Option<Tenants>,
    bundles: Bundles,
    config: ServiceConfig,
    /// Loaded workflows of deployed bundles, by digest.
    deployed: Mutex<lru::LruCache<String, Arc<Deployed>>>,
    live: Arc<Mutex<Live>>,
    /// The event logs of runs that finished lately, for streams that
    /// reconnect after the end.
    finished: Mutex<lru::LruCache<String, Arc<EventLog>>>,
    /// The event logs of runs other nodes drive, followed while read.
    followed: Mutex<HashMap<String, std::sync::Weak<EventLog>>>,
    /// API tokens lately found live.
    tokens: LiveTokens,
    tasks: TaskTracker,
    /// Cancelled when the service stops taking new work.
    closing: CancellationToken,
    /// Cancelled to interrupt every run this service drives.
    interrupt: CancellationToken,
    /// Wakes the task that resumes parked runs: a run parked, or an event
    /// came for one.
    wake: tokio::sync::Notify,
    /// Wakes the task that runs schedules: a deploy may have changed them.
    deployed_now: tokio::sync::Notify,
}

/// The runs this service drives now.
#[derive(Default)]
struct Live {
    runs: HashMap<String, Arc<LiveRun>>,
    /// Runs being taken over (resumed, cancelled) by a call of this
    /// service, so two calls cannot drive one run at once.
    claimed: std::collections::HashSet<String>,
    /// Active runs per tenant: driven, or about to be.
    active: HashMap<String, usize>,
}

/// A run this service drives.
struct LiveRun {
    waits: Arc<crate::scheduler::Waits>,
    cancel: CancellationToken,
    interrupt: CancellationToken,
    events: Arc<EventLog>,
}

impl Service {
    /// Opens the data directory's store, builds the sandbox and resumes
    /// the runs a crash left interrupted. Call from a tokio runtime.
    pub async fn start(config: ServiceConfig) -> Result<Arc<Service>, ServiceError> {
        let db = crate::store::open(config.db.as_deref(), &config.data_dir)?;
        let tenants = match &config.tenants {
            Some(file) => Some(Tenants::load(file).map_err(ServiceError::invalid_workflow)?),
            None => None,
        };
        // Attempts handed to workers do not run in this sandbox: it only
        // compiles, to check components before they are handed over.
        let runs_here = if config.queue { crate::scheduler::default_max_parallel() } else { config.slots };
        let engine = EngineConfig {
            data_dir: Some(config.data_dir.clone()),
            max_concurrent_attempts: u32::try_from(runs_here).unwrap_or(u32::MAX),
            ..Default::default()
        };
        let sandbox =
            Sandbox::new(engine, db.key_values()).map_err(|err| ServiceError::Internal(format!("{err:#}")))?;

        let service = Arc::new(Service {
            dispatcher: Dispatcher::new(config.slots),
            bundles: Bundles::new(&config.data_dir),
            deployed: Mutex::new(lru::LruCache::new(NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN))),
            finished: Mutex::new(lru::LruCache::new(NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN))),
            followed: Mutex::default(),
            tokens: LiveTokens::new(tokens::TOKEN_TTL),
            live: Arc::default(),
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            wake: tokio::sync::Notify::new(),
            deployed_now: tokio::sync::Notify::new(),
            queue: config.queue.then(|| QueueExecutor::new(db.clone())),
            db,
            sandbox,
            tenants,
            config,
        });
        let mut given_up = std::collections::HashSet::new();
        service.resume_interrupted(&mut given_up).await;
        service.tasks.spawn(service.clone().take_over_interrupted(given_up));
        service.tasks.spawn(service.clone().wake_parked_runs());
        service.tasks.spawn(service.clone().run_schedules());
        Ok(service)
    }

    /// The largest bundle a deploy may upload.
    pub fn max_bundle_bytes(&self) -> u64 {
        self.config.max_bundle_bytes
    }

    /// Attempts waiting and running by tenant, for the metrics: in this
    /// process, and in the queue when its attempts go to workers. Blocks on
    /// the database.
    pub fn metric_snapshots(&self) -> Vec<crate::metrics::Snapshot> {
        let mut snapshots = vec![self.dispatcher.snapshot()];
        if self.queue.is_some() {
            snapshots.extend(crate::metrics::queue_snapshot(&*self.db));
        }
        snapshots
    }

    /// The store, for the server's own reads (tokens).
    pub fn database(&self) -> &Arc<dyn Store> {
        &self.db
    }

    /// API tokens lately found live.
    pub(crate) fn tokens(&self) -> &LiveTokens {
        &self.tokens
    }

    /// The tenant `name` with its ceilings: from the tenants file, or an
    /// empty entry's without one.
    fn tenant(&self, name: &str) -> Result<Tenant, ServiceError> {
        match &self.tenants {
            Some(tenants) => tenants.get(name).map_err(|err| ServiceError::Forbidden(err.to_string())),
            None => Ok(Tenant::restricted(name)),
        }
    }

    /// Refuses new work once shutting down.
    fn accepting(&self) -> Result<(), ServiceError> {
        if self.closing.is_cancelled() { Err(ServiceError::ShuttingDown) } else { Ok(()) }
    }

    /// Runs a blocking store call off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || call(&*db))
            .await
            .unwrap_or_else(|err| Err(ServiceError::Internal(format!("a store call failed: {err}"))))
    }

    /// Stops taking work, lets running attempts finish for up to `grace`,
    /// then interrupts what is left: its attempts end as cancelled and are
    /// recorded, and its runs stay unfinished, for the next start to
    /// resume. Returns once every run has stopped.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        self.closing.cancel();
        self.dispatcher.drain();
        let deadline = tokio::time::Instant::now() + grace;
        while self.dispatcher.busy() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.interrupt.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Cancelled once the service stops taking work: long-lived streams
    /// end with it.
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// How many runs this service drives now.
    pub fn active_runs(&self) -> usize {
        self.live.lock().runs.len()
    }
}

/// A tenant's place among its active runs, held from admission until its
/// run ends; dropping it frees the place.
struct Reservation {
    live: Arc<Mutex<Live>>,
    tenant: String,
}

impl Reservation {
    /// Takes a place for `tenant` if it has fewer than `limit` active runs
    /// (any number when `limit` is `None`).
    fn take(live: &Arc<Mutex<Live>>, tenant: &str, limit: Option<usize>) -> Result<Reservation, ServiceError> {
        let mut state = live.lock();
        let active = state.active.entry(tenant.to_owned()).or_default();
        if let Some(limit) = limit.filter(|limit| *active >= *limit) {
            return Err(ServiceError::TooManyRuns { tenant: tenant.to_owned(), limit });
        }
        *active += 1;
        Ok(Reservation { live: live.clone(), tenant: tenant.to_owned() })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut state = self.live.lock();
        if let Some(active) = state.active.get_mut(&self.tenant) {
            *active -= 1;
            if *active == 0 {
                state.active.remove(&self.tenant);
            }
        }
    }
}

/// A run this service is taking over, held until it drives it or gives up;
/// dropping it lets the run go.
struct Claim {
    live: Arc<Mutex<Live>>,
    id: String,
}

impl Claim {
    /// Claims run `id`, unless this service drives it or another call
    /// claimed it.
    fn take(live: &Arc<Mutex<Live>>, id: &str) -> Result<Claim, ServiceError> {
        let mut state = live.lock();
        if state.runs.contains_key(id) || !state.claimed.insert(id.to_owned()) {
            return Err(ServiceError::Conflict {
                code: "run_running",
                message: format!("run {id} is running, or being resumed or cancelled; wait for it, or cancel it"),
            });
        }
        Ok(Claim { live: live.clone(), id: id.to_owned() })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.live.lock().claimed.remove(&self.id);
    }
}

/// Whether a status is final.
fn finished(status: RunStatus) -> bool {
    matches!(status, RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled)
}
