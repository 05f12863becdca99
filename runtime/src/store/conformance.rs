//! What every store backend must do, run against each of them: SQLite in a
//! temporary directory and PostgreSQL in a database of the test's own. The
//! durability promises the scheduler builds on (a run's start committed
//! before its attempt runs, a finished execution seen as finished on
//! resume, records of a run committed in order, one live lease holder,
//! one run per idempotency key) are checked here, not per backend.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use stepbox_tests::postgres::TestDatabase;

use super::{
    Database, PgStore, Room, RunFilter, Shares, Started, Store, StoreError, Task, TaskState, TokenRecord, wait,
};
use crate::run::{Attempt, Failure, FailureKind, Outcome, Run, RunStatus, StepPath, StepReport, StepStatus};

/// A backend, and what keeps it alive (its directory, its database).
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    /// Opens the same database again, as a new process would.
    reopen: Box<dyn Fn() -> Arc<dyn Store>>,
    _keep: Box<dyn std::any::Any>,
}

fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let database = TestDatabase::create();
    let url = database.url.clone();
    vec![
        Backend {
            name: "sqlite",
            store: Arc::new(Database::open(&path).unwrap()),
            reopen: Box::new(move || Arc::new(Database::open(&path).unwrap())),
            _keep: Box::new(dir),
        },
        // The store goes before its database is dropped: fields drop in order.
        Backend {
            name: "postgres",
            store: Arc::new(PgStore::open(&url).unwrap()),
            reopen: Box::new(move || Arc::new(PgStore::open(&url).unwrap())),
            _keep: Box::new(database),
        },
    ]
}

fn run(id: &str, tenant: &str, labels: &[(&str, &str)]) -> Run {
    let mut run = Run::new(id.into(), "wf", "/w.yaml", tenant, json!({"n": 1}).as_object().unwrap().clone());
    run.labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    run
}

/// Creates `run`, waits for it, and lets its lease go.
fn created(store: &dyn Store, run: &Run) {
    let (lease, durable) = store.create_run(run, &json!({"w.yaml": "abc"}));
    wait(durable).unwrap();
    wait(store.release_lease(&lease)).unwrap();
}

fn finished(n: u32, output: Value) -> Attempt {
    Attempt {
        outcome: Outcome::Succeeded { output },
        finished_ms: Some(2.0),
        fuel_consumed: 1234,
        peak_memory: 65536,
        ..Attempt::started(n, 1.0)
    }
}

#[test]
fn a_run_reads_back_as_it_was_created_and_lists_by_every_filter() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        created(store, &run("r1", "acme", &[("env", "prod")]));
        std::thread::sleep(Duration::from_millis(2));
        created(store, &run("r2", "acme", &[("env", "dev")]));
        std::thread::sleep(Duration::from_millis(2));
        created(store, &run("r3", "globex", &[]));
        let loaded = store.load_run("r1").unwrap();
        assert_eq!(loaded.inputs, *json!({"n": 1}).as_object().unwrap(), "{name}");
        assert_eq!(loaded.labels.get("env").map(String::as_str), Some("prod"), "{name}");
        assert_eq!(loaded.status, RunStatus::Interrupted, "{name}: running, and nobody holds it");
        assert_eq!(store.fingerprint("r1").unwrap(), json!({"w.yaml": "abc"}), "{name}");
        assert!(matches!(store.load_run("nope"), Err(StoreError::NoSuchRun(_))), "{name}");

        let ids = |filter: RunFilter| -> Vec<String> {
            store.list_runs(&filter).unwrap().into_iter().map(|run| run.id).collect()
        };
        assert_eq!(ids(RunFilter::default()), ["r3", "r2", "r1"], "{name}: newest first");
        assert_eq!(ids(RunFilter { tenant: Some("acme".into()), ..Default::default() }), ["r2", "r1"], "{name}");
        let labelled = RunFilter { labels: vec![("env".into(), "prod".into())], ..Default::default() };
        assert_eq!(ids(labelled), ["r1"], "{name}");
        let page = RunFilter { limit: 2, ..Default::default() };
        assert_eq!(ids(page), ["r3", "r2"], "{name}");
        let next = RunFilter { limit: 2, before: Some("r2".into()), ..Default::default() };
        assert_eq!(ids(next), ["r1"], "{name}: the page after r2");
        let interrupted = RunFilter { status: Some(RunStatus::Interrupted), ..Default::default() };
        assert_eq!(ids(interrupted).len(), 3, "{name}");
        let running = RunFilter { status: Some(RunStatus::Running), ..Default::default() };
        assert!(ids(running).is_empty(), "{name}");
    }
}

