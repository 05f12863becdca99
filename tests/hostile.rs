//! The hostile-guest suite: each attack ends in a named failure class or a
//! guest-visible refusal within its limit, files outside the grants stay as
//! they were, and healthy steps running at the same time succeed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use common::{load, request, run, sandbox};
use serde_json::json;
use stepbox::run::{Attempt, FailureKind, Outcome};
use stepbox::sandbox::{DirGrant, EngineConfig, LoadError, Sandbox, StepComponent};
use stepbox::store::MemoryKeyValueStore;
use stepbox_tests::guests;

fn failure_kind(report: &Attempt) -> FailureKind {
    match &report.outcome {
        Outcome::Failed { failure } => failure.kind,
        Outcome::Succeeded { output } => panic!("expected a failure, the step returned {output}"),
        Outcome::Running => panic!("the attempt did not end"),
    }
}

/// A host directory with a granted `data` (read-write) and `ro`
/// (read-only), a secret next to them, and symlinks planted inside `data`
/// that point out.
struct Playground {
    root: PathBuf,
}

impl Playground {
    fn new(name: &str) -> Playground {
        let root = std::env::temp_dir().join(format!("stepbox-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(root.join("ro")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        std::fs::write(root.join("secret.txt"), "top secret").unwrap();
        std::fs::write(root.join("outside/inner.txt"), "also secret").unwrap();
        std::fs::write(root.join("data/file.txt"), "mine").unwrap();
        std::fs::write(root.join("ro/file.txt"), "read only").unwrap();
        std::os::unix::fs::symlink(root.join("secret.txt"), root.join("data/link-out")).unwrap();
        std::os::unix::fs::symlink("../secret.txt", root.join("data/rel-out")).unwrap();
        std::os::unix::fs::symlink(root.join("outside"), root.join("data/dir-out")).unwrap();
        Playground { root }
    }

    fn grants(&self) -> Vec<DirGrant> {
        vec![
            DirGrant::new(&self.root.join("data"), "/data", false).unwrap(),
            DirGrant::new(&self.root.join("ro"), "/ro", true).unwrap(),
        ]
    }

    /// Everything outside `data` is as the playground made it.
    fn assert_untouched(&self, attack: &str) {
        let read = |path: &str| {
            std::fs::read_to_string(self.root.join(path)).unwrap_or_else(|err| panic!("{attack}: {path}: {err}"))
        };
        assert_eq!(read("secret.txt"), "top secret", "{attack}");
        assert_eq!(read("outside/inner.txt"), "also secret", "{attack}");
        assert_eq!(read("ro/file.txt"), "read only", "{attack}");
        assert!(!self.root.join("moved.txt").exists(), "{attack}");
        assert!(!self.root.join("ro/new.txt").exists(), "{attack}");
        assert_eq!(read("data/file.txt"), "mine", "{attack}");
        let entries = |dir: &str| std::fs::read_dir(self.root.join(dir)).unwrap().count();
        assert_eq!((entries("ro"), entries("outside")), (1, 1), "{attack}");
        assert_eq!(entries(""), 4, "{attack}: nothing new next to the grants");
        // Hard-linking a planted symlink only makes another symlink (which
        // the guest cannot follow out); a regular file would be a copy of a
        // secret.
        if let Ok(meta) = std::fs::symlink_metadata(self.root.join("data/stolen")) {
            assert!(meta.file_type().is_symlink(), "{attack}: the guest linked a secret file into its directory");
            let _ = std::fs::remove_file(self.root.join("data/stolen"));
        }
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[tokio::test]
async fn filesystem_escapes_are_refused_and_nothing_outside_changes() {
    let playground = Playground::new("fs");
    for attack in [
        "dotdot",
        "absolute",
        "symlink",
        "relative-symlink",
        "trailing-slash-symlink",
        "hard-link",
        "hard-link-through-symlink",
        "rename-out",
        "truncate-read-only",
        "write-read-only",
        "delete-read-only",
    ] {
        let mut req = request(json!({ "attack": attack }));
        req.grants.dirs = playground.grants();
        let report = run(guests::FS_ESCAPE, req).await;
        let outcome =
            report.output().unwrap_or_else(|| panic!("{attack}: {report:?}"))["outcome"].as_str().unwrap().to_owned();
        assert!(outcome.starts_with("refused: "), "{attack}: {outcome}");
        playground.assert_untouched(attack);
    }
}

#[tokio::test]
async fn the_network_is_closed_without_a_grant() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap().to_string();
    for input in [
        json!({ "attack": "connect", "address": address }),
        json!({ "attack": "udp", "address": address }),
        json!({ "attack": "dns", "host": "localhost" }),
    ] {
        let report = run(guests::NET_PROBE, request(input.clone())).await;
        let outcome =
            report.output().unwrap_or_else(|| panic!("{input}: {report:?}"))["outcome"].as_str().unwrap().to_owned();
        assert!(outcome.starts_with("refused: "), "{input}: {outcome}");
    }
    assert!(listener.accept().is_err_and(|err| err.kind() == std::io::ErrorKind::WouldBlock), "nothing connected");
}

#[tokio::test]
async fn environment_variables_and_stdin_are_empty_unless_granted() {
    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "stdin" }))).await;
    assert_eq!(report.output(), Some(&json!("")));
    let mut req = request(json!({ "attack": "stdin" }));
    req.grants.stdin = b"granted input".to_vec();
    assert_eq!(run(guests::HOST_ABUSE, req).await.output(), Some(&json!("granted input")));
    // The host's environment (PATH, HOME, whatever the tests run with)
    // never reaches a step: it sees exactly what it was granted.
    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "env" }))).await;
    assert_eq!(report.output(), Some(&json!({})), "{report:?}");
    let mut req = request(json!({ "attack": "env" }));
    req.grants.env.insert("REGION".into(), "eu-west".into());
    req.grants.env.insert("MODE".into(), "batch".into());
    let report = run(guests::HOST_ABUSE, req).await;
    assert_eq!(report.output(), Some(&json!({ "MODE": "batch", "REGION": "eu-west" })), "{report:?}");
}

