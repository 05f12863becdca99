//! Group commit on PostgreSQL: records queue to one task, which writes what
//! was queued while its last commit ran in one transaction, so many runs
//! share a round trip and a WAL flush. The same promises as the SQLite
//! writer: a run's records commit in the order they were queued, and once
//! one fails every later one of the run fails (until its last record), so
//! awaiting one record vouches for all before it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::journal::Record;
use super::{pg_error, pool_error};
use crate::failpoint::failpoint;
use crate::store::group::{Kind, LAZY_WINDOW, MAX_BATCH};
use crate::store::lease::Held;
use crate::store::log::Chunks;
use crate::store::{Durable, StoreError};

/// How long the writer keeps trying to reach the database before it fails
/// what it was writing.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

struct Queued {
    run_id: String,
    kind: Kind,
    /// The lease epoch the run must still have ([`Held::fence`]).
    fence: Option<u64>,
    entry: Entry,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// What a queued record writes.
pub(super) enum Entry {
    /// Statements of its own (a run's creation among them, hence boxed:
    /// log records are the many).
    Record(Box<Record>),
    /// A record of the run's log ([`crate::store::log`]): a batch appends
    /// each run's records as one row.
    Log(String),
}

impl From<Record> for Entry {
    fn from(record: Record) -> Self {
        Entry::Record(Box::new(record))
    }
}

/// The queue in front of the writer task.
pub(super) struct Writer {
    queue: Mutex<Option<mpsc::UnboundedSender<Queued>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    commits: Arc<AtomicU64>,
    /// The leases this handle took, which its records need.
    pub(super) held: Held,
}

/// Why a run's record failed, kept so its later records fail the same way.
#[derive(Clone)]
enum Lost {
    /// The database failed it.
    Database { place: Arc<str>, unreachable: bool, detail: String },
    /// Another process took over the run from the taking of it with this
    /// epoch (see [`Held`]); a later taking's records are its own.
    Lease(Option<u64>),
}

impl Lost {
    fn of(err: &StoreError, place: &Arc<str>) -> Self {
        let unreachable = matches!(err, StoreError::Unreachable { .. });
        Lost::Database { place: place.clone(), unreachable, detail: err.detail() }
    }

    fn error(&self, run_id: &str) -> StoreError {
        match self {
            Lost::Database { place, unreachable: true, detail } => {
                StoreError::Unreachable { place: place.to_string(), detail: detail.clone() }
            }
            Lost::Database { place, unreachable: false, detail } => {
                StoreError::Database { place: place.to_string(), detail: detail.clone() }
            }
            Lost::Lease(_) => StoreError::LeaseLost(run_id.to_owned()),
        }
    }
}

impl Writer {
    /// Starts the writer task on the current runtime.
    pub(super) fn start(pool: Pool, place: Arc<str>) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        let commits = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_batches(pool, place, receiver, commits.clone()));
        Writer { queue: Mutex::new(Some(queue)), task: Mutex::new(Some(task)), commits, held: Held::default() }
    }

    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Queues a record of `run_id`, to commit only while the run's lease is
    /// still the one this handle holds, if it holds one.
    pub(super) fn queue(&self, run_id: &str, kind: Kind, entry: impl Into<Entry>) -> Durable {
        let (done, receiver) = oneshot::channel();
        let entry = entry.into();
        let queued = Queued { run_id: run_id.to_owned(), kind, fence: self.held.fence(run_id), entry, done };
        let sent = self.queue.lock().as_ref().is_some_and(|queue| queue.send(queued).is_ok());
        Box::pin(async move {
            match (sent, receiver.await) {
                (true, Ok(result)) => result,
                _ => Err(StoreError::WriterStopped),
            }
        })
    }

    /// Commits what is queued, then stops the task; waits for it.
    pub(super) fn stop(&self, handle: &tokio::runtime::Handle) {
        drop(self.queue.lock().take());
        if let Some(task) = self.task.lock().take() {
            let _ = super::block(handle, async move {
                let _ = task.await;
                Ok(())
            });
        }
    }
}