#[test]
fn what_a_run_recorded_comes_back_as_its_report_and_its_resume_state() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        let (lease, durable) = store.create_run(&run("r", "t", &[]), &Value::Null);
        let (a, b): (StepPath, StepPath) = ("a".parse().unwrap(), "b[1]".parse().unwrap());
        drop(store.attempt_started("r", &a, "r/a", &Attempt::started(1, 1.0), Some(r#"{"who":"Ada"}"#)));
        let failed = Attempt {
            outcome: Outcome::Failed { failure: Failure::new(FailureKind::Timeout, "too slow") },
            finished_ms: Some(2.0),
            ..Attempt::started(1, 1.0)
        };
        drop(store.attempt_finished("r", &a, "r/a", &failed, false));
        drop(store.attempt_started("r", &a, "r/a", &Attempt::started(2, 3.0), None));
        let mut second = finished(2, json!({"x": [1, 2]}));
        second.stdout.text = "printed".into();
        drop(store.attempt_finished("r", &a, "r/a", &second, true));
        let step = StepReport {
            status: StepStatus::Succeeded,
            output: Some(json!({"x": [1, 2]})),
            started_ms: Some(1.0),
            finished_ms: Some(4.0),
            ..StepReport::pending(a.clone(), true)
        };
        drop(store.step_finished("r", 0, &step));
        let traced = |span: char| {
            crate::traces::TraceParent::parse(&format!("00-{}-{}-01", "a".repeat(32), span.to_string().repeat(16)))
                .unwrap()
        };
        drop(store.run_traced("r", &traced('b')));
        drop(store.run_traced("r", &traced('c')));
        let huge = format!("[{}1]", "1,".repeat(40_000));
        drop(store.attempt_started("r", &b, "r/b[1]", &Attempt::started(1, 5.0), Some(&huge)));
        let outputs = json!({"out": 7}).as_object().unwrap().clone();
        // Awaiting the last record vouches for every one before it.
        wait(store.run_finished("r", RunStatus::Succeeded, &outputs, None)).unwrap();
        wait(durable).unwrap();
        wait(store.release_lease(&lease)).unwrap();

        let state = store.resume_state("r").unwrap();
        assert_eq!(state.completed.get("r/a"), Some(&json!({"x": [1, 2]})), "{name}: a finished execution");
        assert!(!state.completed.contains_key("r/b[1]"), "{name}");
        assert_eq!(state.attempts.get("r/a"), Some(&2), "{name}");
        assert_eq!(state.attempts.get("r/b[1]"), Some(&1), "{name}");
        assert_eq!(state.trace, Some(traced('b')), "{name}: the first drive's trace is kept");

        let report = store.run_report("r").unwrap();
        assert_eq!(report.run.status, RunStatus::Succeeded, "{name}");
        assert_eq!(report.run.outputs, Some(outputs.clone()), "{name}");
        assert_eq!(report.steps.len(), 2, "{name}: {:?}", report.steps);
        let a_report = &report.steps[0];
        assert_eq!(a_report.output, Some(json!({"x": [1, 2]})), "{name}");
        let attempts = &a_report.executions[0].attempts;
        assert_eq!(attempts.len(), 2, "{name}");
        assert_eq!(
            attempts[0].failure().map(|f| (f.kind, f.message.as_str())),
            Some((FailureKind::Timeout, "too slow"))
        );
        assert_eq!(attempts[1].output(), Some(&json!({"x": [1, 2]})), "{name}");
        assert_eq!((attempts[1].fuel_consumed, attempts[1].peak_memory), (1234, 65536), "{name}");
        assert_eq!(report.steps[1].status, StepStatus::Running, "{name}: only an attempt was recorded");
        assert_eq!(a_report.executions[0].input, Some(json!({"who": "Ada"})), "{name}: the input it was given");
        assert_eq!(
            report.steps[1].executions[0].input,
            Some(json!("[an input of 80003 bytes, not kept]")),
            "{name}: a huge input is kept as its size"
        );
        assert_eq!(attempts[1].stdout.text, "printed", "{name}");
        let summary = store.run_summary("r").unwrap();
        let (kept, summed) = (&report.steps[0].executions[0], &summary.steps[0].executions[0]);
        assert_eq!(summed.input, None, "{name}: a summary leaves the input out");
        assert_eq!(summed.attempts[1].stdout.text, "", "{name}: and the records");
        assert_eq!(summed.attempts.len(), kept.attempts.len(), "{name}");
        assert_eq!((summed.status, &summed.output), (kept.status, &kept.output), "{name}: and keeps the rest");
        assert_eq!(summed.attempts[0].outcome, kept.attempts[0].outcome, "{name}");

        // Forgetting a step makes it run again; the run can reopen.
        store.forget_steps("r", &[a]).unwrap();
        assert!(store.resume_state("r").unwrap().completed.is_empty(), "{name}");
        store.reopen_run("r").unwrap();
        assert_eq!(store.load_run("r").unwrap().status, RunStatus::Interrupted, "{name}");
    }
}

#[test]
fn a_run_has_one_live_lease_holder_and_a_lost_lease_cannot_be_renewed_or_released() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        let (mine, durable) = store.create_run(&run("r", "t", &[]), &Value::Null);
        wait(durable).unwrap();
        assert_eq!(store.load_run("r").unwrap().status, RunStatus::Running, "{name}: its creator holds it");
        assert_eq!((mine.owner.as_str(), mine.epoch), (super::this_owner(), 1), "{name}");
        assert_eq!(store.load_run("r").unwrap().owner.as_deref(), Some(super::this_owner()), "{name}");
        let err = store.acquire_lease("r", "elsewhere:1:aaaaaaaa", Duration::from_secs(60)).unwrap_err();
        assert!(matches!(&err, StoreError::Leased { owner, .. } if owner == super::this_owner()), "{name}: {err}");
        assert!(err.to_string().contains("run r is being run by"), "{name}: {err}");
        store.renew_lease(&mine, Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // Expired: another process takes it, with a higher epoch.
        let theirs = store.acquire_lease("r", "elsewhere:1:aaaaaaaa", Duration::from_secs(60)).unwrap();
        assert!(theirs.epoch > mine.epoch, "{name}");
        assert!(matches!(store.renew_lease(&mine, Duration::from_secs(60)), Err(StoreError::LeaseLost(_))), "{name}");
        // A stale release changes nothing.
        wait(store.release_lease(&mine)).unwrap();
        assert_eq!(store.load_run("r").unwrap().owner.as_deref(), Some("elsewhere:1:aaaaaaaa"), "{name}");
        // gc never takes a run that is held.
        assert_eq!(store.gc(f64::MAX, true).unwrap(), 0, "{name}");
        assert_eq!(store.load_run("r").unwrap().status, RunStatus::Running, "{name}");
        wait(store.release_lease(&theirs)).unwrap();
        assert_eq!(store.gc(f64::MAX, true).unwrap(), 1, "{name}");
        assert!(matches!(store.acquire_lease("r", "x:1:b", Duration::from_secs(1)), Err(StoreError::NoSuchRun(_))));
    }
}

