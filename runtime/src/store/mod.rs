//! State that outlives an attempt: the run journal (written by the
//! scheduler), the run history (read by `stepbox show`, `runs`, `logs`),
//! and the key-value data behind `wasi:keyvalue`.
//!
//! Each is a trait, [`Journal`], [`History`], [`Registry`] and
//! [`KeyValueStore`], so the scheduler, the CLI, the service and the
//! sandbox do not know which database holds them; [`Store`] is all of them
//! in one. Two backends implement them: [`Database`], SQLite files in the
//! data directory (the embedded default; key-value state in a file of its
//! own, [`KeyValueDatabase`], so its writes never wait for the journal's
//! lock), and [`PgStore`], one PostgreSQL database that many processes on
//! many machines share. [`open`] picks one.

#[cfg(test)]
mod conformance;
mod group;
#[cfg(test)]
mod kv_conformance;
mod lease;
mod log;
mod memory;
mod postgres;
mod queue;
mod registry;
mod rows;
mod sqlite;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use serde_json::Value;

use crate::run::{Attempt, Run, RunReport, RunStatus, StepPath, StepReport};

pub use lease::{Heartbeat, LEASE_TTL, Lease, Renewed, is_gone, this_owner};
pub use memory::MemoryKeyValueStore;
pub use postgres::{PG_SCHEMA_VERSION, PgKeyValues, PgStore};
pub use queue::{Claim, Claimed, Queue, Room, Shares, Signals, Task, TaskState};
pub use registry::{Registry, Started, TokenRecord, WorkflowVersion};
pub use sqlite::{DATABASE_FILE, Database, KV_FILE, KeyValueDatabase, SCHEMA_VERSION};

/// Everything stepbox keeps, in one database.
pub trait Store: Journal + History + Registry + Queue + std::fmt::Debug {
    /// The steps' key-value state, beside the rest.
    fn key_values(&self) -> std::sync::Arc<dyn KeyValueStore>;
    /// Journal transactions committed so far: with group commit, fewer than
    /// the records written.
    fn journal_commits(&self) -> u64;
    /// Where the database is, for messages: a file, or a `postgres://` URL
    /// without its password.
    fn place(&self) -> String;
}

impl Store for Database {
    fn key_values(&self) -> std::sync::Arc<dyn KeyValueStore> {
        Database::key_values(self)
    }

    fn journal_commits(&self) -> u64 {
        Database::journal_commits(self)
    }

    fn place(&self) -> String {
        self.path().display().to_string()
    }
}

impl Store for PgStore {
    fn key_values(&self) -> std::sync::Arc<dyn KeyValueStore> {
        PgStore::key_values(self)
    }

    fn journal_commits(&self) -> u64 {
        PgStore::journal_commits(self)
    }

    fn place(&self) -> String {
        PgStore::place(self).to_owned()
    }
}

/// Opens the store: the PostgreSQL database at `db` (a `postgres://` URL)
/// when one is given, else the SQLite files in `data_dir`.
pub fn open(db: Option<&str>, data_dir: &std::path::Path) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match db {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(std::sync::Arc::new(PgStore::open(url)?))
        }
        // Not echoed: it may hold a password.
        Some(_) => Err(StoreError::BadUrl {
            detail: "it is not a postgres:// URL; use postgres://USER:PASSWORD@HOST:PORT/DATABASE, \
                     or leave --db out for the SQLite files in the data directory"
                .into(),
        }),
        None => Ok(std::sync::Arc::new(Database::open(data_dir)?)),
    }
}

/// Waits for a queued write from a sync test (or an async one: on a thread
/// of its own).
#[cfg(test)]
pub(crate) fn wait<T: Send>(pending: Pending<T>) -> Result<T, StoreError> {
    std::thread::scope(|scope| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        scope.spawn(move || runtime.block_on(pending)).join().unwrap()
    })
}

/// Creates `dir` and its missing parents so that only this user can enter
/// them: a data directory holds every tenant's records and compiled native
/// code.
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// A new run id: a UUIDv7, unique across processes and machines and
/// sorting by creation time.
pub fn new_run_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A queued write's result, once it is committed.
pub type Pending<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Resolves once a queued journal record, and every record of its run
/// queued before it, is durable.
pub type Durable = Pending<()>;