#[tokio::test]
async fn key_value_keys_and_values_are_held_to_their_sizes() {
    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "kv-sizes" }))).await;
    let expected = json!({ "key_1024": true, "key_1025": false, "value_1mib": true, "value_1mib_and_1": false });
    assert_eq!(report.output(), Some(&expected), "{report:?}");
}

#[tokio::test]
async fn a_huge_log_message_is_cut_and_a_flood_is_capped() {
    let mut req = request(json!({ "attack": "huge-log", "size": 8 * 1024 * 1024 }));
    req.limits.memory = ByteSize::mib(128);
    let report = run(guests::HOST_ABUSE, req).await;
    assert_eq!(report.output(), Some(&json!(8 * 1024 * 1024)), "{:?}", report.failure());
    let message = &report.logs[0].message;
    assert!(message.len() < 17 * 1024 && message.ends_with("more bytes dropped]"), "{}", message.len());

    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "log-flood", "size": 100_000 }))).await;
    assert!(report.output().is_some());
    let kept: usize = report.logs.iter().map(|log| log.message.len() + log.context.len()).sum();
    assert!(kept <= 1024 * 1024 + 200, "{kept}");
    assert!(report.logs.last().unwrap().message.contains("more log messages dropped"));
}

/// Fuel counts wasm instructions, not host work: a loop of cheap calls
/// into slow host code (each copies, checks and redacts 32 MiB for a few
/// units of fuel) must still stop at its timeout, which the epoch check
/// at every loop header sees to.
#[tokio::test]
async fn a_loop_of_slow_host_calls_stops_at_its_timeout() {
    let mut req = request(json!({ "attack": "huge-log-loop", "size": 32 * 1024 * 1024 }));
    req.limits.memory = ByteSize::mib(128);
    req.limits.timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let report = run(guests::HOST_ABUSE, req).await;
    assert_eq!(failure_kind(&report), FailureKind::Timeout, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

/// A hand-written guest in `guests/`, compiled from its text.
fn wat_guest(name: &str) -> StepComponent {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests").join(name);
    sandbox().load_bytes(&path, &wat::parse_file(&path).unwrap()).unwrap()
}

/// Attempts share the async runtime's threads: a guest that only computes,
/// only calls slow host code, or only waits on memory (`guests/chase.wat`:
/// a cache and TLB miss for every unit of fuel, the slowest fuel there is)
/// yields often enough that a task beside it on the same thread (this
/// test's runtime has one) runs within tens of milliseconds, not once its
/// timeout ends it. Without yields the ticker would wait the whole second;
/// with slices of a million units of fuel, the chase held the thread for
/// 140–300 ms at a time.
#[tokio::test]
async fn a_busy_guest_leaves_its_thread_to_others_every_few_milliseconds() {
    let host_loop = json!({ "attack": "huge-log-loop", "size": 1024 * 1024 });
    for (name, guest, input) in [
        ("spin", load(guests::SPIN), json!(null)),
        ("slow host calls", load(guests::HOST_ABUSE), host_loop),
        ("pointer chase", wat_guest("chase.wat"), json!(null)),
    ] {
        let mut req = request(input);
        req.limits.fuel = u64::MAX;
        req.limits.memory = ByteSize::mib(128);
        req.limits.timeout = Duration::from_secs(1);
        let worst = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let ticker = tokio::spawn({
            let worst = worst.clone();
            async move {
                let mut last = std::time::Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let now = std::time::Instant::now();
                    let mut worst = worst.lock().unwrap();
                    *worst = (*worst).max(now - last);
                    last = now;
                }
            }
        });
        // A task of its own, as the scheduler runs an attempt.
        let report = tokio::spawn(async move { sandbox().run(&guest, req).await }).await.unwrap();
        ticker.abort();
        assert_eq!(failure_kind(&report), FailureKind::Timeout, "{name}: {report:?}");
        let worst = *worst.lock().unwrap();
        assert!(worst < Duration::from_millis(100), "{name}: the thread was held for {worst:?}");
    }
}

/// A loop of a few instructions that each move 32 or 64 MiB
/// (`guests/fill-loop.wat`): counted by the instruction, its fuel would
/// last for hours. wasmtime charges `memory.fill` and `memory.copy` a unit
/// a byte, so the default fuel runs out within a fraction of a second; with
/// fuel to spare, the timeout stops it.
#[tokio::test]
async fn a_loop_of_bulk_memory_instructions_pays_fuel_by_the_byte_and_stops_at_its_timeout() {
    let component = wat_guest("fill-loop.wat");
    let mut req = request(json!(null));
    req.limits.memory = ByteSize::mib(128);
    req.limits.timeout = Duration::from_secs(60);
    let started = std::time::Instant::now();
    let report = sandbox().run(&component, req.clone()).await;
    assert_eq!(failure_kind(&report), FailureKind::OutOfFuel, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());

    req.limits.fuel = u64::MAX / 2;
    req.limits.timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let report = sandbox().run(&component, req).await;
    assert_eq!(failure_kind(&report), FailureKind::Timeout, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_one_gib_host_call_argument_is_refused_before_the_host_copies_it() {
    let mut req = request(json!({ "attack": "huge-log", "size": 1024 * 1024 * 1024 }));
    req.limits.memory = ByteSize::gib(3);
    req.limits.timeout = Duration::from_secs(60);
    let report = run(guests::HOST_ABUSE, req).await;
    assert_eq!(failure_kind(&report), FailureKind::Trap, "{report:?}");
    assert_eq!(report.failure().unwrap().message, "the step passed more than 128.0 MiB to one host call");
    assert!(report.logs.is_empty(), "{:?}", report.logs);
}

#[tokio::test]
async fn a_resource_creation_loop_stops_at_the_resource_limit() {
    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "resource-loop" }))).await;
    assert_eq!(failure_kind(&report), FailureKind::Trap, "{report:?}");
    let message = &report.failure().unwrap().message;
    assert!(message.contains("resource table"), "{message}");
}