#[test]
fn a_holder_that_lost_its_lease_records_nothing_more_of_the_run() {
    for backend in backends() {
        let Backend { name, store: paused, reopen, _keep } = backend;
        // This process (paused past its lease) runs two runs; another takes
        // one of them over.
        let (mine, durable) = paused.create_run(&run("r", "t", &[]), &Value::Null);
        wait(durable).unwrap();
        let (_other, durable) = paused.create_run(&run("o", "t", &[]), &Value::Null);
        wait(durable).unwrap();
        let a: StepPath = "a".parse().unwrap();
        wait(paused.attempt_started("r", &a, "r/a", &Attempt::started(1, 1.0), None)).unwrap();
        paused.renew_lease(&mine, Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let taker = reopen();
        let theirs = taker.acquire_lease("r", "elsewhere:1:aaaaaaaa", Duration::from_secs(60)).unwrap();
        assert!(theirs.epoch > mine.epoch, "{name}");

        // Before its next renewal would tell it, the paused process wakes
        // and records: every record of the run taken over is refused, in
        // the same batch as another run's, which commits.
        let late = paused.attempt_finished("r", &a, "r/a", &finished(1, json!("late")), true);
        let other = paused.attempt_started("o", &a, "o/a", &Attempt::started(1, 1.0), None);
        let later = paused.attempt_started("r", &"b".parse().unwrap(), "r/b", &Attempt::started(1, 1.0), None);
        let outcome = wait(late);
        assert!(matches!(&outcome, Err(StoreError::LeaseLost(run)) if run == "r"), "{name}: {outcome:?}");
        assert!(outcome.unwrap_err().to_string().contains("taken over by another process"), "{name}");
        wait(other).unwrap();
        assert!(matches!(wait(later), Err(StoreError::LeaseLost(_))), "{name}: later records fail too");

        // The new holder sees none of it, and records as it goes.
        let state = taker.resume_state("r").unwrap();
        assert!(state.completed.is_empty(), "{name}: {state:?}");
        assert_eq!(state.attempts.get("r/a"), Some(&1), "{name}: only what came before the taking over");
        assert!(!state.attempts.contains_key("r/b"), "{name}");
        assert_eq!(paused.resume_state("o").unwrap().attempts.get("o/a"), Some(&1), "{name}");
        wait(taker.attempt_finished("r", &a, "r/a", &finished(1, json!("theirs")), true)).unwrap();
        wait(taker.release_lease(&theirs)).unwrap();
        // Its stale release changes nothing.
        wait(paused.release_lease(&mine)).unwrap();
        assert_eq!(taker.load_run("r").unwrap().owner, None, "{name}");

        // This process takes the run up again (a resume): its records of
        // this taking are its own, whatever became of the last one's.
        let again = paused.acquire_lease("r", super::this_owner(), Duration::from_secs(60)).unwrap();
        assert!(again.epoch > theirs.epoch, "{name}");
        wait(paused.attempt_started("r", &"b".parse().unwrap(), "r/b", &Attempt::started(1, 1.0), None)).unwrap();
        wait(paused.run_finished("r", RunStatus::Succeeded, &serde_json::Map::new(), None)).unwrap();
        wait(paused.release_lease(&again)).unwrap();
        let state = taker.resume_state("r").unwrap();
        assert_eq!(state.completed.get("r/a"), Some(&json!("theirs")), "{name}");
        assert_eq!(state.attempts.get("r/b"), Some(&1), "{name}");
        assert_eq!(taker.load_run("r").unwrap().status, RunStatus::Succeeded, "{name}");
    }
}

/// Returns once a store that hears other processes' events (PostgreSQL)
/// listens: its listener raises the queue's signals then.
fn listening(store: &dyn Store, name: &str) {
    if store.signals().shared {
        let listening = store.signals().tasks.subscribe();
        let started = std::time::Instant::now();
        while *listening.borrow() == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "{name}: the listener never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn a_cancel_asked_of_a_running_run_reaches_its_holder_and_ends_with_the_run() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        listening(store, name);
        let mut heard = store.signals().cancels.subscribe();
        let (mine, durable) = store.create_run(&run("r", "t", &[]), &Value::Null);
        wait(durable).unwrap();
        assert!(!store.renew_lease(&mine, Duration::from_secs(60)).unwrap().cancel_requested, "{name}");
        assert!(store.request_cancel("r").unwrap(), "{name}: a running run takes it");
        assert!(store.load_run("r").unwrap().cancel_requested, "{name}");
        assert!(
            store.renew_lease(&mine, Duration::from_secs(60)).unwrap().cancel_requested,
            "{name}: its holder sees it"
        );
        // Where the store notifies (PostgreSQL), through the listener.
        let started = std::time::Instant::now();
        let id = loop {
            match heard.try_recv() {
                Ok(id) => break id,
                Err(_) if started.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(10)),
                Err(err) => panic!("{name}: no cancel signal: {err}"),
            }
        };
        assert_eq!(id, "r", "{name}");
        // Asked again, it stands, and is not notified again.
        assert!(store.request_cancel("r").unwrap(), "{name}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(heard.try_recv().is_err(), "{name}: notified once");
        // Taken up again by another process, it still stands: that one
        // ends the run as asked.
        store.reopen_run("r").unwrap();
        assert!(store.load_run("r").unwrap().cancel_requested, "{name}");
        // A run that ends forgets it, and a finished run takes none.
        wait(store.run_finished("r", RunStatus::Cancelled, &serde_json::Map::new(), None)).unwrap();
        assert!(!store.load_run("r").unwrap().cancel_requested, "{name}");
        assert!(!store.request_cancel("r").unwrap(), "{name}: nothing to cancel");
        assert!(!store.request_cancel("nosuch").unwrap(), "{name}");
        assert!(!store.load_run("r").unwrap().cancel_requested, "{name}");
        // A parked run takes none either: it is cancelled where it waits.
        let (lease, durable) = store.create_run(&run("w", "t", &[]), &Value::Null);
        wait(durable).unwrap();
        wait(store.run_parked("w")).unwrap();
        wait(store.release_lease(&lease)).unwrap();
        assert_eq!(store.load_run("w").unwrap().status, RunStatus::Waiting, "{name}");
        assert!(!store.request_cancel("w").unwrap(), "{name}");
    }
}

#[test]
fn requests_racing_with_one_idempotency_key_start_one_run() {
    for backend in backends() {
        let store = backend.store.clone();
        let name = backend.name;
        let racing: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    wait(store.create_run_once(&run(&format!("r{i}"), "acme", &[]), &Value::Null, "k", "req"))
                })
            })
            .collect();
        let started: Vec<Started> = racing.into_iter().map(|thread| thread.join().unwrap().unwrap()).collect();
        let created: Vec<&Started> = started.iter().filter(|s| matches!(s, Started::Created(_))).collect();
        assert_eq!(created.len(), 1, "{name}: {started:?}");
        let Started::Created(lease) = created[0] else { unreachable!() };
        let existing = Started::Existing(lease.run_id.clone());
        assert!(started.iter().all(|s| s == created[0] || *s == existing), "{name}: {started:?}");
        let conflict = wait(store.create_run_once(&run("other", "acme", &[]), &Value::Null, "k", "different")).unwrap();
        assert_eq!(conflict, Started::Conflict(lease.run_id.clone()), "{name}");
        assert_eq!(store.idempotency_key("acme", "k").unwrap(), Some((lease.run_id.clone(), "req".into())), "{name}");
        assert_eq!(store.list_runs(&RunFilter::default()).unwrap().len(), 1, "{name}: the others left no run");
        let elsewhere = wait(store.create_run_once(&run("g", "globex", &[]), &Value::Null, "k", "req")).unwrap();
        assert!(matches!(elsewhere, Started::Created(_)), "{name}: the key is the tenant's own");
    }
}

