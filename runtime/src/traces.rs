//! Traces in OpenTelemetry, exported over OTLP (HTTP, protobuf) when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set:
//! one trace per run, with a span for the run, each step and each attempt
//! (tenant, component digest, fuel, peak memory, failure class) and events
//! for retries. `OTEL_SERVICE_NAME` names the process (`stepbox` unless
//! set), and the other `OTEL_EXPORTER_OTLP_*` variables (headers, timeout)
//! apply as the OTLP exporter reads them.
//!
//! The spans are `tracing` spans of target `stepbox`; this module only
//! turns them into OpenTelemetry ones. Without the variables nothing is
//! exported and the spans cost a disabled callsite each.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Exports what is left when dropped.
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Drop for Exporting {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown_with_timeout(EXPORT_TIMEOUT) {
            eprintln!("warning: not every trace was exported: {err}");
        }
    }
}

/// The layer that exports stepbox's spans, and the guard that flushes them
/// at exit: to `endpoint` (an OTLP/HTTP base address) when given, else as
/// the environment says; `None` when neither names an endpoint.
pub fn layer<S>(endpoint: Option<&str>) -> Result<Option<(impl Layer<S>, Exporting)>, String>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()));
    if !configured && endpoint.is_none() {
        return Ok(None);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Client::new()?)
        .with_timeout(EXPORT_TIMEOUT);
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
    }
    let exporter = builder
        .build()
        .map_err(|err| format!("cannot export traces (check the OTEL_EXPORTER_OTLP_* variables): {err}"))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("stepbox");
    }
    let provider = SdkTracerProvider::builder().with_resource(resource.build()).with_batch_exporter(exporter).build();
    // Spans carry what stepbox puts on them: no busy and idle clocks on
    // every poll, no source locations, thread names or targets (each an
    // attribute per span, a cost per step). Nothing reads OpenTelemetry's
    // current context, so entering a span (each poll of an attempt) does
    // not set it.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("stepbox"))
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_context_activation(false)
        .with_filter(Targets::new().with_target("stepbox", LevelFilter::INFO));
    Ok(Some((layer, Exporting { provider })))
}

/// The exporter's HTTP client: the project's reqwest, on a runtime of its
/// own, since the batch exporter calls it from a thread of its own.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    /// Taken when dropped: a runtime dropped inside another panics.
    runtime: Option<tokio::runtime::Runtime>,
    /// When an export last failed (unix ms), so a collector that is away
    /// is reported once a minute, not once a batch.
    warned_ms: std::sync::atomic::AtomicU64,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Client {
    fn new() -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|err| format!("cannot make the trace exporter's HTTP client: {err}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("cannot start the trace exporter's runtime: {err}"))?;
        Ok(Client { http, runtime: Some(runtime), warned_ms: std::sync::atomic::AtomicU64::new(0) })
    }

    /// Says, at most once a minute, that an export failed: the exporter
    /// drops the batch and says nothing itself.
    fn warn(&self, why: &str) {
        let now = crate::run::now_ms() as u64;
        let last = self.warned_ms.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && self
                .warned_ms
                .compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
                .is_ok()
        {
            eprintln!("warning: traces were not exported: {why}");
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let (http, url) = (self.http.clone(), request.url().clone());
        let Some(runtime) = &self.runtime else { return Err("the exporter is closed".into()) };
        let sent: Result<Response<Bytes>, HttpError> = runtime.block_on(async move {
            let response = http.execute(request).await?;
            let mut answer = Response::builder().status(response.status());
            for (name, value) in response.headers() {
                answer = answer.header(name, value);
            }
            let body = response.bytes().await?;
            Ok(answer.body(body)?)
        });
        match &sent {
            Ok(response) if !response.status().is_success() => {
                self.warn(&format!("{url} answered {}", response.status()));
            }
            Ok(_) => {}
            Err(err) => self.warn(&format!("{url}: {err}")),
        }
        sent
    }
}

/// A W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), checked: what
/// a request or webhook names as the parent of the run it starts, and what
/// an attempt's outgoing HTTP requests carry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TraceParent(String);

impl TryFrom<String> for TraceParent {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        TraceParent::parse(&value).ok_or_else(|| format!("`{value}` is not a traceparent"))
    }
}

impl From<TraceParent> for String {
    fn from(parent: TraceParent) -> String {
        parent.0
    }
}

impl TraceParent {
    /// `value` if it is a well-formed `traceparent`; a malformed one is
    /// ignored, as the W3C recommendation asks (a new trace starts). A
    /// later version's value is read as version 00 (its first four fields).
    /// It comes back marked sampled: whoever sends it cannot keep a run out
    /// of the traces the operator collects.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let hex =
            |part: &str, len: usize| part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let nonzero = |part: &str| part.bytes().any(|b| b != b'0');
        let version = value.get(..2)?;
        let known = match version {
            "00" => value.len() == 55,
            // Later versions may add fields after these four.
            _ => hex(version, 2) && version != "ff" && (value.len() == 55 || value.as_bytes().get(55) == Some(&b'-')),
        };
        let parts: Vec<&str> = value.get(..55)?.split('-').collect();
        let [_, trace, span, flags] = parts[..] else { return None };
        let valid = known && hex(trace, 32) && nonzero(trace) && hex(span, 16) && nonzero(span) && hex(flags, 2);
        valid.then(|| TraceParent(format!("00-{trace}-{span}-01")))
    }

    /// The header's value.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trace's id (32 hex digits).
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }
}

/// Marks an attempt's span with its failure class and an error status,
/// when it failed (the span declares both fields empty).
pub fn record_failure(span: &tracing::Span, attempt: &crate::run::Attempt) {
    if let Some(failure) = attempt.failure() {
        span.record("stepbox.failure_class", failure.kind.as_str());
        span.record("otel.status_code", "ERROR");
    }
}

/// Makes `span` a child of the span `parent` names (another process's).
pub fn set_parent(span: &tracing::Span, parent: &TraceParent) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let carrier = std::collections::HashMap::from([("traceparent".to_owned(), parent.0.clone())]);
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    // A span no exporter sees has no parent to set.
    let _ = span.set_parent(context);
}

/// The `traceparent` of `span`, when it is exported (else there is no
/// trace to continue).
/// Written from the span's ids directly (every attempt asks, so no
/// propagator and no map). A span the sampler left out has none: nothing
/// should hang beneath a span no collector gets.
pub fn traceparent(span: &tracing::Span) -> Option<TraceParent> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    let otel = context.span();
    let ids = otel.span_context();
    (ids.is_valid() && ids.is_sampled()).then(|| TraceParent(format!("00-{}-{}-01", ids.trace_id(), ids.span_id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_are_taken() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(
            TraceParent::parse(good).map(|p| p.trace_id().to_owned()).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version's first four fields; sampled whatever it says.
        let later = TraceParent::parse("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-what-comes-next");
        assert_eq!(later.map(String::from).as_deref(), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        // Read back from a task only if it is one.
        assert!(serde_json::from_str::<TraceParent>(r#""00-zz""#).is_err());
    }
}
