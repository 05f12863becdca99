//! Attempt slots shared by every run in a process, handed out fairly across
//! tenants: each tenant waits in its own queue, and free slots go round the
//! tenants in turn (a tenant of weight w gets w slots per turn), so a tenant
//! with a huge backlog cannot starve one with a few steps.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::tenant::Share;

/// The process's attempt slots.
#[derive(Debug)]
pub struct Dispatcher {
    state: Mutex<State>,
    slots: usize,
}

#[derive(Debug)]
struct State {
    free: usize,
    tenants: BTreeMap<String, Queue>,
    /// Tenants in turn order; the front is served next.
    turn: VecDeque<String>,
    /// Slots the front tenant has had in its current turn.
    served_in_turn: u32,
    /// No more slots are handed out: the process is shutting down.
    draining: bool,
}

#[derive(Debug, Default)]
struct Queue {
    share: Share,
    running: usize,
    waiting: VecDeque<oneshot::Sender<Slot>>,
}

/// A running attempt's slot; dropping it frees the slot for the next tenant
/// in turn.
#[derive(Debug)]
pub struct Slot {
    /// `None` once the slot was given back by hand.
    dispatcher: Option<Arc<Dispatcher>>,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(dispatcher) = self.dispatcher.take() else { return };
        let mut state = dispatcher.lock();
        state.free += 1;
        if let Some(queue) = state.tenants.get_mut(&self.tenant) {
            queue.running -= 1;
        }
        state.hand_out(&dispatcher);
    }
}

impl Dispatcher {
    /// `slots` attempts run at once over all tenants.
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Dispatcher {
            slots: slots.max(1),
            state: Mutex::new(State {
                free: slots.max(1),
                tenants: BTreeMap::new(),
                turn: VecDeque::new(),
                served_in_turn: 0,
                draining: false,
            }),
        })
    }

    /// How many attempts run at once over all tenants.
    pub fn slots(&self) -> usize {
        self.slots
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Sets how `tenant` is served (weight 1 and no own limit otherwise).
    pub fn set_share(&self, tenant: &str, share: Share) {
        let mut state = self.lock();
        state.tenants.entry(tenant.to_owned()).or_default().share = Share { weight: share.weight.max(1), ..share };
    }

    /// How many of `tenant`'s attempts wait for a slot now.
    pub fn waiting(&self, tenant: &str) -> usize {
        self.lock().tenants.get(tenant).map_or(0, |queue| queue.waiting.len())
    }

    /// Hands out no more slots: attempts running now finish, attempts
    /// waiting for a slot wait until their runs are interrupted. For a
    /// process that is shutting down.
    pub fn drain(&self) {
        self.lock().draining = true;
    }

    /// Attempts waiting for a slot and running now, by tenant, for the
    /// metrics.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        let state = self.lock();
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        crate::metrics::Snapshot {
            waiting: state.tenants.iter().map(|(tenant, queue)| (tenant.clone(), count(queue.waiting.len()))).collect(),
            running: state.tenants.iter().map(|(tenant, queue)| (tenant.clone(), count(queue.running))).collect(),
            source: "process",
        }
    }

    /// How many slots are held by running attempts now.
    pub fn busy(&self) -> usize {
        self.slots - self.lock().free
    }

    /// Waits for a slot for `tenant`.
    pub async fn acquire(self: &Arc<Self>, tenant: &str) -> Slot {
        let (sender, receiver) = oneshot::channel();
        {
            let mut state = self.lock();
            if !state.tenants.contains_key(tenant) {
                state.tenants.insert(tenant.to_owned(), Queue::default());
            }
            if !state.turn.iter().any(|t| t == tenant) {
                state.turn.push_back(tenant.to_owned());
            }
            if let Some(queue) = state.tenants.get_mut(tenant) {
                queue.waiting.push_back(sender);
            }
            state.hand_out(self);
        }
        match receiver.await {
            Ok(slot) => slot,
            // The sender is only dropped with the dispatcher, which the
            // caller holds: unreachable in practice, but a slot is still owed.
            Err(_) => Slot { dispatcher: Some(self.clone()), tenant: tenant.to_owned() },
        }
    }
}

impl State {
    /// Gives free slots to waiting tenants, in turn.
    fn hand_out(&mut self, dispatcher: &Arc<Dispatcher>) {
        let mut idle_turns = 0;
        while !self.draining && self.free > 0 && idle_turns < self.turn.len() {
            let Some(tenant) = self.turn.front().cloned() else { return };
            let Some(queue) = self.tenants.get_mut(&tenant) else {
                self.turn.pop_front();
                continue;
            };
            let can_run = queue.running < queue.share.max_concurrent && !queue.waiting.is_empty();
            if !can_run || self.served_in_turn >= queue.share.weight {
                // Next tenant's turn.
                self.turn.rotate_left(1);
                self.served_in_turn = 0;
                idle_turns = if can_run { 0 } else { idle_turns + 1 };
                continue;
            }
            idle_turns = 0;
            let Some(waiter) = queue.waiting.pop_front() else { continue };
            queue.running += 1;
            self.free -= 1;
            self.served_in_turn += 1;
            let slot = Slot { dispatcher: Some(dispatcher.clone()), tenant: tenant.clone() };
            if let Err(mut slot) = waiter.send(slot) {
                // The waiter gave up (its attempt was cancelled). Dropping
                // the slot normally would lock the state again: give it
                // back by hand.
                slot.dispatcher = None;
                queue.running -= 1;
                self.free += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_go_round_the_tenants_by_weight() {
        let dispatcher = Dispatcher::new(1);
        dispatcher.set_share("big", Share { weight: 2, max_concurrent: usize::MAX });
        let first = dispatcher.acquire("big").await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for tenant in ["big", "big", "big", "big", "small", "small"] {
            let (dispatcher, order) = (dispatcher.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = dispatcher.acquire(tenant).await;
                order.lock().push(tenant);
            }));
            tokio::task::yield_now().await;
        }
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock(), ["big", "small", "big", "big", "small", "big"]);
    }

    #[tokio::test]
    async fn a_tenant_never_exceeds_its_own_limit() {
        let dispatcher = Dispatcher::new(4);
        dispatcher.set_share("t", Share { weight: 1, max_concurrent: 2 });
        let a = dispatcher.acquire("t").await;
        let _b = dispatcher.acquire("t").await;
        let waiting = tokio::spawn({
            let dispatcher = dispatcher.clone();
            async move { dispatcher.acquire("t").await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a third slot waits although two are free");
        let _other = dispatcher.acquire("u").await;
        drop(a);
        waiting.await.unwrap();
    }

    #[tokio::test]
    async fn a_draining_dispatcher_lets_slots_go_and_hands_none_out() {
        let dispatcher = Dispatcher::new(2);
        let held = dispatcher.acquire("t").await;
        dispatcher.drain();
        let waiting = tokio::spawn({
            let dispatcher = dispatcher.clone();
            async move { dispatcher.acquire("t").await }
        });
        tokio::task::yield_now().await;
        assert_eq!(dispatcher.busy(), 1);
        drop(held);
        tokio::task::yield_now().await;
        assert_eq!(dispatcher.busy(), 0);
        assert!(!waiting.is_finished(), "a free slot is not handed out while draining");
        waiting.abort();
    }
}
