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
use stepbox::tenant::{Share, Tenant, Tenants};
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
    let options = RunOptions {
        tenant: Arc::new(Tenant::unconstrained(tenant)),
        dispatcher: Some(dispatcher),
        ..RunOptions::new(format!("run-{tenant}"))
    };
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
    // Let the big tenant's backlog queue up first: a first-in-first-out
    // dispatcher would then start the small tenant's steps after all of it.
    while dispatcher.waiting("big") < 500 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
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
            "name: wf\ncomponents:\n  hello: allowed/hello.wasm\n  sleepy: {}\nsteps:\n  - id: a\n    uses: hello\n    limits: {{ timeout: 1m, memory: 64MiB, fuel: 2_000_000_000 }}\n    dirs: ['data:/data']\n    network: {{ connect: ['10.0.0.2:443'], http: ['GET@api.example.com', 'POST@api.example.com', 'GET@evil.net'] }}\n",
            guests::SLEEPY
        ),
    )
    .unwrap();
    let err = tenants.get("acme").unwrap().check(&Workflow::load(&path).unwrap()).unwrap_err().to_string();
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
    let unknown = tenants.get("globex").unwrap_err().to_string();
    assert!(
        unknown.contains("tenant `globex` is not in the tenants file") && unknown.contains("the tenants are: acme")
    );

    // Paths are compared once `..` and symlinks are resolved: a path that
    // names the allowed directory but leads out of it is refused.
    std::fs::copy(guests::HELLO, dir.join("outside.wasm")).unwrap();
    std::os::unix::fs::symlink(dir.join("outside.wasm"), allowed.join("link.wasm")).unwrap();
    std::os::unix::fs::symlink(dir.join("data"), allowed.join("data-link")).unwrap();
    std::fs::write(
        &path,
        "name: wf\ncomponents:\n  dotdot: allowed/../outside.wasm\n  linked: allowed/link.wasm\nsteps:\n  - id: a\n    uses: dotdot\n    dirs: ['allowed/../data:/data']\n  - id: b\n    uses: linked\n    dirs: ['allowed/data-link:/data']\n",
    )
    .unwrap();
    let err = tenants.get("acme").unwrap().check(&Workflow::load(&path).unwrap()).unwrap_err().to_string();
    for expected in ["component `dotdot`", "component `linked`", "step `a`", "step `b`"] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert_eq!(err.matches("is not under tenant `acme`'s allowed dirs").count(), 2, "{err}");
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
    let mut tenant = Tenant::unconstrained("default");
    tenant.spec.max_run_fuel = Some(45_000_000);
    let options = RunOptions { tenant: Arc::new(tenant), ..RunOptions::new("budget") };
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
    std::fs::write(&tenants, "tenants:\n  acme:\n    limits: { timeout: 5s }\n    components: any\n").unwrap();
    let tenant = Arc::new(Tenants::load(&tenants).unwrap().get("acme").unwrap());
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
    let err = tenant.check(&outer("literal", "sub.yaml")).unwrap_err().to_string();
    assert!(err.contains(&format!("step `inner` includes sub.yaml: step `greet`: {over}")), "{err}");

    // A templated one can only be checked when it is reached: the include
    // step fails and nothing of the included workflow runs.
    let templated = outer("templated", "{{ inputs.which }}.yaml");
    tenant.check(&templated).expect("the path is not known before the run");
    let options = RunOptions { tenant: tenant.clone(), ..RunOptions::new("templated") };
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

/// Writes a tenants file with one tenant `acme` whose entry is `entry` (YAML
/// flow mapping) and loads it.
fn acme(dir: &std::path::Path, entry: &str) -> Arc<Tenant> {
    let file = dir.join("tenants.yaml");
    std::fs::write(&file, format!("tenants:\n  acme: {entry}\n")).unwrap();
    Arc::new(Tenants::load(&file).unwrap().get("acme").unwrap())
}

fn load(dir: &std::path::Path, name: &str, yaml: &str) -> Workflow {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    Workflow::load(&path).unwrap()
}