/// What the scheduler records, and the writes that manage a run's life.
///
/// The scheduler's records queue: each returns at once, with a [`Durable`]
/// that resolves when the record is committed. A run's records commit in
/// the order they were queued, and after one fails every later one of the
/// run fails, so awaiting a record vouches for all before it. Finish
/// records are not waited for: they commit with the run's next start
/// record, or within a few milliseconds.
pub trait Journal: Send + Sync {
    /// Queues a new run's record, with the fingerprint of its files (see
    /// [`crate::workflow::Workflow::fingerprint`]) and its lease, held by
    /// this process ([`this_owner`], [`LEASE_TTL`]) from the start: one
    /// record where a create and a take would be two, and one that shares
    /// its commit with other runs' records. The run's later records commit
    /// after it, so the run may start before the [`Durable`] resolves; it is
    /// awaited before anyone is told the run exists.
    fn create_run(&self, run: &Run, fingerprint: &Value) -> (Lease, Durable);
    /// Marks a run as running again (resume, retry).
    fn reopen_run(&self, run_id: &str) -> Result<(), StoreError>;
    /// Forgets the results of these steps, their executions and everything
    /// inside them, so they run again: `stepbox retry --from`.
    fn forget_steps(&self, run_id: &str, steps: &[StepPath]) -> Result<(), StoreError>;
    /// Deletes the finished runs created before `before_ms` (unix ms) and
    /// all their records, and interrupted ones too when `interrupted`;
    /// never a run whose lease is live. Returns how many.
    fn gc(&self, before_ms: f64, interrupted: bool) -> Result<usize, StoreError>;
    /// Takes the lease on `run_id` for `owner` for `ttl`, unless a live
    /// owner holds it (the error names it). Each taking raises the lease's
    /// epoch, so a holder that lost it cannot renew it.
    fn acquire_lease(&self, run_id: &str, owner: &str, ttl: std::time::Duration) -> Result<Lease, StoreError>;
    /// Extends a held lease by `ttl` from now, and says whether a cancel
    /// of the run was asked for; fails if the lease was taken over.
    fn renew_lease(&self, lease: &Lease, ttl: std::time::Duration) -> Result<Renewed, StoreError>;
    /// Asks whichever process runs `run_id` to cancel it: recorded on the
    /// run if it is still running (its holder finds it when it renews its
    /// lease, at once where [`Signals::cancels`] reach it; a process that
    /// takes the run up later records it cancelled instead). A run that
    /// finishes forgets it. Returns whether the ask stands (the run is
    /// running); only the first ask is signalled.
    fn request_cancel(&self, run_id: &str) -> Result<bool, StoreError>;
    /// Gives a held lease up, with the next group commit.
    fn release_lease(&self, lease: &Lease) -> Durable;
    /// What an interrupted run already did.
    fn resume_state(&self, run_id: &str) -> Result<ResumeState, StoreError>;
    /// An attempt of the execution at `path` (idempotency key `key`) may
    /// start. Awaited before the attempt runs, so a crash leaves a trace of
    /// every attempt that could have had effects. `input` is the JSON text
    /// it is given, kept for reports (cut as [`rows::kept_input`] says).
    fn attempt_started(
        &self,
        run_id: &str,
        path: &StepPath,
        key: &str,
        attempt: &Attempt,
        input: Option<&str>,
    ) -> Durable;
    /// An attempt ended; when it was the `last` of its execution, the
    /// execution's result (its status, and its output) goes with it.
    fn attempt_finished(&self, run_id: &str, path: &StepPath, key: &str, attempt: &Attempt, last: bool) -> Durable;
    /// The include step at `path` read its workflow through a template,
    /// which gave these file hashes ([`crate::workflow::Workflow::fingerprint`]).
    /// The first record of a step is kept, so a resume can refuse a file
    /// that changed since; awaited before the included workflow runs.
    fn include_loaded(&self, run_id: &str, path: &StepPath, fingerprint: &Value) -> Durable;
    /// The waiting step at `path` (idempotency key `key`) waits for `event`
    /// since `started_ms`, until `deadline_ms` when it has a timeout. The
    /// first record of a wait is kept, so its timeout counts from when it
    /// was first reached, across resumes; reached again (a cancelled run
    /// resumed), an ended wait is open again.
    fn wait_started(
        &self,
        run_id: &str,
        path: &StepPath,
        key: &str,
        event: &str,
        started_ms: f64,
        deadline_ms: Option<f64>,
    ) -> Durable;
    /// The wait of the step with idempotency key `key` ended (its event
    /// came, it timed out or was cancelled), after its attempt's records:
    /// a parked run is woken only for waits that have not.
    fn wait_ended(&self, run_id: &str, key: &str) -> Durable;
    /// The run parked: only waiting steps were left, so it stopped, to be
    /// resumed when an event comes or a wait times out. Its last record.
    fn run_parked(&self, run_id: &str) -> Durable;
    /// The run's first traced drive has the span `trace`: later drives
    /// (resumed, retried, woken) continue its trace beneath it. The first
    /// one recorded is kept.
    fn run_traced(&self, run_id: &str, trace: &crate::traces::TraceParent) -> Durable;
    /// The event `name` was sent to the run with `payload`. The first of a
    /// name is kept; returns whether this one was.
    fn event_received(&self, run_id: &str, name: &str, payload: &Value) -> Result<bool, StoreError>;
    /// A step reached its final status; `position` is its place in its
    /// workflow. Durable before any dependent runs, since a dependent
    /// awaits its own later start record.
    fn step_finished(&self, run_id: &str, position: usize, step: &StepReport) -> Durable;
    /// The run's final record.
    fn run_finished(
        &self,
        run_id: &str,
        status: RunStatus,
        outputs: &serde_json::Map<String, Value>,
        error: Option<&str>,
    ) -> Durable;
}

