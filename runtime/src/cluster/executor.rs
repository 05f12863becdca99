//! The coordinator's side: a run's attempts handed to workers through the
//! store's queue, and their results waited for.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{Notify, oneshot};

use super::wire::{TaskRequest, TaskResult};
use crate::run::{Attempt, Failure, FailureKind, now_ms};
use crate::sandbox::StepComponent;
use crate::scheduler::{Executor, Prepared, Reattached, Running, Started};
use crate::store::{Store, StoreError, Task, TaskState};

/// How often results are looked for while some are awaited: at first
/// often, then less while none come. Where the store wakes the poller for
/// every result, only now and then (polling is then only the fallback).
const POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));
const POLL_WOKEN: Duration = Duration::from_secs(1);

/// How long a call is tried again while the database is away.
const AWAY_FOR: Duration = Duration::from_secs(30);

/// Attempts one coordinator hands to workers at once, unless told
/// otherwise: enough to keep many workers busy, few enough that one run
/// does not fill the queue (tenants take turns in it anyway).
pub const HANDED_OVER: usize = 256;

/// Hands attempts to `stepbox worker` processes through the queue of a
/// store they share. One per process: it polls for the results of every
/// run's attempts at once.
pub struct QueueExecutor {
    store: Arc<dyn Store>,
    /// Components whose bytes the store holds already.
    kept: Mutex<HashSet<String>>,
    awaited: Arc<Awaited>,
}

/// The tasks whose results someone waits for.
#[derive(Default)]
struct Awaited {
    tasks: Mutex<HashMap<i64, oneshot::Sender<Value>>>,
    more: Notify,
}

impl QueueExecutor {
    /// An executor on `store`'s queue; starts its result poller on the
    /// current tokio runtime, which it stops once the executor is dropped.
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        let awaited = Arc::new(Awaited::default());
        tokio::spawn(poll(store.clone(), Arc::downgrade(&awaited)));
        Arc::new(QueueExecutor { store, kept: Mutex::default(), awaited })
    }

    /// Puts the component's bytes in the store, once per process: workers
    /// load it by digest. The file is read again, so it must still be the
    /// one that was compiled.
    async fn keep(&self, component: &StepComponent) -> Result<String, String> {
        let digest = component.digest().to_string();
        if self.kept.lock().contains(&digest) {
            return Ok(digest);
        }
        let (path, expected) = (component.path().to_owned(), digest.clone());
        let bytes = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            let found = crate::sandbox::component_digest(&bytes);
            if found != expected {
                return Err(format!("{} changed since it was compiled; start the run again", path.display()));
            }
            Ok(bytes)
        })
        .await
        .map_err(|err| err.to_string())??;
        let wanted = digest.clone();
        persist(&self.store, move |store| store.put_blob(&wanted, &bytes)).await?;
        self.kept.lock().insert(digest.clone());
        Ok(digest)
    }

    async fn hand_over(
        &self,
        component: &StepComponent,
        attempt: &Prepared,
        started: Option<Started<'_>>,
    ) -> Result<Attempt, String> {
        let digest = self.keep(component).await?;
        let context = &attempt.request.context;
        let request = serde_json::to_value(TaskRequest::new(digest, attempt, started.is_some()))
            .map_err(|err| err.to_string())?;
        let task = Task {
            run_id: context.run_id.clone(),
            key: context.idempotency_key.clone(),
            attempt: context.attempt,
            tenant: context.tenant.clone(),
            request,
        };
        let id = persist(&self.store, move |store| store.enqueue(&task))
            .await
            .map_err(|err| format!("the queue did not take the attempt: {err}"))?;
        let outcome = self.outcome(id);
        let Some(started) = started else { return outcome.await };
        tokio::pin!(outcome);
        tokio::select! {
            result = &mut outcome => {
                started();
                return result;
            }
            () = self.started_on_worker(id) => started(),
        }
        outcome.await
    }

    /// Returns once the worker holding task `id` says its attempt started
    /// (or it finished). Starts are not announced, so it looks often at
    /// first, then less; only an attempt whose component has a rate limit is
    /// watched.
    async fn started_on_worker(&self, id: i64) {
        let mut wait = POLL.0;
        loop {
            let store = self.store.clone();
            if let Ok(Ok(TaskState::Claimed { started: true, .. } | TaskState::Done(_))) =
                tokio::task::spawn_blocking(move || store.task_state(id)).await
            {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(POLL.1);
        }
    }

    /// The attempt of task `id`, once a worker reports it.
    async fn outcome(&self, id: i64) -> Result<Attempt, String> {
        let (sender, receiver) = oneshot::channel();
        self.awaited.tasks.lock().insert(id, sender);
        self.awaited.more.notify_one();
        let _forget = Forget { id, awaited: &self.awaited };
        let result = receiver.await.map_err(|_| "the result poller stopped".to_owned())?;
        let result: TaskResult =
            serde_json::from_value(result).map_err(|err| format!("the worker's result could not be read: {err}"))?;
        Ok(result.attempt)
    }
}

