//! A run's live events, numbered from 1, for the API's event streams: a
//! client that lost its connection comes back with the last number it saw
//! and gets what followed. The newest [`KEEP`] events of a run are kept.
//!
//! One log serves every drive of a run in this process (a parked run that
//! an event wakes goes on numbering where it stopped). A log rebuilt from
//! the run's record (after a restart, or once a finished run's log left
//! the cache) is numbered from an origin of its own, the time it was
//! built, as its order need not be the live one: a number from any other
//! log is below that origin (or beyond what it gave), and such a reader
//! gets the stream from its start again. So a reader may see events twice
//! across a restart, and never misses one.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::scheduler::RunEvent;

/// Events kept per run: a run's memory in the service does not grow with
/// its size.
pub const KEEP: usize = 10_000;

/// One event as sent: its number and its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    /// From 1, in the order the run emitted them.
    pub id: u64,
    /// The event as JSON.
    pub json: Arc<str>,
}

/// The events of one run.
#[derive(Debug, Default)]
pub struct EventLog {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Numbers start after it.
    origin: u64,
    /// The number of the first kept event, less one.
    dropped: u64,
    events: VecDeque<Arc<str>>,
    finished: bool,
}

/// What a reader gets: the events after the number it gave, and whether
/// the run is over (no more will come).
#[derive(Debug)]
pub struct Batch {
    /// Events, oldest first.
    pub events: Vec<Numbered>,
    /// No more events will come.
    pub finished: bool,
    /// Events after the given number that are no longer kept.
    pub missed: u64,
}

impl EventLog {
    /// An empty log for events rebuilt from a record, numbered from an
    /// origin no other log of the run has used: microseconds since the
    /// epoch, times a thousand (so below 2^63 until the year 2262).
    pub fn rebuilt() -> Self {
        let micros = u64::try_from(std::time::UNIX_EPOCH.elapsed().unwrap_or_default().as_micros()).unwrap_or(0);
        let origin = micros.saturating_mul(1000);
        EventLog { state: Mutex::new(State { origin, dropped: origin, ..State::default() }), changed: Notify::new() }
    }

    /// Adds an event, dropping the oldest beyond [`KEEP`].
    pub fn push(&self, event: &RunEvent) {
        let json: Arc<str> = serde_json::to_string(event).unwrap_or_else(|_| "{}".into()).into();
        let mut state = self.state.lock();
        state.events.push_back(json);
        if state.events.len() > KEEP {
            state.events.pop_front();
            state.dropped += 1;
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Whether this drive of the run is over ([`EventLog::finish`]).
    pub fn is_finished(&self) -> bool {
        self.state.lock().finished
    }

    /// Marks this drive of the run over: readers end once they have every
    /// event.
    pub fn finish(&self) {
        self.state.lock().finished = true;
        self.changed.notify_waiters();
    }

    /// Opens the log again for the run's next drive, its numbers going on.
    /// The drive before ended its stream with the run's end; the run goes
    /// on, so that end, kept under its number, becomes `run_continued`: a
    /// reader from the start reads on to the new drive's end instead of
    /// stopping at the old one (and a client skips an event it does not
    /// know).
    pub fn reopen(&self) {
        let mut state = self.state.lock();
        state.finished = false;
        if let Some(last) = state.events.back_mut().filter(|last| last.starts_with(r#"{"type":"run_finished""#)) {
            *last = r#"{"type":"run_continued"}"#.into();
        }
    }

    /// The events after number `after`; waits for one when there is none
    /// and the run goes on.
    pub async fn after(&self, after: u64) -> Batch {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so an event pushed in between
            // still wakes this reader.
            changed.as_mut().enable();
            {
                let state = self.state.lock();
                let given = state.dropped + state.events.len() as u64;
                let after = if after > given || after < state.origin { state.origin } else { after };
                let first = after.max(state.dropped);
                let skip = usize::try_from(first - state.dropped).unwrap_or(usize::MAX);
                if skip < state.events.len() || state.finished {
                    let events = state
                        .events
                        .iter()
                        .enumerate()
                        .skip(skip)
                        .map(|(i, json)| Numbered { id: state.dropped + i as u64 + 1, json: json.clone() })
                        .collect();
                    return Batch { events, finished: state.finished, missed: first - after };
                }
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunStatus;

    fn event(n: u32) -> RunEvent {
        RunEvent::AttemptStarted { path: crate::run::StepPath::root("s"), attempt: n }
    }

    #[tokio::test]
    async fn a_reader_gets_what_followed_its_last_event_and_waits_for_more() {
        let log = Arc::new(EventLog::default());
        log.push(&event(1));
        log.push(&event(2));
        let batch = log.after(1).await;
        assert_eq!(batch.events.iter().map(|e| e.id).collect::<Vec<_>>(), [2]);
        assert!(batch.events[0].json.contains("\"attempt\":2"), "{}", batch.events[0].json);
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.after(2).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        log.push(&RunEvent::RunFinished { status: RunStatus::Succeeded });
        log.finish();
        let batch = waiting.await.unwrap();
        assert_eq!(batch.events[0].id, 3);
        assert!(batch.events[0].json.contains("\"type\":\"run_finished\""), "{}", batch.events[0].json);
        let batch = log.after(3).await;
        assert!(batch.events.is_empty() && batch.finished);
    }

    #[tokio::test]
    async fn only_the_newest_events_are_kept_and_a_reader_learns_what_it_missed() {
        let log = EventLog::default();
        for n in 0..KEEP as u32 + 5 {
            log.push(&event(n));
        }
        let batch = log.after(0).await;
        assert_eq!(batch.missed, 5);
        assert_eq!(batch.events.first().map(|e| e.id), Some(6));
        assert_eq!(batch.events.len(), KEEP);
    }

    #[tokio::test]
    async fn a_reopened_log_numbers_on_and_a_number_it_never_gave_restarts_the_stream() {
        let log = EventLog::default();
        log.push(&event(1));
        log.push(&RunEvent::RunFinished { status: crate::run::RunStatus::Failed });
        log.finish();
        log.reopen();
        log.push(&event(2));
        // The old end no longer ends the stream: the run went on.
        let all = log.after(0).await;
        let kinds: Vec<&str> = all.events.iter().map(|e| &*e.json).collect();
        assert_eq!(kinds[1], r#"{"type":"run_continued"}"#, "{kinds:?}");
        let batch = log.after(2).await;
        assert_eq!(batch.events.iter().map(|e| e.id).collect::<Vec<_>>(), [3]);
        assert!(!batch.finished);
        let batch = log.after(9).await;
        assert_eq!((batch.events.len(), batch.missed), (3, 0));
    }

    #[tokio::test]
    async fn a_rebuilt_log_numbers_apart_and_gives_a_reader_of_another_log_everything() {
        let log = EventLog::rebuilt();
        log.push(&event(1));
        log.push(&event(2));
        let all = log.after(0).await;
        assert_eq!((all.events.len(), all.missed), (2, 0));
        assert!(all.events[0].id > 1_000_000_000_000_000_000, "{}", all.events[0].id);
        // A number from the live log it replaces (small) and one it gave.
        assert_eq!(log.after(5).await.events.len(), 2);
        assert_eq!(
            log.after(all.events[0].id).await.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            [all.events[1].id]
        );
    }
}