#[test]
fn tokens_versions_ticks_waits_and_events_behave_the_same() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        let token = TokenRecord {
            id: "t1".into(),
            tenant: Some("acme".into()),
            name: "ci".into(),
            created_ms: 1,
            revoked_ms: None,
        };
        store.create_token(&token, "hash").unwrap();
        assert_eq!(store.find_token("hash").unwrap(), Some(token.clone()), "{name}");
        assert!(store.revoke_token("t1").unwrap(), "{name}");
        assert!(!store.revoke_token("t1").unwrap(), "{name}: revoked once");
        assert_eq!(store.find_token("hash").unwrap(), None, "{name}");
        assert!(store.list_tokens().unwrap()[0].revoked_ms.is_some(), "{name}");

        let (first, new) = store.deploy("acme", "orders", "aaa", "w.yaml").unwrap();
        assert_eq!((first.version, new), (1, true), "{name}");
        assert!(!store.deploy("acme", "orders", "aaa", "w.yaml").unwrap().1, "{name}");
        assert_eq!(store.deploy("acme", "orders", "bbb", "w.yaml").unwrap().0.version, 2, "{name}");
        assert_eq!(store.workflow_version("acme", "orders", Some(1)).unwrap().unwrap().digest, "aaa", "{name}");
        assert_eq!(store.workflow_version("acme", "orders", None).unwrap().unwrap().digest, "bbb", "{name}");
        assert_eq!(store.list_workflows("acme").unwrap().len(), 1, "{name}");
        let versions: Vec<u32> = store.workflow_versions("acme", "orders").unwrap().iter().map(|v| v.version).collect();
        assert_eq!(versions, [2, 1], "{name}: newest first");
        let (other, _) = store.deploy("globex", "orders", "bbb", "w.yaml").unwrap();
        assert_eq!(other.version, 1, "{name}: another tenant's workflow of the name has versions of its own");
        assert_eq!(store.workflow_version("acme", "orders", Some(3)).unwrap(), None, "{name}");
        assert_eq!(store.workflow_versions("globex", "orders").unwrap().len(), 1, "{name}: a tenant's own versions");
        assert!(store.workflow_versions("acme", "nothing").unwrap().is_empty(), "{name}");
        assert_eq!(store.all_workflows().unwrap()[0].version, 2, "{name}");

        assert_eq!(store.schedule_tick("acme", "orders", "s0").unwrap(), None, "{name}");
        store.set_schedule_tick("acme", "orders", "s0", 2000.0).unwrap();
        store.set_schedule_tick("acme", "orders", "s0", 1000.0).unwrap();
        assert_eq!(store.schedule_tick("acme", "orders", "s0").unwrap(), Some(2000.0), "{name}: ticks only advance");

        let (lease, durable) = store.create_run(&run("w", "acme", &[]), &Value::Null);
        let gate: StepPath = "gate".parse().unwrap();
        drop(store.wait_started("w", &gate, "w/gate", "approve", 10.0, Some(5000.0)));
        wait(store.run_parked("w")).unwrap();
        wait(durable).unwrap();
        wait(store.release_lease(&lease)).unwrap();
        assert_eq!(store.load_run("w").unwrap().status, RunStatus::Waiting, "{name}");
        assert_eq!(store.next_wait_deadline().unwrap(), Some(5000.0), "{name}");
        assert!(store.runs_to_wake(100.0).unwrap().is_empty(), "{name}");
        assert_eq!(store.runs_to_wake(6000.0).unwrap(), ["w"], "{name}: past its deadline");
        assert!(store.event_received("w", "approve", &json!({"by": "ann"})).unwrap(), "{name}");
        assert!(!store.event_received("w", "approve", &json!({"by": "bob"})).unwrap(), "{name}: the first is kept");
        assert_eq!(store.runs_to_wake(100.0).unwrap(), ["w"], "{name}: its event came");
        let state = store.resume_state("w").unwrap();
        assert_eq!(state.events.get("approve"), Some(&json!({"by": "ann"})), "{name}");
        assert_eq!(state.waits.get("w/gate"), Some(&10.0), "{name}");

        // Woken, the run ends that wait and parks at another: the ended
        // wait, whose event is still there, wakes it no more.
        let lease = store.acquire_lease("w", super::this_owner(), super::LEASE_TTL).unwrap();
        store.reopen_run("w").unwrap();
        drop(store.wait_ended("w", "w/gate"));
        let ship: StepPath = "ship".parse().unwrap();
        drop(store.wait_started("w", &ship, "w/ship", "shipped", 20.0, None));
        wait(store.run_parked("w")).unwrap();
        wait(store.release_lease(&lease)).unwrap();
        assert!(store.runs_to_wake(100.0).unwrap().is_empty(), "{name}: an ended wait wakes nothing");
        assert_eq!(store.next_wait_deadline().unwrap(), None, "{name}: nor has a deadline");
        assert!(store.event_received("w", "shipped", &json!({})).unwrap(), "{name}");
        assert_eq!(store.runs_to_wake(100.0).unwrap(), ["w"], "{name}: the open wait's event came");

        // Cancelled while it waited, its wait ended; resumed, the run reaches
        // the wait again, which is open again, with its first start.
        let lease = store.acquire_lease("w", super::this_owner(), super::LEASE_TTL).unwrap();
        store.reopen_run("w").unwrap();
        drop(store.wait_ended("w", "w/ship"));
        drop(store.wait_started("w", &gate, "w/gate", "approve", 30.0, Some(5000.0)));
        wait(store.run_parked("w")).unwrap();
        wait(store.release_lease(&lease)).unwrap();
        assert_eq!(store.runs_to_wake(100.0).unwrap(), ["w"], "{name}: the reopened wait's event is there");
        assert_eq!(store.resume_state("w").unwrap().waits["w/gate"], 10.0, "{name}: its first start kept");
    }
}

