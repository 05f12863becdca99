//! The web console in a real browser: Debian's chromium, driven by
//! playwright-core from npm (`console/console.cjs`), against a real
//! `stepbox serve` with real runs. The script clicks and types as a person
//! does; this test then checks through the API that what it did happened.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Server, deploy, project, temp_dir, token};
use reqwest::StatusCode;
use serde_json::{Value, json};
use stepbox_tests::{guests, tools};

/// The chromium the console is tested in: Debian's, or the one
/// `STEPBOX_TEST_CHROMIUM` names. A missing browser fails the test.
fn chromium() -> PathBuf {
    let path =
        std::env::var_os("STEPBOX_TEST_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "the console's tests drive a real chromium, and there is none at {}: install Debian's \
         (`apt-get install chromium`), or set STEPBOX_TEST_CHROMIUM to another",
        path.display()
    );
    path
}

/// The workflows the script works with.
fn deploy_all(server: &Server, token: &str, dir: &Path) {
    let pipeline = project(
        &dir.join("pipeline"),
        "pipeline",
        "name: pipeline\ncomponents:\n  hello: hello.wasm\n  sleepy: sleepy.wasm\nsteps:\n  - id: fetch\n    uses: sleepy\n    with: { millis: 2500 }\n  - id: left\n    uses: hello\n    with: { name: left }\n    depends_on: [fetch]\n  - id: right\n    uses: hello\n    with: { name: right }\n    depends_on: [fetch]\n  - id: join\n    uses: hello\n    with: { name: '{{ steps.left.output.greeting }} {{ steps.right.output.greeting }}' }\n    depends_on: [left, right]\n",
        &[("hello.wasm", guests::HELLO), ("sleepy.wasm", guests::SLEEPY)],
    );
    let flaky = project(
        &dir.join("flaky"),
        "flaky",
        "name: flaky\ncomponents:\n  flaky: flaky.wasm\n  hello: hello.wasm\nsteps:\n  - id: call\n    uses: flaky\n    with: { succeed_on_attempt: 2 }\n    retry: { attempts: 1 }\n    on_failure: [page]\n  - id: page\n    uses: hello\n    with: { name: on-call }\n",
        &[("flaky.wasm", guests::FLAKY), ("hello.wasm", guests::HELLO)],
    );
    let approval = project(
        &dir.join("approval"),
        "approval",
        "name: approval\ninputs:\n  who: { type: string, required: true, description: who asks }\n  count: { type: integer, default: 1 }\ncomponents:\n  hello: hello.wasm\nsteps:\n  - id: prepare\n    uses: hello\n    with: { name: '{{ inputs.who }}' }\n  - id: approve\n    wait: { event: approve, timeout: 1h }\n    depends_on: [prepare]\n  - id: ship\n    uses: hello\n    with: { name: '{{ steps.approve.output.by }}' }\n    depends_on: [approve]\noutputs:\n  shipped: '{{ steps.ship.output.greeting }}'\non:\n  schedule:\n    - cron: '0 9 * * 1'\n      timezone: Europe/Paris\n      with: { who: monday }\n  webhook:\n    secret: a-long-enough-secret\n",
        &[("hello.wasm", guests::HELLO)],
    );
    let nap = project(
        &dir.join("nap"),
        "nap",
        "name: nap\ncomponents:\n  sleepy: sleepy.wasm\nsteps:\n  - id: nap\n    uses: sleepy\n    with: { millis: 60000 }\n    limits: { timeout: 120s }\n",
        &[("sleepy.wasm", guests::SLEEPY)],
    );
    // More steps than the console draws: it lists them instead.
    let steps: String =
        (0..401).map(|n| format!("  - id: s{n}\n    uses: hello\n    with: {{ name: s{n} }}\n")).collect();
    let wide = project(
        &dir.join("wide"),
        "wide",
        &format!("name: wide\ncomponents:\n  hello: hello.wasm\nsteps:\n{steps}"),
        &[("hello.wasm", guests::HELLO)],
    );
    for workflow in [pipeline, flaky, approval, nap, wide] {
        deploy(server, token, &workflow);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_a_real_browser_the_console_signs_in_watches_a_run_go_green_opens_logs_retries_approves_and_cancels() {
    let browser = chromium();
    let dir = temp_dir("console");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let admin = token(&data, None);
    let server = Server::start(&data, &[]);
    let api = server.api(&acme);
    deploy_all(&server, &acme, &dir);

    // A run that failed before anyone looked: its step's one attempt fails.
    let failed = api.start("flaky", json!({})).await;
    assert_eq!(api.finished(&failed).await["status"], "failed");
    let wide = api.start("wide", json!({})).await;
    let report = api.finished(&wide).await;
    assert_eq!(report["status"], "succeeded", "{}", report["error"]);

    let screenshots =
        std::env::var_os("STEPBOX_CONSOLE_SCREENSHOTS").map_or_else(|| dir.join("screens"), PathBuf::from);
    std::fs::create_dir_all(&screenshots).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/console.cjs");
    let mut node = tokio::process::Command::new("node");
    node.arg(&script)
        .env("STEPBOX_URL", &server.url)
        .env("STEPBOX_TOKEN", &acme)
        .env("STEPBOX_ADMIN_TOKEN", &admin)
        .env("FAILED_RUN", &failed)
        .env("WIDE_RUN", &wide)
        .env("PLAYWRIGHT", tools::PLAYWRIGHT)
        .env("CHROMIUM", &browser)
        .env("SCREENSHOTS", &screenshots)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), node.output())
        .await
        .expect("the browser script did not finish in 5 minutes")
        .expect("running node (the tests need Node.js 20 or newer)");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the browser script failed:\n{printed}\n{}", String::from_utf8_lossy(&out.stderr));
    let runs: Value = serde_json::from_str(printed.lines().last().unwrap_or_default())
        .unwrap_or_else(|err| panic!("the script's last line is not its JSON summary ({err}):\n{printed}"));

    // What the clicks did, read back through the API.
    let (_, pipeline) = api.get(&format!("/v1/runs/{}", runs["pipeline"].as_str().unwrap())).await;
    assert_eq!((pipeline["workflow"].as_str(), pipeline["status"].as_str()), (Some("pipeline"), Some("succeeded")));
    let (_, retried) = api.get(&format!("/v1/runs/{failed}")).await;
    assert_eq!(retried["status"], "succeeded", "the console's retry ran the failed step again: {retried}");
    let (_, approved) = api.get(&format!("/v1/runs/{}", runs["approval"].as_str().unwrap())).await;
    assert_eq!(approved["status"], "succeeded", "{approved}");
    assert_eq!(approved["inputs"], json!({ "who": "Grace", "count": 3 }), "the start form's inputs, typed");
    assert_eq!(approved["outputs"]["shipped"], "Hello, Ada!", "the event's payload reached the waiting step");
    assert_eq!(approved["labels"]["note"], "<img src=x onerror=\"window.pwned=1\">");
    let (_, cancelled) = api.get(&format!("/v1/runs/{}", runs["nap"].as_str().unwrap())).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    for shot in ["console-run.png", "console-failed-attempt.png", "console-workflow.png"] {
        assert!(std::fs::metadata(screenshots.join(shot)).unwrap().len() > 10_000, "{shot} was taken");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_is_served_from_the_binary_with_a_policy_that_runs_only_its_own_script() {
    let dir = temp_dir("console-assets");
    let data = dir.join("data");
    let server = Server::start(&data, &[]);
    let http = reqwest::Client::new();
    for (path, kind) in
        [("/", "text/html"), ("/console/console.js", "text/javascript"), ("/console/console.css", "text/css")]
    {
        let response = http.get(format!("{}{path}", server.url)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}: no token needed for the page itself");
        let headers = response.headers();
        assert!(headers["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert!(policy.contains("script-src 'self'") && !policy.contains("unsafe"), "{path}: {policy}");
        assert!(policy.contains("frame-ancestors 'none'"), "{path}: {policy}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let body = response.text().await.unwrap();
        if path == "/" {
            assert!(!body.contains("://"), "the page loads nothing from elsewhere");
        }
    }
    // The API behind it still wants a token.
    let response = http.get(format!("{}/v1/me", server.url)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}