/// What the journal holds, read back.
pub trait History: Send + Sync {
    /// A run, without its steps.
    fn load_run(&self, run_id: &str) -> Result<Run, StoreError>;
    /// The fingerprint a run was created with.
    fn fingerprint(&self, run_id: &str) -> Result<Value, StoreError>;
    /// Runs matching `filter`, newest first.
    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError>;
    /// A run with its steps, executions and attempts as recorded: the same
    /// report the run printed, for what it got to record.
    fn run_report(&self, run_id: &str) -> Result<RunReport, StoreError>;
    /// [`History::run_report`] without the attempts' logs, stdout and
    /// stderr and the executions' inputs: what a view that follows a run
    /// reads again at each change, without the bulk.
    fn run_summary(&self, run_id: &str) -> Result<RunReport, StoreError>;
}

/// Executions that succeeded (their outputs, by idempotency key) and how
/// many attempts every execution had.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResumeState {
    /// Outputs of the executions that succeeded.
    pub completed: HashMap<String, Value>,
    /// The highest attempt number of each execution.
    pub attempts: HashMap<String, u32>,
    /// The final status each step was recorded with, by path.
    pub steps: HashMap<StepPath, crate::run::StepStatus>,
    /// The fingerprints of workflows included through a template, by the
    /// include step's path.
    pub includes: HashMap<String, Value>,
    /// When each waiting step was first reached (unix ms), by idempotency
    /// key.
    pub waits: HashMap<String, f64>,
    /// The events sent to the run, by name.
    pub events: HashMap<String, Value>,
    /// The span of the run's first traced drive ([`Journal::run_traced`]).
    pub trace: Option<crate::traces::TraceParent>,
}

/// Which runs `stepbox runs` and the API list.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only runs of this tenant.
    pub tenant: Option<String>,
    /// Only runs older than this one (its id): the cursor of the page
    /// after a page that ended with it.
    pub before: Option<String>,
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// Only runs of this workflow (its name).
    pub workflow: Option<String>,
    /// Only runs with all these labels.
    pub labels: Vec<(String, String)>,
    /// At most this many (0: all).
    pub limit: usize,
}

