//! Per-component policies shared by every step that uses the component: a
//! circuit breaker and a rate limit on attempt starts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::workflow::spec::{BreakerSpec, RateLimitSpec};

/// Closed: attempts run. Open: they fail at once until the cool-down ends.
/// Then one probe runs (half-open); its result closes or reopens it.
#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    spec: BreakerSpec,
    state: parking_lot::Mutex<BreakerState>,
}

#[derive(Debug, Clone, Copy)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Whether an attempt may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    Run,
    /// Refused: the message says until when.
    Refuse(String),
}

impl CircuitBreaker {
    pub(crate) fn new(spec: BreakerSpec) -> Self {
        CircuitBreaker { spec, state: parking_lot::Mutex::new(BreakerState::Closed { failures: 0 }) }
    }

    fn state(&self) -> parking_lot::MutexGuard<'_, BreakerState> {
        self.state.lock()
    }

    pub(crate) fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state();
        match *state {
            BreakerState::Closed { .. } => Admission::Run,
            BreakerState::Open { until } if now < until => Admission::Refuse(format!(
                "the circuit breaker is open after {} consecutive failures; it lets a probe through in {}",
                self.spec.failures,
                humantime::format_duration(round_ms(until - now))
            )),
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: false } => {
                *state = BreakerState::HalfOpen { probing: true };
                Admission::Run
            }
            BreakerState::HalfOpen { probing: true } => {
                Admission::Refuse("the circuit breaker is half-open and its probe attempt is still running".into())
            }
        }
    }

    /// Records the end of an admitted attempt. `failed` counts failures that
    /// say something about the component's health.
    pub(crate) fn record(&self, failed: bool, now: Instant) {
        let mut state = self.state();
        *state = match (*state, failed) {
            (_, false) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, true) if failures + 1 < self.spec.failures => {
                BreakerState::Closed { failures: failures + 1 }
            }
            (_, true) => BreakerState::Open { until: now + self.spec.cool_down },
        };
    }
}

fn round_ms(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis() as u64)
}

/// At most `starts` attempt starts in any window of `per`. A start counts
/// at the moment the attempt runs, so a commit or a parallelism slot that
/// held some attempts back cannot bunch their starts together; attempts are
/// admitted one at a time ([`RateLimiter::admit`]), so only one is between
/// its start record and its start while the others wait. Uses tokio's clock
/// so tests can run it on paused time.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    spec: RateLimitSpec,
    starts: Mutex<VecDeque<tokio::time::Instant>>,
    admitting: tokio::sync::Mutex<()>,
}

/// An attempt's turn to start: others wait until it starts or gives up.
pub(crate) struct Turn<'a> {
    limiter: &'a RateLimiter,
    _admitting: tokio::sync::MutexGuard<'a, ()>,
}

impl Turn<'_> {
    /// The attempt starts now.
    pub(crate) fn start(self) {
        self.limiter.starts.lock().push_back(tokio::time::Instant::now());
    }
}

impl RateLimiter {
    pub(crate) fn new(spec: RateLimitSpec) -> Self {
        RateLimiter { spec, starts: Mutex::new(VecDeque::new()), admitting: tokio::sync::Mutex::new(()) }
    }

    /// Waits for this attempt's turn (in arrival order) and for room in
    /// the window: the attempt may start once [`Turn::start`] says so. Room
    /// only grows while the turn is held.
    pub(crate) async fn admit(&self) -> Turn<'_> {
        let admitting = self.admitting.lock().await;
        loop {
            let next = {
                let now = tokio::time::Instant::now();
                let mut starts = self.starts.lock();
                while starts.front().is_some_and(|&start| now.duration_since(start) >= self.spec.per) {
                    starts.pop_front();
                }
                if starts.len() < self.spec.starts as usize {
                    return Turn { limiter: self, _admitting: admitting };
                }
                starts[0] + self.spec.per
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_probes_after_the_cool_down() {
        let breaker = CircuitBreaker::new(BreakerSpec { failures: 2, cool_down: Duration::from_secs(10) });
        let t0 = Instant::now();
        breaker.record(true, t0);
        assert_eq!(breaker.admit(t0), Admission::Run);
        breaker.record(true, t0);
        assert!(matches!(breaker.admit(t0 + Duration::from_secs(1)), Admission::Refuse(m) if m.contains("in 9s")));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(breaker.admit(later), Admission::Run, "one probe");
        assert!(matches!(breaker.admit(later), Admission::Refuse(_)), "only one probe");
        breaker.record(false, later);
        assert_eq!(breaker.admit(later), Admission::Run, "a good probe closes it");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_spreads_starts_over_windows() {
        let limiter = RateLimiter::new(RateLimitSpec { starts: 2, per: Duration::from_secs(1) });
        let t0 = tokio::time::Instant::now();
        let mut starts = Vec::new();
        for _ in 0..5 {
            let turn = limiter.admit().await;
            // Time passes between the turn and the start (a commit, a slot):
            // the window counts the start.
            tokio::time::sleep(Duration::from_millis(100)).await;
            turn.start();
            starts.push((tokio::time::Instant::now() - t0).as_millis());
        }
        // Each start at least a window after the one two before it.
        assert_eq!(starts, [100, 200, 1200, 1300, 2300]);
    }
}
