//! OTLP's protobuf, written straight from a span as it ends: the span
//! becomes the bytes of its `Span` message at once, and an export wraps
//! the bytes of many in a request whose resource and scope were written
//! once. OpenTelemetry's own exporter converts every span into owned
//! message structs (every name, key and value copied), groups them by
//! scope through a hash map, and encodes them: several times the
//! instructions, on a busy graph more than the step itself.
//!
//! Field numbers are those of `opentelemetry/proto/trace/v1/trace.proto`
//! and `common/v1/common.proto`; the tests decode what is written here with
//! the generated types and compare it with OpenTelemetry's own conversion.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Event, SpanContext, SpanId, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;

/// What every request of one process holds around its spans: its
/// resource and the scope its spans come from, encoded once.
#[derive(Debug)]
pub(super) struct Header {
    /// `ResourceSpans.resource`, and what follows its `scope_spans`
    /// (`.schema_url`).
    resource: (Vec<u8>, Vec<u8>),
    /// `ScopeSpans.scope`, and what follows its `spans` (`.schema_url`).
    scope: (Vec<u8>, Vec<u8>),
}

impl Header {
    pub(super) fn new(resource: &Resource, scope: &InstrumentationScope) -> Header {
        let mut about = Vec::new();
        message(&mut about, 1, 2, |body| {
            for (key, value) in resource.iter() {
                key_value(body, 1, key.as_str(), value);
            }
        });
        let mut resource_url = Vec::new();
        string(&mut resource_url, 3, resource.schema_url().unwrap_or_default());
        let mut named = Vec::new();
        message(&mut named, 1, 1, |body| {
            string(body, 1, scope.name());
            string(body, 2, scope.version().unwrap_or_default());
            attributes(body, 3, scope.attributes());
        });
        let mut scope_url = Vec::new();
        string(&mut scope_url, 3, scope.schema_url().unwrap_or_default());
        Header { resource: (about, resource_url), scope: (named, scope_url) }
    }

    /// The room a batch keeps before its spans and after them, for
    /// [`Header::wrap`] to write the request's head and tail in place.
    pub(super) fn room(&self) -> (usize, usize) {
        // Each length takes at most ten bytes as a varint.
        let head = 2 * (1 + 10) + self.resource.0.len() + self.scope.0.len();
        (head, self.scope.1.len() + self.resource.1.len())
    }

    /// An `ExportTraceServiceRequest` of the spans in `batch`: the bytes
    /// [`span`] wrote for each, after `self.room().0` bytes of room. The
    /// request is written around them, so a batch of spans is not copied
    /// to be sent, as long as the batch has `self.room().1` bytes of
    /// capacity left for the tail.
    pub(super) fn wrap(&self, mut batch: Vec<u8>) -> bytes::Bytes {
        let (room, _) = self.room();
        let (resource, resource_url) = &self.resource;
        let (scope, scope_url) = &self.scope;
        let scope_spans = scope.len() + (batch.len() - room) + scope_url.len();
        let resource_spans = resource.len() + field_len(scope_spans) + resource_url.len();
        let mut head = Vec::with_capacity(room);
        key(&mut head, 1, LEN);
        varint(&mut head, resource_spans as u64);
        head.extend_from_slice(resource);
        key(&mut head, 2, LEN);
        varint(&mut head, scope_spans as u64);
        head.extend_from_slice(scope);
        let start = room - head.len();
        batch[start..room].copy_from_slice(&head);
        batch.extend_from_slice(scope_url);
        batch.extend_from_slice(resource_url);
        bytes::Bytes::from(batch).slice(start..)
    }
}

/// A span as it ends: what [`span`] writes.
#[derive(Debug)]
pub(super) struct Ended<'a> {
    pub context: &'a SpanContext,
    /// The parent's span id (invalid for none), and whether the parent is
    /// another process's.
    pub parent: (SpanId, bool),
    pub name: &'a str,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Its attributes, as [`attribute`] and its kin wrote them.
    pub attributes: &'a [u8],
    pub dropped_attributes: u32,
    pub events: &'a [Event],
    pub dropped_events: u32,
    pub status: &'a Status,
}

