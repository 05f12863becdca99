//! The queue of attempts waiting for a worker: what a run's coordinator
//! hands to the processes that run attempts, on one machine or many.
//!
//! A task is one attempt of one execution. Workers claim tasks in batches;
//! a claim is a lease with an owner, an expiry the holder renews, and a
//! fencing token that rises with every claim. A worker that stops renewing
//! (killed, paused, cut off) loses its tasks when their claims expire:
//! another worker claims them again, with a new token, and the old holder's
//! result is refused. Claims are handed out fairly: tenants take turns by
//! weight from how many tasks they already hold across every worker, and
//! none gets more than its `max_concurrent` at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::StoreError;
use crate::tenant::Share;

/// One attempt to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The run it belongs to.
    pub run_id: String,
    /// The execution's idempotency key.
    pub key: String,
    /// Which attempt of the execution.
    pub attempt: u32,
    /// Whose it is: fair share and ceilings go by it.
    pub tenant: String,
    /// What a worker needs to run it; the store keeps it as it is.
    pub request: Value,
}

/// A task a worker holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// The task's id in the queue.
    pub id: i64,
    /// The task.
    pub task: Task,
    /// Who holds it.
    pub owner: String,
    /// Which claim of the task this is: only the latest may renew or
    /// complete it.
    pub token: u64,
    /// How many times the task was claimed, this one included: more than
    /// one when an earlier holder's claim expired.
    pub claims: u32,
}

/// What a claim took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claimed {
    /// The tasks now held.
    pub claims: Vec<Claim>,
    /// The claim had room for more, but tasks were left because their
    /// tenant is at its `max_concurrent`: a completion anywhere may let
    /// them go. Else only a new task (or an expired claim) can.
    pub held_back: bool,
    /// The tenants whose tasks the claim left waiting (at their ceiling,
    /// or not far enough behind for the reserve): a worker with only its
    /// reserve free need not claim again for their new tasks.
    pub passed_over: HashSet<String>,
}

/// How tenants share the workers: each tenant's [`Share`], and the share of
/// a tenant not listed.
#[derive(Debug, Clone, Default)]
pub struct Shares {
    /// By tenant.
    pub tenants: HashMap<String, Share>,
    /// For any other tenant.
    pub default: Share,
}

impl Shares {
    fn of(&self, tenant: &str) -> Share {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }
}

/// Wake-ups for who waits on the store: workers for new tasks, coordinators
/// for results, runs' holders for cancels asked of them. The first two are
/// counters that rise on every event, so a waiter that looked at the queue
/// after reading one misses nothing. Events of this process always count;
/// `shared` says whether other processes' do too (PostgreSQL's
/// LISTEN/NOTIFY), or whether waiters must poll for them.
#[derive(Debug)]
pub struct Signals {
    /// Rises when a task is enqueued.
    pub tasks: tokio::sync::watch::Sender<u64>,
    /// The tenant of each task enqueued, or `None` when tasks of any tenant
    /// may have been (notices were missed): a worker whose own slots are
    /// full looks for a claim for its reserve ([`Room`]) only when a
    /// tenant it does not run has new tasks.
    pub tenants: tokio::sync::broadcast::Sender<Option<Arc<str>>>,
    /// Rises when a task is completed.
    pub results: tokio::sync::watch::Sender<u64>,
    /// The ids of runs whose cancel was asked for
    /// ([`super::Journal::request_cancel`]).
    pub cancels: tokio::sync::broadcast::Sender<String>,
    /// Whether other processes' events count too.
    pub shared: bool,
}

impl Signals {
    pub(crate) fn new(shared: bool) -> Self {
        Signals {
            tasks: tokio::sync::watch::Sender::new(0),
            results: tokio::sync::watch::Sender::new(0),
            // A worker that falls this far behind looks as if any tenant
            // had new tasks.
            tenants: tokio::sync::broadcast::Sender::new(256),
            // A holder that falls this far behind renews its lease to look.
            cancels: tokio::sync::broadcast::Sender::new(64),
            shared,
        }
    }

    pub(crate) fn cancel(&self, run_id: &str) {
        // No holder listening is fine: none runs it here.
        let _ = self.cancels.send(run_id.to_owned());
    }

    pub(crate) fn task(&self, tenant: Option<&str>) {
        self.tasks.send_modify(|count| *count = count.wrapping_add(1));
        // No worker listening is fine.
        let _ = self.tenants.send(tenant.map(Arc::from));
    }

