//! Tenants: fair scheduling across tenants sharing one set of slots, tenant
//! concurrency limits, ceilings checked before a run, and a fuel budget per
//! run.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use common::sandbox;
use stepbox::run::{RunReport, RunStatus, StepStatus};
use stepbox::scheduler::{self, Dispatcher, RunOptions};
use stepbox::tenant::Share;
use stepbox::tenant::Tenants;
use stepbox::workflow::Workflow;
use stepbox_tests::guests;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stepbox-tenants-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `n` independent steps that each sleep `millis`.
fn sleepers(dir: &std::path::Path, name: &str, n: usize, millis: u64) -> Workflow {
    let mut yaml = format!("name: {name}\ncomponents:\n  sleepy: {}\nsteps:\n", guests::SLEEPY);
    for i in 0..n {
        yaml.push_str(&format!("  - id: s{i}\n    uses: sleepy\n    with: {{ millis: {millis} }}\n"));
    }
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    Workflow::load(&path).unwrap()
}

async fn run_as(tenant: &str, workflow: Workflow, dispatcher: Arc<Dispatcher>) -> (RunReport, Instant) {
    let options =
        RunOptions { tenant: tenant.into(), dispatcher: Some(dispatcher), ..RunOptions::new(format!("run-{tenant}")) };
    let no_inputs = workflow.bind_inputs(&Default::default()).unwrap();
    let report = scheduler::run(sandbox(), Arc::new(workflow), no_inputs, options).await.unwrap();
    (report, Instant::now())
}