/// Why the store could not be used; each says what to do about it. Nothing
/// already committed is lost by any of them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory cannot be created or used.
    #[error(
        "cannot use the data directory {path}: {source}; choose a writable one with --data-dir or STEPBOX_DATA_DIR"
    )]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database file is damaged or not a database.
    #[error(
        "{path} is not a usable stepbox database ({detail}); move it aside to start a new one, or restore it from a backup"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What the check found.
        detail: String,
    },
    /// A newer stepbox wrote the database.
    #[error(
        "{place} was written by a newer stepbox (schema version {found}; this one knows up to {supported}); upgrade stepbox"
    )]
    NewerSchema {
        /// The database: its file, or its URL without the password.
        place: String,
        /// Its schema version.
        found: u32,
        /// The newest this build knows.
        supported: u32,
    },
    /// Another process holds the write lock.
    #[error("{path} is locked by another stepbox process; wait for it to finish, or use another --data-dir")]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The disk is full.
    #[error(
        "the disk holding {path} is full; what was recorded before is kept; free some space, then `stepbox resume` the run"
    )]
    DiskFull {
        /// The database file.
        path: PathBuf,
    },
    /// The database cannot be written.
    #[error("cannot write {path} ({detail}); check its permissions, or use another --data-dir")]
    NotWritable {
        /// The database file.
        path: PathBuf,
        /// The database's own message.
        detail: String,
    },
    /// Any other database error.
    #[error("{place}: {detail}")]
    Database {
        /// The database: its file, or its URL without the password.
        place: String,
        /// The database's own message.
        detail: String,
    },
    /// The `--db` URL cannot be used (it is not shown: it may hold a
    /// password).
    #[error("cannot use the --db URL (STEPBOX_DB): {detail}")]
    BadUrl {
        /// Why.
        detail: String,
    },
    /// The PostgreSQL server cannot be reached.
    #[error(
        "cannot reach PostgreSQL at {place} ({detail}); start it (a packaged PostgreSQL: \
         `sudo service postgresql start`; or a container: \
         `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`), \
         or point --db / STEPBOX_DB at one that runs"
    )]
    Unreachable {
        /// The database's URL without the password.
        place: String,
        /// What the client said.
        detail: String,
    },
    /// The group-commit writer is gone (it panicked, or the process is
    /// shutting down).
    #[error(
        "the journal writer has stopped, so nothing more can be recorded; restart stepbox and `stepbox resume` the run"
    )]
    WriterStopped,
    /// No run has this id.
    #[error("no run `{0}` in this data directory; `stepbox runs` lists them")]
    NoSuchRun(String),
    /// Another live process holds the run.
    #[error(
        "run {run_id} is being run by {owner} (its lease runs until {}); wait for it to finish, or stop that process",
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(*until_ms as u64))
    )]
    Leased {
        /// The run.
        run_id: String,
        /// Who holds it.
        owner: String,
        /// When the lease expires unless renewed (unix ms).
        until_ms: f64,
    },
    /// The lease was taken over by another process.
    #[error("run {0} was taken over by another process; this one stops")]
    LeaseLost(String),
    /// A worker's claim on a task was taken over after it expired.
    #[error(
        "task {task} was claimed by another worker after this one's claim expired; this worker's result is dropped"
    )]
    Fenced {
        /// The task.
        task: i64,
    },
    /// No task has this id.
    #[error("no task {0} in the queue")]
    NoSuchTask(i64),
}

impl StoreError {
    /// Whether the database is away (it restarts, the network dropped)
    /// rather than refusing: the same call may work a moment later.
    pub fn is_away(&self) -> bool {
        matches!(self, StoreError::Unreachable { .. })
    }

    /// The database's own message, where there is one; else the whole
    /// error.
    pub(crate) fn detail(&self) -> String {
        match self {
            StoreError::Database { detail, .. } | StoreError::Unreachable { detail, .. } => detail.clone(),
            other => other.to_string(),
        }
    }
}

/// Whose state a key belongs to: steps of one tenant and workflow share it,
/// and nobody else can reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvScope {
    /// The tenant.
    pub tenant: String,
    /// The workflow's name.
    pub workflow: String,
}

/// A failure of the key-value store itself, shown to the guest as
/// `wasi:keyvalue/store.error.other`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// `increment` on a value that is not an integer.
    #[error("the value at `{key}` is not an integer, so it cannot be incremented")]
    NotAnInteger {
        /// The key.
        key: String,
    },
    /// `increment` past the range of a 64-bit integer.
    #[error("incrementing `{key}` would overflow a 64-bit integer")]
    Overflow {
        /// The key.
        key: String,
    },
    /// A write would take the tenant past its quota.
    #[error(
        "tenant `{tenant}` would keep {wanted} {what} of key-value state; its quota is {quota} \
         (`kv.max_{what}` in the tenants file); delete keys it no longer needs"
    )]
    Quota {
        /// The tenant.
        tenant: String,
        /// `bytes` or `keys`.
        what: &'static str,
        /// What the tenant would keep after the write.
        wanted: u64,
        /// Its quota.
        quota: u64,
    },
    /// The database failed.
    #[error("key-value storage failed: {0}")]
    Storage(String),
}

/// How much key-value state one tenant may keep, over all its workflows:
/// keys and values count with their lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvQuota {
    /// Bytes of keys and values together.
    pub max_bytes: bytesize::ByteSize,
    /// Keys.
    pub max_keys: u64,
}