#[test]
fn a_records_failure_fails_the_later_records_of_its_run_only() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        created(store, &run("ok", "t", &[]));
        let path: StepPath = "a".parse().unwrap();
        // No such run: its records break a foreign key.
        let doomed = store.attempt_started("ghost", &path, "ghost/a", &Attempt::started(1, 1.0), None);
        let later = store.attempt_started("ghost", &path, "ghost/a", &Attempt::started(2, 1.0), None);
        let fine = store.attempt_started("ok", &path, "ok/a", &Attempt::started(1, 1.0), None);
        assert!(wait(doomed).is_err(), "{name}");
        assert!(wait(later).is_err(), "{name}: after a lost record");
        wait(fine).unwrap();
        assert_eq!(store.resume_state("ok").unwrap().attempts.get("ok/a"), Some(&1), "{name}");
        // The run's last record ends that: the run can be recorded again.
        assert!(wait(store.run_finished("ghost", RunStatus::Failed, &Default::default(), None)).is_err(), "{name}");
        created(store, &run("ghost", "t", &[]));
        wait(store.attempt_started("ghost", &path, "ghost/a", &Attempt::started(3, 1.0), None)).unwrap();
    }
}

#[test]
fn forgetting_a_step_forgets_only_that_step_and_what_is_inside_it() {
    for backend in backends() {
        let store = &*backend.store;
        created(store, &run("a", "t", &[]));
        // `_` is a wildcard in SQL's LIKE: no look-alike may go too (`%`
        // cannot be in a step path at all).
        let paths = ["fetch_a", "fetch-a", "fetchXa", "fetch_ab", "fetch_a.inner", "fetch_a[2]", "fetchzz"];
        for path in paths {
            let key = format!("a/{path}");
            let step: StepPath = path.parse().unwrap();
            drop(store.attempt_started("a", &step, &key, &Attempt::started(1, 0.0), None));
            wait(store.attempt_finished("a", &step, &key, &finished(1, Value::from(path)), true)).unwrap();
        }
        assert!("fetch%".parse::<StepPath>().is_err());
        store.forget_steps("a", &["fetch_a".parse().unwrap()]).unwrap();
        let mut kept: Vec<String> = store.resume_state("a").unwrap().completed.into_keys().collect();
        kept.sort();
        assert_eq!(kept, ["a/fetch-a", "a/fetchXa", "a/fetch_ab", "a/fetchzz"], "{}", backend.name);
    }
}

#[test]
fn awaiting_a_record_makes_every_earlier_one_durable_and_records_share_commits() {
    for backend in backends() {
        let store = &*backend.store;
        created(store, &run("a", "t", &[]));
        let before = store.journal_commits();
        for n in 0..500 {
            let path: StepPath = format!("s[{n}]").parse().unwrap();
            // Dropped without waiting.
            drop(store.attempt_started("a", &path, &format!("a/s[{n}]"), &Attempt::started(1, 0.0), None));
        }
        wait(store.run_finished("a", RunStatus::Succeeded, &Default::default(), None)).unwrap();
        assert_eq!(store.resume_state("a").unwrap().attempts.len(), 500, "{}", backend.name);
        // Queued while a commit runs, they share commits (one per batch of
        // up to 1,024) rather than taking 501. How many depends on how fast
        // the test queues them against how fast a commit is.
        let commits = store.journal_commits() - before;
        assert!(commits <= 50, "{}: {commits} commits for 501 records", backend.name);
    }
}

#[test]
fn closing_the_store_commits_what_is_queued() {
    for backend in backends() {
        let Backend { name, store, reopen, _keep } = backend;
        created(&*store, &run("b", "t", &[]));
        for n in 0..50 {
            let path: StepPath = format!("s[{n}]").parse().unwrap();
            drop(store.attempt_started("b", &path, &format!("b/s[{n}]"), &Attempt::started(1, 0.0), None));
        }
        drop(store);
        assert_eq!(reopen().resume_state("b").unwrap().attempts.len(), 50, "{name}");
    }
}

#[test]
fn the_key_value_state_keeps_every_concurrent_increment() {
    for backend in backends() {
        let kv = backend.store.key_values();
        let scope = super::KvScope { tenant: "t".into(), workflow: "wf".into() };
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (kv, scope) = (kv.clone(), scope.clone());
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        kv.increment(&scope, "b", "n", 1, &super::KvQuota::default()).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(kv.get(&scope, "b", "n").unwrap(), Some(b"200".to_vec()), "{}", backend.name);
    }
}

fn task(run_id: &str, key: &str, tenant: &str) -> Task {
    Task { run_id: run_id.into(), key: key.into(), attempt: 1, tenant: tenant.into(), request: json!({"key": key}) }
}