/// Appends `span` to `out` as one of `ScopeSpans.spans`: a span of kind
/// internal, without links (stepbox makes no other).
pub(super) fn span(out: &mut Vec<u8>, span: &Ended) {
    const INTERNAL: u64 = 1;
    // Most spans take 128 bytes to 16 KiB: a length of two bytes.
    message(out, 2, 2, |body| {
        ids(body, span.context);
        let (parent, remote) = span.parent;
        if parent != SpanId::INVALID {
            bytes(body, 4, &parent.to_bytes());
        }
        string(body, 5, span.name);
        number(body, 6, INTERNAL);
        fixed64(body, 7, nanos(span.start));
        fixed64(body, 8, nanos(span.end));
        body.extend_from_slice(span.attributes);
        number(body, 10, span.dropped_attributes.into());
        for event in span.events {
            message(body, 11, 1, |body| {
                fixed64(body, 1, nanos(event.timestamp));
                string(body, 2, &event.name);
                attributes(body, 3, &event.attributes);
                number(body, 4, event.dropped_attributes_count.into());
            });
        }
        number(body, 12, span.dropped_events.into());
        // Written even when unset, as OpenTelemetry's conversion does.
        let (code, message): (u64, &str) = match span.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        let status = if message.is_empty() { 0 } else { field_len(message.len()) } + if code == 0 { 0 } else { 2 };
        key(body, 15, LEN);
        varint(body, status as u64);
        string(body, 2, message);
        number(body, 3, code);
        fixed32(body, 16, flags(span.context, remote));
    });
}

/// A span's trace id, span id and trace state (fields 1–3).
fn ids(out: &mut Vec<u8>, context: &SpanContext) {
    bytes(out, 1, &context.trace_id().to_bytes());
    bytes(out, 2, &context.span_id().to_bytes());
    if context.trace_state() != &TraceState::NONE {
        string(out, 3, &context.trace_state().header());
    }
}

/// The trace flags, and that whether the parent is remote is known.
fn flags(context: &SpanContext, remote: bool) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(context.trace_flags().to_u8()) | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

fn attributes<'a>(out: &mut Vec<u8>, field: u32, attributes: impl IntoIterator<Item = &'a KeyValue>) {
    for attribute in attributes {
        key_value(out, field, attribute.key.as_str(), &attribute.value);
    }
}

/// A span's attribute (one of `Span.attributes`), written when it is
/// given, for [`span`] to copy as it is.
pub(super) fn attribute(out: &mut Vec<u8>, name: &str, value: &Value) {
    key_value(out, 9, name, value);
}

/// A span's text attribute, written without making it a [`Value`].
pub(super) fn text_attribute(out: &mut Vec<u8>, name: &str, value: &str) {
    key_value_with(out, 9, name, field_len(value.len()), |out| always_string(out, 1, value));
}

/// A span's whole-number attribute.
pub(super) fn int_attribute(out: &mut Vec<u8>, name: &str, value: i64) {
    key_value_with(out, 9, name, 1 + varint_len(value as u64), |out| int_value(out, value));
}

/// A `KeyValue`, its lengths reckoned before it is written: attributes
/// are most of a span, and moving each into place would cost more than
/// writing it.
#[inline]
fn key_value(out: &mut Vec<u8>, field: u32, name: &str, value: &Value) {
    key_value_with(out, field, name, any_value_len(value), |out| any_value(out, value));
}

/// A `KeyValue` whose `AnyValue` takes `any` bytes, as `value` writes it.
#[inline]
fn key_value_with(out: &mut Vec<u8>, field: u32, name: &str, any: usize, value: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    varint(out, (field_len(name.len()) + field_len(any)) as u64);
    always_string(out, 1, name);
    key(out, 2, LEN);
    varint(out, any as u64);
    value(out);
}

