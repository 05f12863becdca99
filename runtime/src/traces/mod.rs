//! Traces in OpenTelemetry, exported over OTLP (HTTP, protobuf) when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set:
//! one trace per run, with a span for the run, each step and each attempt
//! (tenant, component digest, fuel, peak memory, failure class) and events
//! for retries and capability denials. `OTEL_SERVICE_NAME` names the
//! process (`stepbox` unless set), `OTEL_RESOURCE_ATTRIBUTES` and
//! `OTEL_TRACES_SAMPLER` apply as OpenTelemetry reads them, and the
//! exporter reads the `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables it
//! can honour ([`exporter::Settings`]).
//!
//! stepbox makes its spans itself ([`Span`]) and writes each in OTLP's
//! protobuf the moment it ends ([`otlp`]), for a thread of its own to send
//! ([`exporter`]). OpenTelemetry's SDK is used for what must agree with
//! other OpenTelemetry processes (the sampler, trace and span ids, span
//! limits, the resource, all as the standard variables configure them),
//! not for the spans: a no-op step makes two, and the SDK's span objects,
//! its batch processor and its exporter's conversion cost several times
//! what the step itself does (BENCHMARKS.md, "Watching a run"). `tracing`
//! is the process's log. While nothing is exported, a span is one read of
//! a lock.

mod exporter;
mod otlp;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceState,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Config, SamplingDecision};

/// How long the spans left at the end may take to go out.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What spans are made with, while they are exported ([`export`]).
static TRACER: parking_lot::RwLock<Option<&'static Tracer>> = parking_lot::RwLock::new(None);

/// The sampler, ids and limits OpenTelemetry's environment configures, and
/// the queue ended spans go to. Each export's is leaked: a process exports
/// once or a few times, and its spans (children made after the export ended
/// among them) reach it without counting references, which every runtime
/// thread would write for every span.
#[derive(Debug)]
struct Tracer {
    config: Config,
    queue: exporter::Queue,
}

/// Spans are exported while this lives; dropped, it stops making them and
/// exports what is left.
pub struct Exporting {
    tracer: &'static Tracer,
}

impl Drop for Exporting {
    fn drop(&mut self) {
        TRACER.write().take();
        if let Err(err) = self.tracer.queue.shutdown(SHUTDOWN_TIMEOUT) {
            eprintln!("warning: not every trace was exported: {err}");
        }
    }
}

/// Starts exporting spans: to `endpoint` (an OTLP/HTTP base address) when
/// given, else as the environment says; `None` when neither names an
/// endpoint. One export at a time per process.
pub fn export(endpoint: Option<&str>) -> Result<Option<Exporting>, String> {
    let Some(settings) = exporter::Settings::read(endpoint)? else { return Ok(None) };
    let mut current = TRACER.write();
    if current.is_some() {
        return Err("traces are exported already: end that export first".into());
    }
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("stepbox");
    }
    let header = otlp::Header::new(&resource.build(), &InstrumentationScope::builder("stepbox").build());
    let tracer: &'static Tracer =
        Box::leak(Box::new(Tracer { config: Config::default(), queue: exporter::Queue::start(settings, header)? }));
    *current = Some(tracer);
    Ok(Some(Exporting { tracer }))
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
    tracer: &'static Tracer,
    /// Its ids, and whether the sampler kept it.
    context: SpanContext,
    /// Its parent's span id (invalid for none), and whether the parent is
    /// another process's.
    parent: (SpanId, bool),
    name: &'static str,
    start: SystemTime,
    /// What it has recorded; kept only when sampled.
    recorded: parking_lot::Mutex<Recorded>,
    /// Its `traceparent`, when sampled; written out the first time it is
    /// read (by a step, or for its outgoing requests), as most are not.
    traceparent: OnceLock<Option<TraceParent>>,
}

#[derive(Debug, Default)]
struct Recorded {
    /// Its attributes, written as OTLP's `Span.attributes` as they come.
    attributes: Vec<u8>,
    /// How many `attributes` holds, and how many more the span limits
    /// dropped.
    kept_attributes: u32,
    dropped_attributes: u32,
    events: Vec<Event>,
    dropped_events: u32,
    status: Status,
}

