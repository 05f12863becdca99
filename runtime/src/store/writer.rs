//! Group commit for the journal: records are queued to one writer thread,
//! which commits everything queued while its previous commit was syncing in
//! one transaction. A wide graph pays one fsync for many records; a chain
//! pays one per link, because each link waits for its own start record.
//!
//! Records of a run commit in the order they were queued, and once one of
//! them fails every later record of that run fails too. So a caller may drop
//! a [`Durable`] it does not need to wait for: the run's next awaited record
//! reports the failure.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use tokio::sync::oneshot;

use super::StoreError;

/// Resolves once a queued record, and every record of its run queued
/// before it, is durable.
pub type Durable = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// One record's statements, run inside the batch's transaction.
pub(crate) type Job = Box<dyn FnOnce(&Connection) -> rusqlite::Result<()> + Send>;

/// Records committed together at most; bounds how long one commit holds the
/// database.
const MAX_BATCH: usize = 1024;

struct Queued {
    ticket: Ticket,
    job: Job,
}

/// Who waits for a queued record.
struct Ticket {
    run_id: String,
    /// The run's last record: after it, the run's failure is forgotten, so
    /// the same process can resume the run.
    last: bool,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Why a record failed, kept so later records of the run fail the same way.
#[derive(Clone)]
struct Lost {
    code: Option<ErrorCode>,
    detail: String,
}

impl Lost {
    fn of(err: &rusqlite::Error) -> Self {
        Lost { code: err.sqlite_error_code(), detail: err.to_string() }
    }

    fn error(&self, path: &std::path::Path) -> StoreError {
        StoreError::from_code(path, self.code, self.detail.clone())
    }
}

/// The queue in front of the writer thread. Dropping it commits what is
/// queued, then stops the thread.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: Option<Sender<Queued>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn start(conn: Arc<Mutex<Connection>>, path: PathBuf) -> std::io::Result<Self> {
        let (queue, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("stepbox-journal".into())
            .spawn(move || write_batches(&conn, &path, &receiver))?;
        Ok(Writer { queue: Some(queue), thread: Some(thread) })
    }

    /// Queues `job` as a record of `run_id`; `last` marks the run's final
    /// record.
    pub(crate) fn queue(&self, run_id: &str, last: bool, job: Job) -> Durable {
        let (done, receiver) = oneshot::channel();
        let queued = Queued { ticket: Ticket { run_id: run_id.to_owned(), last, done }, job };
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

fn write_batches(conn: &Mutex<Connection>, path: &std::path::Path, receiver: &Receiver<Queued>) {
    // Runs whose records failed, with the first failure.
    let mut lost: HashMap<String, Lost> = HashMap::new();
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
        let outcomes = commit(&mut conn, batch, &mut lost);
        drop(conn);
        for (ticket, outcome) in outcomes {
            if ticket.last {
                lost.remove(&ticket.run_id);
            }
            let _ = ticket.done.send(outcome.map_err(|lost| lost.error(path)));
        }
    }
}

/// Runs each record in its own savepoint of one transaction: a record that
/// fails is rolled back alone (and fails its run's later records), the
/// others commit together.
fn commit(
    conn: &mut Connection,
    batch: Vec<Queued>,
    lost: &mut HashMap<String, Lost>,
) -> Vec<(Ticket, Result<(), Lost>)> {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(err) => return fail_all(batch.into_iter().map(|queued| queued.ticket), &Lost::of(&err), lost),
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for Queued { ticket, job } in batch {
        let outcome = match lost.get(&ticket.run_id) {
            Some(earlier) => Err(earlier.clone()),
            None => run_job(&mut tx, job).map_err(|err| {
                let failure = Lost::of(&err);
                lost.insert(ticket.run_id.clone(), failure.clone());
                failure
            }),
        };
        outcomes.push((ticket, outcome));
    }
    match tx.commit() {
        Ok(()) => outcomes,
        Err(err) => fail_all(outcomes.into_iter().map(|(ticket, _)| ticket), &Lost::of(&err), lost),
    }
}

fn run_job(tx: &mut rusqlite::Transaction<'_>, job: Job) -> rusqlite::Result<()> {
    let savepoint = tx.savepoint()?;
    job(&savepoint)?;
    savepoint.commit()
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