/// The one field of an `AnyValue` its value sets (written even when it is
/// the default: it says which kind the value is).
#[inline]
fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(value) => bool_value(out, *value),
        Value::I64(value) => int_value(out, *value),
        Value::F64(value) => double_value(out, *value),
        Value::String(value) => always_string(out, 1, value.as_str()),
        Value::Array(array) => message(out, 5, 1, |body| {
            let mut each = |value: Value| {
                key(body, 1, LEN);
                varint(body, any_value_len(&value) as u64);
                any_value(body, &value);
            };
            match array {
                Array::Bool(values) => values.iter().for_each(|value| each(Value::Bool(*value))),
                Array::I64(values) => values.iter().for_each(|value| each(Value::I64(*value))),
                Array::F64(values) => values.iter().for_each(|value| each(Value::F64(*value))),
                Array::String(values) => values.iter().for_each(|value| each(Value::String(value.clone()))),
                // A kind of array a later API adds: as text.
                other => each(Value::String(other.to_string().into())),
            }
        }),
        // A kind of value a later API adds: as text.
        other => always_string(out, 1, &other.as_str()),
    }
}

/// How long [`any_value`] writes `value`.
#[inline]
fn any_value_len(value: &Value) -> usize {
    match value {
        Value::Bool(_) => 2,
        Value::I64(value) => 1 + varint_len(*value as u64),
        Value::F64(_) => 9,
        Value::String(value) => field_len(value.as_str().len()),
        Value::Array(_) => {
            let mut written = Vec::new();
            any_value(&mut written, value);
            written.len()
        }
        other => field_len(other.as_str().len()),
    }
}

#[inline]
fn bool_value(out: &mut Vec<u8>, value: bool) {
    key(out, 2, VARINT);
    varint(out, u64::from(value));
}

#[inline]
fn int_value(out: &mut Vec<u8>, value: i64) {
    key(out, 3, VARINT);
    // int64 is written as its two's complement.
    varint(out, value as u64);
}