    pub(crate) fn result(&self) {
        self.results.send_modify(|count| *count = count.wrapping_add(1));
    }
}

/// Where a task stands.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskState {
    /// Waiting for a worker (or for one to claim it again).
    Ready,
    /// Held by a worker.
    Claimed {
        /// Who.
        owner: String,
        /// Until when, unless renewed (unix ms).
        expires_ms: i64,
        /// Its holder said it started to run ([`Queue::start`]).
        started: bool,
    },
    /// Done, with the result its holder recorded.
    Done(Value),
}

/// The queue's operations; both stores implement them.
pub trait Queue: Send + Sync {
    /// Adds `task`, unless the queue already has the same attempt of the
    /// same execution: its id either way.
    fn enqueue(&self, task: &Task) -> Result<i64, StoreError>;
    /// Claims up to `room` tasks for `owner` for `ttl`: ready ones, and ones
    /// whose claim expired. Claims are handed out one transaction at a time
    /// across every process, so `shares` and the reserve hold for the whole
    /// queue.
    fn claim(&self, owner: &str, room: Room, ttl: Duration, shares: &Shares) -> Result<Claimed, StoreError>;
    /// Extends `claim` by `ttl` from now; [`StoreError::Fenced`] if the
    /// task was claimed again since.
    fn renew(&self, claim: &Claim, ttl: Duration) -> Result<(), StoreError>;
    /// The holder of `claim` starts running its attempt now: said of an
    /// attempt whose coordinator counts its start against a rate limit
    /// (a worker may claim, then compile for a while). Fails with `Fenced`
    /// if the claim was taken over.
    fn start(&self, claim: &Claim) -> Result<(), StoreError>;
    /// Records the task's result, if `claim` is still the latest;
    /// [`StoreError::Fenced`] if not, and nothing is recorded. Completing
    /// again with the same claim (its answer was lost) is accepted, and
    /// the first result stands.
    fn complete(&self, claim: &Claim, result: &Value) -> Result<(), StoreError>;
    /// Where task `id` stands.
    fn task_state(&self, id: i64) -> Result<TaskState, StoreError>;
    /// The task of attempt `attempt` of execution `key` of `run_id`, if the
    /// queue has it (ready, held or done): a coordinator that took the run
    /// over waits for it rather than run the attempt again.
    fn find_task(&self, run_id: &str, key: &str, attempt: u32) -> Result<Option<i64>, StoreError>;
    /// The results of those of `ids` that are done. A result stays until
    /// its run finishes: a coordinator that takes the run over finds it.
    fn results(&self, ids: &[i64]) -> Result<Vec<(i64, Value)>, StoreError>;
    /// Tasks ready (waiting for a worker) and claimed, by tenant, for the
    /// metrics.
    fn snapshot(&self) -> Result<crate::metrics::Snapshot, StoreError>;
    /// Wake-ups on new tasks and results.
    fn signals(&self) -> &Signals;
}

/// The metrics' view of `(tenant, state, count)` rows.
pub(crate) fn snapshot(rows: Vec<(String, String, i64)>) -> crate::metrics::Snapshot {
    let mut snapshot = crate::metrics::Snapshot { source: "queue", ..Default::default() };
    for (tenant, state, count) in rows {
        let count = u64::try_from(count).unwrap_or(0);
        match state.as_str() {
            "ready" => snapshot.waiting.push((tenant, count)),
            _ => snapshot.running.push((tenant, count)),
        }
    }
    snapshot
}

/// A claimable task, as the stores read it: its tenant and id, in queue
/// order within its tenant.
#[derive(Clone)]
pub(crate) struct Candidate {
    pub(crate) id: i64,
    pub(crate) tenant: String,
}

/// How many tasks a claim may take: `general` for any tenant, and
/// `reserve` more only for tenants holding less than half as many per unit
/// of weight as the busiest tenant. A worker keeps a few slots beyond its
/// own for that reserve, so a tenant arriving at a cluster that other
/// tenants keep busy starts at once, instead of waiting for their attempts
/// to end (they are never taken away: stopping an attempt wastes its work
/// and may repeat its effects). The reserve fills only while tenants are far
/// out of balance: the slots that free go to whoever holds least, and
/// tenants that hold about as much as each other (a tenant alone, or two
/// busy ones) never take it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    /// Slots for any tenant.
    pub general: usize,
    /// Slots for a tenant holding less than half the busiest one only.
    pub reserve: usize,
}

