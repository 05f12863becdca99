//! Traces in OpenTelemetry, exported over OTLP (HTTP, protobuf) when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set:
//! one trace per run, with a span for the run, each step and each attempt
//! (tenant, component digest, fuel, peak memory, failure class) and events
//! for retries and capability denials. `OTEL_SERVICE_NAME` names the
//! process (`stepbox` unless set), and the other `OTEL_EXPORTER_OTLP_*` and
//! `OTEL_TRACES_SAMPLER` variables apply as OpenTelemetry reads them.
//!
//! The scheduler makes OpenTelemetry spans itself ([`Span`]) rather than
//! through `tracing` and a bridge: a no-op step makes two spans, and the
//! bridge's per-span bookkeeping (a registry slot, attribute formatting,
//! a lock and a clock read on every poll) cost several times what the
//! spans do. `tracing` stays the process's log. While nothing is exported,
//! a span is one read of a lock.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::{
    SpanContext, Status, TraceContextExt as _, TraceFlags, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The tracer spans are made with, while they are exported ([`export`]).
static TRACER: parking_lot::RwLock<Option<SdkTracer>> = parking_lot::RwLock::new(None);

/// Spans are exported while this lives; dropped, it stops making them and
/// exports what is left.
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Drop for Exporting {
    fn drop(&mut self) {
        TRACER.write().take();
        if let Err(err) = self.provider.shutdown_with_timeout(EXPORT_TIMEOUT) {
            eprintln!("warning: not every trace was exported: {err}");
        }
    }
}

/// Starts exporting spans: to `endpoint` (an OTLP/HTTP base address) when
/// given, else as the environment says; `None` when neither names an
/// endpoint. One export at a time per process.
pub fn export(endpoint: Option<&str>) -> Result<Option<Exporting>, String> {
    let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()));
    if !configured && endpoint.is_none() {
        return Ok(None);
    }
    let mut tracer = TRACER.write();
    if tracer.is_some() {
        return Err("traces are exported already: end that export first".into());
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
    *tracer = Some(provider.tracer("stepbox"));
    Ok(Some(Exporting { provider }))
}

/// A span of a run, a step or an attempt, while traces are exported;
/// nothing otherwise. Clones share it: it ends when the last goes (an
/// attempt's span when the scheduler and the attempt's host are both done
/// with it).
#[derive(Debug, Clone, Default)]
pub struct Span(Place);

#[derive(Debug, Clone, Default)]
enum Place {
    /// Not traced.
    #[default]
    None,
    /// A span of another process (the coordinator's attempt, on a worker
    /// that does not export): what hangs beneath it names it, and events
    /// go nowhere.
    Remote(TraceParent),
    /// A span of this process.
    Open(Arc<Open>),
}

#[derive(Debug)]
struct Open {
    /// Holds the span: how OpenTelemetry makes a child of it.
    context: Context,
    /// Its `traceparent`, when sampled; written out the first time it is
    /// read (by a step, or for its outgoing requests), as most are not.
    traceparent: std::sync::OnceLock<Option<TraceParent>>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.context.span().end();
    }
}

impl Span {
    /// A span with no parent in this process: a run's (beneath `parent`,
    /// another process's span or an earlier drive's, when given).
    /// `attributes` are built only when the span is exported.
    pub fn root(name: &'static str, parent: Option<&TraceParent>, attributes: impl FnOnce() -> Vec<KeyValue>) -> Span {
        let parent = match parent {
            Some(parent) => Context::new().with_remote_span_context(parent.span_context()),
            None => Context::new(),
        };
        Span::open(name, &parent, attributes)
    }

    /// A span beneath this one; none when this one is not traced here.
    pub fn child(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) -> Span {
        match &self.0 {
            Place::None => Span::default(),
            Place::Remote(parent) => Span::root(name, Some(parent), attributes),
            Place::Open(open) => Span::open(name, &open.context, attributes),
        }
    }

    /// Another process's span, to hang this process's work beneath.
    pub fn remote(parent: TraceParent) -> Span {
        Span(Place::Remote(parent))
    }

    fn open(name: &'static str, parent: &Context, attributes: impl FnOnce() -> Vec<KeyValue>) -> Span {
        let Some(tracer) = TRACER.read().clone() else { return Span::default() };
        let span = tracer.build_with_context(tracer.span_builder(name).with_attributes(attributes()), parent);
        let context = Context::new().with_span(span);
        Span(Place::Open(Arc::new(Open { context, traceparent: std::sync::OnceLock::new() })))
    }

    /// Sets attributes on the span, built only when it is exported.
    pub fn record(&self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Place::Open(open) = &self.0 {
            open.context.span().set_attributes(attributes());
        }
    }

    /// Adds an event, its attributes built only when the span is exported.
    pub fn event(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Place::Open(open) = &self.0 {
            open.context.span().add_event(name, attributes());
        }
    }

    /// Marks an attempt's span with its failure class and an error status,
    /// when it failed.
    pub fn record_failure(&self, attempt: &crate::run::Attempt) {
        if let (Place::Open(open), Some(failure)) = (&self.0, attempt.failure()) {
            let span = open.context.span();
            span.set_attribute(KeyValue::new("stepbox.failure_class", failure.kind.as_str()));
            span.set_status(Status::error(failure.kind.as_str()));
        }
    }

    /// The span as a `traceparent`: what a step reads and its outgoing
    /// requests carry. None when it is not traced, or the sampler left it
    /// out (nothing should hang beneath a span no collector gets).
    pub fn traceparent(&self) -> Option<&TraceParent> {
        match &self.0 {
            Place::None => None,
            Place::Remote(parent) => Some(parent),
            Place::Open(open) => open
                .traceparent
                .get_or_init(|| {
                    let span = open.context.span();
                    let ids = span.span_context();
                    ids.is_sampled().then(|| TraceParent(format!("00-{}-{}-01", ids.trace_id(), ids.span_id())))
                })
                .as_ref(),
        }
    }
}

/// A count as an attribute value (OpenTelemetry's integers are signed).
pub fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
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

    /// The span it names, as another process's.
    fn span_context(&self) -> SpanContext {
        use opentelemetry::trace::{SpanId, TraceId};
        // Checked as hex when made.
        let trace = TraceId::from_hex(self.trace_id()).unwrap_or(TraceId::INVALID);
        let span = SpanId::from_hex(&self.0[36..52]).unwrap_or(SpanId::INVALID);
        SpanContext::new(trace, span, TraceFlags::SAMPLED, true, TraceState::default())
    }
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