fn max_overlap(report: &RunReport) -> usize {
    let spans: Vec<(f64, f64)> = report
        .steps
        .iter()
        .flat_map(|s| &s.executions)
        .flat_map(|e| &e.attempts)
        .map(|a| (a.started_ms, a.finished_ms.unwrap()))
        .collect();
    spans.iter().map(|(start, _)| spans.iter().filter(|(s, f)| s <= start && start < f).count()).max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_a_huge_backlog_does_not_starve_a_small_one() {
    let dir = temp_dir("fair");
    let dispatcher = Dispatcher::new(4);
    let big = tokio::spawn(run_as("big", sleepers(&dir, "big", 600, 10), dispatcher.clone()));
    // Let the big tenant's backlog queue up first.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let small_started = Instant::now();
    let (small, small_done) = run_as("small", sleepers(&dir, "small", 10, 10), dispatcher).await;
    let (big, big_done) = big.await.unwrap();
    assert_eq!((small.run.status, big.run.status), (RunStatus::Succeeded, RunStatus::Succeeded));
    // With one queue for everyone the small tenant's steps would start after
    // the ~500 big ones queued before them; taking turns, they start at once.
    let last_small_start =
        small.steps.iter().map(|s| s.executions[0].attempts[0].started_ms).fold(0.0, f64::max) - small.run.created_ms;
    let small_wait = small_done.duration_since(small_started);
    let big_left = big_done.duration_since(small_done);
    assert!(
        big_left > small_wait * 3,
        "the big backlog drained long after the small tenant finished: small took {small_wait:?}, big went on for {big_left:?}"
    );
    assert!(
        last_small_start < big_left.as_secs_f64() * 1000.0,
        "the small steps started long before the big backlog drained"
    );
    assert!(max_overlap(&big) <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_never_runs_more_than_its_concurrency_ceiling() {
    let dir = temp_dir("limit");
    let dispatcher = Dispatcher::new(8);
    dispatcher.set_share("capped", Share { weight: 1, max_concurrent: 2 });
    let (report, _) = run_as("capped", sleepers(&dir, "capped", 12, 40), dispatcher).await;
    assert_eq!(max_overlap(&report), 2);
}

#[tokio::test]
async fn a_workflow_over_a_tenant_ceiling_fails_validation_naming_it() {
    let dir = temp_dir("ceilings");
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::copy(guests::HELLO, allowed.join("hello.wasm")).unwrap();
    let tenants = dir.join("tenants.yaml");
    std::fs::write(
        &tenants,
        format!(
            "tenants:\n  acme:\n    limits: {{ timeout: 5s, memory: 32MiB, fuel: 1_000_000 }}\n    components: [{allowed}]\n    dirs: [{allowed}]\n    network: ['10.0.0.1:443']\n    http: ['GET@*.example.com']\n",
            allowed = allowed.display()
        ),
    )
    .unwrap();
    let tenants = Tenants::load(&tenants).unwrap();
    let path = dir.join("wf.yaml");
    std::fs::write(
        &path,
        format!(
            "name: wf\ncomponents:\n  hello: allowed/hello.wasm\n  sleepy: {}\nsteps:\n  - id: a\n    uses: hello\n    limits: {{ timeout: 1m, memory: 64MiB }}\n    dirs: ['data:/data']\n    network: {{ connect: ['10.0.0.2:443'], http: ['GET@api.example.com', 'POST@api.example.com', 'GET@evil.net'] }}\n",
            guests::SLEEPY
        ),
    )
    .unwrap();
    let err = tenants.check("acme", &Workflow::load(&path).unwrap()).unwrap_err().to_string();
    for expected in [
        "step `a`: limits.timeout 1m is over tenant `acme`'s ceiling of 5s",
        "step `a`: limits.memory 64.0 MiB is over tenant `acme`'s ceiling of 32.0 MiB",
        "step `a`: limits.fuel 2000000000 is over tenant `acme`'s ceiling of 1000000",
        "is not under tenant `acme`'s allowed dirs",
        "address 10.0.0.2:443 is not in tenant `acme`'s allowed network",
        "HTTP grant `POST@api.example.com` is not within tenant `acme`'s allowed http",
        "HTTP grant `GET@evil.net` is not within tenant `acme`'s allowed http",
        "component `sleepy`",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("component `hello`"), "hello is under the allowed path: {err}");
    assert!(!err.contains("`GET@api.example.com`"), "within *.example.com: {err}");
    let unknown = tenants.check("globex", &Workflow::load(&path).unwrap()).unwrap_err().to_string();
    assert!(
        unknown.contains("tenant `globex` is not in the tenants file") && unknown.contains("the tenants are: acme")
    );
}

#[tokio::test]
async fn a_run_stops_when_it_uses_up_its_fuel_budget() {
    let dir = temp_dir("budget");
    let path = dir.join("spin.yaml");
    std::fs::write(
        &path,
        format!("name: budget\ncomponents:\n  spin: {}\nsteps:\n  - id: a\n    uses: spin\n    limits: {{ fuel: 30_000_000 }}\n  - id: b\n    uses: spin\n    depends_on: [a]\n    always: true\n    limits: {{ fuel: 30_000_000 }}\n  - id: c\n    uses: spin\n    depends_on: [b]\n    always: true\n", guests::SPIN),
    )
    .unwrap();
    let options = RunOptions { max_run_fuel: Some(45_000_000), ..RunOptions::new("budget") };
    let workflow = Workflow::load(&path).unwrap();
    let no_inputs = workflow.bind_inputs(&Default::default()).unwrap();
    let report = scheduler::run(sandbox(), Arc::new(workflow), no_inputs, options).await.unwrap();
    let fuel: u64 = report.steps.iter().map(|s| s.fuel_consumed()).sum();
    assert!(fuel <= 45_000_000, "the run used {fuel}");
    assert_eq!(report.run.status, RunStatus::Failed);
    assert!(
        report.run.error.as_deref().unwrap().contains("used up its tenant's fuel budget"),
        "{:?}",
        report.run.error
    );
}

#[tokio::test]
async fn included_workflows_are_held_to_the_tenant_ceilings() {
    let dir = temp_dir("includes");
    let tenants = dir.join("tenants.yaml");
    std::fs::write(&tenants, "tenants:\n  acme:\n    limits: { timeout: 5s }\n").unwrap();
    let tenants = Arc::new(Tenants::load(&tenants).unwrap());
    let sub = format!(
        "name: sub\ncomponents:\n  hello: {}\nsteps:\n  - id: greet\n    uses: hello\n    limits: {{ timeout: 1m }}\n",
        guests::HELLO
    );
    std::fs::write(dir.join("sub.yaml"), sub).unwrap();
    let outer = |name: &str, include: &str| {
        let yaml = format!(
            "name: {name}\ninputs:\n  which: {{ type: string, default: sub }}\nsteps:\n  - id: inner\n    include: \"{include}\"\n"
        );
        std::fs::write(dir.join(format!("{name}.yaml")), yaml).unwrap();
        Workflow::load(&dir.join(format!("{name}.yaml"))).unwrap()
    };
    let over = "limits.timeout 1m is over tenant `acme`'s ceiling of 5s";

    // A literal include is checked before the run, with the rest.
    let err = tenants.check("acme", &outer("literal", "sub.yaml")).unwrap_err().to_string();
    assert!(err.contains(&format!("step `inner` includes sub.yaml: step `greet`: {over}")), "{err}");

    // A templated one can only be checked when it is reached: the include
    // step fails and nothing of the included workflow runs.
    let templated = outer("templated", "{{ inputs.which }}.yaml");
    tenants.check("acme", &templated).expect("the path is not known before the run");
    let options = RunOptions { tenant: "acme".into(), tenants: Some(tenants.clone()), ..RunOptions::new("templated") };
    let inputs = templated.bind_inputs(&Default::default()).unwrap();
    let report = scheduler::run(sandbox(), Arc::new(templated), inputs, options).await.unwrap();
    let inner = &report.steps[0];
    assert_eq!(inner.status, StepStatus::Failed, "{inner:?}");
    let reason = inner.reason.as_deref().unwrap();
    assert!(
        reason.contains("the included workflow goes over the tenant's ceilings") && reason.contains(over),
        "{reason}"
    );
    assert!(inner.steps.is_empty(), "nothing of the included workflow ran: {inner:?}");
}