#[tokio::test]
async fn compare_and_swap_handles_that_make_the_host_hold_copies_stop_at_the_host_memory_limit() {
    // Each handle keeps a 1 MiB copy on the host, outside the guest's own
    // memory; 10,000 of them (the resource cap) would be 10 GiB.
    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "cas-hoard", "size": 1024 * 1024 }))).await;
    assert_eq!(failure_kind(&report), FailureKind::MemoryLimit, "{report:?}");
    let message = &report.failure().unwrap().message;
    assert!(message.contains("host memory limit of 16.0 MiB") && message.contains("compare-and-swap"), "{message}");
    assert!(report.peak_memory < 8 * 1024 * 1024, "the copies are the host's, not the guest's: {}", report.peak_memory);
}

#[tokio::test]
async fn http_objects_a_step_builds_without_sending_stop_at_the_host_memory_limit() {
    // No grant is needed to build HTTP header fields and requests, only to
    // send them. Kept without end, 15 KB header sets and requests with a
    // 16 KB path and a written 64 KiB body chunk would be the host's, up to
    // the resource cap (10,000: 150 MB, and over 1 GB). (A 4 MiB budget
    // binds before this machine's share of open files does.)
    for (attack, size, what) in [("fields-hoard", 15_000, "HTTP header fields"), ("request-hoard", 16_000, "HTTP ")] {
        let mut req = request(json!({ "attack": attack, "size": size }));
        req.limits.host_memory = ByteSize::mib(4);
        let report = run(guests::HOST_ABUSE, req).await;
        assert_eq!(failure_kind(&report), FailureKind::MemoryLimit, "{attack}: {report:?}");
        let message = &report.failure().unwrap().message;
        assert!(message.contains("host memory limit of 4.0 MiB") && message.contains(what), "{attack}: {message}");
    }
    // A request's parts are held to lengths its charge covers (the `http`
    // crate alone would keep a method or an authority of any length).
    let parts = |size: usize| async move {
        let report = run(guests::HOST_ABUSE, request(json!({ "attack": "request-parts", "size": size }))).await;
        report.output().cloned().unwrap_or_else(|| panic!("{report:?}"))
    };
    let accepted = json!({ "method": true, "scheme": true, "authority": true, "path": true });
    assert_eq!(parts(60).await, accepted);
    let refused = json!({ "method": false, "scheme": false, "authority": false, "path": false });
    assert_eq!(parts(1024 * 1024).await, refused);
    // What a dropped request held is given back: a step may build as many
    // as it likes, one after another.
    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "request-churn", "size": 2_000 }))).await;
    assert_eq!(report.output(), Some(&json!(2_000)), "{report:?}");
}

