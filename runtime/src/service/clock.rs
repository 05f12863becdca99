//! The service's clock, which schedules read: the system's, or one a test
//! sets by hand, so cron ticks can be tested without waiting for them.

use std::future::Future;
use std::pin::Pin;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Where the time comes from.
pub trait Clock: Send + Sync {
    /// Now, in unix milliseconds.
    fn now_ms(&self) -> f64;
    /// Resolves once it is `ms` or later.
    fn sleep_until(&self, ms: f64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The system's clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> f64 {
        crate::run::now_ms()
    }

    fn sleep_until(&self, ms: f64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let wait = std::time::Duration::from_secs_f64(((ms - self.now_ms()) / 1000.0).max(0.0));
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<f64>,
    moved: Notify,
}

impl ManualClock {
    /// A clock that reads `ms`.
    pub fn at(ms: f64) -> Self {
        ManualClock { now: Mutex::new(ms), moved: Notify::new() }
    }

    /// Moves the clock to `ms` (never back).
    pub fn set(&self, ms: f64) {
        let mut now = self.now.lock();
        *now = now.max(ms);
        drop(now);
        self.moved.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> f64 {
        *self.now.lock()
    }

    fn sleep_until(&self, ms: f64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let moved = self.moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                if self.now_ms() >= ms {
                    return;
                }
                moved.await;
            }
        })
    }
}