impl Executor for QueueExecutor {
    fn run<'a>(&'a self, component: &'a StepComponent, attempt: Prepared, started: Option<Started<'a>>) -> Running<'a> {
        Box::pin(async move {
            let number = attempt.request.context.attempt;
            settle(self.hand_over(component, &attempt, started).await, number)
        })
    }

    /// The task the run's earlier coordinator left for this attempt, ready,
    /// held or done, is waited for as if this one had handed it over: a
    /// coordinator's death costs no attempt its work.
    fn reattach<'a>(&'a self, run_id: &'a str, key: &'a str, number: u32) -> Reattached<'a> {
        Box::pin(async move {
            let (run, wanted) = (run_id.to_owned(), key.to_owned());
            let found = persist(&self.store, move |store| store.find_task(&run, &wanted, number)).await;
            let Ok(Some(id)) = found else { return None };
            Some(settle(self.outcome(id).await, number))
        })
    }
}

/// The attempt numbered `number` as a worker reported it (numbered on if
/// tries before it were lost), or, when it did not run, a failure worth
/// another attempt.
fn settle(outcome: Result<Attempt, String>, number: u32) -> Attempt {
    match outcome {
        Ok(mut attempt) => {
            attempt.attempt = attempt.attempt.max(number);
            attempt
        }
        Err(why) => Attempt::refused(number, now_ms(), Failure::new(FailureKind::Retryable, why)),
    }
}

/// Runs an idempotent store call off the async threads, again while the
/// database is away (it restarts), for up to [`AWAY_FOR`].
async fn persist<T: Send + 'static>(
    store: &Arc<dyn Store>,
    call: impl Fn(&dyn Store) -> Result<T, StoreError> + Send + Sync + 'static,
) -> Result<T, String> {
    let call = Arc::new(call);
    let deadline = tokio::time::Instant::now() + AWAY_FOR;
    let mut pause = Duration::from_millis(50);
    loop {
        let (store, call) = (store.clone(), call.clone());
        match tokio::task::spawn_blocking(move || call(&*store)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) if err.is_away() && tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Ok(Err(err)) => return Err(err.to_string()),
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// Stops waiting for a task whose result is no longer awaited. The task
/// itself is left: the run's next coordinator waits for it in turn, and the
/// run's end removes it.
struct Forget<'a> {
    id: i64,
    awaited: &'a Awaited,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.awaited.tasks.lock().remove(&self.id);
    }
}

/// Delivers the results of awaited tasks as workers finish them, until
/// the executor is gone.
async fn poll(store: Arc<dyn Store>, awaited: Weak<Awaited>) {
    let (soon, longest) = if store.signals().shared { (POLL_WOKEN, POLL_WOKEN) } else { POLL };
    let mut wait = soon;
    let mut woken = store.signals().results.subscribe();
    loop {
        // Seen before looking, so a result that comes meanwhile wakes us.
        woken.borrow_and_update();
        let Some(strong) = awaited.upgrade() else { return };
        let ids: Vec<i64> = strong.tasks.lock().keys().copied().collect();
        if ids.is_empty() {
            // Woken for a new task, or now and then to see whether the
            // executor is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), strong.more.notified()).await;
            wait = soon;
            continue;
        }
        drop(strong);
        let taken = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.results(&ids)).await
        };
        let finished = match taken {
            Ok(Ok(finished)) => finished,
            Ok(Err(err)) => {
                eprintln!("stepbox: cannot read results from the queue: {err}; trying again");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        // Looked for again when woken or after a while, not at once: a
        // look at once would mostly find nothing, and cost a query.
        if finished.is_empty() {
            wait = (wait * 2).min(longest);
        } else {
            wait = soon;
            if let Some(strong) = awaited.upgrade() {
                let mut tasks = strong.tasks.lock();
                for (id, result) in finished {
                    if let Some(sender) = tasks.remove(&id) {
                        let _ = sender.send(result);
                    }
                }
            }
        }
        let Some(strong) = awaited.upgrade() else { return };
        let mut until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                _ = woken.changed() => {
                    wait = soon;
                    break;
                }
                // A task awaited since the look: its result may have come
                // before it was awaited, its notice already spent. Looked
                // for soon, not at once: under load the next notice comes
                // first, and a look per task would cost a query per step.
                () = strong.more.notified() => until = until.min(tokio::time::Instant::now() + POLL.1),
            }
        }
    }
}
