//! A run's fuel budget (`max_run_fuel`). Each attempt reserves the fuel it
//! may burn before it starts and gives back what it did not use when it
//! ends, so attempts running side by side cannot together go over the
//! budget: the sum of what they hold never exceeds what is left.

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Fuel left for the attempts of one run.
pub(crate) struct FuelBudget {
    state: Mutex<State>,
    /// Woken when an attempt gives fuel back.
    returned: Notify,
}

struct State {
    /// Not reserved by any attempt, nor used.
    left: u64,
    /// Attempts holding a reservation.
    holders: usize,
}

impl FuelBudget {
    pub(crate) fn new(total: u64) -> Self {
        FuelBudget { state: Mutex::new(State { left: total, holders: 0 }), returned: Notify::new() }
    }

    /// Up to `want` fuel for one attempt. When nothing is left but running
    /// attempts hold reservations, waits for what they give back; `None`
    /// when the budget is spent.
    pub(crate) async fn reserve(&self, want: u64) -> Option<u64> {
        loop {
            let returned = {
                let mut state = self.state.lock();
                if state.left > 0 {
                    let granted = want.min(state.left);
                    state.left -= granted;
                    state.holders += 1;
                    return Some(granted);
                }
                if state.holders == 0 {
                    return None;
                }
                // Registered before the lock is let go, so a return in
                // between is not missed.
                self.returned.notified()
            };
            returned.await;
        }
    }

    /// Ends a reservation of `reserved` of which the attempt `used` some.
    pub(crate) fn give_back(&self, reserved: u64, used: u64) {
        let mut state = self.state.lock();
        state.left += reserved.saturating_sub(used);
        state.holders -= 1;
        drop(state);
        self.returned.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_never_add_up_to_more_than_the_budget() {
        let budget = FuelBudget::new(100);
        assert_eq!(budget.reserve(60).await, Some(60));
        assert_eq!(budget.reserve(60).await, Some(40));
        // Nothing left, but both may give some back: the third waits.
        let budget = std::sync::Arc::new(budget);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(60).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        budget.give_back(60, 50);
        assert_eq!(waiting.await.unwrap(), Some(10));
        budget.give_back(40, 40);
        budget.give_back(10, 10);
        assert_eq!(budget.reserve(1).await, None);
    }
}