async fn run_under(tenant: Arc<Tenant>, workflow: Workflow) -> RunReport {
    let inputs = workflow.bind_inputs(&Default::default()).unwrap();
    let options = RunOptions { tenant, ..RunOptions::new(format!("run-{}", workflow.name)) };
    scheduler::run(sandbox(), Arc::new(workflow), inputs, options).await.unwrap()
}

#[test]
fn a_dimension_a_tenant_entry_leaves_out_grants_nothing() {
    let dir = temp_dir("closed");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let workflow = load(
        &dir,
        "grants",
        &format!(
            "name: grants\ncomponents:\n  hello: {}\nsteps:\n  - id: a\n    uses: hello\n    dirs: ['data:/data']\n    network: {{ connect: ['10.0.0.1:443'], http: ['api.example.com'] }}\n    secrets: {{ token: {{ env: ACME_TOKEN }}, db: {{ file: acme/db }} }}\n",
            guests::HELLO
        ),
    );
    let err = acme(&dir, "{}").check(&workflow).unwrap_err().to_string();
    for expected in [
        "directory",
        "is not under tenant `acme`'s allowed dirs",
        "address 10.0.0.1:443 is not in tenant `acme`'s allowed network",
        "HTTP grant `api.example.com` is not within tenant `acme`'s allowed http",
        "secret `token` (env:ACME_TOKEN) is not among tenant `acme`'s allowed secrets",
        "secret `db` (file:acme/db) is not among tenant `acme`'s allowed secrets",
        "component `hello`",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // `any`, written out, allows everything; secrets by name or prefix.
    let open =
        acme(&dir, "{ dirs: any, network: any, http: any, components: any, secrets: ['env:ACME_*', 'file:acme/db'] }");
    open.check(&workflow).expect("everything is allowed");
    let file = dir.join("tenants.yaml");
    std::fs::write(&file, "tenants:\n  acme: { dirs: all }\n").unwrap();
    let err = Tenants::load(&file).unwrap_err().to_string();
    assert!(err.contains("`all` is not a list; write `any` to allow everything"), "{err}");
}

#[test]
fn every_limit_a_step_can_set_has_an_enforced_ceiling() {
    let dir = temp_dir("every-limit");
    let workflow = load(
        &dir,
        "limits",
        &format!(
            "name: limits\ncomponents:\n  hello: {}\nsteps:\n  - id: a\n    uses: hello\n    limits: {{ stdio: 2MiB, output: 4MiB, host_memory: 32MiB, scratch: 1GiB }}\n    retry: {{ attempts: 50 }}\n",
            guests::HELLO
        ),
    );
    let tenant = acme(
        &dir,
        "{ components: any, limits: { stdio: 1MiB, output: 1MiB, host_memory: 16MiB, scratch: 64MiB }, max_attempts: 5 }",
    );
    let err = tenant.check(&workflow).unwrap_err().to_string();
    for expected in [
        "step `a`: limits.stdio 2.0 MiB is over tenant `acme`'s ceiling of 1.0 MiB (limits.stdio in",
        "step `a`: limits.output 4.0 MiB is over tenant `acme`'s ceiling of 1.0 MiB (limits.output in",
        "step `a`: limits.host_memory 32.0 MiB is over tenant `acme`'s ceiling of 16.0 MiB (limits.host_memory in",
        "step `a`: limits.scratch 1.0 GiB is over tenant `acme`'s ceiling of 64.0 MiB (limits.scratch in",
        "step `a`: retry.attempts 50 is over tenant `acme`'s ceiling of 5 (max_attempts in",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[tokio::test]
async fn a_ceiling_below_a_default_is_the_default_of_the_tenants_steps() {
    let dir = temp_dir("low-ceiling");
    // No limits in the workflow: stepbox's default fuel (2,000,000,000) is
    // over the ceiling, so the ceiling is this tenant's default.
    let workflow = load(
        &dir,
        "spin",
        &format!("name: spin\ncomponents:\n  spin: {}\nsteps:\n  - id: a\n    uses: spin\n", guests::SPIN),
    );
    let tenant = acme(&dir, "{ components: any, limits: { fuel: 5_000_000, timeout: 2s } }");
    tenant.check(&workflow).expect("a workflow that sets no limits fits any ceiling");
    let report = run_under(tenant, workflow).await;
    let attempt = &report.steps[0].executions[0].attempts[0];
    assert_eq!(attempt.failure().map(|f| f.kind), Some(stepbox::run::FailureKind::OutOfFuel), "{attempt:?}");
    assert!(attempt.fuel_consumed <= 5_000_000, "{}", attempt.fuel_consumed);
}

#[tokio::test]
async fn a_fan_out_over_the_items_ceiling_fails_before_any_item_runs() {
    let dir = temp_dir("items");
    let workflow = load(
        &dir,
        "items",
        &format!(
            "name: items\ncomponents:\n  hello: {}\nsteps:\n  - id: many\n    uses: hello\n    for_each: \"{{{{ range(11)|list }}}}\"\n    with: {{ name: x }}\n  - id: huge\n    uses: hello\n    matrix: {{ a: \"{{{{ range(100000)|list }}}}\", b: \"{{{{ range(100000)|list }}}}\", c: \"{{{{ range(100000)|list }}}}\", d: \"{{{{ range(100000)|list }}}}\" }}\n    with: {{ name: x }}\n",
            guests::HELLO
        ),
    );
    let report = run_under(acme(&dir, "{ components: any, max_items: 10 }"), workflow).await;
    let reason = |i: usize| report.steps[i].reason.clone().unwrap_or_default();
    assert_eq!(report.steps[0].status, StepStatus::Failed);
    assert!(
        reason(0).contains("the fan-out has 11 items, over tenant `acme`'s ceiling of 10 (max_items)"),
        "{}",
        reason(0)
    );
    assert!(report.steps[0].executions.is_empty());
    assert_eq!(report.steps[1].status, StepStatus::Failed);
    assert!(reason(1).contains("the fan-out has more than 2^64 items"), "{}", reason(1));
}

#[tokio::test]
async fn a_run_cannot_create_more_executions_than_its_ceiling_however_its_fan_outs_add_up() {
    let dir = temp_dir("executions");
    let workflow = load(
        &dir,
        "executions",
        &format!(
            "name: executions\ncomponents:\n  echo: {}\nsteps:\n  - id: first\n    uses: echo\n    for_each: \"{{{{ range(6)|list }}}}\"\n  - id: second\n    uses: echo\n    depends_on: [first]\n    for_each: \"{{{{ range(6)|list }}}}\"\n  - id: third\n    uses: echo\n    depends_on: [second]\n    always: true\n",
            guests::ECHO
        ),
    );
    let report = run_under(acme(&dir, "{ components: any, max_items: 6, max_executions: 10 }"), workflow).await;
    assert_eq!(report.steps[0].status, StepStatus::Succeeded, "{:?}", report.steps[0]);
    assert_eq!(report.steps[1].status, StepStatus::Failed);
    let reason = report.steps[1].reason.clone().unwrap_or_default();
    assert!(
        reason.contains(
            "this step's 6 executions would make the run's 12, over tenant `acme`'s ceiling of 10 (max_executions)"
        ),
        "{reason}"
    );
    assert!(report.steps[1].executions.is_empty());
    // What the refused step did not create is left for the others.
    assert_eq!(report.steps[2].status, StepStatus::Succeeded);
}

#[tokio::test]
async fn a_templated_include_that_reaches_itself_stops_at_the_depth_ceiling() {
    let dir = temp_dir("depth");
    // Includes itself through a template, which validation cannot see.
    let workflow = load(
        &dir,
        "again",
        "name: again\ninputs:\n  me: { type: string, default: again }\nsteps:\n  - id: deeper\n    include: \"{{ inputs.me }}.yaml\"\n",
    );
    let report = run_under(acme(&dir, "{ max_include_depth: 3 }"), workflow).await;
    assert_eq!(report.run.status, RunStatus::Failed);
    // The run's own workflow is depth 1; the third include would be the
    // fourth workflow.
    let mut step = &report.steps[0];
    let mut chain = vec![step.id.to_string()];
    while let Some(inner) = step.steps.first() {
        step = inner;
        chain.push(step.id.to_string());
    }
    assert_eq!(chain, ["deeper", "deeper.deeper", "deeper.deeper.deeper"], "{report:?}");
    let reason = step.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("includes nest 4 workflows deep, over tenant `acme`'s ceiling of 3 (max_include_depth"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_attempts_cannot_together_overshoot_the_fuel_budget() {
    let dir = temp_dir("parallel-budget");
    let mut yaml = format!("name: burn\ncomponents:\n  spin: {}\nsteps:\n", guests::SPIN);
    for i in 0..16 {
        yaml.push_str(&format!("  - id: s{i}\n    uses: spin\n    limits: {{ fuel: 30_000_000 }}\n"));
    }
    let workflow = load(&dir, "burn", &yaml);
    let tenant = acme(&dir, "{ components: any, max_run_fuel: 45_000_000 }");
    let report = run_under(tenant, workflow).await;
    let fuel: u64 = report.steps.iter().map(|s| s.fuel_consumed()).sum();
    assert!(fuel <= 45_000_000, "16 parallel attempts used {fuel} of a 45,000,000 budget");
    assert_eq!(report.run.status, RunStatus::Failed);
    assert!(report.run.error.as_deref().unwrap_or_default().contains("fuel budget"), "{:?}", report.run.error);
}

#[tokio::test]
async fn an_include_cannot_reach_out_of_its_workflows_directory_without_a_ceiling() {
    let dir = temp_dir("include-paths");
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    std::fs::create_dir_all(dir.join("shared")).unwrap();
    let sub = format!("name: sub\ncomponents:\n  hello: {}\nsteps:\n  - id: greet\n    uses: hello\n", guests::HELLO);
    std::fs::write(dir.join("shared/sub.yaml"), &sub).unwrap();
    std::fs::write(dir.join("flows/sub.yaml"), &sub).unwrap();
    std::os::unix::fs::symlink(dir.join("shared/sub.yaml"), dir.join("flows/link.yaml")).unwrap();
    let flows = dir.join("flows");
    let outer = |name: &str, include: &str| {
        let yaml = format!(
            "name: {name}\ninputs:\n  which: {{ type: string, default: x }}\nsteps:\n  - id: inner\n    include: \"{include}\"\n"
        );
        load(&flows, name, &yaml)
    };
    let unconstrained = Tenant::unconstrained("default");
    // Literal: checked before the run.
    unconstrained.check(&outer("inside", "sub.yaml")).expect("in the workflow's own directory");
    for include in ["../shared/sub.yaml", "link.yaml"] {
        let err = unconstrained.check(&outer("out", include)).unwrap_err().to_string();
        assert!(err.contains("is outside the including workflow's directory"), "{include}: {err}");
    }
    // A ceiling that lists the directory allows it.
    let tenant = acme(&dir, &format!("{{ components: any, includes: ['{}'] }}", dir.join("shared").display()));
    tenant.check(&outer("out", "../shared/sub.yaml")).expect("shared/ is an allowed include directory");
    // Templated: checked when reached; the include step fails.
    let report = run_under(Arc::new(unconstrained), outer("templated", "{{ '../shared/sub.yaml' }}")).await;
    let reason = report.steps[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("is outside the including workflow's directory"), "{reason}");
    assert!(report.steps[0].steps.is_empty());
}

/// A workflow whose one step, under `limits`, writes `size`-byte values to
/// key-value state until a write fails.
fn kv_flood(dir: &std::path::Path, size: usize, limits: &str) -> Workflow {
    let yaml = format!(
        "name: flood\ncomponents:\n  abuse: {}\nsteps:\n  - id: flood\n    uses: abuse\n    with: {{ attack: kv-flood, size: {size} }}\n    limits: {limits}\n",
        guests::HOST_ABUSE
    );
    let path = dir.join("flood.yaml");
    std::fs::write(&path, yaml).unwrap();
    Workflow::load(&path).unwrap()
}

#[tokio::test]
async fn a_tenant_cannot_keep_more_key_value_state_than_its_quota() {
    let dir = temp_dir("kv-quota");
    let mut tenant = Tenant::unconstrained("kv-quota");
    tenant.spec.kv.max_bytes = bytesize::ByteSize::mib(2);
    let report = run_under(Arc::new(tenant), kv_flood(&dir, 1024 * 1024, "{}")).await;
    assert_eq!(report.run.status, RunStatus::Failed);
    let attempt = &report.steps[0].executions[0].attempts[0];
    let message = &attempt.failure().expect("the flood fails").message;
    // Two 1 MiB values fit in 2 MiB only without their keys: the second
    // write is refused.
    assert!(message.starts_with("write 1 failed"), "{message}");
    assert!(message.contains("tenant `kv-quota` would keep") && message.contains("kv.max_bytes"), "{message}");
}

/// The longest wait of a chain's step for the one before it: from one
/// attempt's end to the next one's start.
fn longest_handover(report: &RunReport) -> f64 {
    let attempts: Vec<_> = report.steps.iter().map(|s| &s.executions[0].attempts[0]).collect();
    attempts.windows(2).map(|pair| pair[1].started_ms - pair[0].finished_ms.unwrap()).fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_looping_large_key_value_writes_does_not_delay_another_tenants_attempts() {
    let dir = temp_dir("kv-neighbour");
    let db = Arc::new(stepbox::store::Database::open(&dir.join("data")).unwrap());
    let config = stepbox::sandbox::EngineConfig { data_dir: Some(common::data_dir()), ..Default::default() };
    let shared = stepbox::sandbox::Sandbox::new(config, db.key_values()).unwrap();
    let mut chain = format!("name: chain\ncomponents:\n  echo: {}\nsteps:\n  - id: s0\n    uses: echo\n", guests::ECHO);
    for i in 1..20 {
        chain.push_str(&format!("  - id: s{i}\n    uses: echo\n    depends_on: [s{}]\n", i - 1));
    }
    std::fs::write(dir.join("chain.yaml"), chain).unwrap();
    let run = |tenant: &'static str, workflow: Workflow, id: String, cancel| {
        let (db, shared) = (db.clone(), shared.clone());
        async move {
            let record = stepbox::run::Run::new(id.clone(), &workflow.name, "", tenant, Default::default());
            stepbox::store::Journal::create_run(&*db, &record, &serde_json::json!({})).1.await.unwrap();
            let options = RunOptions {
                tenant: Arc::new(Tenant::unconstrained(tenant)),
                journal: Some(db),
                cancel,
                ..RunOptions::new(id)
            };
            let inputs = workflow.bind_inputs(&Default::default()).unwrap();
            scheduler::run(&shared, Arc::new(workflow), inputs, options).await.unwrap()
        }
    };
    let chain = || Workflow::load(&dir.join("chain.yaml")).unwrap();

    // Alone, twice: the first warms the component cache.
    run("quiet", chain(), "warm".into(), Default::default()).await;
    let alone = run("quiet", chain(), "alone".into(), Default::default()).await;
    assert_eq!(alone.run.status, RunStatus::Succeeded, "{:?}", alone.steps[0]);

    let stop = tokio_util::sync::CancellationToken::new();
    let flood =
        tokio::spawn(run("noisy", kv_flood(&dir, 1024 * 1024, "{ timeout: 60s }"), "flood".into(), stop.clone()));
    // Let the flood get going.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let beside = run("quiet", chain(), "beside".into(), Default::default()).await;
    stop.cancel();
    let flood = flood.await.unwrap();
    assert_eq!(beside.run.status, RunStatus::Succeeded);
    // The flood was still writing when the chain ended.
    assert_eq!(flood.run.status, RunStatus::Cancelled, "{:?}", flood.run.error);
    let (alone, beside) = (longest_handover(&alone), longest_handover(&beside));
    assert!(
        beside <= alone + 50.0,
        "alone a step waited at most {alone:.1} ms for the one before; beside the flood {beside:.1} ms"
    );
}