impl Default for KvQuota {
    fn default() -> Self {
        KvQuota { max_bytes: bytesize::ByteSize::mib(64), max_keys: 100_000 }
    }
}

/// Bytes a stored key costs besides its names and value (the row and its
/// index entry), so many empty values are not free.
pub(crate) const KV_ROW_OVERHEAD: usize = 32;

/// What one tenant keeps: the sums its quota is checked against, kept
/// beside the data and changed in the same transaction as it. A key counts
/// its tenant, workflow, bucket and key names, its value and
/// [`KV_ROW_OVERHEAD`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KvUsage {
    pub(crate) bytes: u64,
    pub(crate) keys: u64,
}

impl KvUsage {
    /// The usage after `key` of `bucket` goes from a value of `old` bytes
    /// to one of `new` bytes (`None`: absent), or the error if that grows
    /// past `quota`. A change that does not grow a sum is always allowed,
    /// so a tenant over a lowered quota can still delete and shrink.
    pub(crate) fn change(
        self,
        scope: &KvScope,
        bucket: &str,
        key: &str,
        old: Option<usize>,
        new: Option<usize>,
        quota: &KvQuota,
    ) -> Result<KvUsage, KvError> {
        let size = |value: Option<usize>| value.map_or(0, |len| row_size(scope, bucket, key, len));
        let bytes = (self.bytes + size(new)).saturating_sub(size(old));
        let keys = (self.keys + u64::from(new.is_some())).saturating_sub(u64::from(old.is_some()));
        let over = |what, wanted: u64, before: u64, quota: u64| {
            (wanted > quota && wanted > before).then(|| KvError::Quota {
                tenant: scope.tenant.clone(),
                what,
                wanted,
                quota,
            })
        };
        if let Some(err) = over("bytes", bytes, self.bytes, quota.max_bytes.as_u64()) {
            return Err(err);
        }
        if let Some(err) = over("keys", keys, self.keys, quota.max_keys) {
            return Err(err);
        }
        Ok(KvUsage { bytes, keys })
    }

    /// The usage after `key` of `bucket`, holding `old` bytes, is deleted:
    /// never refused.
    pub(crate) fn removed(self, scope: &KvScope, bucket: &str, key: &str, old: usize) -> KvUsage {
        KvUsage {
            bytes: self.bytes.saturating_sub(row_size(scope, bucket, key, old)),
            keys: self.keys.saturating_sub(1),
        }
    }
}

/// What a key holding `value` bytes costs against its tenant's quota.
fn row_size(scope: &KvScope, bucket: &str, key: &str, value: usize) -> u64 {
    (scope.tenant.len() + scope.workflow.len() + bucket.len() + key.len() + KV_ROW_OVERHEAD + value) as u64
}

/// Key-value storage for steps. Implementations must make `increment` and
/// `compare_and_swap` atomic: many attempts run at once against one store.
pub trait KeyValueStore: Send + Sync {
    /// The value at `key`, if any.
    fn get(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Sets `key` to `value`, within the tenant's `quota`.
    fn set(&self, scope: &KvScope, bucket: &str, key: &str, value: &[u8], quota: &KvQuota) -> Result<(), KvError>;
    /// Removes `key`.
    fn delete(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<(), KvError>;
    /// Up to `limit` keys of `bucket` that sort after `after`, in order.
    fn list_keys(
        &self,
        scope: &KvScope,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError>;
    /// Add `delta` to the decimal integer stored at `key` (missing counts as
    /// 0), store it and return it.
    fn increment(&self, scope: &KvScope, bucket: &str, key: &str, delta: i64, quota: &KvQuota) -> Result<i64, KvError>;
    /// Set `key` to `new` only if its value is still `expected` (`None`: not
    /// set). Returns whether it swapped.
    fn compare_and_swap(
        &self,
        scope: &KvScope,
        bucket: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
        quota: &KvQuota,
    ) -> Result<bool, KvError>;
}

/// The integer an `increment` starts from: stored values are decimal text,
/// which is also what a JSON reader of the key sees.
pub(crate) fn add_to_stored(key: &str, stored: Option<&[u8]>, delta: i64) -> Result<i64, KvError> {
    let current = match stored {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .ok_or_else(|| KvError::NotAnInteger { key: key.to_owned() })?,
    };
    current.checked_add(delta).ok_or_else(|| KvError::Overflow { key: key.to_owned() })
}
