//! Traces as an OpenTelemetry collector receives them: a receiver of the
//! test's own takes the OTLP/HTTP protobuf export of a real `stepbox run`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::{stepbox, temp_dir};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use stepbox_tests::guests;

/// The spans received, with the service name of the process that sent
/// them.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// Starts an OTLP/HTTP receiver on a free port; returns its address.
async fn receiver(received: Received) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
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
            axum::http::StatusCode::OK
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
    let endpoint = receiver(received.clone()).await;
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
    let out = tokio::task::spawn_blocking(move || {
        stepbox(&dir.join("data"))
            .args(["run", workflow.to_str().unwrap(), "--json"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_SERVICE_NAME", "stepbox-test")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
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
