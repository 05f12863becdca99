//! Group commit for the journal: records are queued to one writer thread,
//! which commits everything queued while its previous commit was syncing in
//! one transaction. A record nobody waits for ([`Kind::Lazy`]) waits a
//! little for company: it commits with the next awaited record, or after
//! [`LAZY_WINDOW`]. So a wide graph pays one fsync for many records, and a
//! chain one per link: a link's finish records commit with the next link's
//! start record.
//!
//! Records of a run commit in the order they were queued, and once one of
//! them fails every later record of that run fails too. So a caller may drop
//! a [`Durable`] it does not need to wait for: the run's next awaited record
//! reports the failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use crate::failpoint::failpoint;
pub(crate) use crate::store::group::Kind;
use crate::store::group::{LAZY_WINDOW, MAX_BATCH};
use crate::store::lease::Held;
use crate::store::log::{Chunks, Row};
use crate::store::{Durable, StoreError};

/// Statements run inside the batch's transaction (again, if another record
/// of the batch failed and the batch is retried without it).
pub(crate) type Statements = Box<dyn Fn(&Connection) -> rusqlite::Result<()> + Send>;

/// What a queued record writes.
pub(crate) enum Job {
    /// Statements of its own.
    Statements(Statements),
    /// A record of the run's log ([`crate::store::log`]): the batch appends
    /// each run's records as one row.
    Log(String),
}

struct Queued {
    ticket: Ticket,
    job: Job,
}

/// Who waits for a queued record.
struct Ticket {
    run_id: String,
    kind: Kind,
    /// The lease epoch the run must still have ([`Held::fence`]).
    fence: Option<u64>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Why a record failed, kept so later records of the run fail the same way.
#[derive(Clone)]
enum Lost {
    /// The database failed it.
    Database { code: Option<ErrorCode>, detail: String },
    /// Another process took over the run from the taking of it with this
    /// epoch (see [`Held`]); a later taking's records are its own.
    Lease(u64),
}

impl Lost {
    fn of(err: &rusqlite::Error) -> Self {
        Lost::Database { code: err.sqlite_error_code(), detail: err.to_string() }
    }

    fn error(&self, path: &std::path::Path, run_id: &str) -> StoreError {
        match self {
            Lost::Database { code, detail } => StoreError::from_code(path, *code, detail.clone()),
            Lost::Lease(_) => StoreError::LeaseLost(run_id.to_owned()),
        }
    }
}

/// The queue in front of the writer thread. Dropping it commits what is
/// queued, then stops the thread.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: Option<Sender<Queued>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Transactions committed so far.
    commits: Arc<AtomicU64>,
    /// The leases this handle took, which its records need.
    pub(crate) held: Held,
}

impl Writer {
    pub(crate) fn start(conn: Arc<Mutex<Connection>>, path: PathBuf) -> std::io::Result<Self> {
        let (queue, receiver) = std::sync::mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let counter = commits.clone();
        let thread = std::thread::Builder::new()
            .name("stepbox-journal".into())
            .spawn(move || write_batches(&conn, &path, &receiver, &counter))?;
        Ok(Writer { queue: Some(queue), thread: Some(thread), commits, held: Held::default() })
    }