/// The longest text a span keeps in one value. What tenants and steps
/// choose lands in spans (a step's path, the host of a request its grants
/// refuse), and an open span holds it in the host's memory, up to the span
/// limits' 128 attributes and 128 events.
const MAX_TEXT: usize = 1024;

/// `text` cut to [`MAX_TEXT`] bytes.
fn clipped(text: &str) -> &str {
    &text[..text.floor_char_boundary(MAX_TEXT)]
}

/// Cuts the text values of `attributes` to [`MAX_TEXT`] bytes.
fn clip(attributes: &mut [KeyValue]) {
    for attribute in attributes {
        if let Value::String(text) = &attribute.value
            && text.as_str().len() > MAX_TEXT
        {
            attribute.value = Value::from(clipped(text.as_str()).to_owned());
        }
    }
}

/// What a span is given as attributes: each is written as OTLP's bytes
/// at once, so no text is copied into owned values to be encoded when the
/// span ends. Past the span limits' count they are counted, not kept.
pub struct Attributes<'a> {
    recorded: &'a mut Recorded,
    limit: u32,
}

impl Attributes<'_> {
    /// A text attribute, cut to 1 KiB.
    pub fn text(&mut self, name: &str, value: &str) -> &mut Self {
        self.add(|out| otlp::text_attribute(out, name, clipped(value)))
    }

    /// A whole-number attribute.
    pub fn int(&mut self, name: &str, value: i64) -> &mut Self {
        self.add(|out| otlp::int_attribute(out, name, value))
    }

    /// Attributes OpenTelemetry made: a sampler may add them (none of
    /// those its environment chooses does yet).
    fn values(&mut self, attributes: &mut [KeyValue]) {
        clip(attributes);
        for attribute in attributes.iter() {
            self.add(|out| otlp::attribute(out, attribute.key.as_str(), &attribute.value));
        }
    }

    fn add(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        let recorded = &mut *self.recorded;
        if recorded.kept_attributes < self.limit {
            if recorded.attributes.capacity() == 0 {
                // Room for a span's usual attributes at once, not grown
                // (and copied) by a few bytes at a time.
                recorded.attributes.reserve(256);
            }
            write(&mut recorded.attributes);
            recorded.kept_attributes += 1;
        } else {
            recorded.dropped_attributes = recorded.dropped_attributes.saturating_add(1);
        }
        self
    }
}

impl Recorded {
    /// Attributes for `attributes` to write, within `limit` in all.
    fn attributes(&mut self, limit: u32) -> Attributes<'_> {
        Attributes { recorded: self, limit }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if !self.context.is_sampled() {
            return;
        }
        let recorded = self.recorded.get_mut();
        let ended = otlp::Ended {
            context: &self.context,
            parent: self.parent,
            name: self.name,
            start: self.start,
            end: SystemTime::now(),
            attributes: &recorded.attributes,
            dropped_attributes: recorded.dropped_attributes,
            events: &recorded.events,
            dropped_events: recorded.dropped_events,
            status: &recorded.status,
        };
        self.tracer.queue.push(|out| otlp::span(out, &ended));
    }
}

impl Span {
    /// A span with no parent in this process: a run's (beneath `parent`,
    /// another process's span or an earlier drive's, when given).
    /// `attributes` are written only when the span is sampled.
    pub fn root(name: &'static str, parent: Option<&TraceParent>, attributes: impl FnOnce(&mut Attributes)) -> Span {
        let Some(tracer) = *TRACER.read() else { return Span::default() };
        Span::open(tracer, name, parent.map(TraceParent::span_context).as_ref(), attributes)
    }

    /// A span beneath this one; none when this one is not traced here.
    pub fn child(&self, name: &'static str, attributes: impl FnOnce(&mut Attributes)) -> Span {
        match &self.0 {
            Place::None => Span::default(),
            Place::Remote(parent) => Span::root(name, Some(parent), attributes),
            Place::Open(open) => Span::open(open.tracer, name, Some(&open.context), attributes),
        }
    }

    /// Another process's span, to hang this process's work beneath.
    pub fn remote(parent: TraceParent) -> Span {
        Span(Place::Remote(parent))
    }