#[test]
fn a_task_is_enqueued_once_claimed_once_and_completed_by_its_holder() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        created(store, &run("r", "t", &[]));
        let id = store.enqueue(&task("r", "r/a", "t")).unwrap();
        assert_eq!(store.enqueue(&task("r", "r/a", "t")).unwrap(), id, "{name}: the same attempt is one task");
        assert_eq!(store.task_state(id).unwrap(), TaskState::Ready, "{name}");
        let ttl = Duration::from_secs(30);
        let claims = store.claim("w1", Room::general(10), ttl, &Shares::default()).unwrap().claims;
        assert_eq!(claims.len(), 1, "{name}");
        let claim = &claims[0];
        assert_eq!(
            (claim.id, claim.token, claim.claims, claim.task.request.clone()),
            (id, 1, 1, json!({"key": "r/a"}))
        );
        assert!(
            store.claim("w2", Room::general(10), ttl, &Shares::default()).unwrap().claims.is_empty(),
            "{name}: held"
        );
        assert!(
            matches!(store.task_state(id).unwrap(), TaskState::Claimed { owner, started: false, .. } if owner == "w1"),
            "{name}"
        );
        store.start(claim).unwrap();
        assert!(matches!(store.task_state(id).unwrap(), TaskState::Claimed { started: true, .. }), "{name}");
        store.renew(claim, ttl).unwrap();
        store.complete(claim, &json!({"ok": true})).unwrap();
        assert_eq!(store.task_state(id).unwrap(), TaskState::Done(json!({"ok": true})), "{name}");
        assert!(
            store.claim("w2", Room::general(10), ttl, &Shares::default()).unwrap().claims.is_empty(),
            "{name}: done"
        );
        // Again by its holder (an answer was lost): accepted, the first
        // result stands.
        store.complete(claim, &json!(1)).unwrap();
        assert_eq!(store.task_state(id).unwrap(), TaskState::Done(json!({"ok": true})), "{name}: once");
        assert!(matches!(store.task_state(id + 1000), Err(StoreError::NoSuchTask(_))), "{name}");
    }
}

#[test]
fn a_worker_that_lost_its_claim_cannot_renew_or_complete_and_the_task_is_claimed_again() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        created(store, &run("r", "t", &[]));
        let id = store.enqueue(&task("r", "r/a", "t")).unwrap();
        let paused = store
            .claim("paused", Room::general(1), Duration::from_millis(1), &Shares::default())
            .unwrap()
            .claims
            .remove(0);
        store.start(&paused).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let taken = store
            .claim("alive", Room::general(1), Duration::from_secs(30), &Shares::default())
            .unwrap()
            .claims
            .remove(0);
        assert_eq!((taken.id, taken.token, taken.claims), (id, 2, 2), "{name}: claimed again, counted");
        assert!(matches!(store.start(&paused), Err(StoreError::Fenced { .. })), "{name}");
        assert!(
            matches!(store.task_state(id).unwrap(), TaskState::Claimed { started: false, .. }),
            "{name}: a new claim has not started"
        );
        assert!(matches!(store.renew(&paused, Duration::from_secs(30)), Err(StoreError::Fenced { .. })), "{name}");
        assert!(matches!(store.complete(&paused, &json!("late")), Err(StoreError::Fenced { .. })), "{name}");
        store.complete(&taken, &json!("on time")).unwrap();
        assert_eq!(store.task_state(id).unwrap(), TaskState::Done(json!("on time")), "{name}");
    }
}

#[test]
fn results_are_read_until_their_run_finishes() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        created(store, &run("r", "t", &[]));
        let ttl = Duration::from_secs(30);
        let (a, b) = (store.enqueue(&task("r", "r/a", "t")).unwrap(), store.enqueue(&task("r", "r/b", "t")).unwrap());
        let claims = store.claim("w", Room::general(2), ttl, &Shares::default()).unwrap().claims;
        assert_eq!(claims.iter().map(|c| c.id).collect::<Vec<_>>(), [a, b], "{name}");
        store.complete(&claims[0], &json!({"out": "a"})).unwrap();
        assert_eq!(store.results(&[a, b, a + 1000]).unwrap(), [(a, json!({"out": "a"}))], "{name}: only the done one");
        assert_eq!(store.results(&[a]).unwrap(), [(a, json!({"out": "a"}))], "{name}: it stays");
        assert!(store.results(&[]).unwrap().is_empty(), "{name}");
        assert!(
            store.claim("w2", Room::general(10), ttl, &Shares::default()).unwrap().claims.is_empty(),
            "{name}: done is never claimed"
        );
    }
}

#[test]
fn a_run_taken_over_finds_its_tasks_and_a_finished_one_leaves_none_and_fences_their_holders() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        created(store, &run("r", "t", &[]));
        created(store, &run("s", "t", &[]));
        let ttl = Duration::from_secs(30);
        let first = store.enqueue(&task("r", "r/a", "t")).unwrap();
        let held = store.claim("old", Room::general(1), ttl, &Shares::default()).unwrap().claims.remove(0);
        let second = store.enqueue(&task("r", "r/b", "t")).unwrap();
        let other = store.enqueue(&task("s", "s/a", "t")).unwrap();
        assert_eq!(store.find_task("r", "r/a", 1).unwrap(), Some(first), "{name}: held, it is found");
        assert_eq!(store.find_task("r", "r/b", 1).unwrap(), Some(second), "{name}: ready, it is found");
        assert_eq!(store.find_task("r", "r/a", 2).unwrap(), None, "{name}: another attempt's");
        store.complete(&held, &json!("done")).unwrap();
        assert_eq!(store.find_task("r", "r/a", 1).unwrap(), Some(first), "{name}: done, it is found");
        let held = store.claim("old", Room::general(1), ttl, &Shares::default()).unwrap().claims.remove(0);
        assert_eq!(held.id, second, "{name}");
        wait(store.run_finished("r", RunStatus::Failed, &serde_json::Map::new(), None)).unwrap();
        assert_eq!(store.find_task("r", "r/a", 1).unwrap(), None, "{name}");
        assert!(matches!(store.renew(&held, ttl), Err(StoreError::Fenced { .. })), "{name}");
        assert!(matches!(store.complete(&held, &json!(1)), Err(StoreError::Fenced { .. })), "{name}");
        let left: Vec<i64> = store
            .claim("new", Room::general(10), ttl, &Shares::default())
            .unwrap()
            .claims
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(left, [other], "{name}: only the other run's task is left");
    }
}

#[test]
fn blobs_are_kept_by_digest_once() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        assert_eq!(store.blob("abc").unwrap(), None, "{name}");
        store.put_blob("abc", b"\0asm first").unwrap();
        store.put_blob("abc", b"other").unwrap();
        assert_eq!(store.blob("abc").unwrap().as_deref(), Some(&b"\0asm first"[..]), "{name}");
    }
}

