//! `stepbox serve` as its users meet it: a real server process on an
//! ephemeral port, tokens made with `stepbox token create`, workflows
//! deployed with `stepbox deploy`, and a real HTTP client for the rest.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Api, Server, deploy, journal_state, key_counts, output, project, sample, signature, stderr, stepbox, temp_dir,
    token,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use stepbox_tests::guests;

fn greeter(dir: &Path) -> PathBuf {
    project(
        dir,
        "greet",
        "name: greet\ninputs:\n  who: { type: string, required: true }\ncomponents:\n  hello: hello.wasm\nsteps:\n  - id: first\n    uses: hello\n    with: { name: '{{ inputs.who }}' }\n  - id: second\n    uses: hello\n    with: { name: '{{ steps.first.output.greeting }}' }\n    depends_on: [first]\noutputs:\n  greeting: '{{ steps.second.output.greeting }}'\n",
        &[("hello.wasm", guests::HELLO)],
    )
}

fn sleeper(dir: &Path, millis: u64) -> PathBuf {
    project(
        dir,
        "nap",
        &format!(
            "name: nap\ncomponents:\n  sleepy: sleepy.wasm\nsteps:\n  - id: nap\n    uses: sleepy\n    with: {{ millis: {millis} }}\n    limits: {{ timeout: 60s }}\n"
        ),
        &[("sleepy.wasm", guests::SLEEPY)],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployed_workflow_runs_over_http_and_its_events_stream_live() {
    let dir = temp_dir("serve-basics");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &[]);
    let api = server.api(&acme);
    let workflow = greeter(&dir.join("project"));

    // Deploying the same files keeps the version; a change adds one.
    assert!(deploy(&server, &acme, &workflow).contains("deployed `greet` version 1 (2 files"));
    assert!(deploy(&server, &acme, &workflow).contains("`greet` is unchanged: version 1"));
    let (status, listed) = api.get("/v1/workflows").await;
    assert_eq!((status, listed["workflows"][0]["version"].clone()), (StatusCode::OK, json!(1)));

    let id = api.start("greet", json!({ "inputs": { "who": "Ada" }, "labels": { "order": "42" } })).await;
    let events = api.events(&id, None, |event| event["type"] == "run_finished").await;
    let numbers: Vec<u64> = events.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>(), "numbered from 1 without gaps");
    let kinds: Vec<String> = events
        .iter()
        .map(|(_, e)| format!("{} {}", e["type"].as_str().unwrap(), e["path"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        kinds,
        [
            "attempt_started first",
            "step_finished first",
            "attempt_started second",
            "step_finished second",
            "run_finished "
        ]
    );
    assert_eq!(events.last().unwrap().1["status"], "succeeded");
    // A client that reconnects with the last number it saw gets the rest.
    let rest = api.events(&id, Some(3), |_| false).await;
    assert_eq!(rest.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [4, 5]);

    let report = api.finished(&id).await;
    assert_eq!(report["outputs"]["greeting"], "Hello, Hello, Ada!!");
    assert_eq!((report["version"].clone(), report["labels"]["order"].clone()), (json!(1), json!("42")));
    let (status, logs) = api.get(&format!("/v1/runs/{id}/logs?step=second")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(logs["steps"][0]["executions"][0]["attempts"][0]["status"], "succeeded");

    // A new version: the old run keeps the version it ran.
    std::fs::write(&workflow, std::fs::read_to_string(&workflow).unwrap() + "# changed\n").unwrap();
    assert!(deploy(&server, &acme, &workflow).contains("deployed `greet` version 2"));
    let second = api.start("greet", json!({ "inputs": { "who": "Bo" } })).await;
    assert_eq!(api.finished(&second).await["version"], 2);
    let pinned = api.start("greet", json!({ "inputs": { "who": "Cy" }, "version": 1 })).await;
    assert_eq!(api.finished(&pinned).await["version"], 1);

    // Pages of runs, newest first, by cursor.
    let (_, page) = api.get("/v1/runs?limit=2").await;
    let ids = |page: &Value| -> Vec<String> {
        page["runs"].as_array().unwrap().iter().map(|run| run["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(ids(&page), [pinned.clone(), second.clone()]);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, page) = api.get(&format!("/v1/runs?limit=2&cursor={cursor}")).await;
    assert_eq!((ids(&page), page["next_cursor"].clone()), (vec![id.clone()], Value::Null));
    let (_, page) = api.get("/v1/runs?label=order=42").await;
    assert_eq!(ids(&page), std::slice::from_ref(&id));

    // The OpenAPI document is served.
    let (status, document) = api.get("/v1/openapi.json").await;
    assert_eq!((status, document["openapi"].as_str()), (StatusCode::OK, Some("3.1.0")));
    assert!(document["paths"]["/v1/runs/{id}/events"]["get"].is_object());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_cannot_see_or_touch_another_tenants_workflows_runs_or_state() {
    let dir = temp_dir("serve-isolation");
    let data = dir.join("data");
    let (acme, globex, admin) = (token(&data, Some("acme")), token(&data, Some("globex")), token(&data, None));
    let server = Server::start(&data, &[]);
    let counter = project(
        &dir.join("project"),
        "count",
        "name: count\ncomponents:\n  counter: counter.wasm\nsteps:\n  - id: count\n    uses: counter\n",
        &[("counter.wasm", guests::COUNTER)],
    );
    deploy(&server, &acme, &counter);
    let (a, g) = (server.api(&acme), server.api(&globex));
    let run = a.start("count", json!({})).await;
    let first = a.finished(&run).await;

    // Every way to reach acme's run answers globex as if it did not exist.
    let missing = |(status, body): (StatusCode, Value)| {
        assert_eq!((status, body["error"]["code"].clone()), (StatusCode::NOT_FOUND, json!("not_found")), "{body}");
        body["error"]["message"].as_str().unwrap().to_owned()
    };
    let unknown = missing(g.get("/v1/runs/019ad3c5-0000-7000-8000-000000000000").await);
    let probed = missing(g.get(&format!("/v1/runs/{run}")).await);
    assert_eq!(probed.replace(&run, "ID"), unknown.replace("019ad3c5-0000-7000-8000-000000000000", "ID"));
    missing(g.get(&format!("/v1/runs/{run}/logs")).await);
    missing(g.get(&format!("/v1/runs/{run}/events")).await);
    for action in ["cancel", "resume", "retry"] {
        missing(g.post(&format!("/v1/runs/{run}/{action}"), json!({})).await);
    }
    missing(g.get("/v1/workflows/count").await);
    missing(g.post("/v1/workflows/count/runs", json!({})).await);
    assert_eq!(g.get("/v1/runs").await.1["runs"], json!([]));
    assert_eq!(g.get("/v1/workflows").await.1["workflows"], json!([]));
    let (status, body) = g.get(&format!("/v1/runs?cursor={run}")).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_cursor")));

    // Key-value state: the same workflow deployed by globex counts on its own.
    deploy(&server, &globex, &counter);
    let theirs = g.start("count", json!({})).await;
    let mine = a.start("count", json!({})).await;
    let count = |report: &Value| report["steps"][0]["output"].clone();
    assert_eq!(count(&g.finished(&theirs).await), count(&first), "globex starts from nothing");
    assert_ne!(count(&a.finished(&mine).await), count(&first), "acme's count went on");

    // A tenant token cannot act for another tenant; an admin can act for any.
    let mut posing = g.clone();
    posing.tenant = Some("acme".into());
    let (status, body) = posing.get("/v1/runs").await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::FORBIDDEN, json!("forbidden")));
    let root = server.api(&admin);
    assert_eq!(root.get(&format!("/v1/runs/{run}")).await.0, StatusCode::OK);
    assert_eq!(root.get("/v1/runs").await.1["runs"].as_array().unwrap().len(), 3);
    let (status, body) = root.post("/v1/workflows/count/runs", json!({})).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::BAD_REQUEST, json!("tenant_required")));
    let mut acting = root.clone();
    acting.tenant = Some("globex".into());
    assert_eq!(acting.get("/v1/runs").await.1["runs"].as_array().unwrap().len(), 1);

    // A revoked token is refused within the second a server believes a
    // token it found live.
    let listed = output(&data, &["token", "list", "--json"]);
    let tokens: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let id = tokens.as_array().unwrap().iter().find(|t| t["tenant"] == "globex").unwrap()["id"].as_str().unwrap();
    assert!(output(&data, &["token", "revoke", id]).status.success());
    let revoked = std::time::Instant::now();
    loop {
        let (status, body) = g.get("/v1/runs").await;
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(body["error"]["code"], json!("unauthorized"));
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(revoked.elapsed() < stepbox::service::TOKEN_TTL * 2, "the revoked token still acts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&globex), "token list never shows a token");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_starts_one_run_and_a_tenant_past_its_active_runs_gets_429() {
    let dir = temp_dir("serve-idempotency");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &["--max-active-runs", "2"]);
    deploy(&server, &acme, &sleeper(&dir.join("project"), 20_000));
    let api = server.api(&acme);
    let start = |key: &'static str, body: Value| {
        let api = api.clone();
        async move {
            let request = api.request(reqwest::Method::POST, "/v1/workflows/nap/runs").header("Idempotency-Key", key);
            Api::send(request.json(&body)).await
        }
    };
    let (status, first) = start("order-1", json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, again) = start("order-1", json!({})).await;
    assert_eq!((status, again["id"].clone()), (StatusCode::OK, first["id"].clone()));
    let (status, body) = start("order-1", json!({ "labels": { "x": "y" } })).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::CONFLICT, json!("idempotency_key_reused")));

    assert_eq!(start("order-2", json!({})).await.0, StatusCode::CREATED);
    let response = api.request(reqwest::Method::POST, "/v1/workflows/nap/runs").json(&json!({})).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_runs");
    // A repeated request is still answered: it starts nothing.
    assert_eq!(start("order-1", json!({})).await.0, StatusCode::OK);

    // Cancelling one frees its place.
    let id = first["id"].as_str().unwrap();
    assert_eq!(api.post(&format!("/v1/runs/{id}/cancel"), json!({})).await.0, StatusCode::ACCEPTED);
    assert_eq!(api.finished(id).await["status"], "cancelled");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = api.post("/v1/workflows/nap/runs", json!({})).await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(Instant::now() < deadline, "the cancelled run's place was not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_json_errors_that_say_what_to_fix() {
    let dir = temp_dir("serve-errors");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &["--max-bundle", "1MiB"]);
    let api = server.api(&acme);
    deploy(&server, &acme, &greeter(&dir.join("project")));
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", server.url);
    let expect = |status: StatusCode, code: &str, (got, body): (StatusCode, Value)| {
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{body}");
        body["error"]["message"].as_str().unwrap().to_owned()
    };

    expect(StatusCode::UNAUTHORIZED, "unauthorized", Api::send(http.get(url("/v1/runs"))).await);
    expect(StatusCode::UNAUTHORIZED, "unauthorized", Api::send(http.get(url("/v1/runs")).bearer_auth("sbx_x")).await);
    expect(StatusCode::NOT_FOUND, "not_found", api.get("/v2/nothing").await);
    expect(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        Api::send(api.request(reqwest::Method::DELETE, "/v1/runs")).await,
    );
    let raw = |body: &'static str, kind: &'static str| {
        api.request(reqwest::Method::POST, "/v1/workflows/greet/runs").header("content-type", kind).body(body)
    };
    expect(StatusCode::BAD_REQUEST, "invalid_json", Api::send(raw("{", "application/json")).await);
    expect(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_json", Api::send(raw("{}", "text/plain")).await);
    let message = expect(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
        api.post("/v1/workflows/greet/runs", json!({ "input": {} })).await,
    );
    assert!(message.contains("unknown field `input`"), "{message}");
    let message = expect(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_inputs",
        api.post("/v1/workflows/greet/runs", json!({})).await,
    );
    assert!(message.contains("who"), "{message}");
    expect(StatusCode::NOT_FOUND, "not_found", api.post("/v1/workflows/nope/runs", json!({})).await);
    expect(
        StatusCode::NOT_FOUND,
        "not_found",
        api.post("/v1/workflows/greet/runs", json!({ "inputs": { "who": "x" }, "version": 9 })).await,
    );
    let labels: serde_json::Map<String, Value> = (0..40).map(|i| (format!("k{i}"), json!("v"))).collect();
    expect(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_labels",
        api.post("/v1/workflows/greet/runs", json!({ "inputs": { "who": "x" }, "labels": labels })).await,
    );
    // A NUL no store can hold, in a label or an event's name.
    expect(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_labels",
        api.post("/v1/workflows/greet/runs", json!({ "inputs": { "who": "x" }, "labels": { "k": "a\0b" } })).await,
    );
    expect(StatusCode::NOT_FOUND, "not_found", api.get("/v1/runs/a%00b").await);
    expect(StatusCode::BAD_REQUEST, "invalid_query", api.get("/v1/runs?limit=0").await);
    expect(StatusCode::BAD_REQUEST, "invalid_query", api.get("/v1/runs?status=done").await);
    let events = api.request(reqwest::Method::GET, "/v1/runs/x/events").header("Last-Event-ID", "soon");
    expect(StatusCode::BAD_REQUEST, "invalid_last_event_id", Api::send(events).await);
    let huge = json!({ "inputs": { "who": "x".repeat(2 * 1024 * 1024) } });
    let response = api.request(reqwest::Method::POST, "/v1/workflows/greet/runs").json(&huge).send().await.unwrap();
    assert_eq!(response.headers()["connection"], "close", "the unread rest of the body ends the connection");
    expect(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", (response.status(), response.json().await.unwrap()));

    // Bundles: every file path stays inside the bundle, the workflow is
    // checked, and its name must be the one it is deployed under.
    let put = |name: &str, bundle: Value| {
        Api::send(api.request(reqwest::Method::PUT, &format!("/v1/workflows/{name}")).json(&bundle))
    };
    let b64 = |text: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(text)
    };
    let message = expect(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_bundle",
        put("x", json!({ "workflow": "w.yaml", "files": { "w.yaml": b64("x"), "../up.wasm": b64("x") } })).await,
    );
    assert!(message.contains("`..`"), "{message}");
    let message = expect(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_workflow",
        put("x", json!({ "workflow": "w.yaml", "files": { "w.yaml": b64("name: x\nsteps: []\nbogus: 1\n") } })).await,
    );
    assert!(message.contains("bogus"), "{message}");
    let message = expect(
        StatusCode::UNPROCESSABLE_ENTITY,
        "name_mismatch",
        put("other", json!({ "workflow": "w.yaml", "files": { "w.yaml": b64("name: x\nsteps: []\n") } })).await,
    );
    assert!(message.contains("named `x`"), "{message}");
    let message = expect(StatusCode::UNPROCESSABLE_ENTITY, "invalid_component", put("x", json!({ "workflow": "w.yaml", "files": { "w.yaml": b64("name: x\ncomponents:\n  c: c.wasm\nsteps:\n  - id: s\n    uses: c\n"), "c.wasm": b64("not wasm") } })).await);
    assert!(message.contains("component `c`"), "{message}");
    let big = "x".repeat(1024 * 1024 + 1);
    expect(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_bundle",
        put("x", json!({ "workflow": "w.yaml", "files": { "w.yaml": b64(&big) } })).await,
    );
    // A refused deploy leaves no files behind.
    let kept: Vec<_> = std::fs::read_dir(data.join("bundles")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployed_workflow_cannot_reach_files_outside_its_bundle() {
    let dir = temp_dir("serve-escape");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &[]);
    let api = server.api(&acme);
    let secret = dir.join("secret.yaml");
    std::fs::write(&secret, "name: stolen-secret-value\nsteps: [}\n").unwrap();
    std::fs::copy(guests::HELLO, dir.join("outside.wasm")).unwrap();
    let b64 = |text: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(text)
    };
    let hello = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(guests::HELLO).unwrap())
    };
    let attempts = [
        // A literal include outside the bundle is refused before it is read,
        // so nothing of it can show in the message.
        format!("name: x\nsteps:\n  - id: s\n    include: {}\n", secret.display()),
        "name: x\nsteps:\n  - id: s\n    include: ../../../../../../dev/zero\n".to_owned(),
        // Components must be files of the bundle.
        format!("name: x\ncomponents:\n  c: {}\nsteps:\n  - id: s\n    uses: c\n", dir.join("outside.wasm").display()),
        "name: x\ncomponents:\n  c: /dev/zero\nsteps:\n  - id: s\n    uses: c\n".to_owned(),
        // Without a tenants file, steps get no directories or secrets.
        "name: x\ncomponents:\n  c: c.wasm\nsteps:\n  - id: s\n    uses: c\n    dirs: ['/etc:/etc']\n".to_owned(),
        "name: x\ncomponents:\n  c: c.wasm\nsteps:\n  - id: s\n    uses: c\n    secrets: { K: { env: HOME } }\n"
            .to_owned(),
    ];
    for yaml in attempts {
        let bundle = json!({ "workflow": "w.yaml", "files": { "w.yaml": b64(&yaml), "c.wasm": hello } });
        let (status, body) = Api::send(api.request(reqwest::Method::PUT, "/v1/workflows/x").json(&bundle)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_workflow")),
            "{yaml}: {body}"
        );
        assert!(!body.to_string().contains("stolen-secret-value"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_resume_and_retry_work_over_http() {
    let dir = temp_dir("serve-continue");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &[]);
    let api = server.api(&acme);
    deploy(&server, &acme, &sleeper(&dir.join("nap"), 30_000));
    let flaky = project(
        &dir.join("flaky"),
        "flaky",
        "name: flaky\ncomponents:\n  flaky: flaky.wasm\nsteps:\n  - id: hello\n    uses: flaky\n    with: { succeed_on_attempt: 2 }\n",
        &[("flaky.wasm", guests::FLAKY)],
    );
    deploy(&server, &acme, &flaky);

    let nap = api.start("nap", json!({})).await;
    api.events(&nap, None, |event| event["type"] == "attempt_started").await;
    assert_eq!(api.post(&format!("/v1/runs/{nap}/cancel"), json!({})).await.0, StatusCode::ACCEPTED);
    let report = api.finished(&nap).await;
    assert_eq!(report["status"], "cancelled");
    let (status, body) = api.post(&format!("/v1/runs/{nap}/cancel"), json!({})).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::CONFLICT, json!("run_finished")));

    let run = api.start("flaky", json!({})).await;
    assert_eq!(api.finished(&run).await["status"], "failed");
    let (status, body) = api.post(&format!("/v1/runs/{run}/retry"), json!({ "from": "nope" })).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("no_such_step")));
    let (status, body) = api.post(&format!("/v1/runs/{run}/retry"), json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let report = api.finished(&run).await;
    assert_eq!(report["status"], "succeeded", "{report}");
    let attempts = &report["steps"][0]["executions"][0]["attempts"];
    assert_eq!(attempts.as_array().unwrap().len(), 2, "the retry's attempt counts on: {report}");
    let (status, body) = api.post(&format!("/v1/runs/{run}/resume"), json!({})).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::CONFLICT, json!("run_not_continuable")));
}

