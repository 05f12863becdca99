//! Each guest example run through the sandbox: the healthy ones succeed with
//! the right output, the hostile ones end in their failure class within their
//! limit, and the host (this process) carries on.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use common::{load, request, run, sandbox};
use serde_json::json;
use stepbox::run::{FailureKind, LogLevel, Outcome};
use stepbox::sandbox::{DirGrant, EngineConfig, Sandbox};
use stepbox::store::MemoryKeyValueStore;
use stepbox_tests::guests;

/// Slack on top of a time limit for a busy, shared test machine.
const SLACK: Duration = Duration::from_secs(3);

fn failure_kind(report: &stepbox::run::Attempt) -> FailureKind {
    match &report.outcome {
        Outcome::Failed { failure } => failure.kind,
        Outcome::Succeeded { output } => panic!("expected a failure, the step returned {output}"),
        Outcome::Running => panic!("the attempt did not end"),
    }
}

#[tokio::test]
async fn hello_greets_its_input_and_logs() {
    let report = run(guests::HELLO, request(json!({ "name": "Ada" }))).await;
    assert_eq!(report.output(), Some(&json!({ "greeting": "Hello, Ada!" })), "{report:?}");
    assert!(report.fuel_consumed > 0);
    assert!(report.peak_memory > 0);
    let log = &report.logs[0];
    assert_eq!(log.level, LogLevel::Info);
    assert_eq!(log.context, "hello");
    assert_eq!(log.message, "greeting Ada in step step");
}

#[tokio::test]
async fn environment_variables_reach_the_step_only_when_granted() {
    let mut req = request(json!({ "name": "Ada" }));
    req.grants.env.insert("GREETING".into(), "Ahoy".into());
    let report = run(guests::HELLO, req).await;
    assert_eq!(report.output(), Some(&json!({ "greeting": "Ahoy, Ada!" })));
    // SAFETY: tests in this binary do not read the environment concurrently.
    unsafe { std::env::set_var("GREETING", "Leaked") };
    let report = run(guests::HELLO, request(json!({ "name": "Ada" }))).await;
    assert_eq!(report.output(), Some(&json!({ "greeting": "Hello, Ada!" })), "the host environment is not passed on");
}

#[tokio::test]
async fn input_of_the_wrong_shape_is_a_fatal_error_naming_the_type() {
    let report = run(guests::HELLO, request(json!({ "nom": "Ada" }))).await;
    let failure = report.failure().expect("bad input must fail");
    assert_eq!(failure.kind, FailureKind::Fatal);
    assert!(failure.message.contains("hello::Input") && failure.message.contains("missing field `name`"), "{failure}");
}

#[tokio::test]
async fn transform_reshapes_an_order_with_config_values() {
    let order = json!({
        "id": "o-7",
        "customer": { "first_name": "Grace", "last_name": "Hopper" },
        "items": [
            { "sku": "tea", "quantity": 3, "unit_price_cents": 250 },
            { "sku": "cup", "quantity": 1, "unit_price_cents": 1000 }
        ]
    });
    let mut req = request(order.clone());
    req.grants.config.insert("currency".into(), "EUR".into());
    req.grants.config.insert("tax_percent".into(), "10".into());
    let report = run(guests::TRANSFORM, req).await;
    assert_eq!(
        report.output(),
        Some(&json!({
            "invoice_for": "o-7",
            "bill_to": "Grace Hopper",
            "currency": "EUR",
            "lines": [ { "sku": "tea", "amount_cents": 750 }, { "sku": "cup", "amount_cents": 1000 } ],
            "subtotal_cents": 1750,
            "tax_cents": 175,
            "total_cents": 1925
        })),
        "{report:?}"
    );

    // Without config the defaults apply.
    let report = run(guests::TRANSFORM, request(order)).await;
    assert_eq!(report.output().unwrap()["currency"], "USD");
    assert_eq!(report.output().unwrap()["tax_cents"], 0);
}

#[tokio::test]
async fn transform_rejects_a_bad_config_value_as_fatal() {
    let mut req = request(json!({ "id": "o", "customer": { "first_name": "a", "last_name": "b" }, "items": [
        { "sku": "x", "quantity": 1, "unit_price_cents": 1 } ] }));
    req.grants.config.insert("tax_percent".into(), "lots".into());
    let failure = run(guests::TRANSFORM, req).await.failure().cloned().unwrap();
    assert_eq!(failure.kind, FailureKind::Fatal);
    assert!(failure.message.contains("`tax_percent`"), "{failure}");
}

