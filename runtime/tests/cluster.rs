//! Attempts run by `stepbox worker` processes through a shared PostgreSQL
//! database: secrets read on the worker, a killed worker's attempt taken
//! over after its lease, a paused worker's late result refused.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Worker, key_counts, stderr, stepbox, temp_dir, use_database};
use serde_json::Value;
use stepbox_tests::guests;
use stepbox_tests::postgres::TestDatabase;

/// One test of this file at a time: each starts several processes, and the
/// fairness test compares latencies, which other tests' processes would
/// make noise in.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The owner of the task of execution `key` while one holds it.
fn holder(db: &TestDatabase) -> Option<String> {
    db.query("SELECT owner FROM tasks WHERE state = 'claimed'").into_iter().next().and_then(|row| row[0].clone())
}

/// Waits up to `within` for `check` to give something.
fn wait_for<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(start.elapsed() < within, "nothing came within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Starts `stepbox run FILE --queue --json`.
fn start_run(data: &Path, workflow: &Path) -> Child {
    stepbox(data)
        .args(["run", workflow.to_str().unwrap(), "--queue", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn attempts_run_on_workers_which_read_secrets_themselves_and_none_reaches_the_database() {
    const SECRET: &str = "sk_live_cluster_0123456789";
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-run");
    let workflow = write(
        &dir,
        "fan.yaml",
        &format!(
            "name: fan\ncomponents:\n  probe: {}\n  effect: {}\nsteps:\n  - id: leak\n    uses: probe\n    secrets: {{ api_key: {{ env: STEPBOX_TEST_SECRET }} }}\n    with: {{ probe: leak-secret }}\n  - id: fan\n    uses: effect\n    for_each: [1, 2, 3, 4, 5, 6]\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log, millis: 50 }}\n  - id: last\n    uses: effect\n    depends_on: [leak, fan]\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log }}\noutputs:\n  keys: '{{{{ steps.fan.output | length }}}}'\n",
            guests::PROBE,
            guests::SIDE_EFFECT
        ),
    );
    let env = [("STEPBOX_TEST_SECRET", SECRET)];
    let _workers: Vec<Worker> =
        (0..2).map(|n| Worker::start(&dir, &format!("w{n}"), &["--slots", "2", "--lease", "1s"], &env)).collect();
    // The coordinator has no secret: only a worker can run `leak`.
    let report = finish(start_run(&dir.join("coordinator"), &workflow));
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["outputs"]["keys"], 6, "{report}");
    assert_eq!(report["steps"][0]["output"]["key"], "[redacted]", "{report}");
    let counts = key_counts(&dir);
    assert_eq!(counts.len(), 7, "{counts:?}");
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    // Every execution's key, as the step saw it, is its execution's.
    for execution in report["steps"][1]["executions"].as_array().unwrap() {
        assert_eq!(execution["output"]["key"], execution["idempotency_key"], "{execution}");
    }
    // No table holds the secret; the queue is empty once results are in.
    for table in db.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'") {
        let table = table[0].clone().unwrap();
        let found = db.query(&format!("SELECT count(*) FROM {table} t WHERE t::text LIKE '%{SECRET}%'"));
        assert_eq!(found[0][0].as_deref(), Some("0"), "the secret is in table {table}");
    }
    assert_eq!(db.query("SELECT count(*) FROM tasks")[0][0].as_deref(), Some("0"));
    use_database(None);
}

/// One step that works for `millis`, then appends its key to out/keys.log.
fn one_slow_step(dir: &Path, millis: u64) -> PathBuf {
    write(
        dir,
        "slow.yaml",
        &format!(
            "name: slow\ncomponents:\n  effect: {}\nsteps:\n  - id: slow\n    uses: effect\n    dirs: ['out:/out']\n    limits: {{ timeout: 60s }}\n    with: {{ file: /out/keys.log, millis: {millis} }}\n",
            guests::SIDE_EFFECT
        ),
    )
}

#[test]
fn a_killed_workers_attempt_is_claimed_again_within_two_leases_and_counted() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-kill");
    let workflow = one_slow_step(&dir, 3_000);
    let lease = Duration::from_secs(1);
    let first = Worker::start(&dir, "first", &["--slots", "1", "--lease", "1s"], &[]);
    let run = start_run(&dir.join("coordinator"), &workflow);
    let owner = wait_for(Duration::from_secs(60), || holder(&db));
    assert!(owner.contains(&format!(":{}:", first.child.id())), "{owner}");
    let second = Worker::start(&dir, "second", &["--slots", "1", "--lease", "1s"], &[]);
    first.signal("-KILL");
    let killed = Instant::now();
    let taken = wait_for(Duration::from_secs(30), || holder(&db).filter(|holder| *holder != owner));
    let failover = killed.elapsed();
    assert!(taken.contains(&format!(":{}:", second.child.id())), "{taken}");
    assert!(failover <= 2 * lease, "failover took {failover:?}, over two leases");
    let report = finish(run);
    assert_eq!(report["status"], "succeeded", "{report}");
    let execution = &report["steps"][0]["executions"][0];
    let attempts = execution["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{execution}");
    assert_eq!(attempts[0]["status"], "failed", "{execution}");
    assert_eq!(attempts[0]["failure"]["kind"], "lost", "{execution}");
    assert_eq!((attempts[1]["attempt"].as_u64(), attempts[1]["status"].as_str()), (Some(2), Some("succeeded")));
    // The same key for both; the killed one never got to its effect.
    assert_eq!(execution["output"]["key"], execution["idempotency_key"], "{execution}");
    assert_eq!(key_counts(&dir).values().copied().collect::<Vec<_>>(), [1]);
    use_database(None);
}

#[test]
fn a_paused_workers_late_result_is_refused_and_it_drops_the_attempt() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-pause");
    let workflow = one_slow_step(&dir, 1_500);
    let paused = Worker::start(&dir, "paused", &["--slots", "1", "--lease", "1s"], &[]);
    let run = start_run(&dir.join("coordinator"), &workflow);
    let owner = wait_for(Duration::from_secs(60), || holder(&db));
    assert!(owner.contains(&format!(":{}:", paused.child.id())), "{owner}");
    paused.signal("-STOP");
    let _other = Worker::start(&dir, "other", &["--slots", "1", "--lease", "1s"], &[]);
    let report = finish(run);
    // Past its lease, then woken: the run has long finished without it.
    paused.signal("-CONT");
    let dropped = wait_for(Duration::from_secs(30), || {
        Some(paused.log()).filter(|log| log.contains("was claimed again or its run ended; its work here is dropped"))
    });
    assert_eq!(report["status"], "succeeded", "{report}");
    let attempts = report["steps"][0]["executions"][0]["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.iter().map(|a| a["status"].as_str().unwrap()).collect::<Vec<_>>(), ["failed", "succeeded"]);
    // Nothing the paused worker did after waking reached the record.
    std::thread::sleep(Duration::from_secs(2));
    let shown = common::json(&dir.join("coordinator"), &["show", report["id"].as_str().unwrap(), "--json"]);
    assert_eq!(shown["steps"][0]["executions"][0]["attempts"].as_array().unwrap().len(), 2, "{shown}\n{dropped}");
    use_database(None);
}

#[test]
fn a_rate_limit_counts_starts_on_the_workers_so_a_backlog_cannot_bunch_them() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-rate");
    let workflow = write(
        &dir,
        "limited.yaml",
        &format!(
            "name: limited\ncomponents:\n  effect: {{ path: {}, rate_limit: {{ starts: 1, per: 400ms }} }}\nsteps:\n  - id: fan\n    uses: effect\n    for_each: [1, 2, 3, 4, 5]\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log }}\n",
            guests::SIDE_EFFECT
        ),
    );
    let run = start_run(&dir.join("coordinator"), &workflow);
    // No worker yet: counted as they were handed over, all five would be
    // waiting in the queue by now, and would start at once.
    std::thread::sleep(Duration::from_millis(2_500));
    let _worker = Worker::start(&dir, "w", &["--slots", "4"], &[]);
    // Each effect's time, as its line appears.
    let mut seen: Vec<Instant> = Vec::new();
    let start = Instant::now();
    while seen.len() < 5 {
        assert!(start.elapsed() < Duration::from_secs(60), "only {} effects came", seen.len());
        let lines = common::effects(&dir).len();
        seen.extend(std::iter::repeat_n(Instant::now(), lines.saturating_sub(seen.len())));
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = finish(run);
    assert_eq!(report["status"], "succeeded", "{report}");
    let gaps: Vec<Duration> = seen.windows(2).map(|pair| pair[1] - pair[0]).collect();
    assert!(
        gaps.iter().all(|gap| *gap >= Duration::from_millis(350)),
        "starts closer than the limit allows (one per 400 ms): {gaps:?}"
    );
    use_database(None);
}

/// How long each execution of a run waited from its step's start to its
/// first attempt's start, at most (ms).
fn slowest_start(report: &Value) -> f64 {
    let mut slowest: f64 = 0.0;
    for step in report["steps"].as_array().unwrap() {
        let started = step["started_ms"].as_f64().unwrap();
        for execution in step["executions"].as_array().unwrap() {
            let first = execution["attempts"][0]["started_ms"].as_f64().unwrap();
            slowest = slowest.max(first - started);
        }
    }
    slowest
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[test]
fn a_small_tenant_starts_within_twice_its_solo_latency_beside_ten_thousand_steps_of_a_big_one() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-fair");
    let tenants = dir.join("tenants.yaml");
    std::fs::write(&tenants, "tenants:\n  big: { components: any, max_items: 10000 }\n  small: { components: any }\n")
        .unwrap();
    // Three workers of 16 slots (and a reserve of four each, the default),
    // all kept busy by the big tenant, with no ceiling: its 10,000 steps
    // wait seconds each, the small tenant's ten 20 ms. The small one's go
    // into the reserve at once. The big tenant's steps are I/O-bound and
    // long, so that the workers are busy without the two cores and the
    // disk of a test machine being so: with 200 ms steps, the load of
    // recording 150 a second made every commit of the small run wait for
    // the disk behind the big one's, and doubled the latency the solo runs
    // were measured without.
    let fan = |name: &str, items: usize, millis: &str| {
        write(
            &dir,
            &format!("{name}.yaml"),
            &format!(
                "name: {name}\ncomponents:\n  sleepy: {}\nsteps:\n  - id: fan\n    uses: sleepy\n    for_each: '{{{{ range({items}) | list }}}}'\n    with: {{ millis: {millis} }}\n",
                guests::SLEEPY
            ),
        )
    };
    // The big tenant's waits spread over 2–4 s, so its attempts end
    // one after another, not in waves that load the machine in bursts.
    let (big, small) = (fan("big", 10_000, "'{{ 2000 + item * 37 % 2000 }}'"), fan("small", 10, "20"));
    let tenants_arg = tenants.to_str().unwrap();
    let _workers: Vec<Worker> = (0..3)
        .map(|n| Worker::start(&dir, &format!("w{n}"), &["--slots", "16", "--tenants", tenants_arg], &[]))
        .collect();
    let run_small = || {
        let out = stepbox(&dir.join("small-coordinator"))
            .args(["run", small.to_str().unwrap(), "--queue", "--json", "--tenant", "small", "--tenants", tenants_arg])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        slowest_start(&report)
    };
    // Compiled on every node first: what is measured is waiting, not
    // compiling.
    for _ in 0..3 {
        run_small();
    }
    // Alone both before and after the flood, so that the machine's own
    // moods (a test machine is shared) weigh on both sides alike.
    let mut alone: Vec<f64> = (0..5).map(|_| run_small()).collect();
    let mut flood = stepbox(&dir.join("big-coordinator"))
        .args(["run", big.to_str().unwrap(), "--queue", "--tenant", "big", "--tenants", tenants_arg])
        .args(["--max-parallel", "4096"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The big tenant in every slot of the three workers, with
    // thousands of steps behind it. Measured once its coordinator has
    // queued all it may hand over at once (4,096 attempts, which keeps both
    // cores of a test machine and its disk busy for a while: that would
    // measure the machine, not the queue's fairness).
    wait_for(Duration::from_secs(120), || {
        assert!(flood.try_wait().unwrap().is_none(), "the big tenant's run ended early");
        let count = |sql: &str| db.query(sql)[0][0].as_deref().and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
        let claimed = count("SELECT count(*) FROM tasks WHERE tenant = 'big' AND state = 'claimed'");
        let queued = count("SELECT count(*) FROM tasks WHERE tenant = 'big'");
        (claimed == 48 && queued >= 4096).then_some(())
    });
    let loaded = median((0..5).map(|_| run_small()).collect());
    let flooding = flood.try_wait().unwrap().is_none();
    let _ = flood.kill();
    let _ = flood.wait();
    assert!(flooding, "the big tenant's run ended before the measurement did");
    // Its thousands of queued attempts go with the run's cancel; those the
    // workers still hold end within a step's time.
    let flood_id = db.query("SELECT id FROM runs WHERE workflow = 'big'")[0][0].clone().unwrap();
    let out = stepbox(&dir.join("big-coordinator")).args(["cancel", &flood_id]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    wait_for(Duration::from_secs(30), || {
        let held = db.query("SELECT count(*) FROM tasks WHERE tenant = 'big' AND state <> 'done'");
        (held[0][0].as_deref() == Some("0")).then_some(())
    });
    // The workers still run those they held until a renewal (every third
    // of the 5 s lease) finds them gone.
    std::thread::sleep(Duration::from_secs(3));
    alone.extend((0..5).map(|_| run_small()));
    let solo = median(alone);
    println!("the small tenant's slowest start: {solo:.1} ms alone, {loaded:.1} ms beside the big one");
    assert!(
        loaded <= 2.0 * solo,
        "the small tenant's steps started {loaded:.1} ms after their step beside the big tenant, \
         {solo:.1} ms alone: over twice"
    );
    use_database(None);
}

#[test]
fn a_worker_holds_each_attempt_to_its_own_tenants_file() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-ceilings");
    let workflow = write(
        &dir,
        "secret.yaml",
        &format!(
            "name: secret\ncomponents:\n  probe: {}\nsteps:\n  - id: leak\n    uses: probe\n    secrets: {{ api_key: {{ env: STEPBOX_TEST_SECRET }} }}\n    with: {{ probe: leak-secret }}\n",
            guests::PROBE
        ),
    );
    // The coordinator's file grants the secret; the worker's does not, and
    // it knows no tenant `globex` at all.
    let coordinator_tenants = write(
        &dir,
        "coordinator.yaml",
        "tenants:\n  acme: { components: any, secrets: any }\n  globex: { components: any, secrets: any }\n",
    );
    let worker_tenants = write(&dir, "worker.yaml", "tenants:\n  acme: { components: any }\n");
    let _worker = Worker::start(
        &dir,
        "worker",
        &["--tenants", worker_tenants.to_str().unwrap()],
        &[("STEPBOX_TEST_SECRET", "sk_live_worker")],
    );
    let run = |tenant: &str| {
        let out = stepbox(&dir.join("coordinator"))
            .args(["run", workflow.to_str().unwrap(), "--queue", "--json", "--tenant", tenant])
            .args(["--tenants", coordinator_tenants.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        report["steps"][0]["reason"].as_str().unwrap().to_owned()
    };
    let refused = run("acme");
    assert!(
        refused.contains("this worker's tenants file refuses the attempt: secret `api_key` (env:STEPBOX_TEST_SECRET) is not among tenant `acme`'s allowed secrets"),
        "{refused}"
    );
    let unknown = run("globex");
    assert!(unknown.contains("tenant `globex` is not in the tenants file"), "{unknown}");
    use_database(None);
}

#[test]
fn a_killed_coordinators_run_is_taken_over_and_waits_for_the_attempt_its_worker_still_runs() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-coordinator");
    let workflow = one_slow_step(&dir, 3_000);
    let worker = Worker::start(&dir, "worker", &["--slots", "2", "--lease", "1s"], &[]);
    let coordinator = dir.join("coordinator");
    let mut first = start_run(&coordinator, &workflow);
    let owner = wait_for(Duration::from_secs(60), || holder(&db));
    first.kill().unwrap();
    first.wait().unwrap();
    let id = common::json(&coordinator, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned();
    // Another coordinator takes the run over while the worker still runs
    // the dead one's attempt: it waits for that attempt's result.
    let report = finish(
        stepbox(&coordinator)
            .args(["resume", &id, "--queue", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(report["status"], "succeeded", "{report}");
    let shown = common::json(&coordinator, &["show", &id, "--json"]);
    let attempts: Vec<(u64, String)> = shown["steps"][0]["executions"][0]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["attempt"].as_u64().unwrap(), a["status"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(attempts, [(1, "succeeded".to_owned())], "{shown}");
    assert!(owner.contains(&format!(":{}:", worker.child.id())), "{owner}");
    assert!(!worker.log().contains("its work here is dropped"), "{}", worker.log());
    assert_eq!(key_counts(&dir).values().copied().collect::<Vec<_>>(), [1], "the attempt ran once");
    assert_eq!(db.query("SELECT count(*) FROM tasks")[0][0].as_deref(), Some("0"), "a finished run leaves no task");
    use_database(None);
}

/// `stepbox token create --tenant default` in the shared database.
fn default_token(dir: &Path) -> String {
    let out = common::output(dir, &["token", "create", "--tenant", "default"]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Deploys workflow `name` through `server` with `stepbox deploy`: a nap
/// of `millis`, then a step after it. A project as a user has it: the
/// component beside the workflow.
fn deploy_naps(dir: &Path, name: &str, millis: u64, server: &common::Server, token: &str) {
    std::fs::copy(guests::SLEEPY, dir.join("sleepy.wasm")).unwrap();
    let workflow = write(
        dir,
        &format!("{name}.yaml"),
        &format!(
            "name: {name}\ncomponents:\n  sleepy: sleepy.wasm\nsteps:\n  - id: nap\n    uses: sleepy\n    with: {{ millis: {millis} }}\n  - id: after\n    uses: sleepy\n    depends_on: [nap]\n    with: {{ millis: 1 }}\n"
        ),
    );
    let deployed = stepbox(Path::new("/nonexistent"))
        .args(["deploy", workflow.to_str().unwrap(), "--server", &server.url, "--token", token])
        .output()
        .unwrap();
    assert!(deployed.status.success(), "{}", stderr(&deployed));
}

/// The owner of run `id`'s lease, while one holds it.
fn run_owner(db: &TestDatabase, id: &str) -> Option<String> {
    db.query(&format!("SELECT lease_owner FROM runs WHERE id = '{id}'"))
        .into_iter()
        .next()
        .and_then(|row| row[0].clone())
}

#[test]
fn service_nodes_share_deploys_hand_attempts_to_workers_and_take_over_a_dead_nodes_run() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-serve");
    let token = default_token(&dir.join("a"));
    let a = common::Server::start(&dir.join("a"), &["--queue"]);
    let b = common::Server::start(&dir.join("b"), &["--queue"]);
    let worker = Worker::start(&dir, "worker", &["--slots", "2", "--lease", "1s"], &[]);
    deploy_naps(&dir, "nap", 3000, &a, &token);

    // Node b never saw the upload: it loads the bundle from the database.
    let (http, runtime) = (reqwest::Client::new(), tokio::runtime::Runtime::new().unwrap());
    let started =
        http.post(format!("{}/v1/workflows/nap/runs", b.url)).bearer_auth(&token).json(&serde_json::json!({}));
    let (status, started) = runtime.block_on(async {
        let response = started.send().await.unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    });
    assert_eq!(status, reqwest::StatusCode::CREATED, "{started}");
    let id = started["id"].as_str().unwrap().to_owned();
    let claimed = wait_for(Duration::from_secs(60), || holder(&db));
    assert!(claimed.contains(&format!(":{}:", worker.child.id())), "the worker runs it: {claimed}");
    let driver = run_owner(&db, &id).unwrap();
    assert!(driver.contains(&format!(":{}:", b.child.id())), "node b drives it: {driver}");

    // Node b dies while the worker runs the attempt: node a takes the run
    // over and waits for that attempt rather than run it again.
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(90);
    let report = loop {
        let report: Value = runtime.block_on(async {
            let response = http.get(format!("{}/v1/runs/{id}", a.url)).bearer_auth(&token).send().await.unwrap();
            response.json().await.unwrap()
        });
        if ["succeeded", "failed", "cancelled"].contains(&report["status"].as_str().unwrap_or_default()) {
            break report;
        }
        assert!(Instant::now() < deadline, "node a did not finish the run: {report}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(report["status"], "succeeded", "{report}");
    for step in report["steps"].as_array().unwrap() {
        let attempts: Vec<(u64, &str)> = step["executions"][0]["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["attempt"].as_u64().unwrap(), a["status"].as_str().unwrap()))
            .collect();
        assert_eq!(attempts, [(1, "succeeded")], "{report}");
    }
    assert!(!worker.log().contains("its work here is dropped"), "{}", worker.log());
    let left = db.query(&format!("SELECT count(*) FROM tasks WHERE run_id = '{id}'"));
    assert_eq!(left[0][0].as_deref(), Some("0"), "a finished run leaves no task");
    use_database(None);
}

/// A run one node drives is followed and cancelled through another: the
/// other node streams its events from the journal, and the cancel reaches
/// the driver at once (through the database's notifications, not at its
/// next lease renewal ten seconds later).
#[test]
fn a_run_driven_by_one_node_is_followed_and_cancelled_through_another() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-cancel");
    let token = default_token(&dir.join("a"));
    let a = common::Server::start(&dir.join("a"), &[]);
    let b = common::Server::start(&dir.join("b"), &[]);
    deploy_naps(&dir, "long", 120_000, &a, &token);
    let (on_a, on_b) = (a.api(&token), b.api(&token));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let id = on_a.start("long", serde_json::json!({})).await;
        let driver = run_owner(&db, &id).unwrap();
        assert!(driver.contains(&format!(":{}:", a.child.id())), "node a drives it: {driver}");
        // Node b follows the run from its first attempt's start.
        let follower = {
            let (on_b, id) = (on_b.clone(), id.clone());
            tokio::spawn(async move { on_b.events(&id, None, |event| event["type"] == "run_finished").await })
        };
        wait_for_async(|| async {
            let (_, report) = on_b.get(&format!("/v1/runs/{id}")).await;
            (report["steps"][0]["executions"][0]["attempts"][0]["status"] == "running").then_some(())
        })
        .await;
        let (status, run) = on_b.post(&format!("/v1/runs/{id}/cancel"), serde_json::json!({})).await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{run}");
        assert!(run["cancel_requested"] == true || run["status"] == "cancelled", "{run}");
        let report = on_b.finished(&id).await;
        assert_eq!(report["status"], "cancelled", "{report}");
        // Over before node a first renewed its lease (ten seconds in), so
        // node a heard of the cancel through the database's notice.
        let lived = report["finished_ms"].as_f64().unwrap() - report["created_ms"].as_f64().unwrap();
        assert!(lived < 9_000.0, "the run lived {lived} ms: long enough for a renewal to find the cancel");
        assert!(report.get("cancel_requested").is_none(), "a finished run forgets it: {report}");
        let attempt = &report["steps"][0]["executions"][0]["attempts"][0];
        assert_eq!(attempt["failure"]["kind"], "cancelled", "{report}");
        assert_eq!(report["steps"][1]["status"], "cancelled", "{report}");
        // What node b streamed: the attempt's start, then the run's end.
        let events = tokio::time::timeout(Duration::from_secs(30), follower).await.unwrap().unwrap();
        let kinds: Vec<&str> = events.iter().map(|(_, event)| event["type"].as_str().unwrap()).collect();
        assert_eq!(kinds.first(), Some(&"attempt_started"), "{events:?}");
        assert_eq!(events.last().unwrap().1["status"], "cancelled", "{events:?}");
        // Nothing left to cancel, on either node.
        let (status, body) = on_b.post(&format!("/v1/runs/{id}/cancel"), serde_json::json!({})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (reqwest::StatusCode::CONFLICT, Some("run_finished")));
    });
    use_database(None);
}

/// Waits up to a minute for `check` to give something.
async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(mut check: impl FnMut() -> F) -> T {
    let start = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "nothing came within a minute");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that each execution of a run's report succeeded once, by its
/// last attempt, that no effect came from an attempt after that one, and
/// that it had exactly one; returns how many executions took more than one
/// attempt.
fn succeeded_once(shown: &Value, effects: &[(String, u32)], context: &str) -> usize {
    let mut retried = 0;
    for execution in common::executions(shown) {
        let key = execution["idempotency_key"].as_str().unwrap();
        let attempts = execution["attempts"].as_array().unwrap();
        let statuses: Vec<&str> = attempts.iter().map(|a| a["status"].as_str().unwrap()).collect();
        assert_eq!(statuses.iter().filter(|s| **s == "succeeded").count(), 1, "{context} {key}: {statuses:?}");
        assert_eq!(statuses.last(), Some(&"succeeded"), "{context} {key}: {statuses:?}");
        let succeeded = attempts.last().unwrap()["attempt"].as_u64().unwrap() as u32;
        let mine: Vec<u32> = effects.iter().filter(|(k, _)| k == key).map(|(_, attempt)| *attempt).collect();
        assert!(mine.iter().all(|attempt| *attempt <= succeeded), "{context} {key}: {mine:?} after {succeeded}");
        assert_eq!(mine.iter().filter(|a| **a == succeeded).count(), 1, "{context} {key}: {mine:?}");
        retried += usize::from(attempts.len() > 1);
    }
    retried
}

/// A small seeded generator, so a failing chaos schedule can be replayed.
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

/// What the chaos test does to one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaos {
    KillWorker,
    PauseWorker,
    KillCoordinator,
    PauseCoordinator,
}

fn pid_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
    assert!(status.unwrap().success(), "kill {signal} {pid}");
}

#[test]
fn chaos_across_three_workers_and_the_coordinator_changes_no_output_and_runs_no_finished_execution_again() {
    const STEPS: usize = 1_000;
    const EVENTS: usize = 20;
    let seed: u64 = std::env::var("STEPBOX_CHAOS_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or(0x5eed_cafe);
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-chaos");
    let yaml = format!(
        "name: chaos\ncomponents:\n  effect: {}\nsteps:\n  - id: fan\n    uses: effect\n    for_each: '{{{{ range({STEPS}) | list }}}}'\n    dirs: ['out:/out']\n    limits: {{ timeout: 60s }}\n    with: {{ file: /out/keys.log, millis: 400, value: '{{{{ item * 7 % 13 }}}}' }}\n  - id: total\n    uses: effect\n    depends_on: [fan]\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log, value: '{{{{ steps.fan.output | map(attribute=\"value\") | sum }}}}' }}\noutputs:\n  values: '{{{{ steps.fan.output | map(attribute=\"value\") | list }}}}'\n  total: '{{{{ steps.total.output.value }}}}'\n",
        guests::SIDE_EFFECT
    );
    // The clean run: in one process, no queue, nothing killed.
    let clean_dir = dir.join("clean");
    let clean_workflow = write(&clean_dir, "chaos.yaml", &yaml);
    let out = stepbox(&clean_dir.join("data"))
        .args(["run", clean_workflow.to_str().unwrap(), "--json", "--max-parallel", "100"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let clean: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(clean["outputs"]["values"].as_array().unwrap().len(), STEPS, "{}", clean["outputs"]);

    let workflow = write(&dir, "chaos.yaml", &yaml);
    let worker_args = ["--slots", "4", "--lease", "1s"];
    let mut workers: Vec<Worker> = (0..3).map(|n| Worker::start(&dir, &format!("w{n}"), &worker_args, &[])).collect();
    let mut restarts = 0;
    let coordinator = dir.join("coordinator");
    let mut driver = start_run(&coordinator, &workflow);
    // Under way, with the run recorded, before anything is done to it.
    wait_for(Duration::from_secs(60), || holder(&db));
    let id = common::json(&coordinator, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned();

    let mut random = Seeded(seed);
    let kinds = [Chaos::KillWorker, Chaos::PauseWorker, Chaos::KillCoordinator, Chaos::PauseCoordinator];
    let mut done = Vec::new();
    for _ in 0..EVENTS {
        std::thread::sleep(Duration::from_millis(150 + random.below(300)));
        assert!(driver.try_wait().unwrap().is_none(), "the run ended after only {} events: {done:?}", done.len());
        let kind = kinds[random.below(4) as usize];
        match kind {
            Chaos::KillWorker => {
                let n = random.below(3) as usize;
                workers[n].signal("-KILL");
                restarts += 1;
                workers[n] = Worker::start(&dir, &format!("w{n}-{restarts}"), &worker_args, &[]);
            }
            // Past its lease: its claims are taken over, its late results
            // refused.
            Chaos::PauseWorker => {
                let n = random.below(3) as usize;
                workers[n].signal("-STOP");
                std::thread::sleep(Duration::from_millis(1_500));
                workers[n].signal("-CONT");
            }
            // Another coordinator resumes the run and waits for the attempts
            // the dead one handed out.
            Chaos::KillCoordinator => {
                driver.kill().unwrap();
                driver.wait().unwrap();
                driver = stepbox(&coordinator)
                    .args(["resume", &id, "--queue", "--json"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
            }
            Chaos::PauseCoordinator => {
                pid_signal(driver.id(), "-STOP");
                std::thread::sleep(Duration::from_millis(1_000 + random.below(1_000)));
                pid_signal(driver.id(), "-CONT");
            }
        }
        done.push(kind);
    }
    for kind in kinds {
        assert!(done.contains(&kind), "seed {seed:#x} never did {kind:?}: {done:?}");
    }
    let report = finish(driver);
    assert_eq!(report["status"], "succeeded", "seed {seed:#x}: {report}");
    assert_eq!(report["outputs"], clean["outputs"], "seed {seed:#x}: the outputs differ from the clean run's");

    let shown = common::json(&coordinator, &["show", &id, "--json"]);
    let retried = succeeded_once(&shown, &common::effects(&dir), &format!("seed {seed:#x}"));
    assert!(retried > 0, "seed {seed:#x}: no execution needed a second attempt: {done:?}");
    assert_eq!(db.query("SELECT count(*) FROM tasks")[0][0].as_deref(), Some("0"), "a finished run leaves no task");
    eprintln!("seed {seed:#x}: {done:?}; {retried} executions took more than one attempt");
    use_database(None);
}

/// The attempts recorded as succeeded (their execution's path and number),
/// as the run logs' records hold them.
const SUCCEEDED_ATTEMPTS: &str = "SELECT r->'attempt_finished'->>'path', r->'attempt_finished'->'attempt'->>'attempt'
     FROM run_log, json_array_elements(records::json) AS r
     WHERE r->'attempt_finished'->'attempt'->>'status' = 'succeeded' ORDER BY 1";

#[test]
fn postgresql_restarted_under_load_loses_nothing_committed_and_every_process_carries_on() {
    const STEPS: usize = 300;
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-restart");
    let workflow = write(
        &dir,
        "busy.yaml",
        &format!(
            "name: busy\ncomponents:\n  effect: {}\nsteps:\n  - id: fan\n    uses: effect\n    for_each: '{{{{ range({STEPS}) | list }}}}'\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log, millis: 100, value: '{{{{ item }}}}' }}\noutputs:\n  total: '{{{{ steps.fan.output | map(attribute=\"value\") | sum }}}}'\n",
            guests::SIDE_EFFECT
        ),
    );
    let mut workers: Vec<Worker> =
        (0..2).map(|n| Worker::start(&dir, &format!("w{n}"), &["--slots", "4"], &[])).collect();
    let run = start_run(&dir.join("coordinator"), &workflow);
    // Under load: a tenth of the steps done, the rest claimed or waiting.
    let before: Vec<(String, String)> = wait_for(Duration::from_secs(60), || {
        let done = db.query(SUCCEEDED_ATTEMPTS);
        let done: Vec<(String, String)> =
            done.into_iter().map(|row| (row[0].clone().unwrap(), row[1].clone().unwrap())).collect();
        (done.len() >= STEPS / 10).then_some(done)
    });
    let restarted = std::process::Command::new("service").args(["postgresql", "restart"]).output().unwrap();
    assert!(
        restarted.status.success(),
        "this test restarts the machine's PostgreSQL with `service postgresql restart`, which failed: {}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    let report = finish(run);
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["outputs"]["total"], (0..STEPS).sum::<usize>(), "{report}");
    let id = report["id"].as_str().unwrap();
    let shown = common::json(&dir.join("coordinator"), &["show", id, "--json"]);
    succeeded_once(&shown, &common::effects(&dir), "after the restart");
    // What was committed before the restart is there, unchanged.
    let after = db.query(SUCCEEDED_ATTEMPTS);
    for (key, attempt) in &before {
        assert!(
            after.iter().any(|row| row[0].as_deref() == Some(key) && row[1].as_deref() == Some(attempt)),
            "attempt {attempt} of {key} succeeded before the restart and is not recorded after it"
        );
    }
    // The workers reconnected rather than died, and go on taking work.
    for worker in &mut workers {
        assert!(worker.child.try_wait().unwrap().is_none(), "a worker exited: {}", worker.log());
    }
    let again = finish(start_run(&dir.join("coordinator"), &workflow));
    assert_eq!(again["status"], "succeeded", "{again}");
    use_database(None);
}

#[test]
fn a_worker_and_a_coordinator_serve_their_metrics_while_the_attempt_runs() {
    let _serial = serial();
    let db = TestDatabase::create();
    use_database(Some(&db.url));
    let dir = temp_dir("cluster-metrics");
    // A quick step, then a slow one to scrape beside.
    let workflow = write(
        &dir,
        "two.yaml",
        &format!(
            "name: two\ncomponents:\n  effect: {}\nsteps:\n  - id: quick\n    uses: effect\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log }}\n  - id: slow\n    uses: effect\n    depends_on: [quick]\n    dirs: ['out:/out']\n    limits: {{ timeout: 60s }}\n    with: {{ file: /out/keys.log, millis: 3000 }}\n",
            guests::SIDE_EFFECT
        ),
    );
    let worker = Worker::start(&dir, "w", &["--metrics-listen", "127.0.0.1:0"], &[]);
    let worker_metrics = wait_for(Duration::from_secs(30), || {
        let log = worker.log();
        let line = log.lines().find_map(|line| line.strip_prefix("metrics at "))?;
        Some(line.trim().to_owned())
    });
    let mut coordinator = stepbox(&dir.join("coordinator"))
        .args(["run", workflow.to_str().unwrap(), "--queue", "--json", "--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(coordinator.stderr.take().unwrap()).lines();
    let coordinator_metrics = loop {
        let line = lines.next().expect("the run printed no metrics address").unwrap();
        if let Some(url) = line.strip_prefix("metrics at ") {
            break url.trim().to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    // While the slow step runs: the coordinator has counted the quick one
    // as it ended, and sees one attempt out, in its slots and the queue.
    let scraped = wait_for(Duration::from_secs(30), || {
        let scraped = common::scrape(&coordinator_metrics);
        let ended = r#"stepbox_attempts_total{tenant="default",component="effect",outcome="succeeded"}"#;
        let running = r#"stepbox_process_attempts_running{tenant="default"}"#;
        (common::sample(&scraped, ended) == Some(1.0) && common::sample(&scraped, running) == Some(1.0))
            .then_some(scraped)
    });
    assert_eq!(common::sample(&scraped, r#"stepbox_queue_attempts_running{tenant="default"}"#), Some(1.0), "{scraped}");
    // The worker sees it in the queue, loaded the component, and counts
    // no attempts (so summing over processes counts each once).
    let scraped = common::scrape(&worker_metrics);
    assert_eq!(common::sample(&scraped, r#"stepbox_queue_attempts_running{tenant="default"}"#), Some(1.0), "{scraped}");
    let loaded: f64 = ["memory", "disk", "compiled"]
        .iter()
        .filter_map(|result| {
            common::sample(&scraped, &format!(r#"stepbox_components_loaded_total{{result="{result}"}}"#))
        })
        .sum();
    assert!(loaded >= 1.0, "the worker loaded the component:\n{scraped}");
    assert!(!scraped.contains("stepbox_attempts_total"), "{scraped}");
    let out = coordinator.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "succeeded", "{report}");
    use_database(None);
}
