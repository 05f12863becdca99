//! Traces as an OpenTelemetry collector receives them: a receiver of the
//! test's own takes the OTLP/HTTP protobuf export of a real `stepbox run`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::response::IntoResponse as _;
use common::{Worker, stepbox, temp_dir};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};
use stepbox_tests::guests;
use stepbox_tests::postgres::TestDatabase;

/// The spans received, with the service name of the process that sent
/// them.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// The `traceparent` of each request `GET /echo` took (`None`: it had
/// none).
type Echoed = Arc<Mutex<Vec<Option<String>>>>;

/// How a test's collector behaves, and what it saw besides the spans.
#[derive(Clone, Default)]
struct Collector {
    /// The first this many exports are answered 503 (a collector that
    /// cannot take them now).
    refuse_first: usize,
    /// How long each export waits before it is answered.
    hold: std::time::Duration,
    /// The `Retry-After` of a refusal.
    retry_after: Option<&'static str>,
    /// When each export came.
    times: Arc<Mutex<Vec<std::time::Instant>>>,
    /// Each export's request headers, as they came.
    headers: Arc<Mutex<Vec<axum::http::HeaderMap>>>,
}

/// Starts an OTLP/HTTP receiver on a free port, which also answers
/// `GET /echo` for steps to call; returns its address.
async fn receiver(received: Received, echoed: Echoed) -> String {
    collector(received, echoed, Collector::default()).await
}

/// [`receiver`], behaving as `collector` says.
async fn collector(received: Received, echoed: Echoed, collector: Collector) -> String {
    let app = axum::Router::new()
        .route(
            "/echo",
            axum::routing::get(move |headers: axum::http::HeaderMap| async move {
                let parent = headers.get("traceparent").and_then(|value| Some(value.to_str().ok()?.to_owned()));
                echoed.lock().unwrap().push(parent);
                "echo"
            }),
        )
        .route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                tokio::time::sleep(collector.hold).await;
                collector.times.lock().unwrap().push(std::time::Instant::now());
                let seen = {
                    let mut seen = collector.headers.lock().unwrap();
                    seen.push(headers);
                    seen.len()
                };
                if seen <= collector.refuse_first {
                    let mut refused = axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                    if let Some(after) = collector.retry_after {
                        refused.headers_mut().insert(axum::http::header::RETRY_AFTER, after.parse().unwrap());
                    }
                    return refused;
                }
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                let mut received = received.lock().unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|resource| &resource.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        received.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
                    }
                }
                axum::http::StatusCode::OK.into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