#[tokio::test]
async fn flaky_fails_retryably_until_its_attempt() {
    let component = load(guests::FLAKY);
    for attempt in 1..=3 {
        let mut req = request(json!({ "succeed_on_attempt": 3 }));
        req.context.attempt = attempt;
        let report = sandbox().run(&component, req).await;
        if attempt < 3 {
            let failure = report.failure().unwrap();
            assert_eq!(failure.kind, FailureKind::Retryable);
            assert!(failure.kind.retryable_by_default());
            assert!(failure.message.contains(&format!("attempt {attempt} of 3")), "{failure}");
        } else {
            assert_eq!(report.output(), Some(&json!({ "succeeded_on_attempt": 3 })));
        }
    }
}

#[tokio::test]
async fn counter_keeps_state_per_tenant_and_workflow() {
    let component = load(guests::COUNTER);
    let run_in = |workflow: &str, tenant: &str, run_id: &str| {
        let mut req = request(json!({}));
        req.context.tenant = tenant.into();
        req.context.workflow = workflow.into();
        req.context.run_id = run_id.into();
        sandbox().run(&component, req)
    };
    let run_as = |tenant: &str, run_id: &str| run_in("counter-state", tenant, run_id);
    let first = run_as("acme", "r1").await;
    assert_eq!(first.output(), Some(&json!({ "count": 1, "previous_run": null, "runs_seen": 1 })), "{first:?}");
    let second = run_as("acme", "r2").await;
    assert_eq!(second.output(), Some(&json!({ "count": 2, "previous_run": "r1", "runs_seen": 2 })));
    let other_tenant = run_as("globex", "r3").await;
    assert_eq!(other_tenant.output(), Some(&json!({ "count": 1, "previous_run": null, "runs_seen": 1 })));
    // The same tenant's other workflows have their own state too.
    let other_workflow = run_in("counter-elsewhere", "acme", "r4").await;
    assert_eq!(other_workflow.output(), Some(&json!({ "count": 1, "previous_run": null, "runs_seen": 1 })));
}