#[test]
fn workers_claiming_at_once_never_share_a_task_and_tenants_take_turns() {
    for backend in backends() {
        let store = backend.store.clone();
        let name = backend.name;
        created(&*store, &run("big", "big", &[]));
        created(&*store, &run("small", "small", &[]));
        for n in 0..60 {
            store.enqueue(&task("big", &format!("big/s[{n}]"), "big")).unwrap();
        }
        for n in 0..3 {
            store.enqueue(&task("small", &format!("small/s[{n}]"), "small")).unwrap();
        }
        // The first claim already serves the small tenant: turns, not age.
        let first = store.claim("w0", Room::general(4), Duration::from_secs(30), &Shares::default()).unwrap().claims;
        let small = first.iter().filter(|claim| claim.task.tenant == "small").count();
        assert_eq!(small, 2, "{name}: {first:?}");
        let workers: Vec<_> = (1..=4)
            .map(|worker| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    loop {
                        let claims = store
                            .claim(&format!("w{worker}"), Room::general(5), Duration::from_secs(30), &Shares::default())
                            .unwrap()
                            .claims;
                        if claims.is_empty() {
                            return ids;
                        }
                        ids.extend(claims.iter().map(|claim| claim.id));
                    }
                })
            })
            .collect();
        let mut ids: Vec<i64> = first.iter().map(|claim| claim.id).collect();
        for worker in workers {
            ids.extend(worker.join().unwrap());
        }
        let total = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!((total, ids.len()), (63, 63), "{name}: every task claimed, none twice");
    }
}

#[test]
fn a_tenants_ceiling_holds_across_every_worker() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        created(store, &run("r", "capped", &[]));
        for n in 0..10 {
            store.enqueue(&task("r", &format!("r/s[{n}]"), "capped")).unwrap();
        }
        let shares = Shares {
            tenants: std::collections::HashMap::from([(
                "capped".to_owned(),
                crate::tenant::Share { weight: 1, max_concurrent: 3 },
            )]),
            ..Shares::default()
        };
        let ttl = Duration::from_secs(30);
        let one = store.claim("w1", Room::general(2), ttl, &shares).unwrap();
        let two = store.claim("w2", Room::general(5), ttl, &shares).unwrap();
        assert_eq!((one.claims.len(), two.claims.len()), (2, 1), "{name}: three at once, whoever asks");
        // The first was full; the second had room the ceiling kept empty,
        // so it looks again when a task completes.
        assert_eq!((one.held_back, two.held_back), (false, true), "{name}");
        store.complete(&one.claims[0], &json!(null)).unwrap();
        assert_eq!(
            store.claim("w3", Room::general(5), ttl, &shares).unwrap().claims.len(),
            1,
            "{name}: one finished, one more"
        );
    }
}

#[test]
fn the_reserve_lets_a_newcomer_in_beside_a_busy_tenant_across_workers() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        created(store, &run("big", "big", &[]));
        created(store, &run("small", "small", &[]));
        for n in 0..12 {
            store.enqueue(&task("big", &format!("big/s[{n}]"), "big")).unwrap();
        }
        let (ttl, shares) = (Duration::from_secs(30), Shares::default());
        let full = Room { general: 0, reserve: 2 };
        // Two workers' slots full of the big tenant; their reserve stays
        // free of it, and the claim says whose tasks it left.
        assert_eq!(store.claim("w1", Room::general(4), ttl, &shares).unwrap().claims.len(), 4, "{name}");
        assert_eq!(store.claim("w2", Room::general(4), ttl, &shares).unwrap().claims.len(), 4, "{name}");
        let vain = store.claim("w1", full, ttl, &shares).unwrap();
        assert!(vain.claims.is_empty(), "{name}: the busiest gets no reserve");
        assert_eq!(vain.passed_over, std::collections::HashSet::from(["big".to_owned()]), "{name}");
        listening(store, name);
        let mut announced = store.signals().tenants.subscribe();
        for n in 0..5 {
            store.enqueue(&task("small", &format!("small/s[{n}]"), "small")).unwrap();
        }
        // Workers hear whose tasks came (PostgreSQL: through the listener).
        let started = std::time::Instant::now();
        loop {
            match announced.try_recv() {
                Ok(Some(tenant)) if &*tenant == "small" => break,
                Ok(_) => {}
                Err(_) if started.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(10)),
                Err(err) => panic!("{name}: the newcomer was not announced: {err}"),
            }
        }
        // The newcomer goes in at once, on either worker, until it holds
        // half as many as the big tenant.
        let one = store.claim("w1", full, ttl, &shares).unwrap().claims;
        let two = store.claim("w2", full, ttl, &shares).unwrap().claims;
        let tenants: Vec<&str> = one.iter().chain(&two).map(|claim| claim.task.tenant.as_str()).collect();
        assert_eq!(tenants, ["small"; 4], "{name}");
        let mut more = store.claim("w3", Room { general: 0, reserve: 5 }, ttl, &shares).unwrap().claims;
        assert!(more.is_empty(), "{name}: halfway to the busiest, no more reserve: {more:?}");
        // A general slot takes whoever holds least.
        more = store.claim("w3", Room::general(1), ttl, &shares).unwrap().claims;
        assert_eq!(more.iter().map(|claim| claim.task.tenant.as_str()).collect::<Vec<_>>(), ["small"], "{name}");
    }
}

#[test]
fn text_a_guest_controls_is_stored_alike_and_ids_no_store_holds_are_not_found() {
    for backend in backends() {
        let store = &*backend.store;
        let name = backend.name;
        let (lease, durable) = store.create_run(&run("r", "t", &[]), &Value::Null);
        let path: StepPath = "a".parse().unwrap();
        let mut attempt = Attempt {
            outcome: Outcome::Failed { failure: Failure::new(FailureKind::Trap, "bad\0byte") },
            finished_ms: Some(2.0),
            ..Attempt::started(1, 1.0)
        };
        attempt.stdout.text = "out\0put".into();
        drop(store.attempt_started("r", &path, "r/a", &Attempt::started(1, 1.0), None));
        drop(store.attempt_finished("r", &path, "r/a", &attempt, true));
        let step = StepReport {
            status: StepStatus::Failed,
            reason: Some("because\0".into()),
            ..StepReport::pending(path.clone(), true)
        };
        drop(store.step_finished("r", 0, &step));
        wait(store.run_finished("r", RunStatus::Failed, &Default::default(), Some("run\0error"))).unwrap();
        wait(durable).unwrap();
        wait(store.release_lease(&lease)).unwrap();
        let report = store.run_report("r").unwrap();
        assert_eq!(report.run.error.as_deref(), Some("run\u{FFFD}error"), "{name}");
        assert_eq!(report.steps[0].reason.as_deref(), Some("because\u{FFFD}"), "{name}");
        let stored = &report.steps[0].executions[0].attempts[0];
        assert_eq!(stored.failure().map(|f| f.message.as_str()), Some("bad\u{FFFD}byte"), "{name}");
        assert_eq!(stored.stdout.text, "out\u{FFFD}put", "{name}");
        assert!(matches!(store.load_run("r\0"), Err(StoreError::NoSuchRun(_))), "{name}");
        assert_eq!(store.find_token("h\0").unwrap(), None, "{name}");
    }
}