#[tokio::test]
async fn output_caps_that_the_host_memory_limit_cannot_hold_are_refused_before_the_step_runs() {
    // The captures and the logs are charged to the host memory limit: 1 MiB
    // of each stream and 1 MiB of logs do not fit in 2 MiB.
    let mut req = request(json!({ "bytes": 4 * 1024 * 1024 }));
    req.limits.host_memory = ByteSize::mib(2);
    let report = run(guests::CHATTY, req).await;
    assert_eq!(failure_kind(&report), FailureKind::Fatal, "{report:?}");
    let message = &report.failure().unwrap().message;
    assert!(message.contains("limits.host_memory (2.0 MiB) cannot hold the stdout and stderr captures"), "{message}");
    assert!(report.stdout.text.is_empty(), "it never ran");
    // With room for them, the flood is cut at the caps and the step succeeds.
    let mut req = request(json!({ "bytes": 4 * 1024 * 1024 }));
    req.limits.host_memory = ByteSize::mib(3);
    let report = run(guests::CHATTY, req).await;
    assert!(report.output().is_some(), "{report:?}");
    assert_eq!(report.stderr.dropped_bytes, 3 * 1024 * 1024);
}

#[tokio::test]
async fn a_huge_return_value_is_an_output_limit() {
    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "huge-output", "size": 3 * 1024 * 1024 }))).await;
    assert_eq!(failure_kind(&report), FailureKind::OutputLimit);
}

#[tokio::test]
async fn a_huge_initial_memory_is_refused_before_any_code_runs() {
    let report = run(guests::BIG_MEMORY, request(json!(7))).await;
    assert_eq!(failure_kind(&report), FailureKind::MemoryLimit, "{report:?}");
    assert_eq!(report.fuel_consumed, 0, "nothing ran");
    let mut req = request(json!(7));
    req.limits.memory = ByteSize::mib(300);
    assert_eq!(run(guests::BIG_MEMORY, req).await.output(), Some(&json!(1)), "it runs with enough memory");
}