    /// A span beneath `parent`: another process's (or none), sampled as
    /// OpenTelemetry's sampler decides, or one of this process's, sampled
    /// as it was. Every sampler OpenTelemetry's environment can choose
    /// decides a child as its parent within a process (the parent-based
    /// ones by the parent, the trace-id ratio by the trace id they share,
    /// always on and off alike), so the sampler is asked once a run.
    fn open(
        tracer: &'static Tracer,
        name: &'static str,
        parent: Option<&SpanContext>,
        attributes: impl FnOnce(&mut Attributes),
    ) -> Span {
        let config = &tracer.config;
        let mut recorded = Recorded::default();
        let limit = config.span_limits.max_attributes_per_span;
        let (trace_id, flags, trace_state) = match parent {
            Some(parent) if !parent.is_remote() => {
                if parent.is_sampled() {
                    attributes(&mut recorded.attributes(limit));
                }
                (parent.trace_id(), parent.trace_flags(), parent.trace_state().clone())
            }
            _ => {
                let trace_id = parent.map_or_else(|| config.id_generator.new_trace_id(), SpanContext::trace_id);
                let parent = parent.map(|parent| Context::new().with_remote_span_context(parent.clone()));
                // No sampler OpenTelemetry's environment can choose reads
                // the attributes, so they are written only once sampled.
                let mut sampled =
                    config.sampler.should_sample(parent.as_ref(), trace_id, name, &SpanKind::Internal, &[], &[]);
                let flags = match sampled.decision {
                    SamplingDecision::RecordAndSample => {
                        let mut kept = recorded.attributes(limit);
                        attributes(&mut kept);
                        kept.values(&mut sampled.attributes);
                        TraceFlags::SAMPLED
                    }
                    // Recorded only to be sampled: nothing else reads a span.
                    SamplingDecision::RecordOnly | SamplingDecision::Drop => TraceFlags::default(),
                };
                (trace_id, flags, sampled.trace_state)
            }
        };
        let context = SpanContext::new(trace_id, config.id_generator.new_span_id(), flags, false, trace_state);
        let parent = parent.map_or((SpanId::INVALID, false), |parent| (parent.span_id(), parent.is_remote()));
        Span(Place::Open(Arc::new(Open {
            tracer,
            context,
            parent,
            name,
            start: SystemTime::now(),
            recorded: parking_lot::Mutex::new(recorded),
            traceparent: OnceLock::new(),
        })))
    }

    /// What the span records, while it is sampled.
    fn recording(&self) -> Option<(&Open, parking_lot::MutexGuard<'_, Recorded>)> {
        match &self.0 {
            Place::Open(open) if open.context.is_sampled() => Some((open, open.recorded.lock())),
            _ => None,
        }
    }

    /// Sets attributes on the span, written only when it is sampled.
    pub fn record(&self, attributes: impl FnOnce(&mut Attributes)) {
        if let Some((open, mut recorded)) = self.recording() {
            attributes(&mut recorded.attributes(open.tracer.config.span_limits.max_attributes_per_span));
        }
    }

    /// Adds an event, its attributes built only when the span is sampled.
    /// A span keeps as many as OpenTelemetry's span limits allow (a step
    /// can make an event of every request it is refused) and counts the
    /// rest.
    pub fn event(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some((open, mut recorded)) = self.recording() {
            let limits = &open.tracer.config.span_limits;
            if recorded.events.len() < limits.max_events_per_span as usize {
                let mut attributes = attributes();
                let dropped = attributes.len().saturating_sub(limits.max_attributes_per_event as usize);
                attributes.truncate(limits.max_attributes_per_event as usize);
                clip(&mut attributes);
                let dropped = u32::try_from(dropped).unwrap_or(u32::MAX);
                recorded.events.push(Event::new(name, SystemTime::now(), attributes, dropped));
            } else {
                recorded.dropped_events = recorded.dropped_events.saturating_add(1);
            }
        }
    }

    /// Marks an attempt's span with its failure class and an error status,
    /// when it failed.
    pub fn record_failure(&self, attempt: &crate::run::Attempt) {
        if let Some(failure) = attempt.failure()
            && let Some((open, mut recorded)) = self.recording()
        {
            let limit = open.tracer.config.span_limits.max_attributes_per_span;
            recorded.attributes(limit).text("stepbox.failure_class", failure.kind.as_str());
            recorded.status = Status::error(failure.kind.as_str());
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
                    let ids = &open.context;
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