#[tokio::test]
async fn parallel_counters_never_lose_an_update() {
    let component = load(guests::COUNTER);
    let attempts = (0..24).map(|i| {
        let component = component.clone();
        let mut req = request(json!({ "key": "parallel" }));
        req.context.workflow = "counter-parallel".into();
        req.context.run_id = format!("r{i}");
        tokio::spawn(async move { sandbox().run(&component, req).await })
    });
    let mut counts = Vec::new();
    for attempt in attempts {
        let report = attempt.await.unwrap();
        counts.push(report.output().expect("counter succeeds")["count"].as_i64().unwrap());
    }
    counts.sort();
    assert_eq!(counts, (1..=24).collect::<Vec<i64>>(), "every increment is seen exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_counters_on_the_durable_store_never_lose_an_update() {
    let dir = std::env::temp_dir().join(format!("stepbox-kv-{}", std::process::id()));
    let db = std::sync::Arc::new(stepbox::store::Database::open(&dir).unwrap());
    let durable = stepbox::sandbox::Sandbox::new(stepbox::sandbox::EngineConfig::default(), db.key_values()).unwrap();
    let component = durable.load(std::path::Path::new(guests::COUNTER)).unwrap();
    let attempts = (0..16).map(|i| {
        let (durable, component) = (durable.clone(), component.clone());
        let mut req = request(json!({ "key": "parallel" }));
        req.context.run_id = format!("r{i}");
        tokio::spawn(async move { durable.run(&component, req).await })
    });
    let mut counts = Vec::new();
    for attempt in attempts {
        let report = attempt.await.unwrap();
        let output = report.output().unwrap_or_else(|| panic!("{report:?}"));
        counts.push(output["count"].as_i64().unwrap());
        assert!((1..=16).contains(&output["runs_seen"].as_i64().unwrap()), "compare-and-swap updates: {output}");
    }
    counts.sort();
    assert_eq!(counts, (1..=16).collect::<Vec<i64>>());
    // The state is in the file: a new store on the same directory sees it.
    let reopened = stepbox::store::Database::open(&dir).unwrap();
    let scope = stepbox::store::KvScope { tenant: "tenant".into(), workflow: "tests".into() };
    use stepbox::store::KeyValueStore;
    let kv = reopened.key_values();
    assert_eq!(kv.get(&scope, "default", "parallel").unwrap(), Some(b"16".to_vec()));
    assert_eq!(kv.get(&scope, "default", "runs_seen").unwrap(), Some(b"16".to_vec()));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn fs_read_reads_only_granted_directories() {
    let dir = std::env::temp_dir().join(format!("stepbox-fs-read-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "granted").unwrap();

    let mut req = request(json!({ "path": "/data/notes.txt" }));
    req.grants.dirs.push(DirGrant::new(&dir, "/data", true).unwrap());
    let report = run(guests::FS_READ, req).await;
    assert_eq!(report.output(), Some(&json!({ "path": "/data/notes.txt", "contents": "granted", "bytes": 7 })));

    // Without a grant there is no filesystem at all.
    let failure = run(guests::FS_READ, request(json!({ "path": "/data/notes.txt" }))).await.failure().cloned().unwrap();
    assert_eq!(failure.kind, FailureKind::Fatal);
    assert!(failure.message.contains("cannot read /data/notes.txt"), "{failure}");

    // `..` does not climb out of a grant.
    let secret = dir.parent().unwrap().join(format!("stepbox-secret-{}", std::process::id()));
    std::fs::write(&secret, "secret").unwrap();
    let escape = format!("/data/../{}", secret.file_name().unwrap().to_string_lossy());
    let mut req = request(json!({ "path": escape }));
    req.grants.dirs.push(DirGrant::new(&dir, "/data", true).unwrap());
    assert_eq!(failure_kind(&run(guests::FS_READ, req).await), FailureKind::Fatal);

    std::fs::remove_file(secret).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_grant_of_a_directory_that_is_gone_fails_naming_it() {
    assert!(DirGrant::new(Path::new("/no/such/dir"), "/data", true).unwrap_err().contains("/no/such/dir"));
    let dir = std::env::temp_dir().join(format!("stepbox-gone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut req = request(json!({ "path": "/data/x" }));
    req.grants.dirs.push(DirGrant::new(&dir, "/data", true).unwrap());
    std::fs::remove_dir(&dir).unwrap();
    let failure = run(guests::FS_READ, req).await.failure().cloned().unwrap();
    assert_eq!(failure.kind, FailureKind::Fatal);
    assert!(failure.message.contains(&*dir.to_string_lossy()), "{failure}");
}

#[tokio::test]
async fn no_grant_reaches_the_data_directory_with_the_compile_cache_and_scratch() {
    // The tests' sandbox keeps its data directory under target/.
    let target = Path::new(guests::HELLO).ancestors().nth(4).unwrap();
    for granted in [target.join("tests-data"), target.join("tests-data/compiled"), target.to_owned()] {
        std::fs::create_dir_all(&granted).unwrap();
        let mut req = request(json!({ "path": "/data/x" }));
        req.grants.dirs.push(DirGrant::new(&granted, "/data", true).unwrap());
        let failure = run(guests::FS_READ, req).await.failure().cloned().unwrap();
        assert_eq!(failure.kind, FailureKind::Fatal);
        assert!(failure.message.contains("overlaps stepbox's data directory"), "{}: {failure}", granted.display());
    }
}

#[tokio::test]
async fn without_a_data_directory_no_grant_reaches_the_scratch_directories() {
    // Scratch directories are then made under the system's temporary
    // directory, which a grant of it would reach, another tenant's among them.
    let config = EngineConfig { data_dir: None, ..EngineConfig::default() };
    let sandbox = Sandbox::new(config, std::sync::Arc::new(MemoryKeyValueStore::new())).unwrap();
    let mut req = request(json!({ "path": "/data/x" }));
    req.grants.dirs.push(DirGrant::new(&std::env::temp_dir(), "/data", true).unwrap());
    let component = sandbox.load(Path::new(guests::FS_READ)).unwrap();
    let failure = sandbox.run(&component, req).await.failure().cloned().unwrap();
    assert_eq!(failure.kind, FailureKind::Fatal);
    assert!(failure.message.contains("overlaps stepbox's data directory or scratch directories"), "{failure}");
}

#[tokio::test]
async fn spin_times_out_within_its_timeout() {
    let mut req = request(json!(null));
    req.limits.fuel = u64::MAX;
    req.limits.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let report = run(guests::SPIN, req).await;
    assert_eq!(failure_kind(&report), FailureKind::Timeout);
    assert!(started.elapsed() < Duration::from_millis(500) + SLACK, "took {:?}", started.elapsed());
    assert!(report.fuel_consumed > 10_000_000, "the fuel it burned is counted: {}", report.fuel_consumed);
}

#[tokio::test]
async fn spin_runs_out_of_fuel_when_fuel_is_the_tighter_limit() {
    let mut req = request(json!(null));
    req.limits.fuel = 20_000_000;
    req.limits.timeout = Duration::from_secs(60);
    let report = run(guests::SPIN, req).await;
    assert_eq!(failure_kind(&report), FailureKind::OutOfFuel);
    assert_eq!(report.fuel_consumed, 20_000_000);
    assert!(!FailureKind::OutOfFuel.retryable_by_default());
}

#[tokio::test]
async fn memory_hog_stops_at_the_memory_limit() {
    let mut req = request(json!(null));
    req.limits.memory = ByteSize::mib(32);
    let report = run(guests::MEMORY_HOG, req).await;
    assert_eq!(failure_kind(&report), FailureKind::MemoryLimit, "{report:?}");
    assert!(report.peak_memory <= ByteSize::mib(32).as_u64());
    assert!(report.peak_memory > ByteSize::mib(16).as_u64(), "it did get to use its memory");
    assert!(report.failure().unwrap().message.contains("limit is 32.0 MiB"), "{report:?}");
}

#[tokio::test]
async fn recurse_overflows_its_stack() {
    let report = run(guests::RECURSE, request(json!(null))).await;
    assert_eq!(failure_kind(&report), FailureKind::StackOverflow);
}

#[tokio::test]
async fn chatty_output_is_capped_and_marked() {
    let mut req = request(json!({ "lines": 20000 }));
    req.limits.stdio = ByteSize::kib(64);
    let report = run(guests::CHATTY, req).await;
    assert_eq!(report.output(), Some(&json!(20000)), "{report:?}");
    // What the guest wrote, counted here: kept and dropped must add up.
    let written = |line: fn(u32) -> String| (0..20_000).map(|n| line(n).len()).sum::<usize>();
    let stdout = written(|n| format!("line {n}: all work and no play makes a dull step\n"));
    let stderr = written(|n| format!("line {n} to stderr\n"));
    for (captured, written) in [(&report.stdout, stdout), (&report.stderr, stderr)] {
        assert!(captured.is_truncated());
        assert!(captured.text.starts_with("line 0"));
        // The cut falls mid-line, so the marker starts a line of its own.
        let marker = format!("\n[... {} more bytes dropped]", written - 64 * 1024);
        assert!(captured.text.ends_with(&marker), "{}", &captured.text[captured.text.len() - 60..]);
        assert_eq!(captured.text.len(), 64 * 1024 + marker.len());
    }
}

#[tokio::test]
async fn endless_chatty_runs_out_of_fuel_with_its_capture_capped() {
    let mut req = request(json!({}));
    req.limits.fuel = 50_000_000;
    req.limits.stdio = ByteSize::kib(16);
    let report = run(guests::CHATTY, req).await;
    assert_eq!(failure_kind(&report), FailureKind::OutOfFuel);
    assert!(report.stdout.is_truncated() && report.stdout.text.len() < 16 * 1024 + 100);
}

#[tokio::test]
async fn the_timeout_ends_an_attempt_blocked_reading_a_file_or_waiting_on_http() {
    // A FIFO nobody writes to: opening it to read blocks in the host.
    let dir = std::env::temp_dir().join(format!("stepbox-blocked-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let mut req = request(json!({ "path": "/data/fifo" }));
    req.grants.dirs.push(DirGrant::new(&dir, "/data", true).unwrap());
    req.limits.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let report = run(guests::FS_READ, req).await;
    assert_eq!(failure_kind(&report), FailureKind::Timeout, "{report:?}");
    assert!(started.elapsed() < Duration::from_millis(300) + SLACK, "took {:?}", started.elapsed());
    // Let the host thread still blocked in the open go.
    let _writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();

    // A server that accepts the connection and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let mut req = request(json!({ "url": format!("http://{address}/") }));
    req.grants.http = vec![format!("GET@{address}").parse().unwrap()];
    req.limits.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let report = run(guests::HTTP_PROBE, req).await;
    assert_eq!(failure_kind(&report), FailureKind::Timeout, "{report:?}");
    assert!(started.elapsed() < Duration::from_millis(300) + SLACK, "took {:?}", started.elapsed());
    held.abort();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn sleepy_times_out_while_blocked_in_a_clock_wait() {
    let mut req = request(json!({}));
    req.limits.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let report = run(guests::SLEEPY, req).await;
    assert_eq!(failure_kind(&report), FailureKind::Timeout);
    assert!(started.elapsed() < Duration::from_millis(300) + SLACK, "took {:?}", started.elapsed());
    assert!(report.fuel_consumed < 1_000_000, "waiting burns no fuel");
}

#[tokio::test]
async fn output_over_the_limit_is_an_output_limit_failure() {
    let mut req = request(json!({ "name": "Ada" }));
    req.limits.output = ByteSize::b(10);
    let report = run(guests::HELLO, req).await;
    assert_eq!(failure_kind(&report), FailureKind::OutputLimit);
}

#[tokio::test]
async fn a_memory_limit_above_the_sandbox_maximum_is_refused() {
    let mut req = request(json!({ "name": "Ada" }));
    req.limits.memory = ByteSize::gib(64);
    let failure = run(guests::HELLO, req).await.failure().cloned().unwrap();
    assert_eq!(failure.kind, FailureKind::Fatal);
    assert!(failure.message.contains("above this sandbox's maximum"), "{failure}");
}

/// Every hostile guest at once, next to healthy ones: each ends in its own
/// class, and the healthy steps all succeed while the hostile ones still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_do_not_disturb_healthy_ones() {
    const HOSTILE_TIMEOUT: Duration = Duration::from_secs(5);
    let hostile = [
        (guests::SPIN, json!(null), FailureKind::Timeout),
        (guests::SLEEPY, json!({}), FailureKind::Timeout),
        (guests::MEMORY_HOG, json!(null), FailureKind::MemoryLimit),
        (guests::RECURSE, json!(null), FailureKind::StackOverflow),
        (guests::CHATTY, json!({}), FailureKind::Timeout),
    ]
    .map(|(guest, input, kind)| (guest, load(guest), input, kind));
    let hello = load(guests::HELLO);

    let hostile_runs: Vec<_> = hostile
        .into_iter()
        .map(|(guest, component, input, kind)| {
            let mut req = request(input);
            req.limits.fuel = u64::MAX;
            req.limits.timeout = HOSTILE_TIMEOUT;
            let handle = tokio::spawn(async move { sandbox().run(&component, req).await });
            (guest, kind, handle)
        })
        .collect();

    for i in 0..20 {
        let report = sandbox().run(&hello, request(json!({ "name": format!("n{i}") }))).await;
        assert_eq!(report.output(), Some(&json!({ "greeting": format!("Hello, n{i}!") })));
    }
    let still_running: Vec<&str> = hostile_runs
        .iter()
        .filter(|(_, kind, handle)| *kind == FailureKind::Timeout && !handle.is_finished())
        .map(|(guest, _, _)| *guest)
        .collect();
    assert_eq!(still_running.len(), 3, "the healthy steps finished only after hostile ones timed out");

    for (guest, kind, handle) in hostile_runs {
        let report = handle.await.expect("the attempt task did not panic");
        assert_eq!(failure_kind(&report), kind, "{guest}");
        assert!(
            report.duration_ms() < (HOSTILE_TIMEOUT + SLACK).as_secs_f64() * 1000.0,
            "{guest} took {} ms",
            report.duration_ms()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_finds_no_free_instance_slot_waits_for_one() {
    // Two instance slots in the pool; six attempts at once, straight to the
    // sandbox (no scheduler in front to hold them back).
    let config = stepbox::sandbox::EngineConfig {
        data_dir: Some(common::data_dir()),
        max_concurrent_attempts: 2,
        ..Default::default()
    };
    let small = stepbox::sandbox::Sandbox::new(config, std::sync::Arc::new(stepbox::store::MemoryKeyValueStore::new()))
        .unwrap();
    let component = small.load(Path::new(guests::SLEEPY)).unwrap();
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            let (small, component) = (small.clone(), component.clone());
            tokio::spawn(async move { small.run(&component, request(json!({ "millis": 150 }))).await })
        })
        .collect();
    let mut spans = Vec::new();
    for attempt in attempts {
        let report = attempt.await.unwrap();
        assert!(report.output().is_some(), "every attempt succeeds: {report:?}");
        spans.push((report.started_ms, report.finished_ms.unwrap()));
    }
    let overlap = spans.iter().map(|(start, _)| spans.iter().filter(|(s, f)| s <= start && start < f).count()).max();
    assert!(overlap <= Some(2), "at most two attempts ran at once, not {overlap:?}");
}

/// A key-value store whose every call takes a second, counting the calls
/// that ran.
struct SlowStore(std::sync::atomic::AtomicUsize);

impl SlowStore {
    fn call<T: Default>(&self) -> Result<T, stepbox::store::KvError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(1));
        Ok(T::default())
    }
}

impl stepbox::store::KeyValueStore for SlowStore {
    fn get(&self, _: &stepbox::store::KvScope, _: &str, _: &str) -> Result<Option<Vec<u8>>, stepbox::store::KvError> {
        self.call()
    }
    fn set(
        &self,
        _: &stepbox::store::KvScope,
        _: &str,
        _: &str,
        _: &[u8],
        _: &stepbox::store::KvQuota,
    ) -> Result<(), stepbox::store::KvError> {
        self.call()
    }
    fn delete(&self, _: &stepbox::store::KvScope, _: &str, _: &str) -> Result<(), stepbox::store::KvError> {
        self.call()
    }
    fn list_keys(
        &self,
        _: &stepbox::store::KvScope,
        _: &str,
        _: Option<&str>,
        _: usize,
    ) -> Result<Vec<String>, stepbox::store::KvError> {
        self.call()
    }
    fn increment(
        &self,
        _: &stepbox::store::KvScope,
        _: &str,
        _: &str,
        _: i64,
        _: &stepbox::store::KvQuota,
    ) -> Result<i64, stepbox::store::KvError> {
        self.call()
    }
    fn compare_and_swap(
        &self,
        _: &stepbox::store::KvScope,
        _: &str,
        _: &str,
        _: Option<&[u8]>,
        _: &[u8],
        _: &stepbox::store::KvQuota,
    ) -> Result<bool, stepbox::store::KvError> {
        self.call()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_ends_an_attempt_waiting_on_key_value_state_and_calls_it_left_waiting_never_run() {
    let store = std::sync::Arc::new(SlowStore(Default::default()));
    let config = stepbox::sandbox::EngineConfig { data_dir: Some(common::data_dir()), ..Default::default() };
    let slow = stepbox::sandbox::Sandbox::new(config, store.clone()).unwrap();
    let component = slow.load(Path::new(guests::COUNTER)).unwrap();
    // 20 attempts at once, each stuck in its first key-value call; 16 calls
    // run at a time, so 4 wait for a turn when their attempts time out.
    let started = Instant::now();
    let attempts: Vec<_> = (0..20)
        .map(|i| {
            let (slow, component) = (slow.clone(), component.clone());
            let mut req = request(json!({ "key": format!("k{i}") }));
            req.limits.timeout = Duration::from_millis(300);
            tokio::spawn(async move { slow.run(&component, req).await })
        })
        .collect();
    for attempt in attempts {
        let report = attempt.await.unwrap();
        assert_eq!(report.failure().map(|f| f.kind), Some(FailureKind::Timeout), "{report:?}");
    }
    assert!(started.elapsed() < Duration::from_millis(300) + SLACK, "took {:?}", started.elapsed());
    // The calls already running finish; the waiting ones were called off.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.0.load(std::sync::atomic::Ordering::SeqCst), 16);
}

/// A component file is read and hashed again whenever a run loads it, so
/// a file rewritten in place, however soon and however alike in size and
/// times, runs as it is now. (A cache keyed by the file's stamp was tried
/// and taken back: writes through a shared mapping change a file without
/// touching its times.)
#[test]
fn a_component_file_loads_again_when_it_changed() {
    let sandbox = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("step.wasm");
    let original = std::fs::read(guests::NOOP).unwrap();
    // The same size, another component: what a rebuild leaves in place.
    let mut rebuilt = original.clone();
    let last = rebuilt.len() - 1;
    rebuilt[last] ^= 1;
    let digest =
        |sandbox: &Sandbox| sandbox.load(&path).map(|c| c.digest().to_string()).unwrap_or_else(|err| err.to_string());
    std::fs::write(&path, &original).unwrap();
    let first = digest(sandbox);
    // Rewritten at once (within a tick of the file clock), and again once
    // the file has aged.
    for aged in [false, true] {
        if aged {
            std::thread::sleep(Duration::from_millis(1100));
            assert_eq!(digest(sandbox), first);
        }
        std::fs::write(&path, &rebuilt).unwrap();
        if aged {
            std::thread::sleep(Duration::from_millis(1100));
        }
        assert_ne!(digest(sandbox), first, "a changed file was not read again (aged: {aged})");
        std::fs::write(&path, &original).unwrap();
        assert_eq!(digest(sandbox), first);
    }
}