/// 3 chains of 8 steps; each step appends its key to `out/keys.log`.
fn chains(dir: &Path) -> PathBuf {
    let mut yaml = String::from("name: chains\ncomponents:\n  effect: effect.wasm\nsteps:\n");
    for chain in 0..3 {
        for link in 0..8 {
            yaml.push_str(&format!(
                "  - id: c{chain}-s{link}\n    uses: effect\n    dirs: ['{}:/out']\n    with: {{ file: /out/keys.log, millis: 150 }}\n    limits: {{ timeout: 30s }}\n",
                dir.join("out").display()
            ));
            if link > 0 {
                yaml.push_str(&format!("    depends_on: [c{chain}-s{}]\n", link - 1));
            }
        }
    }
    std::fs::create_dir_all(dir.join("out")).unwrap();
    project(&dir.join("project"), "chains", &yaml, &[("effect.wasm", guests::SIDE_EFFECT)])
}

fn tenants_allowing(dir: &Path) -> PathBuf {
    let file = dir.join("tenants.yaml");
    std::fs::write(&file, format!("tenants:\n  acme:\n    dirs: ['{}']\n", dir.display())).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_killed_with_the_server_resume_when_it_starts_again_without_repeating_finished_steps() {
    let dir = temp_dir("serve-kill");
    let data = dir.join("data");
    let tenants = tenants_allowing(&dir);
    let tenants = tenants.to_str().unwrap();
    let acme = token(&data, Some("acme"));
    let workflow = chains(&dir);
    let mut server = Server::start(&data, &["--tenants", tenants]);
    deploy(&server, &acme, &workflow);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(server.api(&acme).start("chains", json!({})).await);
    }
    let mut completed_counts: std::collections::HashMap<String, usize> = Default::default();
    let mut interrupted = 0;
    for kill in 0..3 {
        // Killed once more steps finished since the last start, while
        // others run.
        let api = server.api(&acme);
        let target = completed_counts.len() + 4;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut succeeded = 0;
            for id in &ids {
                let report = api.get(&format!("/v1/runs/{id}")).await.1;
                succeeded += report["steps"].as_array().unwrap().iter().filter(|s| s["status"] == "succeeded").count();
            }
            if succeeded >= target {
                break;
            }
            assert!(Instant::now() < deadline, "kill {kill}: no progress");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        // What the journal holds as done must never run again.
        let counts = key_counts(&dir);
        for id in &ids {
            let (_, running) = journal_state(&data, id);
            interrupted += running.len();
            let shown: Value = serde_json::from_slice(&output(&data, &["show", id, "--json"]).stdout).unwrap();
            for step in shown["steps"].as_array().unwrap().iter().filter(|s| s["status"] == "succeeded") {
                let key = format!("{id}/{}", step["id"].as_str().unwrap());
                let now = counts.get(&key).copied().unwrap_or(0);
                assert_eq!(now, *completed_counts.entry(key.clone()).or_insert(now), "kill {kill}: {key} ran again");
            }
        }
        server = Server::start(&data, &["--tenants", tenants]);
    }
    assert!(!completed_counts.is_empty(), "the killed servers made progress");
    assert!(interrupted > 0, "no kill interrupted an attempt");
    let api = server.api(&acme);
    for id in &ids {
        let report = api.finished(id).await;
        assert_eq!(report["status"], "succeeded", "{report}");
    }
    let counts = key_counts(&dir);
    for id in &ids {
        for chain in 0..3 {
            for link in 0..8 {
                let key = format!("{id}/c{chain}-s{link}");
                let count = counts.get(&key).copied().unwrap_or(0);
                assert!(count >= 1, "{key} never ran");
                if let Some(&then) = completed_counts.get(&key) {
                    assert_eq!(count, then, "{key} ran again after it was recorded as done");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_running_attempts_finish_and_the_rest_resume_at_the_next_start() {
    let dir = temp_dir("serve-sigterm");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &["--grace", "20s"]);
    let two = project(
        &dir.join("project"),
        "two",
        "name: two\ncomponents:\n  sleepy: sleepy.wasm\nsteps:\n  - id: first\n    uses: sleepy\n    with: { millis: 1500 }\n  - id: second\n    uses: sleepy\n    with: { millis: 10 }\n    depends_on: [first]\n",
        &[("sleepy.wasm", guests::SLEEPY)],
    );
    deploy(&server, &acme, &two);
    let api = server.api(&acme);
    let id = api.start("two", json!({})).await;
    api.events(&id, None, |event| event["type"] == "attempt_started").await;
    let stopping = Instant::now();
    assert_eq!(server.terminate(), Some(0));
    assert!(stopping.elapsed() >= Duration::from_millis(500), "the running attempt was waited for");
    // The running attempt finished and was recorded; the step after it
    // never started; the run waits, unfinished, for the next start.
    let shown: Value = serde_json::from_slice(&output(&data, &["show", &id, "--json"]).stdout).unwrap();
    assert_eq!(shown["status"], "interrupted", "{shown}");
    assert_eq!(shown["steps"][0]["status"], "succeeded", "{shown}");
    assert_ne!(shown["steps"][1]["status"], "succeeded", "{shown}");

    let server = Server::start(&data, &[]);
    let report = server.api(&acme).finished(&id).await;
    assert_eq!(report["status"], "succeeded", "{report}");
    let attempts = report["steps"][0]["executions"][0]["attempts"].as_array().unwrap().len();
    assert_eq!(attempts, 1, "the first step did not run again: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_openapi_document() {
    let dir = temp_dir("serve-schemathesis");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &[]);
    // Data to reach: a deployed workflow and a finished run.
    deploy(&server, &acme, &greeter(&dir.join("project")));
    let api = server.api(&acme);
    let id = api.start("greet", json!({ "inputs": { "who": "Ada" } })).await;
    api.finished(&id).await;
    let site = stepbox_tests::tools::SCHEMATHESIS;
    let out = tokio::process::Command::new(Path::new(site).join("bin/st"))
        .env("PYTHONPATH", site)
        .current_dir(&dir)
        // One worker: CPython 3.11 can crash compiling in two threads at
        // once ("AST constructor recursion depth mismatch"), which is
        // schemathesis failing, not the API.
        .args(["run", &format!("{}/v1/openapi.json", server.url), "--workers", "1", "--max-examples", "40"])
        .args(["-H", &format!("Authorization: Bearer {acme}")])
        // Every check but one: a request the document allows may still be
        // refused for what a schema cannot say (a bundle whose workflow is
        // not valid YAML, a run id that does not exist).
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("Tested: 16"), "every operation was tested: {report}");
}

/// `prepare`, then `approve` waits for an event, then `ship` greets whoever
/// approved; `side` (a sleeper) runs beside them for `side_millis`.
fn approval(dir: &Path, timeout: &str, side_millis: u64) -> PathBuf {
    project(
        dir,
        "approval",
        &format!(
            "name: approval\ncomponents:\n  hello: hello.wasm\n  sleepy: sleepy.wasm\nsteps:\n  - id: prepare\n    uses: hello\n    with: {{ name: order }}\n  - id: approve\n    wait: {{ event: approve, timeout: {timeout} }}\n    depends_on: [prepare]\n  - id: ship\n    uses: hello\n    with: {{ name: '{{{{ steps.approve.output.by }}}}' }}\n    depends_on: [approve]\n  - id: side\n    uses: sleepy\n    with: {{ millis: {side_millis} }}\noutputs:\n  shipped: '{{{{ steps.ship.output.greeting }}}}'\n"
        ),
        &[("hello.wasm", guests::HELLO), ("sleepy.wasm", guests::SLEEPY)],
    )
}

/// Waits until run `id` has `status`.
async fn wait_for_status(api: &Api, id: &str, status: &str) -> Value {
    wait_for(api, id, status, |report| report["status"] == status).await
}

/// Waits until run `id`'s report is `what`, as `is` tells.
async fn wait_for(api: &Api, id: &str, what: &str, is: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, report) = api.get(&format!("/v1/runs/{id}")).await;
        if is(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "run {id} never became {what}: {report}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_step_parks_its_run_across_a_restart_until_its_event_comes() {
    let dir = temp_dir("serve-wait");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let mut server = Server::start(&data, &[]);
    deploy(&server, &acme, &approval(&dir.join("project"), "72h", 10));
    let api = server.api(&acme);
    let id = api.start("approval", json!({})).await;
    let events = api.events(&id, None, |event| event["type"] == "run_finished").await;
    assert!(events.iter().any(|(_, e)| e["type"] == "wait_started" && e["event"] == "approve"), "{events:?}");
    assert_eq!(events.last().unwrap().1["status"], "waiting");
    // Parked: no process holds it. The drive lets its lease go just after
    // it records the run as waiting, so that comes a moment later.
    let report =
        wait_for(&api, &id, "parked", |report| report["status"] == "waiting" && report.get("owner").is_none()).await;
    assert_eq!(report["steps"][1]["status"], "waiting");

    // An event for no step, or to another tenant's run, is refused.
    let (status, body) = api.post(&format!("/v1/runs/{id}/events/reject"), json!({})).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("no_such_event")));
    let (status, body) = api.post(&format!("/v1/runs/{id}/events/a%00b"), json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("invalid_event_name"))
    );
    let other = server.api(&token(&data, Some("globex")));
    assert_eq!(other.post(&format!("/v1/runs/{id}/events/approve"), json!({})).await.0, StatusCode::NOT_FOUND);

    // The wait survives the server.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    server = Server::start(&data, &[]);
    let api = server.api(&acme);
    assert_eq!(wait_for_status(&api, &id, "waiting").await["status"], "waiting");
    let (status, run) = api.post(&format!("/v1/runs/{id}/events/approve"), json!({ "by": "Ada" })).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    // A reader that comes back after the restart misses nothing: rebuilt
    // from the record, the stream starts over, the earlier drive's end
    // coming again before the new drive's.
    let (last, _) = events.last().unwrap();
    let after = api.follow(&id, *last).await;
    assert!(after.iter().any(|(_, e)| e["type"] == "step_finished" && e["path"] == "ship"), "{after:?}");
    assert_eq!(after.last().unwrap().1["status"], "succeeded", "{after:?}");
    // At least once: a stream rebuilt again starts over, so the earlier
    // drive's end may come more than once, the new drive's end once.
    assert_eq!(after.iter().filter(|(_, e)| e["type"] == "run_finished" && e["status"] == "succeeded").count(), 1);
    let report = api.finished(&id).await;
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["outputs"]["shipped"], "Hello, Ada!");
    assert_eq!(report["steps"][1]["output"], json!({ "by": "Ada" }));
    let prepared = &report["steps"][0]["executions"][0]["attempts"];
    assert_eq!(prepared.as_array().unwrap().len(), 1, "prepare did not run again: {report}");
    let (status, body) = api.post(&format!("/v1/runs/{id}/events/approve"), json!({})).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::CONFLICT, json!("run_finished")));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_reaches_a_live_run_at_once_and_a_wait_past_its_timeout_fails_as_timeout() {
    let dir = temp_dir("serve-wait-live");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &[]);
    let api = server.api(&acme);
    // `side` keeps the run busy for 5s, so the waiting step waits in memory.
    deploy(&server, &acme, &approval(&dir.join("live"), "72h", 5_000));
    let id = api.start("approval", json!({})).await;
    api.events(&id, None, |event| event["type"] == "wait_started").await;
    let sent = Instant::now();
    assert_eq!(api.post(&format!("/v1/runs/{id}/events/approve"), json!({ "by": "Bo" })).await.0, StatusCode::ACCEPTED);
    let events = api.events(&id, None, |event| event["type"] == "step_finished" && event["path"] == "ship").await;
    assert!(sent.elapsed() < Duration::from_secs(4), "the live run went on without parking first");
    assert!(!events.iter().any(|(_, e)| e["type"] == "run_finished"), "{events:?}");
    assert_eq!(api.finished(&id).await["outputs"]["shipped"], "Hello, Bo!");

    // Nobody approves: past its timeout, the waiting step fails as `timeout`.
    let short = approval(&dir.join("short"), "1s", 10);
    let (status, body) =
        Api::send(api.request(reqwest::Method::PUT, "/v1/workflows/approval").json(&bundle_of(&short))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = api.start("approval", json!({})).await;
    let report = api.finished(&id).await;
    assert_eq!(report["status"], "failed", "{report}");
    let attempt = &report["steps"][1]["executions"][0]["attempts"][0];
    assert_eq!(attempt["failure"]["kind"], "timeout", "{report}");
    assert_eq!(report["steps"][2]["status"], "skipped");

    // A retry waits afresh, its timeout counted from the retry; two
    // retries at once drive the run once.
    let failed = api.events(&id, None, |event| event["type"] == "run_finished").await;
    let (last, _) = *failed.last().unwrap();
    let retry = |api: Api, id: String| async move { api.post(&format!("/v1/runs/{id}/retry"), json!({})).await.0 };
    let (first, second) = tokio::join!(retry(api.clone(), id.clone()), retry(api.clone(), id.clone()));
    let mut statuses = [first, second];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::ACCEPTED, StatusCode::CONFLICT]);
    let events = api.events(&id, Some(last), |event| event["type"] == "wait_started").await;
    assert!(!events.iter().any(|(_, e)| e["type"] == "run_finished"), "{events:?}");
    let report = api.finished(&id).await;
    let attempts = report["steps"][1]["executions"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{report}");
    assert!(attempts[1]["finished_ms"].as_f64().unwrap() - attempts[1]["started_ms"].as_f64().unwrap() >= 900.0);

    // Version 1 waits 72h, so its runs stay parked. The event stream of a
    // parked run that an event wakes goes on numbering where it stopped.
    let parked = api.start("approval", json!({ "version": 1 })).await;
    let before = api.events(&parked, None, |event| event["type"] == "run_finished").await;
    let (last, end) = before.last().unwrap();
    assert_eq!(end["status"], "waiting", "{before:?}");
    assert_eq!(
        api.post(&format!("/v1/runs/{parked}/events/approve"), json!({ "by": "Cy" })).await.0,
        StatusCode::ACCEPTED
    );
    let after = api.follow(&parked, *last).await;
    assert_eq!(after.first().map(|(id, _)| *id), Some(last + 1), "{after:?}");
    assert!(after.iter().any(|(_, e)| e["type"] == "step_finished" && e["path"] == "ship"), "{after:?}");
    assert_eq!(after.last().unwrap().1["status"], "succeeded");

    // A parked run can be cancelled, and then takes no event.
    let parked = api.start("approval", json!({ "version": 1 })).await;
    wait_for_status(&api, &parked, "waiting").await;
    assert_eq!(api.post(&format!("/v1/runs/{parked}/cancel"), json!({})).await.0, StatusCode::ACCEPTED);
    assert_eq!(wait_for_status(&api, &parked, "cancelled").await["status"], "cancelled");
    let (status, body) = api.post(&format!("/v1/runs/{parked}/events/approve"), json!({})).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::CONFLICT, json!("run_finished")));
}