#[inline]
fn double_value(out: &mut Vec<u8>, value: f64) {
    key(out, 4, I64);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A message field: its key, then its length, then what `body` writes.
/// `guess` bytes are kept for the length; the body is moved only when its
/// length takes more or fewer.
fn message(out: &mut Vec<u8>, field: u32, guess: usize, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let at = out.len();
    out.resize(at + guess, 0);
    body(out);
    let len = out.len() - at - guess;
    let prefix = varint_len(len as u64);
    if prefix > guess {
        out.resize(at + prefix + len, 0);
    }
    if prefix != guess {
        out.copy_within(at + guess..at + guess + len, at + prefix);
        out.truncate(at + prefix + len);
    }
    let mut len = len as u64;
    for byte in &mut out[at..at + prefix] {
        *byte = len as u8 & 0x7f | if len >= 0x80 { 0x80 } else { 0 };
        len >>= 7;
    }
}

/// A string field, left out when empty (proto3's default).
#[inline]
fn string(out: &mut Vec<u8>, field: u32, value: &str) {
    if !value.is_empty() {
        always_string(out, field, value);
    }
}

#[inline]
fn always_string(out: &mut Vec<u8>, field: u32, value: &str) {
    bytes(out, field, value.as_bytes());
}

/// A bytes field, written whatever it holds.
#[inline]
fn bytes(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    key(out, field, LEN);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// A varint field, left out when zero.
#[inline]
fn number(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        key(out, field, VARINT);
        varint(out, value);
    }
}

/// A fixed64 field, left out when zero.
#[inline]
fn fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        key(out, field, I64);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// A fixed32 field, left out when zero.
#[inline]
fn fixed32(out: &mut Vec<u8>, field: u32, value: u32) {
    if value != 0 {
        key(out, field, I32);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// Wire types.
const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

#[inline]
fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

#[inline]
fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[inline]
fn varint_len(value: u64) -> usize {
    // Seven bits a byte; zero takes one.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// How long a length-delimited field of `len` bytes is, numbered below 16
/// (a key of one byte).
#[inline]
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{SpanKind, TraceFlags, TraceId};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use prost::Message as _;

    use super::*;

    fn context(trace: u128, span: u64, flags: TraceFlags, state: &str) -> SpanContext {
        SpanContext::new(TraceId::from(trace), SpanId::from(span), flags, false, state.parse().unwrap())
    }

    /// Every kind of value, the empty ones, and one long enough that its
    /// length takes three bytes.
    fn every_value() -> Vec<KeyValue> {
        vec![
            KeyValue::new("bool", false),
            KeyValue::new("int", -7_i64),
            KeyValue::new("zero", 0_i64),
            KeyValue::new("float", 2.5),
            KeyValue::new("empty", ""),
            KeyValue::new("long", "x".repeat(20_000)),
            KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("ints", Value::Array(Array::I64(vec![1, i64::MIN]))),
            KeyValue::new("floats", Value::Array(Array::F64(vec![-0.5]))),
            KeyValue::new("texts", Value::Array(Array::String(vec!["a".into(), "".into()]))),
            KeyValue::new("none", Value::Array(Array::String(vec![]))),
        ]
    }

    /// Spans as stepbox ends them: a root with every kind of value, one
    /// beneath another process's span with events, dropped counts, a trace
    /// state, a long name and an error, and one that ended well and was not
    /// sampled, short enough for a length of one byte.
    fn spans(scope: &InstrumentationScope) -> Vec<SpanData> {
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let mut events = SpanEvents::default();
        events.events = vec![
            Event::new("retry", start + Duration::from_millis(1), vec![KeyValue::new("stepbox.delay_ms", 100)], 0),
            Event::new("quiet", start, vec![], 3),
        ];
        events.dropped_count = 2;
        let root = SpanData {
            span_context: context(0xabc, 1, TraceFlags::SAMPLED, ""),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed("run"),
            start_time: start,
            end_time: start + Duration::from_secs(2),
            attributes: every_value(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        };
        let beneath_remote = SpanData {
            span_context: context(0xabc, 2, TraceFlags::SAMPLED, "a=b,c=d"),
            parent_span_id: SpanId::from(77),
            parent_span_is_remote: true,
            name: Cow::Owned("n".repeat(300)),
            dropped_attributes_count: 5,
            events,
            status: Status::error("trap"),
            ..root.clone()
        };
        let ok = SpanData {
            span_context: context(0xdef, 3, TraceFlags::default(), ""),
            parent_span_id: SpanId::from(1),
            name: Cow::Borrowed("ok"),
            attributes: vec![],
            status: Status::Ok,
            // Before the epoch: written as 0, as OpenTelemetry does.
            start_time: UNIX_EPOCH - Duration::from_secs(1),
            ..root.clone()
        };
        vec![root, beneath_remote, ok]
    }

    #[test]
    fn what_is_written_decodes_as_opentelemetrys_own_conversion() {
        let resource = Resource::builder_empty()
            .with_schema_url([KeyValue::new("service.name", "stepbox"), KeyValue::new("n", 3)], "https://schema/1")
            .build();
        let scope = InstrumentationScope::builder("stepbox")
            .with_version("1.2")
            .with_attributes([KeyValue::new("a", true)])
            .with_schema_url("https://schema/2")
            .build();
        let spans = spans(&scope);
        let header = Header::new(&resource, &scope);
        let mut written = vec![0; header.room().0];
        for data in &spans {
            let mut attributes = Vec::new();
            for (i, kv) in data.attributes.iter().enumerate() {
                // Each way an attribute is written.
                let name = kv.key.as_str();
                match &kv.value {
                    Value::String(text) if i % 2 == 0 => text_attribute(&mut attributes, name, text.as_str()),
                    Value::I64(n) => int_attribute(&mut attributes, name, *n),
                    value => attribute(&mut attributes, name, value),
                }
            }
            let ended = Ended {
                context: &data.span_context,
                parent: (data.parent_span_id, data.parent_span_is_remote),
                name: &data.name,
                start: data.start_time,
                end: data.end_time,
                attributes: &attributes,
                dropped_attributes: data.dropped_attributes_count,
                events: &data.events.events,
                dropped_events: data.events.dropped_count,
                status: &data.status,
            };
            span(&mut written, &ended);
        }
        let request = header.wrap(written);
        let ours = ExportTraceServiceRequest::decode(&request[..]).expect("a request that decodes");
        let theirs =
            ExportTraceServiceRequest { resource_spans: group_spans_by_resource_and_scope(spans, &(&resource).into()) };
        assert_eq!(ours, theirs);
        // And byte for byte what prost writes of the same message.
        assert_eq!(request, theirs.encode_to_vec());
    }
}
