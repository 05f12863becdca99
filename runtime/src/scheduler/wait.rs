//! Durable waits: a step that waits for an event holds no instance and no
//! slot. While the run has other work, a waiting step waits in memory and an
//! event sent to the live run wakes it; once nothing but waiting steps is
//! left, the run parks: it ends unfinished (`waiting`) and holds nothing,
//! and the service resumes it when an event comes or a wait times out. A
//! wait's start is recorded when it is first reached, so its timeout counts
//! from then across resumes; its result is recorded as one attempt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{RunEvent, Shared};
use crate::run::{Attempt, ExecutionReport, Failure, FailureKind, Outcome, StepReport, StepStatus, now_ms};

/// A run's events and what its waiting steps are doing.
#[derive(Debug, Default)]
pub struct Waits {
    events: Mutex<HashMap<String, Value>>,
    arrived: Notify,
    /// Graph loops at work, and component steps in flight.
    active: AtomicUsize,
    /// Waiting steps blocked on their event.
    blocked: AtomicUsize,
    /// Cancelled once only waiting steps are left: they stop waiting in
    /// memory and the run parks.
    park: CancellationToken,
}

/// Work in progress: the run does not park while one is held.
pub(super) struct Busy<'a>(&'a Waits);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.check();
    }
}

/// How a wait ended.
enum End {
    Event(Value),
    TimedOut,
    Cancelled,
    Parked,
}

impl Waits {
    /// Delivers event `name` to the run: a step waiting for it wakes, and
    /// one that reaches it later finds it. The first of a name is kept.
    pub fn deliver(&self, name: &str, payload: Value) {
        self.events.lock().entry(name.to_owned()).or_insert(payload);
        self.arrived.notify_waiters();
    }

    /// Counts work in progress until the guard is dropped.
    pub(super) fn busy(&self) -> Busy<'_> {
        self.active.fetch_add(1, Ordering::SeqCst);
        Busy(self)
    }

    /// Parks the run when only blocked waiting steps are left. Parking
    /// early (a step about to start) only means a wait reached afterwards
    /// parks at once; the run still ends when its other work does.
    fn check(&self) {
        if self.active.load(Ordering::SeqCst) == 0 && self.blocked.load(Ordering::SeqCst) > 0 {
            self.park.cancel();
        }
    }

    async fn next(&self, name: &str, deadline_ms: Option<f64>, cancel: &CancellationToken) -> End {
        self.blocked.fetch_add(1, Ordering::SeqCst);
        self.check();
        let end = loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(payload) = self.events.lock().get(name) {
                break End::Event(payload.clone());
            }
            let left = deadline_ms.map(|deadline| Duration::from_secs_f64(((deadline - now_ms()) / 1000.0).max(0.0)));
            if left.is_some_and(|left| left.is_zero()) {
                break End::TimedOut;
            }
            let timer = async {
                match left {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = arrived => {}
                () = timer => {}
                () = cancel.cancelled() => break End::Cancelled,
                () = self.park.cancelled() => break End::Parked,
            }
        };
        self.blocked.fetch_sub(1, Ordering::SeqCst);
        end
    }
}

/// Runs the waiting step `i`, waiting for `event` for at most `timeout`.
pub(super) async fn step(
    shared: &Shared,
    i: usize,
    event: &str,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
    report: &mut StepReport,
) {
    let path = shared.path(i);
    let key = ExecutionReport::key(&shared.run_id, &path);
    let mut execution = ExecutionReport {
        path: path.clone(),
        item: None,
        idempotency_key: key.clone(),
        status: StepStatus::Running,
        output: None,
        error: None,
        reused: false,
        input: None,
        attempts: Vec::new(),
    };
    let resume = &shared.base.resume;
    if let Some(output) = resume.completed.get(&key) {
        // Again: a crash may have come between the attempt's records and
        // this one.
        drop(shared.record(|journal, run_id| journal.wait_ended(run_id, &key)));
        (execution.status, execution.output, execution.reused) = (StepStatus::Succeeded, Some(output.clone()), true);
        (report.status, report.output) = (StepStatus::Succeeded, Some(output.clone()));
        report.executions.push(execution);
        return;
    }
    let started_ms = resume.waits.get(&key).copied().unwrap_or_else(now_ms);
    let deadline_ms = timeout.map(|timeout| started_ms + timeout.as_secs_f64() * 1000.0);
    let record =
        shared.record(|journal, run_id| journal.wait_started(run_id, &path, &key, event, started_ms, deadline_ms));
    if !shared.durable(record).await {
        report.status = StepStatus::Cancelled;
        return;
    }
    shared.emit(RunEvent::WaitStarted { path: path.clone(), event: event.to_owned() });
    let outcome = match shared.base.waits.next(event, deadline_ms, cancel).await {
        End::Parked => {
            report.status = StepStatus::Waiting;
            report.reason = Some(format!("waiting for the event `{event}`"));
            return;
        }
        End::Event(payload) => Outcome::Succeeded { output: payload },
        End::TimedOut => Outcome::Failed {
            failure: Failure::new(
                FailureKind::Timeout,
                format!("no `{event}` event came within {}", humantime::format_duration(timeout.unwrap_or_default())),
            ),
        },
        End::Cancelled => Outcome::Failed {
            failure: Failure::new(FailureKind::Cancelled, "the run was cancelled while the step waited"),
        },
    };
    let number = resume.attempts.get(&key).copied().unwrap_or(0) + 1;
    let attempt = Attempt { outcome, finished_ms: Some(now_ms()), ..Attempt::started(number, started_ms) };
    let started = shared.record(|journal, run_id| journal.attempt_started(run_id, &path, &key, &attempt, None));
    shared.durable(started).await;
    shared.record(|journal, run_id| journal.attempt_finished(run_id, &path, &key, &attempt, true));
    drop(shared.record(|journal, run_id| journal.wait_ended(run_id, &key)));
    match &attempt.outcome {
        Outcome::Succeeded { output } => {
            (execution.status, execution.output) = (StepStatus::Succeeded, Some(output.clone()));
            (report.status, report.output) = (StepStatus::Succeeded, Some(output.clone()));
        }
        Outcome::Failed { failure } => {
            let status =
                if failure.kind == FailureKind::Cancelled { StepStatus::Cancelled } else { StepStatus::Failed };
            (execution.status, report.status, report.reason) = (status, status, Some(failure.to_string()));
        }
        Outcome::Running => {}
    }
    execution.attempts.push(attempt);
    report.executions.push(execution);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_parks_once_nothing_else_is_busy_and_an_event_wakes_it_before() {
        let waits = std::sync::Arc::new(Waits::default());
        let cancel = CancellationToken::new();
        let busy = waits.busy();
        let waiting = tokio::spawn({
            let (waits, cancel) = (waits.clone(), cancel.clone());
            async move { matches!(waits.next("go", None, &cancel).await, End::Event(value) if value == 7) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished() && !waits.park.is_cancelled(), "other work holds the run");
        waits.deliver("go", Value::from(7));
        waits.deliver("go", Value::from(8));
        assert!(waiting.await.unwrap(), "woken by the first event of its name");

        let parked = tokio::spawn({
            let (waits, cancel) = (waits.clone(), cancel.clone());
            async move { matches!(waits.next("later", None, &cancel).await, End::Parked) }
        });
        tokio::task::yield_now().await;
        drop(busy);
        assert!(parked.await.unwrap(), "with nothing else busy, the run parks");
        let deadline = Some(now_ms() - 1.0);
        assert!(matches!(waits.next("late", deadline, &cancel).await, End::TimedOut));
    }
}