/// The bundle `stepbox deploy` would send for `workflow`.
fn bundle_of(workflow: &Path) -> Value {
    let loaded = stepbox::workflow::Workflow::load(workflow).unwrap();
    serde_json::to_value(stepbox::service::Bundle::of_workflow(&loaded, &[]).unwrap().encode()).unwrap()
}

/// `X-Stepbox-Signature-256` for `body` under `secret`.
#[tokio::test(flavor = "multi_thread")]
async fn a_signed_webhook_starts_one_run_per_delivery_and_an_unsigned_one_none() {
    let dir = temp_dir("serve-webhook");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &[]);
    let secret = "hook-secret-0123456789";
    let hooked = project(
        &dir.join("project"),
        "hooked",
        &format!(
            "name: hooked\non:\n  webhook:\n    secret: {secret}\n    with: {{ who: '{{{{ body.user.name }}}} via {{{{ headers[\"x-source\"] }}}}' }}\ninputs:\n  who: {{ type: string, required: true }}\ncomponents:\n  hello: hello.wasm\nsteps:\n  - id: greet\n    uses: hello\n    with: {{ name: '{{{{ inputs.who }}}}' }}\noutputs:\n  greeting: '{{{{ steps.greet.output.greeting }}}}'\n"
        ),
        &[("hello.wasm", guests::HELLO)],
    );
    deploy(&server, &acme, &hooked);
    deploy(&server, &acme, &greeter(&dir.join("plain")));
    let http = reqwest::Client::new();
    let hook = |workflow: &str, body: &'static str, signature: Option<String>, delivery: Option<&str>| {
        let mut request = http
            .post(format!("{}/v1/hooks/acme/{workflow}", server.url))
            .header("content-type", "application/json")
            .header("x-source", "ci")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("X-Stepbox-Signature-256", signature);
        }
        if let Some(delivery) = delivery {
            request = request.header("X-Stepbox-Delivery", delivery);
        }
        Api::send(request)
    };
    let body = r#"{"user": {"name": "Ada"}}"#;
    let (status, run) = hook("hooked", body, Some(signature(secret, body.as_bytes())), Some("d-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    assert_eq!((run["labels"]["trigger"].clone(), run["labels"]["delivery"].clone()), (json!("webhook"), json!("d-1")));
    let api = server.api(&acme);
    assert_eq!(api.finished(&id).await["outputs"]["greeting"], "Hello, Ada via ci!");

    // A replay starts nothing.
    let (status, again) = hook("hooked", body, Some(signature(secret, body.as_bytes())), Some("d-1")).await;
    assert_eq!((status, again["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
    let other = r#"{"user": {"name": "Eve"}}"#;
    let (status, reused) = hook("hooked", other, Some(signature(secret, other.as_bytes())), Some("d-1")).await;
    assert_eq!((status, reused["error"]["code"].clone()), (StatusCode::CONFLICT, json!("idempotency_key_reused")));

    // Unsigned, wrongly signed, or signed for another body: refused.
    let expect = |(status, body): (StatusCode, Value), want: StatusCode, code: &str| {
        assert_eq!((status, body["error"]["code"].as_str()), (want, Some(code)), "{body}");
    };
    expect(hook("hooked", body, None, Some("d-2")).await, StatusCode::UNAUTHORIZED, "unauthorized");
    expect(
        hook("hooked", body, Some(signature("not-the-secret-at-all", body.as_bytes())), Some("d-2")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    expect(
        hook("hooked", other, Some(signature(secret, body.as_bytes())), Some("d-2")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    expect(
        hook("hooked", body, Some(signature(secret, body.as_bytes())), None).await,
        StatusCode::BAD_REQUEST,
        "invalid_delivery",
    );
    // No webhook, no workflow, no tenant: all alike.
    expect(
        hook("greet", body, Some(signature(secret, body.as_bytes())), Some("d-3")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect(
        hook("nothing", body, Some(signature(secret, body.as_bytes())), Some("d-3")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let inputs = r#"{"user": {}}"#;
    expect(
        hook("hooked", inputs, Some(signature(secret, inputs.as_bytes())), Some("d-4")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_inputs",
    );
    let page = api.get("/v1/runs?label=trigger=webhook").await.1;
    assert_eq!(page["runs"].as_array().unwrap().len(), 1, "only the first delivery started a run: {page}");

    // A short secret is refused when the workflow is deployed.
    std::fs::write(&hooked, std::fs::read_to_string(&hooked).unwrap().replace(secret, "short")).unwrap();
    let (status, body) =
        Api::send(api.request(reqwest::Method::PUT, "/v1/workflows/hooked").json(&bundle_of_unchecked(&hooked))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("at least 16"), "{body}");
}

/// The bundle of a workflow file that does not validate: its file and its
/// component, as a client might send them.
fn bundle_of_unchecked(workflow: &Path) -> Value {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let dir = workflow.parent().unwrap();
    let mut files = serde_json::Map::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        files.insert(name, json!(engine.encode(std::fs::read(&path).unwrap())));
    }
    json!({ "workflow": workflow.file_name().unwrap().to_str().unwrap(), "files": files })
}

fn at(text: &str) -> f64 {
    text.parse::<jiff::Timestamp>().unwrap().as_millisecond() as f64
}

/// Runs of `workflow` in `scope`, oldest first, once there are `count`.
async fn runs_of(service: &stepbox::service::Service, workflow: &str, count: usize) -> Vec<Value> {
    let scope = stepbox::service::Scope::Tenant("acme".into());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let filter = stepbox::store::RunFilter { workflow: Some(workflow.into()), limit: 100, ..Default::default() };
        let page = service.runs(&scope, filter).await.unwrap();
        if page.runs.len() >= count {
            let mut runs: Vec<Value> = page.runs.iter().map(|run| serde_json::to_value(run).unwrap()).collect();
            runs.reverse();
            return runs;
        }
        assert!(Instant::now() < deadline, "{workflow}: {} runs, not {count}", page.runs.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_cron_tick_runs_once_across_restarts_and_missed_ticks_catch_up_as_asked() {
    use stepbox::service::{Bundle, ManualClock, Scope, Service, ServiceConfig};
    let dir = temp_dir("serve-cron");
    let clock = Arc::new(ManualClock::at(at("2026-12-03T10:00:30Z")));
    let config = ServiceConfig { clock: clock.clone(), ..ServiceConfig::new(dir.join("data")) };
    let service = Service::start(config.clone()).await.unwrap();
    let scope = Scope::Tenant("acme".into());
    for catch_up in ["none", "latest", "all"] {
        let workflow = project(
            &dir.join(catch_up),
            catch_up,
            &format!(
                "name: {catch_up}\non:\n  schedule:\n    - cron: '*/5 * * * *'\n      timezone: Europe/Paris\n      catch_up: {catch_up}\n      with: {{ who: cron }}\ninputs:\n  who: {{ type: string, required: true }}\ncomponents:\n  hello: hello.wasm\nsteps:\n  - id: greet\n    uses: hello\n    with: {{ name: '{{{{ inputs.who }}}}' }}\n"
            ),
            &[("hello.wasm", guests::HELLO)],
        );
        let loaded = stepbox::workflow::Workflow::load(&workflow).unwrap();
        service.deploy(&scope, catch_up, Bundle::of_workflow(&loaded, &[]).unwrap().encode()).await.unwrap();
    }
    // No tick yet; then one each, with the schedule's inputs and the
    // tick's time as a label.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(service.runs(&scope, Default::default()).await.unwrap().runs.len(), 0);
    clock.set(at("2026-12-03T10:05:00Z"));
    for workflow in ["none", "latest", "all"] {
        let runs = runs_of(&service, workflow, 1).await;
        assert_eq!(runs[0]["labels"]["tick"], "2026-12-03T10:05:00Z");
        assert_eq!(runs[0]["inputs"]["who"], "cron");
    }
    // The same moment again starts nothing more.
    clock.set(at("2026-12-03T10:05:20Z"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(service.runs(&scope, Default::default()).await.unwrap().runs.len(), 3);

    // Down across two ticks (10:10 and 10:15), back at 10:17.
    service.shutdown(Duration::from_secs(5)).await;
    drop(service);
    clock.set(at("2026-12-03T10:17:00Z"));
    let service = Service::start(config).await.unwrap();
    let ticks = |runs: &[Value]| -> Vec<String> {
        runs.iter().map(|r| r["labels"]["tick"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(ticks(&runs_of(&service, "latest", 2).await)[1], "2026-12-03T10:15:00Z");
    assert_eq!(ticks(&runs_of(&service, "all", 3).await)[1..], ["2026-12-03T10:10:00Z", "2026-12-03T10:15:00Z"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs_of(&service, "none", 1).await.len(), 1, "none skips what was missed");
    // The next tick comes to each as usual.
    clock.set(at("2026-12-03T10:20:00Z"));
    assert_eq!(ticks(&runs_of(&service, "none", 2).await)[1], "2026-12-03T10:20:00Z");
    assert_eq!(runs_of(&service, "latest", 3).await.len(), 3);
    assert_eq!(runs_of(&service, "all", 4).await.len(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(service.runs(&scope, Default::default()).await.unwrap().runs.len(), 9, "no tick ran twice");
    service.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_works_on_a_server_with_the_output_and_exit_codes_of_local_mode() {
    let dir = temp_dir("serve-cli");
    let data = dir.join("data");
    let acme = token(&data, Some("acme"));
    let server = Server::start(&data, &[]);
    let remote = |args: &[&str]| {
        let mut command = stepbox(Path::new("/nonexistent"));
        command.env("STEPBOX_SERVER", &server.url).env("STEPBOX_TOKEN", &acme).args(args);
        command.output().unwrap()
    };
    let greet = greeter(&dir.join("project"));
    let greet = greet.to_str().unwrap();

    // `run` deploys and runs, showing progress and the outputs as locally.
    let out = remote(&["run", greet, "--input", "who=Ada", "--label", "order=7"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let outputs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outputs, json!({ "greeting": "Hello, Hello, Ada!!" }));
    assert!(stderr(&out).contains("first: attempt 1 started"), "{}", stderr(&out));
    let local = output(&dir, &["run", greet, "--input", "who=Ada"]);
    assert_eq!(local.stdout, out.stdout, "the same outputs as a local run");

    let runs: Value = serde_json::from_slice(&remote(&["runs", "--label", "order=7", "--json"]).stdout).unwrap();
    let id = runs[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(runs.as_array().unwrap().len(), 1);
    let shown: Value = serde_json::from_slice(&remote(&["show", &id, "--json"]).stdout).unwrap();
    assert_eq!((shown["status"].clone(), shown["version"].clone()), (json!("succeeded"), json!(1)));
    let logs = remote(&["logs", &id, "first"]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("greeting Ada in step first"), "{}", stderr(&logs));

    // A failed run exits 1; retry on the server exits as the retried run.
    let flaky = project(
        &dir.join("flaky"),
        "flaky",
        "name: flaky\ncomponents:\n  flaky: flaky.wasm\nsteps:\n  - id: hello\n    uses: flaky\n    with: { succeed_on_attempt: 2 }\n",
        &[("flaky.wasm", guests::FLAKY)],
    );
    let out = remote(&["run", flaky.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let failed: Value = serde_json::from_slice(&remote(&["runs", "--status", "failed", "--json"]).stdout).unwrap();
    let failed = failed[0]["id"].as_str().unwrap().to_owned();
    let out = remote(&["retry", &failed]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // cancel, on the server.
    deploy(&server, &acme, &sleeper(&dir.join("nap"), 30_000));
    let nap = server.api(&acme).start("nap", json!({})).await;
    let out = remote(&["cancel", &nap]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(server.api(&acme).finished(&nap).await["status"], "cancelled");
    let out = remote(&["cancel", &nap]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("already cancelled"), "{}", stderr(&out));

    // A bad token or an unreachable server: clear errors, usual codes.
    let out = stepbox(Path::new("/nonexistent"))
        .args(["runs", "--server", &server.url, "--token", "sbx_nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not valid, or it was revoked"), "{}", stderr(&out));
    let out = stepbox(Path::new("/nonexistent"))
        .args(["runs", "--server", "http://127.0.0.1:9", "--token", &acme])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is `stepbox serve` running there?"), "{}", stderr(&out));
    let out = remote(&["run", greet, "--input", "who=Ada", "--max-parallel", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_attempts_commits_compiles_and_requests_for_admins_only() {
    let dir = temp_dir("serve-metrics");
    let data = dir.join("data");
    let (acme, admin) = (token(&data, Some("acme")), token(&data, None));
    let server = Server::start(&data, &[]);
    let api = server.api(&acme);
    deploy(&server, &acme, &greeter(&dir.join("greet")));
    let flaky = project(
        &dir.join("flaky"),
        "flaky",
        "name: flaky\ncomponents:\n  flaky: flaky.wasm\nsteps:\n  - id: hello\n    uses: flaky\n    with: { succeed_on_attempt: 2 }\n",
        &[("flaky.wasm", guests::FLAKY)],
    );
    deploy(&server, &acme, &flaky);
    let greeted = api.start("greet", json!({ "inputs": { "who": "Ada" } })).await;
    assert_eq!(api.finished(&greeted).await["status"], "succeeded");
    let failed = api.start("flaky", json!({})).await;
    assert_eq!(api.finished(&failed).await["status"], "failed");
    assert_eq!(api.get("/v1/nope").await.0, StatusCode::NOT_FOUND);
    // Any token can be a method: they share one series.
    for method in ["BREW", "WHEN"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let answer = reqwest::Client::new().request(method, format!("{}/v1/runs", server.url)).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    // They name every tenant: a tenant's token, or none, gets nothing.
    let scrape = |token: Option<&str>| {
        let mut request = reqwest::Client::new().get(format!("{}/metrics", server.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(scrape(None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let refused = scrape(Some(&acme)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().await.unwrap().contains("scrape them with an admin token"));
    // An admin acting for one tenant sees that tenant's share only.
    let acting = reqwest::Client::new()
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&admin)
        .header("Stepbox-Tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(acting.status(), StatusCode::FORBIDDEN);
    let answer = scrape(Some(&admin)).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = answer.text().await.unwrap();

    let expect = |series: &str, wanted: f64| {
        assert_eq!(sample(&text, series), Some(wanted), "{series} in:\n{text}");
    };
    expect(r#"stepbox_attempts_total{tenant="acme",component="hello",outcome="succeeded"}"#, 2.0);
    expect(r#"stepbox_attempts_total{tenant="acme",component="flaky",outcome="retryable"}"#, 1.0);
    for histogram in ["attempt_seconds", "attempt_fuel", "attempt_peak_memory_bytes"] {
        expect(&format!(r#"stepbox_{histogram}_count{{tenant="acme"}}"#), 3.0);
    }
    let fuel = sample(&text, r#"stepbox_attempt_fuel_sum{tenant="acme"}"#).unwrap();
    assert!(fuel > 1_000.0, "fuel is counted: {fuel}");
    // Each run's start, attempts and end went through the journal.
    let commits = sample(&text, r#"stepbox_journal_commit_seconds_count{store="sqlite"}"#).unwrap_or(0.0);
    let records = sample(&text, r#"stepbox_journal_commit_records_sum{store="sqlite"}"#).unwrap_or(0.0);
    assert!(commits >= 2.0 && records >= commits, "{commits} commits of {records} records:\n{text}");
    let loaded: f64 = ["memory", "disk", "compiled"]
        .iter()
        .filter_map(|result| sample(&text, &format!(r#"stepbox_components_loaded_total{{result="{result}"}}"#)))
        .sum();
    assert!(loaded >= 2.0, "two components were loaded:\n{text}");
    // Requests by route pattern, never by path.
    expect(r#"stepbox_http_requests_total{route="/v1/workflows/{name}/runs",method="POST",status="201"}"#, 2.0);
    expect(r#"stepbox_http_requests_total{route="unmatched",method="GET",status="404"}"#, 1.0);
    expect(r#"stepbox_http_requests_total{route="/v1/runs",method="other",status="405"}"#, 2.0);
    expect(r#"stepbox_http_requests_total{route="/metrics",method="GET",status="403"}"#, 2.0);
    assert!(sample(&text, r#"stepbox_http_requests_total{route="/v1/runs/{id}",method="GET",status="200"}"#).is_some());
    expect(r#"stepbox_process_attempts_running{tenant="acme"}"#, 0.0);
    expect(r#"stepbox_process_attempts_waiting{tenant="acme"}"#, 0.0);
    assert!(!text.contains(&greeted) && !text.contains(&failed), "no run ids in labels:\n{text}");
}
