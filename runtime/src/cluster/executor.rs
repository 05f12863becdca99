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
use crate::scheduler::{Executor, Prepared, Running};
use crate::store::{Store, Task};

/// How often results are looked for while some are awaited: at first
/// often, then less while none come; least often when the store wakes the
/// poller for every result (polling is then only the fallback).
const POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));
const POLL_WOKEN: Duration = Duration::from_secs(1);

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
        let digest = component.digest();
        if self.kept.lock().contains(&digest) {
            return Ok(digest);
        }
        let (store, path, expected) = (self.store.clone(), component.path().to_owned(), digest.clone());
        let kept = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            let found = crate::sandbox::component_digest(&bytes);
            if found != expected {
                return Err(format!("{} changed since it was compiled; start the run again", path.display()));
            }
            store.put_component(&expected, &bytes).map_err(|err| err.to_string())
        })
        .await
        .map_err(|err| err.to_string())?;
        kept?;
        self.kept.lock().insert(digest.clone());
        Ok(digest)
    }

    async fn hand_over(&self, component: &StepComponent, attempt: &Prepared) -> Result<Attempt, String> {
        let digest = self.keep(component).await?;
        let context = &attempt.request.context;
        let request = serde_json::to_value(TaskRequest::new(digest, attempt)).map_err(|err| err.to_string())?;
        let task = Task {
            run_id: context.run_id.clone(),
            key: context.idempotency_key.clone(),
            attempt: context.attempt,
            tenant: context.tenant.clone(),
            request,
        };
        let store = self.store.clone();
        let id = tokio::task::spawn_blocking(move || store.enqueue(&task))
            .await
            .map_err(|err| err.to_string())?
            .map_err(|err| format!("the queue did not take the attempt: {err}"))?;
        let (sender, receiver) = oneshot::channel();
        self.awaited.tasks.lock().insert(id, sender);
        self.awaited.more.notify_one();
        // Dropped unfinished (the run was cancelled, or stopped): the task
        // is withdrawn, and its worker fenced off.
        let mut withdraw = Withdraw { id, store: Some(self.store.clone()), awaited: &self.awaited };
        let result = receiver.await.map_err(|_| "the result poller stopped".to_owned())?;
        withdraw.store = None;
        let result: TaskResult =
            serde_json::from_value(result).map_err(|err| format!("the worker's result could not be read: {err}"))?;
        Ok(result.attempt)
    }
}

impl Executor for QueueExecutor {
    fn run<'a>(&'a self, component: &'a StepComponent, attempt: Prepared) -> Running<'a> {
        Box::pin(async move {
            let number = attempt.request.context.attempt;
            match self.hand_over(component, &attempt).await {
                Ok(mut attempt) => {
                    attempt.attempt = attempt.attempt.max(number);
                    attempt
                }
                // The attempt did not run: worth another.
                Err(why) => Attempt::refused(number, now_ms(), Failure::new(FailureKind::Retryable, why)),
            }
        })
    }
}

/// Withdraws a task whose result is no longer awaited.
struct Withdraw<'a> {
    id: i64,
    store: Option<Arc<dyn Store>>,
    awaited: &'a Awaited,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else { return };
        self.awaited.tasks.lock().remove(&self.id);
        let id = self.id;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || {
                if let Err(err) = store.cancel(id) {
                    eprintln!("stepbox: cannot withdraw task {id} from the queue: {err}");
                }
            });
        }
    }
}

/// Takes the results of awaited tasks as workers finish them, until the
/// executor is gone.
async fn poll(store: Arc<dyn Store>, awaited: Weak<Awaited>) {
    let mut wait = POLL.0;
    let mut woken = store.signals().results.subscribe();
    let longest = if store.signals().shared { POLL_WOKEN } else { POLL.1 };
    loop {
        // Seen before looking, so a result that comes meanwhile wakes us.
        woken.borrow_and_update();
        let Some(strong) = awaited.upgrade() else { return };
        let ids: Vec<i64> = strong.tasks.lock().keys().copied().collect();
        if ids.is_empty() {
            // Woken for a new task, or now and then to see whether the
            // executor is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), strong.more.notified()).await;
            wait = POLL.0;
            continue;
        }
        drop(strong);
        let taken = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.take_finished(&ids)).await
        };
        let finished = match taken {
            Ok(Ok(finished)) => finished,
            Ok(Err(err)) => {
                eprintln!("stepbox: cannot read results from the queue: {err}; trying again");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        if finished.is_empty() {
            tokio::select! {
                () = tokio::time::sleep(wait) => wait = (wait * 2).min(longest),
                _ = woken.changed() => wait = POLL.0,
            }
            continue;
        }
        wait = POLL.0;
        if let Some(strong) = awaited.upgrade() {
            let mut tasks = strong.tasks.lock();
            for (id, result) in finished {
                if let Some(sender) = tasks.remove(&id) {
                    let _ = sender.send(result);
                }
            }
        }
    }
}