fn text(value: &Any) -> Option<String> {
    match value {
        Any::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

/// A span's attributes, as text.
fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Any::StringValue(text) => text.clone(),
                Any::IntValue(n) => n.to_string(),
                Any::BoolValue(b) => b.to_string(),
                Any::DoubleValue(x) => x.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_is_one_trace_of_run_step_and_attempt_spans_with_their_measures_and_retries() {
    let received = Received::default();
    let endpoint = receiver(received.clone(), Echoed::default()).await;
    let dir = temp_dir("traces");
    let workflow = dir.join("traced.yaml");
    std::fs::write(
        &workflow,
        format!(
            "name: traced\ncomponents:\n  flaky: {}\n  hello: {}\nsteps:\n  - id: warm\n    uses: flaky\n    with: {{ succeed_on_attempt: 2 }}\n    retry: {{ attempts: 3, initial: 10ms }}\n  - id: greet\n    uses: hello\n    depends_on: [warm]\n    with: {{ name: traced }}\n",
            guests::FLAKY,
            guests::HELLO
        ),
    )
    .unwrap();
    let out = run_exported(dir, workflow, endpoint, &[("OTEL_SERVICE_NAME", "stepbox-test")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Exported before the process exited.
    let spans = received.lock().unwrap().clone();
    assert!(spans.iter().all(|(service, _)| service == "stepbox-test"), "{spans:?}");
    let named = |name: &str| spans.iter().map(|(_, span)| span).filter(|span| span.name == name).collect::<Vec<_>>();
    let (runs, steps, attempts) = (named("run"), named("step"), named("attempt"));
    assert_eq!((runs.len(), steps.len(), attempts.len()), (1, 2, 3), "{:?}", spans.iter().map(|(_, s)| &s.name));

    // One trace: the run is its root, the steps its children, each
    // attempt a child of its step.
    let run = runs[0];
    assert!(run.parent_span_id.is_empty());
    assert!(spans.iter().all(|(_, span)| span.trace_id == run.trace_id), "one trace per run");
    let run_attributes = attributes(run);
    assert_eq!(run_attributes["stepbox.run_id"], report["id"].as_str().unwrap());
    assert_eq!(run_attributes["stepbox.tenant"], "default");
    assert_eq!(run_attributes["stepbox.status"], "succeeded");
    let step_of: HashMap<String, &Span> =
        steps.iter().map(|step| (attributes(step)["stepbox.step"].clone(), *step)).collect();
    assert!(steps.iter().all(|step| step.parent_span_id == run.span_id));
    for attempt in &attempts {
        let seen = attributes(attempt);
        assert_eq!(attempt.parent_span_id, step_of[&seen["stepbox.step"]].span_id, "{seen:?}");
        assert_eq!(seen["stepbox.tenant"], "default");
        assert_eq!(seen["stepbox.component_digest"].len(), 64, "{seen:?}");
        assert!(seen["stepbox.fuel"].parse::<u64>().unwrap() > 0, "{seen:?}");
        assert!(seen["stepbox.peak_memory"].parse::<u64>().unwrap() > 0, "{seen:?}");
    }
    let mut warm: Vec<HashMap<String, String>> =
        attempts.iter().map(|span| attributes(span)).filter(|seen| seen["stepbox.step"] == "warm").collect();
    warm.sort_by_key(|seen| seen["stepbox.attempt"].clone());
    assert_eq!(warm.len(), 2);
    assert_eq!(warm[0]["stepbox.failure_class"], "retryable");
    assert!(!warm[1].contains_key("stepbox.failure_class"), "{:?}", warm[1]);
    let failed = attempts.iter().find(|span| attributes(span).contains_key("stepbox.failure_class")).unwrap();
    assert_eq!(failed.status.as_ref().map(|status| status.code), Some(2), "an error status");
    // The retry is an event of the step that retried.
    let retries: Vec<_> = step_of["warm"].events.iter().filter(|event| event.name == "retry").collect();
    assert_eq!(retries.len(), 1, "{:?}", step_of["warm"].events);
    assert!(step_of["greet"].events.iter().all(|event| event.name != "retry"));
}

/// `stepbox ARGS` with `data` as its data directory and `env` set, run
/// off the test's runtime (its receiver answers meanwhile).
async fn stepbox_off_runtime(
    data: std::path::PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> std::process::Output {
    tokio::task::spawn_blocking(move || stepbox(&data).args(args).envs(env).output().unwrap()).await.unwrap()
}

/// `stepbox run --json` of `workflow` in `dir`, exporting its traces to
/// `endpoint`, with `env` set.
async fn run_exported(
    dir: std::path::PathBuf,
    workflow: std::path::PathBuf,
    endpoint: String,
    env: &'static [(&'static str, &'static str)],
) -> std::process::Output {
    let args = vec!["run".into(), workflow.display().to_string(), "--json".into()];
    let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint));
    stepbox_off_runtime(dir.join("data"), args, env).await
}

/// `calls.yaml` in `dir`: step `call` asks `ENDPOINT/echo`, which its grant
/// allows, and step `denied` asks a host it does not.
fn calls_workflow(dir: &std::path::Path, endpoint: &str) -> std::path::PathBuf {
    let host = endpoint.strip_prefix("http://").unwrap();
    let workflow = dir.join("calls.yaml");
    std::fs::write(
        &workflow,
        format!(
            "name: calls\ncomponents:\n  probe: {probe}\nsteps:\n  - id: call\n    uses: probe\n    with: {{ url: \"{endpoint}/echo\" }}\n    network: {{ http: [\"GET@{host}\"] }}\n  - id: denied\n    uses: probe\n    with: {{ url: \"http://example.com/\" }}\n    network: {{ http: [\"GET@{host}\"] }}\n",
            probe = guests::HTTP_PROBE
        ),
    )
    .unwrap();
    workflow
}

/// The spans `received` holds named `name`.
fn spans_named(received: &Received, name: &str) -> Vec<Span> {
    received.lock().unwrap().iter().map(|(_, span)| span).filter(|span| span.name == name).cloned().collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempts_http_requests_carry_its_traceparent_and_a_denied_one_is_an_event() {
    let (received, echoed) = (Received::default(), Echoed::default());
    let endpoint = receiver(received.clone(), echoed.clone()).await;
    let dir = temp_dir("traces-http");
    let workflow = calls_workflow(&dir, &endpoint);
    let out = run_exported(dir, workflow, endpoint, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"][0]["output"]["response"]["body"], "echo", "{report}");
    let attempts = spans_named(&received, "attempt");
    let of = |step: &str| attempts.iter().find(|span| attributes(span)["stepbox.step"] == step).unwrap().clone();
    let (call, denied) = (of("call"), of("denied"));
    // The request carried the attempt's span as its parent.
    let echoed = echoed.lock().unwrap().clone();
    assert_eq!(echoed, [Some(format!("00-{}-{}-01", hex(&call.trace_id), hex(&call.span_id)))]);
    // The refused one is an event of its attempt, naming what was refused.
    let event = denied.events.iter().find(|event| event.name == "capability denied").expect("a denial event");
    let seen: HashMap<String, String> = event
        .attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?)?)))
        .collect();
    assert_eq!(
        (seen["stepbox.capability"].as_str(), seen["stepbox.host"].as_str()),
        ("http", "example.com"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_reads_its_attempts_traceparent_and_none_while_traces_are_not_exported_or_sampled_out() {
    let received = Received::default();
    let endpoint = receiver(received.clone(), Echoed::default()).await;
    let dir = temp_dir("traces-read");
    let workflow = dir.join("read.yaml");
    std::fs::write(
        &workflow,
        format!(
            "name: read\ncomponents:\n  probe: {}\nsteps:\n  - id: look\n    uses: probe\n    with: {{ probe: trace }}\n",
            guests::PROBE
        ),
    )
    .unwrap();
    let out = run_exported(dir.clone(), workflow.clone(), endpoint.clone(), &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let attempt = spans_named(&received, "attempt").pop().expect("the attempt's span");
    // A span the sampler leaves out gives nothing to hang beneath it.
    let sampled_out =
        run_exported(dir.clone(), workflow.clone(), endpoint, &[("OTEL_TRACES_SAMPLER", "always_off")]).await;
    assert_eq!(sampled_out.status.code(), Some(0), "{}", String::from_utf8_lossy(&sampled_out.stderr));
    let sampled_out: Value = serde_json::from_slice(&sampled_out.stdout).unwrap();
    assert_eq!(sampled_out["steps"][0]["output"], json!({ "traceparent": null, "trace_id": null }));
    let expected = format!("00-{}-{}-01", hex(&attempt.trace_id), hex(&attempt.span_id));
    assert_eq!(report["steps"][0]["output"], json!({ "traceparent": expected, "trace_id": hex(&attempt.trace_id) }));

    // Without an exporter there is no trace to join.
    let args = vec!["run".into(), workflow.display().to_string(), "--json".into()];
    let quiet = stepbox_off_runtime(dir.join("data"), args, Vec::new()).await;
    assert_eq!(quiet.status.code(), Some(0), "{}", String::from_utf8_lossy(&quiet.stderr));
    let report: Value = serde_json::from_slice(&quiet.stdout).unwrap();
    assert_eq!(report["steps"][0]["output"], json!({ "traceparent": null, "trace_id": null }));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_on_the_request_that_starts_a_run_becomes_its_parent() {
    let received = Received::default();
    let endpoint = receiver(received.clone(), Echoed::default()).await;
    let dir = temp_dir("traces-serve");
    let data = dir.join("data");
    let token = common::output(&data, &["token", "create", "--tenant", "acme"]);
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let server = common::Server::start_with(&data, &[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::copy(guests::HELLO, project.join("hello.wasm")).unwrap();
    std::fs::write(
        project.join("greet.yaml"),
        "name: greet\non:\n  webhook:\n    secret: hush-hush-hush-hush\ncomponents:\n  hello: hello.wasm\nsteps:\n  - id: hi\n    uses: hello\n    with: { name: trace }\n",
    )
    .unwrap();
    let deployed = stepbox(std::path::Path::new("/nonexistent"))
        .args(["deploy", project.join("greet.yaml").to_str().unwrap(), "--server", &server.url, "--token", &token])
        .output()
        .unwrap();
    assert!(deployed.status.success(), "{}", String::from_utf8_lossy(&deployed.stderr));
    let api = server.api(&token);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let start = |traceparent: &'static str| {
        api.http
            .post(format!("{}/v1/workflows/greet/runs", server.url))
            .bearer_auth(&token)
            .header("traceparent", traceparent)
            .json(&serde_json::json!({}))
            .send()
    };
    let started: Value = start(parent).await.unwrap().json().await.unwrap();
    let id = started["id"].as_str().unwrap().to_owned();
    assert_eq!(api.finished(&id).await["status"], "succeeded");
    // A malformed one is ignored: the run starts a trace of its own.
    let other: Value = start("00-not-a-trace-01").await.unwrap().json().await.unwrap();
    let other = other["id"].as_str().unwrap().to_owned();
    assert_eq!(api.finished(&other).await["status"], "succeeded");
    // A webhook's delivery continues the sender's trace alike.
    let hooked = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let delivered: Value = api
        .http
        .post(format!("{}/v1/hooks/acme/greet", server.url))
        .header("traceparent", hooked)
        .header("x-stepbox-delivery", "d1")
        .header("x-stepbox-signature-256", common::signature("hush-hush-hush-hush", b"{}"))
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let delivered = delivered["id"].as_str().unwrap().to_owned();
    assert_eq!(api.finished(&delivered).await["status"], "succeeded");
    // The server exports as it goes; its spans of both runs arrive.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let run_span =
        |id: &str| spans_named(&received, "run").into_iter().find(|span| attributes(span)["stepbox.run_id"] == id);
    while [&id, &other, &delivered].iter().any(|id| run_span(id).is_none()) {
        assert!(std::time::Instant::now() < deadline, "the runs' spans were not exported");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let run = run_span(&id).unwrap();
    assert_eq!(hex(&run.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&run.parent_span_id), "00f067aa0ba902b7");
    let own = run_span(&other).unwrap();
    assert!(own.parent_span_id.is_empty());
    assert_ne!(own.trace_id, run.trace_id);
    let hook = run_span(&delivered).unwrap();
    assert_eq!(
        (hex(&hook.trace_id), hex(&hook.parent_span_id)),
        ("0af7651916cd43dd8448eb211c80319c".into(), "b7ad6b7169203331".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_is_away_costs_the_run_nothing_and_is_said() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let dir = temp_dir("traces-away");
    let workflow = greetings(&dir, 1);
    let out = run_exported(dir, workflow, endpoint, &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("warning: traces were not exported"), "{stderr}");
}

/// `greet.yaml` in `dir`: `steps` independent steps that greet.
fn greetings(dir: &std::path::Path, steps: usize) -> std::path::PathBuf {
    let workflow = dir.join("greet.yaml");
    let steps: String =
        (0..steps).map(|n| format!("  - id: hi{n}\n    uses: hello\n    with: {{ name: x }}\n")).collect();
    std::fs::write(&workflow, format!("name: greet\ncomponents:\n  hello: {}\nsteps:\n{steps}", guests::HELLO))
        .unwrap();
    workflow
}

#[tokio::test(flavor = "multi_thread")]
async fn text_a_tenant_chooses_is_cut_to_a_kibibyte_in_spans() {
    let received = Received::default();
    let endpoint = receiver(received.clone(), Echoed::default()).await;
    let dir = temp_dir("traces-long");
    // A step id has no length of its own; each of its spans carries it.
    let id = "s".repeat(5000);
    let workflow = dir.join("long.yaml");
    std::fs::write(
        &workflow,
        format!(
            "name: long\ncomponents:\n  hello: {}\nsteps:\n  - id: {id}\n    uses: hello\n    with: {{ name: x }}\n",
            guests::HELLO
        ),
    )
    .unwrap();
    let out = run_exported(dir, workflow, endpoint, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    for name in ["step", "attempt"] {
        let spans = spans_named(&received, name);
        assert_eq!(spans.len(), 1, "{name}");
        assert_eq!(attributes(&spans[0])["stepbox.step"], id[..1024], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sampler_by_trace_id_keeps_or_leaves_out_each_runs_trace_whole() {
    let received = Received::default();
    let endpoint = receiver(received.clone(), Echoed::default()).await;
    let dir = temp_dir("traces-ratio");
    let workflow = greetings(&dir, 2);
    const HALF: &[(&str, &str)] = &[("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.5")];
    let runs = 16;
    for _ in 0..runs {
        let out = run_exported(dir.clone(), workflow.clone(), endpoint.clone(), HALF).await;
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The sampler is asked once a run; the steps and attempts follow.
    let mut traces: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    for (_, span) in received.lock().unwrap().iter() {
        traces.entry(span.trace_id.clone()).or_default().push(span.name.clone());
    }
    for names in traces.values_mut() {
        names.sort();
        assert_eq!(names, &["attempt", "attempt", "run", "step", "step"], "a trace kept whole");
    }
    // Some kept, some left out (each of 16 both ways by chance: 1 in 32,768).
    assert!((1..runs).contains(&traces.len()), "{} of {runs} traces kept", traces.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_collectors_address_and_headers_come_from_the_standard_variables() {
    let dir = temp_dir("traces-settings");
    let workflow = greetings(&dir, 1);
    /// Names and values: variables set, or headers an export carries.
    type Pairs = &'static [(&'static str, &'static str)];
    // (variables, the headers each export must carry, and must not)
    let cases: [(Pairs, Pairs, &[&str]); 2] = [
        // The general headers, percent-decoded; the protocol's name in any
        // case.
        (
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20s3cret, x-which = general"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "HTTP/Protobuf"),
            ],
            &[("authorization", "Bearer s3cret"), ("x-which", "general")],
            &[],
        ),
        // The traces' own address wins over the general one (where nothing
        // listens) and is taken as it is; the traces' own headers replace
        // the general ones whole.
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20s3cret,x-which=general"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-which=traces"),
            ],
            &[("x-which", "traces")],
            &["authorization"],
        ),
    ];
    for (variables, carried, left_out) in cases {
        let (received, seen) = (Received::default(), Collector::default());
        let endpoint = collector(received.clone(), Echoed::default(), seen.clone()).await;
        let mut env = vec![("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".to_owned(), format!("{endpoint}/v1/traces"))];
        env.extend(variables.iter().map(|(name, value)| (name.to_string(), value.to_string())));
        let args = vec!["run".into(), workflow.display().to_string(), "--json".into()];
        let out = stepbox_off_runtime(dir.join("data"), args, env).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{variables:?}: {stderr}");
        assert!(!stderr.contains("warning"), "{stderr}");
        assert_eq!(spans_named(&received, "attempt").len(), 1, "{variables:?}");
        let headers = seen.headers.lock().unwrap().clone();
        assert!(!headers.is_empty());
        for headers in headers {
            assert_eq!(headers["content-type"], "application/x-protobuf");
            for (name, value) in carried {
                assert_eq!(headers[*name], *value, "{variables:?}");
            }
            for name in left_out {
                assert!(!headers.contains_key(*name), "{variables:?}: {headers:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_the_collector_cannot_take_now_is_sent_again() {
    let received = Received::default();
    let seen = Collector { refuse_first: 2, ..Collector::default() };
    let endpoint = collector(received.clone(), Echoed::default(), seen.clone()).await;
    let dir = temp_dir("traces-retry");
    let workflow = greetings(&dir, 3);
    // One batch, sent at exit.
    let out = run_exported(dir, workflow, endpoint, &[("OTEL_BSP_SCHEDULE_DELAY", "600000")]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // Refused twice, taken the third time: every span arrives, and nothing
    // is said.
    assert!(!stderr.contains("warning"), "{stderr}");
    assert_eq!(seen.headers.lock().unwrap().len(), 3);
    assert_eq!(
        (
            spans_named(&received, "run").len(),
            spans_named(&received, "step").len(),
            spans_named(&received, "attempt").len()
        ),
        (1, 3, 3)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_beyond_the_queue_are_dropped_and_said_while_the_collector_is_slow() {
    let received = Received::default();
    // Each export is answered after two seconds: meanwhile the run ends, and
    // its spans find the queue (one span) full.
    let seen = Collector { hold: std::time::Duration::from_secs(2), ..Collector::default() };
    let endpoint = collector(received.clone(), Echoed::default(), seen).await;
    let dir = temp_dir("traces-queue");
    let workflow = greetings(&dir, 6);
    let out = run_exported(dir, workflow, endpoint, &[("OTEL_BSP_MAX_QUEUE_SIZE", "1")]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("spans were dropped"), "{stderr}");
    // 13 spans were made (a run, six steps, six attempts); at most one
    // waited at a time, besides the one being sent (and, should the run
    // outlast the first export, one more).
    let got = received.lock().unwrap().len();
    assert!((1..=3).contains(&got), "{got} spans arrived");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collectors_retry_after_is_heeded_within_the_timeout_and_no_further() {
    let dir = temp_dir("traces-later");
    let workflow = greetings(&dir, 1);
    const ONCE: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "600000")];
    // Asked to come back in a second: it does, and every span arrives.
    let received = Received::default();
    let seen = Collector { refuse_first: 1, retry_after: Some("1"), ..Collector::default() };
    let endpoint = collector(received.clone(), Echoed::default(), seen.clone()).await;
    let out = run_exported(dir.clone(), workflow.clone(), endpoint, ONCE).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let times = seen.times.lock().unwrap().clone();
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] >= std::time::Duration::from_secs(1), "{:?}", times[1] - times[0]);
    assert_eq!(spans_named(&received, "attempt").len(), 1);
    // Asked to come back in 292 billion years: the export is given up at
    // once and said, and the exporter goes on (no panic, no wait at exit).
    let received = Received::default();
    let seen = Collector { refuse_first: 1, retry_after: Some("9300000000000000000"), ..Collector::default() };
    let endpoint = collector(received.clone(), Echoed::default(), seen.clone()).await;
    let started = std::time::Instant::now();
    let out = run_exported(dir, workflow, endpoint, ONCE).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("answered 503"), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("not every trace"), "{stderr}");
    assert_eq!(seen.times.lock().unwrap().len(), 1);
    assert!(started.elapsed() < std::time::Duration::from_secs(8), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exporter_setting_stepbox_cannot_honour_is_an_error_that_names_it() {
    let dir = temp_dir("traces-bad");
    let workflow = greetings(&dir, 1);
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "ten seconds"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://collector"),
    ] {
        let env =
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), "http://127.0.0.1:9".into()), (name.into(), value.into())];
        let args = vec!["run".into(), workflow.display().to_string()];
        let out = stepbox_off_runtime(dir.join("data"), args, env).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}={value}: {stderr}");
        let named = if name.ends_with("ENDPOINT") { "ftp://collector" } else { name };
        assert!(stderr.contains(named), "{name}={value}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_run_continues_its_first_drives_trace_beneath_it() {
    let received = Received::default();
    let endpoint = receiver(received.clone(), Echoed::default()).await;
    let dir = temp_dir("traces-retry");
    let workflow = dir.join("flaky.yaml");
    std::fs::write(
        &workflow,
        format!(
            "name: flaky\ncomponents:\n  flaky: {}\nsteps:\n  - id: call\n    uses: flaky\n    with: {{ succeed_on_attempt: 2 }}\n    retry: {{ attempts: 1 }}\n",
            guests::FLAKY
        ),
    )
    .unwrap();
    let out = run_exported(dir.clone(), workflow, endpoint.clone(), &[]).await;
    assert_eq!(out.status.code(), Some(1), "the first drive fails: {}", String::from_utf8_lossy(&out.stderr));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"].as_str().unwrap().to_owned();
    let (args, env) =
        (vec!["retry".into(), id, "--json".into()], vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint)]);
    let retried = stepbox_off_runtime(dir.join("data"), args, env).await;
    assert_eq!(retried.status.code(), Some(0), "{}", String::from_utf8_lossy(&retried.stderr));
    let mut runs = spans_named(&received, "run");
    runs.sort_by_key(|span| span.start_time_unix_nano);
    let [first, second] = &runs[..] else { panic!("two drives, two run spans: {runs:?}") };
    assert_eq!(second.trace_id, first.trace_id, "one trace for the run");
    assert_eq!(second.parent_span_id, first.span_id, "the retry beneath the first drive");
    let statuses: Vec<String> = runs.iter().map(|span| attributes(span)["stepbox.status"].clone()).collect();
    assert_eq!(statuses, ["failed", "succeeded"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_exports_its_attempts_span_under_the_coordinators_with_the_denials_as_events() {
    let (received, echoed) = (Received::default(), Echoed::default());
    let endpoint = receiver(received.clone(), echoed).await;
    let db = TestDatabase::create();
    let dir = temp_dir("traces-worker");
    let workflow = calls_workflow(&dir, &endpoint);
    let traced = [("STEPBOX_DB", db.url.as_str()), ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let worker_env = [traced[0], traced[1], ("OTEL_SERVICE_NAME", "the-worker")];
    let worker = Worker::start(&dir, "w", &[], &worker_env);
    let args = vec!["run".into(), workflow.display().to_string(), "--queue".into(), "--json".into()];
    let env = traced.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec();
    let out = stepbox_off_runtime(dir.join("coordinator"), args, env).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // A worker sends what it has when it stops.
    worker.signal("-TERM");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while spans_named(&received, "worker attempt").len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the worker exported no spans:\n{}", worker.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let services: HashMap<Vec<u8>, String> =
        received.lock().unwrap().iter().map(|(service, span)| (span.span_id.clone(), service.clone())).collect();
    let attempts = spans_named(&received, "attempt");
    let workers = spans_named(&received, "worker attempt");
    for step in ["call", "denied"] {
        let of = |spans: &[Span]| spans.iter().find(|span| attributes(span)["stepbox.step"] == step).unwrap().clone();
        let (attempt, on_worker) = (of(&attempts), of(&workers));
        assert_eq!(services[&on_worker.span_id], "the-worker", "{step}: exported by the worker");
        assert_eq!(on_worker.trace_id, attempt.trace_id, "{step}: in the run's trace");
        assert_eq!(on_worker.parent_span_id, attempt.span_id, "{step}: under the coordinator's attempt span");
        let denied = on_worker.events.iter().any(|event| event.name == "capability denied");
        assert_eq!(denied, step == "denied", "{step}: {:?}", on_worker.events);
    }
}