#[tokio::test]
async fn shared_memory_and_more_memories_or_instances_than_an_attempt_may_have_are_refused() {
    // No memory of a step is shared with anything: a shared memory (the
    // threads proposal) does not even load.
    let shared = wat::parse_str(r#"(module (memory (export "memory") 1 1 shared) (func (export "_start")))"#).unwrap();
    let err = sandbox().load_bytes(Path::new("shared.wasm"), &shared).unwrap_err().to_string();
    assert!(err.contains("shared"), "{err}");
    // A core module has one memory, however many it declares: refused when
    // it loads, before any of it runs.
    let memories = "(memory 1)".repeat(16);
    let text = format!(r#"(module {memories} (memory (export "memory") 1) (func (export "_start")))"#);
    let err = sandbox().load_bytes(Path::new("many.wasm"), &wat::parse_str(text).unwrap()).unwrap_err().to_string();
    assert!(err.contains("asks for more than any step may have") && err.contains("memories count of 17"), "{err}");
    // More core instances than an attempt may create (64).
    let instances = "(core instance (instantiate $m))".repeat(65);
    let component = wat::parse_str(format!("(component (core module $m) {instances})")).unwrap();
    let err = sandbox().load_bytes(Path::new("instances.wasm"), &component).unwrap_err().to_string();
    assert!(err.contains("asks for more than any step may have"), "{err}");
}

#[tokio::test]
async fn an_attempt_never_sees_what_the_one_before_wrote() {
    // Instance slots are reused with their touched pages kept resident;
    // each attempt must still start from the component's initial memory,
    // inside the resident region (7) and beyond it (100 MiB). A sandbox of
    // one attempt at a time has one instance slot and 16 memory slots
    // (MAX_MEMORIES): 20 attempts one after another must reuse them.
    let data = std::env::temp_dir().join(format!("stepbox-one-slot-{}", std::process::id()));
    let config = EngineConfig {
        max_concurrent_attempts: 1,
        max_memory: ByteSize::mib(512),
        data_dir: Some(data.clone()),
        ..EngineConfig::default()
    };
    let sandbox = Sandbox::new(config, std::sync::Arc::new(MemoryKeyValueStore::new())).unwrap();
    let component = sandbox.load(Path::new(guests::BIG_MEMORY)).unwrap();
    for (attempt, index) in [7, 100 * 1024 * 1024].into_iter().cycle().take(20).enumerate() {
        let mut req = request(json!(index));
        req.limits.memory = ByteSize::mib(300);
        let report = sandbox.run(&component, req).await;
        assert_eq!(report.output(), Some(&json!(1)), "attempt {attempt}, index {index}: {report:?}");
    }
    drop(sandbox);
    std::fs::remove_dir_all(data).unwrap();
}

/// The hand-written table bomb (`guests/table-bomb.wat`) with a table of
/// `initial` elements.
fn table_bomb(initial: u64) -> Result<StepComponent, LoadError> {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/guests/table-bomb.wat"));
    let text = std::fs::read_to_string(path).unwrap().replace("INITIAL", &initial.to_string());
    sandbox().load_bytes(path, &wat::parse_str(text).unwrap())
}

#[tokio::test]
async fn table_growth_stops_at_the_table_limit() {
    // The default limit is 20,000 elements.
    let report = sandbox().run(&table_bomb(1).unwrap(), request(json!(null))).await;
    assert_eq!(failure_kind(&report), FailureKind::MemoryLimit, "{report:?}");
    let message = &report.failure().unwrap().message;
    assert!(message.contains("grow a table to 20001 elements; the limit is 20000"), "{message}");

    let err = table_bomb(100_000_000).unwrap_err().to_string();
    assert!(err.contains("asks for more than any step may have"), "refused before it can run: {err}");
    assert!(err.contains("make its initial tables or memories smaller"), "{err}");
}

#[tokio::test]
async fn asking_for_u64_max_random_bytes_traps_without_allocating() {
    let report = run(guests::HOST_ABUSE, request(json!({ "attack": "random" }))).await;
    assert_eq!(failure_kind(&report), FailureKind::Trap, "{report:?}");
    let message = &report.failure().unwrap().message;
    assert!(message.contains(&format!("requested len {} exceeds limit 1048576", u64::MAX)), "{message}");
    assert!(report.peak_memory < 8 * 1024 * 1024, "{report:?}");
}

#[tokio::test]
async fn http_is_refused_without_a_grant() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let report = run(guests::HTTP_PROBE, request(json!({ "url": url }))).await;
    assert_eq!(report.output(), Some(&json!({ "refused": "ErrorCode::HttpRequestDenied" })), "{report:?}");
    assert!(listener.accept().is_err(), "nothing connected");
}

/// What one attack must end in.
enum Ends {
    /// A failure of this kind, with this in its message.
    Failure(FailureKind, &'static str),
    /// An output that holds this text.
    Output(&'static str),
}

/// Every attack at once, next to 50 healthy steps: the healthy steps all
/// succeed, each attack ends as it does alone, and the host stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_healthy_steps_succeed_beside_every_attack() {
    use Ends::{Failure, Output};
    let playground = Playground::new("mixed");
    std::fs::write(playground.root.join("data/f.txt"), "x").unwrap();
    let mut attacks = Vec::new();
    let hostile = [
        (guests::SPIN, json!(null), Failure(FailureKind::OutOfFuel, "used up its fuel")),
        (guests::MEMORY_HOG, json!(null), Failure(FailureKind::MemoryLimit, "its limit is 64.0 MiB")),
        (guests::RECURSE, json!(null), Failure(FailureKind::StackOverflow, "overflowed its call stack")),
        (guests::CHATTY, json!({}), Failure(FailureKind::Timeout, "timeout of 3s")),
        (guests::SLEEPY, json!({}), Failure(FailureKind::Timeout, "timeout of 3s")),
        (guests::BIG_MEMORY, json!(1), Failure(FailureKind::MemoryLimit, "its limit is 64.0 MiB")),
        (guests::HOST_ABUSE, json!({ "attack": "resource-loop" }), Failure(FailureKind::Trap, "no free keys")),
        (guests::HOST_ABUSE, json!({ "attack": "log-flood", "size": 1_000_000 }), Output("1000000")),
        (guests::FS_ESCAPE, json!({ "attack": "symlink" }), Output("refused: ")),
        (guests::NET_PROBE, json!({ "attack": "dns", "host": "localhost" }), Output("refused: ")),
        (guests::HOST_ABUSE, json!({ "attack": "random" }), Failure(FailureKind::Trap, "exceeds limit 1048576")),
        (
            guests::HOST_ABUSE,
            json!({ "attack": "cas-hoard", "size": 1024 * 1024 }),
            Failure(FailureKind::MemoryLimit, "compare-and-swap"),
        ),
        (guests::HOST_ABUSE, json!({ "attack": "kv-flood", "size": 1024 * 1024 }), Failure(FailureKind::Timeout, "3s")),
        (guests::HTTP_PROBE, json!({ "url": "http://127.0.0.1:9/" }), Output("HttpRequestDenied")),
        (
            guests::HOST_ABUSE,
            json!({ "attack": "fields-hoard", "size": 15_000 }),
            Failure(FailureKind::MemoryLimit, "HTTP header fields"),
        ),
        (
            guests::HOST_ABUSE,
            json!({ "attack": "request-hoard", "size": 16_000 }),
            Failure(FailureKind::MemoryLimit, "HTTP "),
        ),
        (guests::SCRATCH_FILL, json!({ "how": "files" }), Output("\"held\":")),
        (guests::SCRATCH_FILL_WASIP1, json!({ "how": "dirs" }), Output("\"error\":\"StorageFull\"")),
    ];
    let components = hostile.into_iter().map(|(guest, input, ends)| (common::load(guest), input, ends)).chain([
        (table_bomb(1).unwrap(), json!(null), Failure(FailureKind::MemoryLimit, "the limit is 20000")),
        (open_loop(), json!(null), Failure(FailureKind::Trap, "no free keys")),
    ]);
    for (component, input, ends) in components {
        let mut req = request(input);
        // Only the attacks that must end at their deadline meet one that a
        // loaded machine could reach first; the rest end by their own limit.
        let times_out = matches!(ends, Failure(FailureKind::Timeout, _));
        req.limits.timeout = Duration::from_secs(if times_out { 3 } else { 60 });
        if times_out {
            // Fuel for far longer than the deadline, so a fast machine
            // does not run out of it first.
            req.limits.fuel = 1_000_000_000_000;
        }
        req.grants.dirs = playground.grants();
        // Fuel, not the clock, ends the spin, however busy the machine.
        if component.path().to_string_lossy().contains("spin") {
            req.limits.fuel = 200_000_000;
        }
        if component.path().to_string_lossy().contains("scratch-fill") {
            req.grants.scratch = true;
            req.limits.scratch = ByteSize::mib(1);
        }
        // A budget that binds before the share of open files does.
        req.limits.host_memory = ByteSize::mib(4);
        req.limits.stdio = ByteSize::kib(512);
        req.limits.logs = ByteSize::kib(512);
        attacks.push((ends, tokio::spawn(async move { sandbox().run(&component, req).await })));
    }
    let hello = common::load(guests::HELLO);
    let healthy: Vec<_> = (0..50)
        .map(|i| {
            let hello = hello.clone();
            tokio::spawn(async move { sandbox().run(&hello, request(json!({ "name": format!("n{i}") }))).await })
        })
        .collect();
    for (i, task) in healthy.into_iter().enumerate() {
        let report = task.await.unwrap();
        assert_eq!(report.output(), Some(&json!({ "greeting": format!("Hello, n{i}!") })), "{report:?}");
    }
    for (ends, task) in attacks {
        let report = task.await.expect("an attack did not take the host down");
        match ends {
            Failure(kind, text) => {
                if kind == FailureKind::Timeout {
                    assert!(report.duration_ms() < 6000.0, "the deadline held: {report:?}");
                }
                let failure = report.failure().unwrap_or_else(|| panic!("{report:?}"));
                assert!(
                    failure.kind == kind && failure.message.contains(text),
                    "expected {kind:?} ({text}): {failure}"
                );
            }
            Output(text) => {
                let output = report.output().map(|output| output.to_string()).unwrap_or_default();
                assert!(output.contains(text), "expected an output with {text}: {report:?}");
            }
        }
    }
    playground.assert_untouched("mixed");
}

/// A host tree for the symlink-swap attack: `ceiling/d/sub` holds a file;
/// `secret.txt` lies in the root, which `d/../..` reaches.
fn swap_tree(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("stepbox-swap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("ceiling/d/sub")).unwrap();
    std::fs::write(root.join("ceiling/d/sub/inside.txt"), "inside").unwrap();
    std::fs::write(root.join("secret.txt"), "top secret").unwrap();
    root
}

/// Step `plant` (read-write on `d`) swaps `d/sub` for a symlink to `../..`
/// (the root); step `read`, granted `d/sub` and checked when the run
/// started, then tries to read `secret.txt` through it.
fn swap_workflow(root: &Path) -> stepbox::workflow::Workflow {
    let yaml = format!(
        "name: swap\ncomponents:\n  escape: {}\nsteps:\n  - id: plant\n    uses: escape\n    with: {{ attack: plant-symlink }}\n    dirs: ['ceiling/d:/data']\n  - id: read\n    uses: escape\n    depends_on: [plant]\n    with: {{ attack: read-secret }}\n    dirs: ['ceiling/d/sub:/data:ro']\n",
        guests::FS_ESCAPE
    );
    std::fs::write(root.join("swap.yaml"), yaml).unwrap();
    stepbox::workflow::Workflow::load(&root.join("swap.yaml")).unwrap()
}

async fn run_swap(root: &Path, tenant: stepbox::tenant::Tenant) -> stepbox::run::RunReport {
    use std::sync::Arc;
    let workflow = swap_workflow(root);
    tenant.check(&workflow).expect("both grants are under the ceiling when the run starts");
    let inputs = workflow.bind_inputs(&Default::default()).unwrap();
    let options =
        stepbox::scheduler::RunOptions { tenant: Arc::new(tenant), ..stepbox::scheduler::RunOptions::new("swap") };
    stepbox::scheduler::run(sandbox(), Arc::new(workflow), inputs, options).await.unwrap()
}

fn assert_swap_refused(report: &stepbox::run::RunReport) {
    let output = |i: usize| report.steps[i].executions[0].attempts[0].output().cloned();
    assert_eq!(output(0), Some(json!({ "attack": "plant-symlink", "outcome": "done: planted" })), "{report:?}");
    let read = &report.steps[1].executions[0].attempts[0];
    let failure = read.failure().unwrap_or_else(|| panic!("the swapped grant was opened: {read:?}"));
    assert_eq!(failure.kind, FailureKind::Fatal);
    assert!(failure.message.contains("cannot grant directory"), "{failure}");
    assert!(!format!("{report:?}").contains("top secret"));
}

#[tokio::test]
async fn a_grant_swapped_for_a_symlink_is_not_followed_out_of_the_tenants_ceiling() {
    let root = swap_tree("ceiling");
    let tenants = root.join("tenants.yaml");
    std::fs::write(
        &tenants,
        format!("tenants:\n  acme: {{ dirs: ['{}'], components: any }}\n", root.join("ceiling/d").display()),
    )
    .unwrap();
    let tenant = stepbox::tenant::Tenants::load(&tenants).unwrap().get("acme").unwrap();
    let report = run_swap(&root, tenant).await;
    assert_swap_refused(&report);
    let message = report.steps[1].executions[0].attempts[0].failure().unwrap().message.clone();
    assert!(message.contains("outside"), "opened beneath the ceiling, the symlink leads out: {message}");

    // A later run is checked against the tree as it is now: the grant
    // resolves outside the ceiling and the run is refused.
    let tenant = stepbox::tenant::Tenants::load(&tenants).unwrap().get("acme").unwrap();
    let err = tenant.check(&swap_workflow(&root)).unwrap_err().to_string();
    assert!(err.contains("is not under tenant `acme`'s allowed dirs"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn without_a_ceiling_a_grant_whose_target_changed_is_refused() {
    let root = swap_tree("no-ceiling");
    let report = run_swap(&root, stepbox::tenant::Tenant::unconstrained("default")).await;
    assert_swap_refused(&report);
    let message = report.steps[1].executions[0].attempts[0].failure().unwrap().message.clone();
    assert!(message.contains("is no longer the directory that was granted"), "{message}");
    std::fs::remove_dir_all(root).unwrap();
}

/// The hand-written preview1 program (`guests/open-loop.wat`) that opens
/// `f.txt` in its first granted directory in a loop.
fn open_loop() -> StepComponent {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/guests/open-loop.wat"));
    sandbox().load_bytes(path, &wat::parse_file(path).unwrap()).unwrap()
}

#[tokio::test]
async fn a_preview1_module_opening_files_in_a_loop_stops_at_the_resource_cap() {
    let dir = std::env::temp_dir().join(format!("stepbox-open-loop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("f.txt"), "x").unwrap();
    let module = open_loop();
    let mut req = request(json!(null));
    req.grants.dirs.push(DirGrant::new(&dir, "/data", true).unwrap());
    // Without the cap the module would open files until the process ran
    // out of descriptors (or 100,000 times), and print how many it got.
    let report = sandbox().run(&module, req.clone()).await;
    assert_eq!(failure_kind(&report), FailureKind::Trap, "{report:?}");
    assert!(report.failure().unwrap().message.contains("resource table has no free keys"), "{report:?}");
    assert!(report.stdout.text.is_empty(), "it never finished its loop: {report:?}");
    // The attempt's files are closed with it: the process has descriptors
    // for the next one.
    let mut read = request(json!({ "path": "/data/f.txt" }));
    read.grants.dirs = req.grants.dirs.clone();
    let report = run(guests::FS_READ, read).await;
    assert_eq!(report.output().map(|o| o["contents"].clone()), Some(json!("x")), "{report:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs the scratch filler (`how`, `mib`) as `program` with a scratch
/// directory of `cap` (the default when `None`), returning its report.
async fn fill_scratch(program: &str, how: &str, mib: u64, cap: Option<ByteSize>) -> serde_json::Value {
    let mut req = request(json!({ "how": how, "mib": mib }));
    req.grants.scratch = true;
    if let Some(cap) = cap {
        req.limits.scratch = cap;
    }
    req.limits.timeout = Duration::from_secs(30);
    let report = run(program, req).await;
    report.output().cloned().unwrap_or_else(|| panic!("{program} {how}: {report:?}"))
}

/// The same program as a command component and as a preview1 module: both
/// write through calls stepbox holds to the scratch size.
const FILLERS: [&str; 2] = [guests::SCRATCH_FILL, guests::SCRATCH_FILL_WASIP1];

#[tokio::test]
async fn writes_past_the_scratch_size_fail_inside_the_guest_however_they_are_made() {
    const MIB: u64 = 1 << 20;
    for program in FILLERS {
        for how in ["append", "files", "pwrite"] {
            let report = fill_scratch(program, how, 0, Some(ByteSize::mib(8))).await;
            // The write that would pass 8 MiB fails with "no space left on
            // device"; the step itself carries on and reports it. (A
            // component's libc, wasi-libc, reports a failed write to a
            // file stream, which is how it writes at a file's position, as
            // a plain I/O error.)
            let streamed = program == guests::SCRATCH_FILL && how != "pwrite";
            let expected = if streamed { "Uncategorized" } else { "StorageFull" };
            assert_eq!(report["error"], json!(expected), "{program} {how}: {report}");
            let written = report["written"].as_u64().unwrap();
            assert!((7 * MIB..=8 * MIB).contains(&written), "{program} {how}: {report}");
            assert!(report["held"].as_u64().unwrap() <= 8 * MIB, "{program} {how}: {report}");
        }
        // A file cannot be made larger than the space by resizing it.
        let report = fill_scratch(program, "sparse", 1024, Some(ByteSize::mib(8))).await;
        assert_eq!((&report["error"], &report["held"]), (&json!("StorageFull"), &json!(0)), "{program}: {report}");
        // Every directory costs a block: 8 MiB holds 2,048 at most, not
        // the unbounded number of empty ones a byte count alone would.
        let report = fill_scratch(program, "dirs", 0, Some(ByteSize::mib(8))).await;
        let entries = report["entries"].as_u64().unwrap();
        assert_eq!(report["error"], json!("StorageFull"), "{program}: {report}");
        assert!((1_900..=2_048).contains(&entries), "{program}: {report}");
        // Truncating a file gives its space back.
        let report = fill_scratch(program, "truncate", 6, Some(ByteSize::mib(8))).await;
        assert_eq!((&report["error"], &report["written"]), (&json!(null), &json!(12 * MIB)), "{program}: {report}");
    }
}

#[tokio::test]
async fn files_cannot_be_moved_or_linked_across_the_edge_of_the_scratch_directory() {
    // A sparse 1 GiB file made in a granted directory costs nothing there;
    // moved into /scratch and filled, it would hold what was never charged.
    // A file linked out could grow outside and shrink inside, and a
    // directory moved out would lead back in.
    for (i, program) in FILLERS.into_iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("stepbox-cross-{}-{i}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut req = request(json!({ "how": "cross" }));
        req.grants.scratch = true;
        req.grants.dirs.push(DirGrant::new(&dir, "/data", false).unwrap());
        let report = run(program, req).await;
        let expected = json!({
            "move_in": "CrossesDevices",
            "link_in": "CrossesDevices",
            "link_out": "CrossesDevices",
            "move_out": "CrossesDevices",
        });
        assert_eq!(report.output(), Some(&expected), "{program}: {report:?}");
        assert!(!dir.join("moved").exists() && !dir.join("linked").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[tokio::test]
async fn a_step_that_sets_no_scratch_size_gets_64_mib() {
    const MIB: u64 = 1 << 20;
    for program in FILLERS {
        let report = fill_scratch(program, "files", 0, None).await;
        assert!(report["error"].is_string(), "{program}: {report}");
        assert!((63 * MIB..=64 * MIB).contains(&report["written"].as_u64().unwrap()), "{program}: {report}");
    }
}