    /// Transactions committed so far: how well records were grouped.
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Queues `job` as a record of `run_id`, to commit only while the
    /// run's lease is still the one this handle holds, if it holds one.
    pub(crate) fn queue(&self, run_id: &str, kind: Kind, job: Job) -> Durable {
        let (done, receiver) = oneshot::channel();
        let ticket = Ticket { run_id: run_id.to_owned(), kind, fence: self.held.fence(run_id), done };
        let queued = Queued { ticket, job };
        let sent = self.queue.as_ref().is_some_and(|queue| queue.send(queued).is_ok());
        Box::pin(async move {
            match (sent, receiver.await) {
                (true, Ok(result)) => result,
                _ => Err(StoreError::WriterStopped),
            }
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_batches(conn: &Mutex<Connection>, path: &std::path::Path, receiver: &Receiver<Queued>, commits: &AtomicU64) {
    // Runs whose records failed, with the first failure.
    let mut lost: HashMap<String, Lost> = HashMap::new();
    while let Ok(first) = receiver.recv() {
        let lazy_until = Instant::now() + LAZY_WINDOW;
        let mut awaited = first.ticket.kind != Kind::Lazy;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let next = if awaited {
                receiver.try_recv().ok()
            } else {
                receiver.recv_timeout(lazy_until.saturating_duration_since(Instant::now())).ok()
            };
            let Some(queued) = next else { break };
            awaited |= queued.ticket.kind != Kind::Lazy;
            batch.push(queued);
        }
        let mut conn = conn.lock();
        let (records, began) = (batch.len(), Instant::now());
        let outcomes = commit(&mut conn, batch, &mut lost);
        drop(conn);
        if let Some(metrics) = crate::metrics::recording() {
            metrics.journal_committed("sqlite", records, began.elapsed());
        }
        commits.fetch_add(1, Ordering::Relaxed);
        for (Ticket { run_id, kind, done, .. }, outcome) in outcomes {
            if kind == Kind::Last {
                lost.remove(&run_id);
            }
            let _ = done.send(outcome.map_err(|lost| lost.error(path, &run_id)));
        }
    }
}

/// Commits the batch in one transaction. A record that fails is dropped
/// from the batch with every later record of its run, and the rest is tried
/// again; a failed commit fails them all.
fn commit(
    conn: &mut Connection,
    batch: Vec<Queued>,
    lost: &mut HashMap<String, Lost>,
) -> Vec<(Ticket, Result<(), Lost>)> {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    for queued in batch {
        match lost.get(&queued.ticket.run_id) {
            Some(Lost::Lease(epoch)) if queued.ticket.fence != Some(*epoch) => {
                // Not of the taking that was refused: of a later one (this
                // process took the run again), or a release, which needs
                // no lease. Still checked at commit if fenced.
                lost.remove(&queued.ticket.run_id);
                pending.push(queued);
            }
            Some(earlier) => outcomes.push((queued.ticket, Err(earlier.clone()))),
            None => pending.push(queued),
        }
    }
    loop {
        match try_commit(conn, &pending) {
            Ok(()) => {
                outcomes.extend(pending.into_iter().map(|queued| (queued.ticket, Ok(()))));
                return outcomes;
            }
            Err((Some(index), failure)) => {
                let run_id = pending[index].ticket.run_id.clone();
                lost.insert(run_id.clone(), failure.clone());
                let mut position = 0;
                let (kept, failed): (Vec<_>, Vec<_>) = pending.into_iter().partition(|queued| {
                    position += 1;
                    position <= index || queued.ticket.run_id != run_id
                });
                outcomes.extend(failed.into_iter().map(|queued| (queued.ticket, Err(failure.clone()))));
                pending = kept;
            }
            Err((None, failure)) => {
                outcomes.extend(fail_all(pending.into_iter().map(|queued| queued.ticket), &failure, lost));
                return outcomes;
            }
        }
    }
}

/// One transaction over `pending`; on failure, which record failed (`None`:
/// the transaction itself). A record of a run another process took over
/// fails: the transaction holds the database's write lock, so the epochs
/// it reads last stand until it commits.
fn try_commit(conn: &mut Connection, pending: &[Queued]) -> Result<(), (Option<usize>, Lost)> {
    let whole = |err: rusqlite::Error| (None, Lost::of(&err));
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(whole)?;
    let mut chunks = Chunks::default();
    for (index, queued) in pending.iter().enumerate() {
        let run_id = queued.ticket.run_id.as_str();
        match &queued.job {
            Job::Statements(job) => job(&tx).map_err(|err| (Some(index), Lost::of(&err)))?,
            Job::Log(record) => {
                if let Some(row) = chunks.push(run_id, index, record) {
                    append(&tx, &row).map_err(|err| (Some(row.first), Lost::of(&err)))?;
                }
            }
        }
        failpoint!("journal.batch.record-written");
    }
    for row in chunks.rows() {
        append(&tx, &row).map_err(|err| (Some(row.first), Lost::of(&err)))?;
    }
    let mut epochs: HashMap<&str, Option<u64>> = HashMap::new();
    for (index, queued) in pending.iter().enumerate() {
        let Some(fence) = queued.ticket.fence else { continue };
        let run_id = queued.ticket.run_id.as_str();
        let epoch = match epochs.get(run_id) {
            Some(epoch) => *epoch,
            None => {
                let epoch = tx
                    .prepare_cached("SELECT lease_epoch FROM runs WHERE id = ?1")
                    .and_then(|mut statement| statement.query_row([run_id], |row| row.get::<_, i64>(0)).optional())
                    .map_err(|err| (Some(index), Lost::of(&err)))?
                    .map(i64::cast_unsigned);
                epochs.insert(run_id, epoch);
                epoch
            }
        };
        if epoch != Some(fence) {
            return Err((Some(index), Lost::Lease(fence)));
        }
    }
    failpoint!("journal.batch.before-commit");
    tx.commit().map_err(whole)?;
    failpoint!("journal.batch.after-commit");
    Ok(())
}

/// Appends a row to its run's log.
pub(super) fn append(conn: &Connection, row: &Row<'_>) -> rusqlite::Result<()> {
    // No parameter in a WHERE clause: with STAT4, SQLite compiles such a
    // statement again for each new value.
    conn.prepare_cached("INSERT INTO run_log (run_id, records) VALUES (?1, ?2)")?
        .execute(rusqlite::params![row.run_id, row.records])
        .map(drop)
}

fn fail_all(
    tickets: impl Iterator<Item = Ticket>,
    failure: &Lost,
    lost: &mut HashMap<String, Lost>,
) -> Vec<(Ticket, Result<(), Lost>)> {
    tickets
        .map(|ticket| {
            let failure = lost.entry(ticket.run_id.clone()).or_insert_with(|| failure.clone()).clone();
            (ticket, Err(failure))
        })
        .collect()
}