async fn write_batches(
    pool: Pool,
    place: Arc<str>,
    mut receiver: mpsc::UnboundedReceiver<Queued>,
    commits: Arc<AtomicU64>,
) {
    let mut lost: HashMap<String, Lost> = HashMap::new();
    while let Some(first) = receiver.recv().await {
        let lazy_until = tokio::time::Instant::now() + LAZY_WINDOW;
        let mut awaited = first.kind != Kind::Lazy;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let next = if awaited {
                receiver.try_recv().ok()
            } else {
                tokio::time::timeout_at(lazy_until, receiver.recv()).await.ok().flatten()
            };
            let Some(queued) = next else { break };
            awaited |= queued.kind != Kind::Lazy;
            batch.push(queued);
        }
        let (records, began) = (batch.len(), std::time::Instant::now());
        let outcomes = commit(&pool, &place, batch, &mut lost).await;
        if let Some(metrics) = crate::metrics::recording() {
            metrics.journal_committed("postgres", records, began.elapsed());
        }
        commits.fetch_add(1, Ordering::Relaxed);
        for (queued, outcome) in outcomes {
            if queued.kind == Kind::Last {
                lost.remove(&queued.run_id);
            }
            let _ = queued.done.send(outcome);
        }
    }
}

/// Commits the batch in one transaction. Records of runs another process
/// took over fail, and the rest is tried again without them. If the batch
/// fails for a record's sake, each run's records are committed in a
/// transaction of their own, so one run's failure fails only that run.
async fn commit(
    pool: &Pool,
    place: &Arc<str>,
    batch: Vec<Queued>,
    lost: &mut HashMap<String, Lost>,
) -> Vec<(Queued, Result<(), StoreError>)> {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    for queued in batch {
        match lost.get(&queued.run_id) {
            Some(Lost::Lease(epoch)) if queued.fence != *epoch => {
                // Not of the taking that was refused: of a later one (this
                // process took the run again), or a release, which needs
                // no lease. Still checked at commit if fenced.
                lost.remove(&queued.run_id);
                pending.push(queued);
            }
            Some(earlier) => {
                let err = earlier.error(&queued.run_id);
                outcomes.push((queued, Err(err)));
            }
            None => pending.push(queued),
        }
    }
    loop {
        match write(pool, place, &pending.iter().collect::<Vec<_>>()).await {
            Ok(fenced) if fenced.is_empty() => {
                outcomes.extend(pending.into_iter().map(|queued| (queued, Ok(()))));
                return outcomes;
            }
            Ok(fenced) => {
                let (failed, kept) = pending.into_iter().partition(|queued| fenced.contains(&queued.run_id));
                outcomes.extend(fail(failed, &Lost::Lease(None), lost));
                pending = kept;
            }
            Err(err @ StoreError::Unreachable { .. }) => {
                outcomes.extend(fail(pending, &Lost::of(&err, place), lost));
                return outcomes;
            }
            Err(_) => break,
        }
    }
    let mut runs: Vec<(String, Vec<Queued>)> = Vec::new();
    for queued in pending {
        match runs.iter_mut().find(|(run_id, _)| *run_id == queued.run_id) {
            Some((_, records)) => records.push(queued),
            None => runs.push((queued.run_id.clone(), vec![queued])),
        }
    }
    for (_, records) in runs {
        let failure = match write(pool, place, &records.iter().collect::<Vec<_>>()).await {
            Ok(fenced) if fenced.is_empty() => {
                outcomes.extend(records.into_iter().map(|queued| (queued, Ok(()))));
                continue;
            }
            Ok(_) => Lost::Lease(None),
            Err(err) => Lost::of(&err, place),
        };
        outcomes.extend(fail(records, &failure, lost));
    }
    outcomes
}

/// Fails `records`, each run's with its first failure, which its later
/// records keep (a run taken over, with the epoch of the record's own
/// taking).
fn fail(
    records: Vec<Queued>,
    failure: &Lost,
    lost: &mut HashMap<String, Lost>,
) -> Vec<(Queued, Result<(), StoreError>)> {
    records
        .into_iter()
        .map(|queued| {
            let failure = match failure {
                Lost::Lease(_) => Lost::Lease(queued.fence),
                other => other.clone(),
            };
            let err = lost.entry(queued.run_id.clone()).or_insert(failure).error(&queued.run_id);
            (queued, Err(err))
        })
        .collect()
}