impl Room {
    /// Room for `general` tasks of any tenant, and no reserve.
    pub fn general(general: usize) -> Self {
        Room { general, reserve: 0 }
    }

    /// Every task it could take.
    pub fn total(self) -> usize {
        self.general.saturating_add(self.reserve)
    }
}

/// What [`fair_pick`] picked.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Picked {
    /// The tasks, in the order picked.
    pub(crate) ids: Vec<i64>,
    /// See [`Claimed::held_back`].
    pub(crate) held_back: bool,
    /// See [`Claimed::passed_over`].
    pub(crate) passed_over: HashSet<String>,
}

/// A tenant's tasks held per unit of weight, compared exactly.
#[derive(Clone, Copy)]
struct PerWeight {
    held: u128,
    weight: u128,
}

impl PerWeight {
    fn cmp(self, other: PerWeight) -> std::cmp::Ordering {
        (self.held * other.weight).cmp(&(other.held * self.weight))
    }

    /// Less than half of `other`.
    fn under_half_of(self, other: PerWeight) -> bool {
        2 * self.held * other.weight < other.held * self.weight
    }
}

/// Picks up to `room` of `candidates` (each tenant's in queue order):
/// every pick goes to the tenant with the least held per unit of weight
/// (what it `holds` already, plus what it was picked here), never one at
/// its `max_concurrent`; ties go to the older task. Past `room.general`,
/// picks go only to tenants holding less than half the busiest one (see
/// [`Room`]).
pub(crate) fn fair_pick(
    candidates: Vec<Candidate>,
    holds: &HashMap<String, usize>,
    shares: &Shares,
    room: Room,
) -> Picked {
    let mut queues: HashMap<String, VecDeque<i64>> = HashMap::new();
    for candidate in candidates {
        queues.entry(candidate.tenant).or_default().push_back(candidate.id);
    }
    // Every tenant holding tasks or with tasks to take, by what it holds.
    let mut load: HashMap<String, usize> = holds.clone();
    for tenant in queues.keys() {
        load.entry(tenant.clone()).or_default();
    }
    let per_weight = |load: &HashMap<String, usize>, tenant: &str| PerWeight {
        held: load[tenant] as u128,
        weight: u128::from(shares.of(tenant).weight.max(1)),
    };
    let mut ids = Vec::new();
    while ids.len() < room.total() {
        let next = queues
            .iter()
            .filter(|(tenant, queue)| !queue.is_empty() && load[*tenant] < shares.of(tenant).max_concurrent)
            .min_by(|(a, qa), (b, qb)| per_weight(&load, a).cmp(per_weight(&load, b)).then(qa[0].cmp(&qb[0])))
            .map(|(tenant, _)| tenant.clone());
        let Some(tenant) = next else { break };
        if ids.len() >= room.general {
            let mine = per_weight(&load, &tenant);
            if !load.keys().any(|other| mine.under_half_of(per_weight(&load, other))) {
                break;
            }
        }
        if let Some(id) = queues.get_mut(&tenant).and_then(VecDeque::pop_front) {
            ids.push(id);
            *load.entry(tenant).or_default() += 1;
        }
    }
    let passed_over: HashSet<String> =
        queues.into_iter().filter(|(_, queue)| !queue.is_empty()).map(|(tenant, _)| tenant).collect();
    // Fewer than the general room: every tenant with tasks left is at its
    // ceiling.
    let held_back = ids.len() < room.general && !passed_over.is_empty();
    Picked { ids, held_back, passed_over }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(
        candidates: Vec<Candidate>,
        holds: &HashMap<String, usize>,
        shares: &Shares,
        room: Room,
    ) -> (Vec<i64>, bool) {
        let picked = fair_pick(candidates, holds, shares, room);
        (picked.ids, picked.held_back)
    }

    fn candidates(list: &[(&str, i64)]) -> Vec<Candidate> {
        list.iter().map(|(tenant, id)| Candidate { id: *id, tenant: (*tenant).to_owned() }).collect()
    }

    #[test]
    fn tenants_take_turns_by_weight_from_what_they_hold() {
        let big: Vec<(&str, i64)> = (1..=10).map(|id| ("big", id)).collect();
        let mut all = big.clone();
        all.extend([("small", 100), ("small", 101)]);
        let shares = Shares::default();
        // The small tenant's older-by-id rivals do not go first: turns.
        assert_eq!(pick(candidates(&all), &HashMap::new(), &shares, Room::general(4)), (vec![1, 100, 2, 101], false));
        // The big tenant already holds 3: the small one catches up first.
        let holds = HashMap::from([("big".to_owned(), 3)]);
        assert_eq!(pick(candidates(&all), &holds, &shares, Room::general(3)), (vec![100, 101, 1], false));
        // Weight 2 gets two turns to one.
        let weighted =
            Shares { tenants: HashMap::from([("big".into(), Share { weight: 2, max_concurrent: 9 })]), ..shares };
        assert_eq!(
            pick(candidates(&all), &HashMap::new(), &weighted, Room::general(6)),
            (vec![1, 100, 2, 3, 101, 4], false)
        );
        // Room for all, and all taken: nothing held back.
        assert!(!pick(candidates(&all), &HashMap::new(), &shares, Room::general(20)).1);
    }

    #[test]
    fn a_tenant_at_its_ceiling_gets_nothing_more() {
        let shares = Shares {
            tenants: HashMap::from([("capped".into(), Share { weight: 1, max_concurrent: 2 })]),
            ..Shares::default()
        };
        let list = candidates(&[("capped", 1), ("capped", 2), ("capped", 3)]);
        let held = HashMap::from([("capped".to_owned(), 1)]);
        // One more, and the rest held back for a completion to let go.
        assert_eq!(pick(list.clone(), &held, &shares, Room::general(10)), (vec![1], true));
        // Full before the ceiling mattered: not held back.
        assert_eq!(pick(list, &held, &shares, Room::general(1)), (vec![1], false));
    }

    #[test]
    fn the_reserve_goes_only_to_tenants_far_behind_the_busiest() {
        let shares = Shares::default();
        let big: Vec<(&str, i64)> = (1..=10).map(|id| ("big", id)).collect();
        let held = HashMap::from([("big".to_owned(), 30)]);
        let reserve = Room { general: 0, reserve: 3 };
        // Alone, a tenant is its own busiest: the reserve stays free, and
        // the claim says whose tasks it left.
        let alone = fair_pick(candidates(&big), &held, &shares, reserve);
        assert_eq!((alone.ids, alone.passed_over), (vec![], HashSet::from(["big".to_owned()])));
        assert_eq!(
            pick(candidates(&big), &HashMap::new(), &shares, Room { general: 2, reserve: 3 }),
            (vec![1, 2], false)
        );
        // A newcomer takes the reserve beside a tenant that holds all.
        let mut both = big.clone();
        both.extend([("small", 100), ("small", 101), ("small", 102), ("small", 103)]);
        assert_eq!(pick(candidates(&both), &held, &shares, reserve), (vec![100, 101, 102], false));
        // The busiest may hold nothing more here: it counts all the same.
        let newcomer = candidates(&[("small", 100), ("small", 101)]);
        assert_eq!(pick(newcomer.clone(), &held, &shares, reserve), (vec![100, 101], false));
        // Only while under half the busiest: two tenants about level, or
        // one that caught up halfway, take none of it, so busy tenants
        // cannot keep the reserve full between them.
        let level = HashMap::from([("big".to_owned(), 4), ("small".to_owned(), 3)]);
        let none = fair_pick(candidates(&both), &level, &shares, reserve);
        assert_eq!((none.ids, none.passed_over.len()), (vec![], 2));
        let halfway = HashMap::from([("big".to_owned(), 4), ("small".to_owned(), 1)]);
        assert_eq!(pick(candidates(&both), &halfway, &shares, reserve), (vec![100], false));
        // ... and a third tenant arriving beside the two takes it.
        let mut three = both.clone();
        three.push(("third", 200));
        assert_eq!(pick(candidates(&three), &level, &shares, reserve), (vec![200], false));
        // By weight: a weight-3 tenant holding as many is far behind.
        let weighted =
            Shares { tenants: HashMap::from([("small".into(), Share { weight: 3, max_concurrent: 9 })]), ..shares };
        let holding = HashMap::from([("big".to_owned(), 4), ("small".to_owned(), 4)]);
        assert_eq!(pick(candidates(&both), &holding, &weighted, reserve), (vec![100, 101], false));
        // Never past a tenant's ceiling.
        let capped = Shares {
            tenants: HashMap::from([("small".into(), Share { weight: 1, max_concurrent: 1 })]),
            ..Shares::default()
        };
        assert_eq!(pick(candidates(&both), &held, &capped, reserve), (vec![100], false));
    }
}