/// Rows as both stores wrote them before a run's attempts, executions and
/// steps became its log: a for_each step whose second item failed once, a
/// wait that ended, an attempt left running, and a step retried with
/// `--from` (its attempt kept, its result forgotten).
pub(super) const OLD_ROWS: &str = r#"
    INSERT INTO runs (id, workflow, workflow_path, fingerprint, tenant, inputs, status, created_ms, updated_ms)
    VALUES ('r', 'w', 'w.yaml', 'null', 't', '{}', 'waiting', 1, 1);
    INSERT INTO steps (run_id, step_id, position, status, reason, output, started_ms, finished_ms, required)
    VALUES ('r', 'a', 0, 'succeeded', NULL, '[1,2]', 1.0, 4.0, TRUE),
           ('r', 'gate', 1, 'succeeded', NULL, '{"by":"ann"}', 5.0, 6.0, FALSE);
    INSERT INTO executions (run_id, key, step_id, status, output)
    VALUES ('r', 'r/a[0]', 'a[0]', 'succeeded', '1'), ('r', 'r/a[1]', 'a[1]', 'succeeded', '2'),
           ('r', 'r/gate', 'gate', 'succeeded', '{"by":"ann"}');
    INSERT INTO attempts (run_id, key, attempt, step_id, status, kind, message, started_ms, finished_ms,
                          fuel, peak_memory, logs, stdout, stderr, delay_before_ms, input)
    VALUES ('r', 'r/a[0]', 1, 'a[0]', 'succeeded', NULL, NULL, 1.0, 2.0, 10, 4096, '[]', 'hi', '', 0, '{"n":0}'),
           ('r', 'r/a[1]', 1, 'a[1]', 'failed', 'trap', 'boom', 1.0, 2.0, 5, 4096, '[]', '', 'oops', 0, '{"n":1}'),
           ('r', 'r/a[1]', 2, 'a[1]', 'succeeded', NULL, NULL, 3.0, 4.0, 7, 4096, '[]', '', '', 250, '{"n":1}'),
           ('r', 'r/gate', 1, 'gate', 'succeeded', NULL, NULL, 5.0, 6.0, 0, 0, '[]', '', '', 0, NULL),
           ('r', 'r/c', 1, 'c', 'failed', 'timeout', 'slow', 5.0, 6.0, 0, 0, '[]', '', '', 0, NULL),
           ('r', 'r/b', 1, 'b', 'running', NULL, NULL, 7.0, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL);
    INSERT INTO waits (run_id, key, step_id, event, started_ms, deadline_ms)
    VALUES ('r', 'r/gate', 'gate', 'approve', 5.0, NULL);
    INSERT INTO run_events (run_id, name, payload, received_ms) VALUES ('r', 'approve', '{"by":"ann"}', 5.5);"#;

/// [`OLD_ROWS`] read back from the log they moved into, as they read before.
pub(super) fn assert_moved_into_the_log(store: &dyn Store, name: &str) {
    let state = store.resume_state("r").unwrap();
    assert_eq!(state.completed.len(), 3, "{name}");
    assert_eq!((&state.completed["r/a[1]"], &state.completed["r/gate"]), (&json!(2), &json!({"by": "ann"})), "{name}");
    let attempts = [("r/a[0]", 1), ("r/a[1]", 2), ("r/gate", 1), ("r/c", 1), ("r/b", 1)];
    assert_eq!(state.attempts, attempts.into_iter().map(|(key, n)| (key.to_owned(), n)).collect(), "{name}");
    assert!(store.runs_to_wake(100.0).unwrap().is_empty(), "{name}: the ended wait wakes nothing");

    let report = store.run_report("r").unwrap();
    let ids: Vec<String> = report.steps.iter().map(|step| step.id.to_string()).collect();
    assert_eq!(ids, ["a", "gate", "b", "c"], "{name}");
    let (a, gate, b, c) = (&report.steps[0], &report.steps[1], &report.steps[2], &report.steps[3]);
    assert_eq!((a.status, a.output.clone(), a.finished_ms), (StepStatus::Succeeded, Some(json!([1, 2])), Some(4.0)));
    assert!(!gate.required, "{name}");
    let item = &a.executions[1];
    assert_eq!((item.idempotency_key.as_str(), item.input.clone()), ("r/a[1]", Some(json!({"n": 1}))), "{name}");
    let failure = item.attempts[0].failure().unwrap();
    assert_eq!((failure.kind, failure.message.as_str()), (FailureKind::Trap, "boom"), "{name}");
    assert_eq!((item.attempts[0].stderr.text.as_str(), item.attempts[0].fuel_consumed), ("oops", 5), "{name}");
    assert_eq!((item.attempts[1].output(), item.attempts[1].delay_before_ms), (Some(&json!(2)), 250.0), "{name}");
    assert_eq!(a.executions[0].attempts[0].stdout.text, "hi", "{name}");
    assert_eq!((b.status, b.executions[0].attempts[0].finished_ms), (StepStatus::Running, None), "{name}");
    assert_eq!((c.status, c.executions[0].status), (StepStatus::Running, StepStatus::Running), "{name}: forgotten");
    assert_eq!(c.executions[0].attempts[0].failure().unwrap().kind, FailureKind::Timeout, "{name}");
}