/// Writes `records` in one transaction, again and again while the
/// database cannot be reached (it restarts, the network drops), for up to
/// [`RECONNECT_FOR`]. Every record may be written twice: a commit whose
/// answer was lost may have happened.
/// Returns the runs whose records were not written because another
/// process took them over (then nothing was).
async fn write(pool: &Pool, place: &str, records: &[&Queued]) -> Result<Vec<String>, StoreError> {
    let deadline = tokio::time::Instant::now() + RECONNECT_FOR;
    let mut pause = Duration::from_millis(20);
    loop {
        match write_once(pool, place, records).await {
            Err(Failed { transient: true, .. }) if tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            result => return result.map_err(|failed| failed.error),
        }
    }
}

/// Why a write failed, and whether trying again may help.
struct Failed {
    transient: bool,
    error: StoreError,
}

impl Failed {
    fn pg(place: &str, err: &tokio_postgres::Error) -> Self {
        let error = pg_error(place, err);
        let conflict = err.code().is_some_and(|code| code.code() == "40001" || code.code() == "40P01");
        Failed { transient: error.is_away() || conflict, error }
    }

    fn pool(place: &str, err: deadpool_postgres::PoolError) -> Self {
        let error = pool_error(place, err);
        Failed { transient: error.is_away(), error }
    }
}

async fn write_once(pool: &Pool, place: &str, records: &[&Queued]) -> Result<Vec<String>, Failed> {
    let mut client = pool.get().await.map_err(|err| Failed::pool(place, err))?;
    let err = |err: tokio_postgres::Error| Failed::pg(place, &err);
    let tx = client.transaction().await.map_err(err)?;
    // Prepared first (once per connection, later batches find them
    // cached), so that sent together the records reach the server in the
    // order queued: the connection pipelines them, and a batch waits for
    // about one round trip rather than one a record.
    for sql in super::journal::STATEMENTS {
        tx.prepare_cached(sql).await.map_err(err)?;
    }
    let fenced: Vec<&str> = records
        .iter()
        .filter(|queued| queued.fence.is_some())
        .map(|queued| queued.run_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Sent behind the records, in the same round trip. The lock it takes
    // keeps the epochs it read until the commit: a process taking a run
    // over waits for it (`acquire_lease` locks the row for update).
    let epochs = async {
        if fenced.is_empty() {
            return Ok(Vec::new());
        }
        let statement = tx.prepare_cached(super::journal::LEASE_EPOCHS).await?;
        tx.query(&statement, &[&fenced]).await
    };
    // Sent in this order: the records with statements of their own (a
    // run's creation among them), then the runs' log rows.
    let mut chunks = Chunks::default();
    let mut rows = Vec::new();
    let mut writes = Vec::new();
    for (index, queued) in records.iter().enumerate() {
        match &queued.entry {
            Entry::Record(record) => writes.push(record.write(&tx)),
            Entry::Log(record) => rows.extend(chunks.push(&queued.run_id, index, record)),
        }
    }
    rows.extend(chunks.rows());
    let writes = futures_util::future::try_join_all(writes);
    let appends = futures_util::future::try_join_all(rows.iter().map(|row| super::journal::append(&tx, row)));
    let (_, _, epochs) = futures_util::future::try_join3(writes, appends, epochs).await.map_err(err)?;
    let epochs: HashMap<&str, i64> = epochs.iter().map(|row| (row.get(0), row.get(1))).collect();
    let taken_over: BTreeSet<&str> = records
        .iter()
        .filter(|queued| {
            queued.fence.is_some_and(|fence| epochs.get(queued.run_id.as_str()) != Some(&fence.cast_signed()))
        })
        .map(|queued| queued.run_id.as_str())
        .collect();
    if !taken_over.is_empty() {
        // Rolled back as it drops.
        return Ok(taken_over.into_iter().map(str::to_owned).collect());
    }
    failpoint!("journal.batch.record-written");
    failpoint!("journal.batch.before-commit");
    tx.commit().await.map_err(err)?;
    failpoint!("journal.batch.after-commit");
    Ok(Vec::new())
}
