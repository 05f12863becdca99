//! Sends ended spans to an OTLP/HTTP collector: the settings the standard
//! environment gives, a bounded queue of spans already encoded
//! ([`super::otlp`]), and a thread of its own that posts them in batches.
//!
//! This stands where OpenTelemetry's batch processor and OTLP exporter
//! would, and reads the same variables: a span encoded the moment it ends,
//! into bytes that go out as they are, costs a fraction of one handed to
//! another thread to be converted and encoded there.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::otlp;

/// How long an export may take when `OTEL_EXPORTER_OTLP_TIMEOUT` does not say.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a batch the collector could not take now (it was away,
/// or answered 429, 502, 503 or 504) is sent again, the first after
/// [`FIRST_RETRY`] and each later after twice as long, within the
/// export's timeout.
const RETRIES: u32 = 3;
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The longest `Retry-After` believed, in seconds (as opentelemetry-otlp).
const MAX_RETRY_AFTER: u64 = 600;

/// How much of a collector's answer is read.
const MAX_ANSWER: usize = 64 << 10;

/// Where and how spans are sent: what the standard `OTEL_EXPORTER_OTLP_*`
/// and `OTEL_BSP_*` variables say, each checked.
#[derive(Debug)]
pub(super) struct Settings {
    /// The traces address itself (`…/v1/traces`).
    endpoint: reqwest::Url,
    headers: HeaderMap,
    timeout: Duration,
    /// How long a batch that is not full waits for more spans.
    delay: Duration,
    /// How many spans may wait; more are dropped, and that is said.
    queue: usize,
    /// How many spans one request carries at most.
    batch: usize,
}

impl Settings {
    /// The settings to export to `endpoint` (an OTLP/HTTP base address)
    /// when given, else to where the environment says; `None` when neither
    /// names an endpoint. A variable that is set but cannot be used is an
    /// error that names it.
    pub(super) fn read(endpoint: Option<&str>) -> Result<Option<Settings>, String> {
        let base = |base: &str| format!("{}/v1/traces", base.trim_end_matches('/'));
        let (endpoint, from) =
            match (endpoint, var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?, var("OTEL_EXPORTER_OTLP_ENDPOINT")?) {
                (Some(endpoint), _, _) => (base(endpoint), "the endpoint"),
                (None, Some(traces), _) => (traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
                (None, None, Some(endpoint)) => (base(&endpoint), "OTEL_EXPORTER_OTLP_ENDPOINT"),
                (None, None, None) => return Ok(None),
            };
        let endpoint =
            reqwest::Url::parse(&endpoint).ok().filter(|url| matches!(url.scheme(), "http" | "https")).ok_or_else(
                || format!("cannot export traces to `{endpoint}`: give {from} an http:// or https:// address"),
            )?;
        for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(protocol) = var(name)?.filter(|protocol| !protocol.trim().eq_ignore_ascii_case("http/protobuf"))
            {
                return Err(format!(
                    "{name} is `{protocol}`, but stepbox exports traces over OTLP/HTTP in protobuf only: set it to http/protobuf, or unset it"
                ));
            }
        }
        for name in ["OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"] {
            if let Some(compression) = var(name)?.filter(|compression| !compression.trim().eq_ignore_ascii_case("none"))
            {
                return Err(format!(
                    "{name} is `{compression}`, but stepbox sends traces uncompressed: set it to none, or unset it"
                ));
            }
        }
        // The traces' own headers, when set, replace the general ones
        // whole (a general credential does not go to a traces collector
        // set apart), as opentelemetry-otlp does.
        let mut headers = HeaderMap::new();
        for name in ["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"] {
            if let Some(list) = var(name)? {
                headers = parse_headers(&list).map_err(|why| format!("{name}: {why}"))?;
                break;
            }
        }
        let timeout = match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")? {
            Some(_) => millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", DEFAULT_TIMEOUT)?,
            None => millis("OTEL_EXPORTER_OTLP_TIMEOUT", DEFAULT_TIMEOUT)?,
        };
        let queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?;
        Ok(Some(Settings {
            endpoint,
            headers,
            timeout,
            delay: millis("OTEL_BSP_SCHEDULE_DELAY", Duration::from_secs(5))?,
            queue,
            batch: count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.min(queue),
        }))
    }
}

/// An environment variable's value, `None` when unset or blank.
fn var(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

/// A number the variable `name` gives, at least 1; `default` when unset.
fn count(name: &str, default: usize) -> Result<usize, String> {
    Ok(positive(name, "a whole number")?.map_or(default, |n| usize::try_from(n).unwrap_or(usize::MAX)))
}

/// A duration the variable `name` gives in milliseconds, at least 1;
/// `default` when unset.
fn millis(name: &str, default: Duration) -> Result<Duration, String> {
    Ok(positive(name, "a whole number of milliseconds")?.map_or(default, Duration::from_millis))
}

/// The whole number above 0 the variable `name` gives (`what` says what
/// it is to a user who gave something else); `None` when unset.
fn positive(name: &str, what: &str) -> Result<Option<u64>, String> {
    var(name)?
        .map(|value| {
            value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{name} is `{value}`: give {what} above 0"))
        })
        .transpose()
}

/// `key=value,key=value`, each value percent-decoded, as the
/// OpenTelemetry specification writes headers in the environment.
fn parse_headers(list: &str) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for pair in list.split(',').map(str::trim).filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not `name=value`"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("`{}` is not an HTTP header name", name.trim()))?;
        let value = percent_encoding::percent_decode_str(value.trim())
            .decode_utf8()
            .ok()
            .and_then(|value| HeaderValue::from_str(&value).ok())
            .ok_or_else(|| {
                format!("the value of `{name}` is not a header value (percent-encode what is not plain text)")
            })?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Ended spans, encoded, waiting for the exporting thread, which posts a
/// batch when it is full, when it has waited `OTEL_BSP_SCHEDULE_DELAY`,
/// and at shutdown.
#[derive(Debug)]
pub(super) struct Queue {
    shared: Arc<Shared>,
    queue: usize,
    batch: usize,
}

#[derive(Debug)]
struct Shared {
    waiting: Mutex<Waiting>,
    /// Wakes the exporting thread: a batch is full, or it is to stop.
    work: Condvar,
    /// Wakes whoever waits for the thread to stop.
    stopped: Condvar,
}

#[derive(Debug, Default)]
struct Waiting {
    /// Spans waiting, encoded, in batches of at most `batch`.
    batches: VecDeque<Batch>,
    /// How many spans `batches` holds.
    spans: usize,
    /// How many bytes `batches` holds, room included: what
    /// [`MAX_WAITING_BYTES`] bounds.
    bytes: usize,
    /// The room each batch keeps before and after its spans for the
    /// request's head and tail ([`otlp::Header::room`]).
    around: (usize, usize),
    /// How many bytes of spans the last batch sent held: the room a new
    /// batch starts with when none waits (one that follows another starts
    /// with as much as that one holds), so a batch seldom grows, and is
    /// copied, as it fills.
    expect: usize,
    /// Spans dropped because `queue` spans or [`MAX_WAITING_BYTES`]
    /// were waiting, not yet said.
    dropped: u64,
    /// When to give up on what is left, once shutting down.
    stopping: Option<Instant>,
    stopped: bool,
}

/// Bytes of encoded spans that may wait, whatever `OTEL_BSP_MAX_QUEUE_SIZE`
/// allows: a span can carry text a step chose (the host of a request it
/// was refused), so a count of spans alone does not bound memory. What
/// counts is what the batches have allocated, room not yet filled
/// included.
const MAX_WAITING_BYTES: usize = 64 << 20;

/// Bytes of spans one request carries at most (collectors refuse larger
/// bodies: OpenTelemetry's own takes up to 20 MiB).
const MAX_BATCH_BYTES: usize = 4 << 20;

/// The room a thread's scratch buffer keeps between spans.
const MAX_SCRATCH: usize = 64 << 10;

impl Waiting {
    /// Nothing waiting yet; each batch keeps `around` bytes of room before
    /// and after its spans.
    fn new(around: (usize, usize)) -> Waiting {
        Waiting { around, ..Waiting::default() }
    }

    /// Queues one encoded span, unless `queue` spans wait already, the
    /// room it takes would take the queue past [`MAX_WAITING_BYTES`], or
    /// the queue is shutting down; true when a batch became ready to send.
    fn add(&mut self, span: &[u8], queue: usize, batch: usize) -> bool {
        if self.stopping.is_some() {
            return false;
        }
        let (head, tail) = self.around;
        let full = |last: &Batch| last.spans >= batch || last.bytes.len() - head + span.len() > MAX_BATCH_BYTES;
        let started = self.batches.back().is_none_or(full);
        if started {
            self.close_last();
        }
        // The room the span takes (a new batch's, or more of the last
        // one's): as much as is expected when the bound allows it, else
        // only what the span needs.
        let (had, wants, needs) = match self.batches.back() {
            Some(last) if !started => {
                let (had, needs) = (last.bytes.capacity(), last.bytes.len() + span.len() + tail);
                let doubled = (2 * had).min(head + MAX_BATCH_BYTES + tail);
                (had, if needs <= had { had } else { needs.max(doubled) }, needs.max(had))
            }
            // A batch that follows another expects as much as that one
            // holds, a first as much as the last one sent held, and a
            // quarter more, as spans differ in size.
            last => {
                let expect = last.map_or(self.expect, |last| last.bytes.len() - head).min(MAX_BATCH_BYTES);
                (0, head + span.len().max(expect + expect / 4) + tail, head + span.len() + tail)
            }
        };
        let fits = |room: &usize| self.bytes - had + room <= MAX_WAITING_BYTES;
        let Some(room) = [wants, needs].into_iter().find(fits).filter(|_| self.spans < queue) else {
            self.dropped += 1;
            return false;
        };
        if started {
            let mut bytes = Vec::with_capacity(room);
            bytes.resize(head, 0);
            self.batches.push_back(Batch { spans: 0, bytes });
        }
        let followed = self.batches.len() > 1;
        let Some(last) = self.batches.back_mut() else { return false };
        last.bytes.reserve_exact(room - last.bytes.len());
        last.bytes.extend_from_slice(span);
        last.spans += 1;
        self.spans += 1;
        self.bytes = self.bytes - had + last.bytes.capacity();
        // The batch before a new one is ready.
        (started && followed) || last.spans == batch
    }

    /// Gives back what the last batch did not fill, as a new one starts
    /// after it, when that is more than it holds: room kept for spans that
    /// came smaller than the batch before would otherwise count against the
    /// bound until the batch is sent.
    fn close_last(&mut self) {
        let tail = self.around.1;
        if let Some(last) = self.batches.back_mut()
            && last.bytes.capacity() > 2 * (last.bytes.len() + tail)
        {
            let had = last.bytes.capacity();
            last.bytes.shrink_to(last.bytes.len() + tail);
            self.bytes = self.bytes - had + last.bytes.capacity();
        }
    }

    /// The oldest batch, if it is ready: full, or followed by another.
    fn ready(&mut self, batch: usize) -> Option<Batch> {
        let ready = self.batches.len() > 1 || self.batches.front().is_some_and(|first| first.spans >= batch);
        ready.then(|| self.take_first()).flatten()
    }

    fn take_first(&mut self) -> Option<Batch> {
        let first = self.batches.pop_front()?;
        self.spans -= first.spans;
        self.bytes -= first.bytes.capacity();
        self.expect = first.bytes.len() - self.around.0;
        Some(first)
    }
}

#[derive(Debug)]
struct Batch {
    spans: usize,
    /// The room for the request's head, then the spans' `ScopeSpans.spans`
    /// fields, with room after them for its tail.
    bytes: Vec<u8>,
}

thread_local! {
    /// Where a span is encoded before it joins its batch, so the queue's
    /// lock is held only to copy it.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Queue {
    /// Starts the exporting thread.
    pub(super) fn start(settings: Settings, header: otlp::Header) -> Result<Queue, String> {
        let shared = Arc::new(Shared {
            waiting: Mutex::new(Waiting::new(header.room())),
            work: Condvar::new(),
            stopped: Condvar::new(),
        });
        let (queue, batch) = (settings.queue, settings.batch);
        let sender = Sender::new(settings, header)?;
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("stepbox-traces".into())
            .spawn(move || sender.run(&thread))
            .map_err(|err| format!("cannot start the trace exporter's thread: {err}"))?;
        Ok(Queue { shared, queue, batch })
    }

    /// Queues the span `encode` writes (with [`otlp::span`]); drops it
    /// when the queue is full or shut down.
    pub(super) fn push(&self, encode: impl FnOnce(&mut Vec<u8>)) {
        // A span dropped while its thread ends, after the scratch buffer
        // has gone, is not exported.
        let _ = SCRATCH.try_with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let scratch = &mut *scratch;
            scratch.clear();
            encode(scratch);
            if self.shared.waiting.lock().add(scratch, self.queue, self.batch) {
                self.shared.work.notify_one();
            }
            // A thread keeps no more than an ordinary span's room.
            if scratch.capacity() > MAX_SCRATCH {
                *scratch = Vec::new();
            }
        });
    }

    /// Sends what is queued and stops the thread, waiting for it at most
    /// `timeout`.
    pub(super) fn shutdown(&self, timeout: Duration) -> Result<(), String> {
        let mut waiting = self.shared.waiting.lock();
        let deadline = *waiting.stopping.get_or_insert(Instant::now() + timeout);
        self.shared.work.notify_one();
        while !waiting.stopped {
            if self.shared.stopped.wait_until(&mut waiting, deadline).timed_out() {
                return Err(format!("the collector took longer than {} s", timeout.as_secs()));
            }
        }
        Ok(())
    }
}

/// The exporting thread's own: the settings, the encoded resource and
/// scope, and an HTTP client on a runtime of its own.
struct Sender {
    settings: Settings,
    header: otlp::Header,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    /// When a failure was last said, so a collector that is away is
    /// reported once a minute, not once a batch.
    warned: Cell<Option<Instant>>,
}

impl Sender {
    fn new(settings: Settings, header: otlp::Header) -> Result<Sender, String> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("stepbox/", env!("CARGO_PKG_VERSION")))
            .default_headers(settings.headers.clone())
            // A collector's token goes to the collector named, not to
            // wherever it redirects.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| format!("cannot make the trace exporter's HTTP client: {err}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("cannot start the trace exporter's runtime: {err}"))?;
        Ok(Sender { settings, header, http, runtime, warned: Cell::new(None) })
    }

    /// Waits for work and sends it, until shut down.
    fn run(self, shared: &Shared) {
        /// Says the thread stopped however it ends, so a shutdown does not
        /// wait for it in vain.
        struct Stopped<'a>(&'a Shared);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                self.0.waiting.lock().stopped = true;
                self.0.stopped.notify_all();
            }
        }
        let _stopped = Stopped(shared);
        let mut due = Instant::now() + self.settings.delay;
        loop {
            let mut waiting = shared.waiting.lock();
            // At shutdown, everything queued; otherwise a full batch, or
            // any batch once it has waited long enough.
            let batches = loop {
                if waiting.stopping.is_some() {
                    (waiting.spans, waiting.bytes) = (0, 0);
                    break std::mem::take(&mut waiting.batches);
                }
                if let Some(batch) = waiting.ready(self.settings.batch) {
                    break VecDeque::from([batch]);
                }
                if Instant::now() >= due
                    && let Some(batch) = waiting.take_first()
                {
                    break VecDeque::from([batch]);
                }
                if Instant::now() >= due {
                    due = Instant::now() + self.settings.delay;
                }
                shared.work.wait_until(&mut waiting, due);
            };
            let stopping = waiting.stopping;
            let dropped = std::mem::take(&mut waiting.dropped);
            drop(waiting);
            if dropped > 0 {
                self.warn(&format!(
                    "{dropped} spans were dropped: the queue was full ({} spans, OTEL_BSP_MAX_QUEUE_SIZE, or {} MiB)",
                    self.settings.queue,
                    MAX_WAITING_BYTES >> 20
                ));
            }
            for batch in batches {
                let deadline = Instant::now() + self.settings.timeout;
                let deadline = stopping.map_or(deadline, |stopping| stopping.min(deadline));
                if let Err(why) = self.send(self.header.wrap(batch.bytes), deadline) {
                    self.warn(&why);
                }
            }
            if stopping.is_some() {
                return;
            }
            due = Instant::now() + self.settings.delay;
        }
    }

    /// Posts one request, sending it again (up to [`RETRIES`] times) while
    /// the collector cannot take it now, until `deadline`.
    fn send(&self, body: bytes::Bytes, deadline: Instant) -> Result<(), String> {
        let url = &self.settings.endpoint;
        self.runtime.block_on(async {
            let (mut wait, mut retries) = (FIRST_RETRY, 0);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!("{url} did not answer in time"));
                }
                let sent = self
                    .http
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(body.clone())
                    .timeout(left)
                    .send()
                    .await;
                let why = match sent {
                    Ok(mut response) if response.status().is_success() => {
                        // Read to the end, so the connection is kept, unless
                        // the answer is longer than any answer should be.
                        let mut read = 0;
                        while let Ok(Some(chunk)) = response.chunk().await {
                            read += chunk.len();
                            if read > MAX_ANSWER {
                                break;
                            }
                        }
                        return Ok(());
                    }
                    Ok(response) => {
                        let status = response.status();
                        let why = format!("{url} answered {status}");
                        if !matches!(status.as_u16(), 429 | 502 | 503 | 504) {
                            return Err(why);
                        }
                        // A collector that says when to come back is believed,
                        // within the deadline.
                        if let Some(after) = response
                            .headers()
                            .get(reqwest::header::RETRY_AFTER)
                            .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
                        {
                            wait = Duration::from_secs(after.min(MAX_RETRY_AFTER));
                        }
                        why
                    }
                    Err(err) => format!("{url}: {err}"),
                };
                if retries == RETRIES || Instant::now().checked_add(wait).is_none_or(|then| then >= deadline) {
                    return Err(why);
                }
                tokio::time::sleep(wait).await;
                (wait, retries) = (wait * 2, retries + 1);
            }
        })
    }

    /// Says, at most once a minute, that spans were not exported.
    fn warn(&self, why: &str) {
        let now = Instant::now();
        if self.warned.get().is_none_or(|last| now - last >= Duration::from_secs(60)) {
            self.warned.set(Some(now));
            eprintln!("warning: traces were not exported: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the batches of `waiting` have allocated.
    fn allocated(waiting: &Waiting) -> usize {
        waiting.batches.iter().map(|batch| batch.bytes.capacity()).sum()
    }

    #[test]
    fn what_waits_is_bounded_in_spans_and_in_bytes_and_batched_by_both() {
        let mut waiting = Waiting::default();
        // Spans of 1 MiB: four to a batch. The first batch grows to 4 MiB;
        // each after it starts with room for as much and a quarter more,
        // and that room counts: 52 spans fit in 64 MiB, whatever the count
        // allows.
        let big = vec![7u8; 1 << 20];
        let ready: Vec<bool> = (0..100).map(|_| waiting.add(&big, 10_000, 512)).collect();
        assert_eq!((waiting.spans, waiting.bytes, waiting.dropped), (52, MAX_WAITING_BYTES, 48));
        assert_eq!(allocated(&waiting), waiting.bytes);
        assert!(waiting.batches.iter().all(|batch| batch.bytes.len() <= MAX_BATCH_BYTES && batch.spans == 4));
        // Each batch is ready as the next one starts.
        assert_eq!(ready.iter().filter(|ready| **ready).count(), 12);
        let first = waiting.ready(512).expect("a batch followed by others is ready");
        assert_eq!((first.spans, waiting.spans, waiting.bytes), (4, 48, 60 << 20));
        // Small spans: a batch is ready when it holds `batch`; no more than
        // `queue` wait.
        let mut waiting = Waiting::default();
        let ready: Vec<bool> = (0..10).map(|_| waiting.add(b"span", 5, 2)).collect();
        // Ready as the second fills it, and again as a new one starts.
        assert_eq!(ready, [false, true, true, true, true, false, false, false, false, false]);
        assert_eq!((waiting.spans, waiting.dropped), (5, 5));
        assert_eq!(waiting.ready(2).map(|batch| batch.bytes), Some(b"spanspan".to_vec()));
        assert_eq!(waiting.ready(2).map(|batch| batch.spans), Some(2));
        // The last holds one span: ready only when its time comes.
        assert!(waiting.ready(2).is_none());
        assert_eq!(waiting.take_first().map(|batch| batch.spans), Some(1));
        // Nothing is queued once it stops.
        waiting.stopping = Some(Instant::now());
        assert!(!waiting.add(b"late", 5, 2));
        assert_eq!((waiting.spans, waiting.dropped), (0, 5));
    }

    #[test]
    fn room_a_batch_does_not_fill_counts_against_the_bound() {
        // One span a batch (OTEL_BSP_MAX_EXPORT_BATCH_SIZE=1), large and
        // small in turn: a small span's batch starts with the room the
        // large one before it took, and that room is counted.
        let mut waiting = Waiting::new((64, 16));
        let (big, small) = (vec![7u8; 1 << 20], vec![7u8; 10]);
        for i in 0..1_000 {
            waiting.add(if i % 2 == 0 { &big } else { &small }, 10_000, 1);
            assert_eq!(allocated(&waiting), waiting.bytes);
            assert!(waiting.bytes <= MAX_WAITING_BYTES);
        }
        assert!(waiting.dropped > 0);
        // What leaves the queue leaves the count.
        while waiting.take_first().is_some() {}
        assert_eq!((waiting.spans, waiting.bytes), (0, 0));
    }

    #[test]
    fn a_closed_batch_keeps_no_more_than_twice_what_it_holds() {
        // Batches of large spans and of small ones in turn: a small batch
        // starts with the large one's room and gives back what it did not
        // fill once the next starts, so what waits is at least about half
        // what the bound counts.
        let mut waiting = Waiting::new((64, 16));
        let (large, small) = (vec![7u8; 8_000], vec![7u8; 300]);
        let mut i = 0;
        while waiting.dropped == 0 {
            waiting.add(if (i / 512) % 2 == 0 { &large } else { &small }, 1_000_000, 512);
            i += 1;
        }
        assert_eq!(allocated(&waiting), waiting.bytes);
        let closed = waiting.batches.len() - 1;
        assert!(
            waiting.batches.iter().take(closed).all(|batch| batch.bytes.capacity() <= 2 * (batch.bytes.len() + 16))
        );
        let held: usize = waiting.batches.iter().map(|batch| batch.bytes.len()).sum();
        let open = waiting.batches[closed].bytes.capacity();
        assert!(held >= (MAX_WAITING_BYTES - open) / 2, "{held} bytes held");
    }

    #[test]
    fn one_huge_span_does_not_make_the_next_batch_huge() {
        let mut waiting = Waiting::new((64, 16));
        waiting.add(&vec![7u8; 6 << 20], 10, 512);
        waiting.add(b"small", 10, 512);
        let next = waiting.batches.back().expect("a second batch");
        assert!(next.bytes.capacity() <= 64 + MAX_BATCH_BYTES + MAX_BATCH_BYTES / 4 + 16);
        assert_eq!(allocated(&waiting), waiting.bytes);
    }

    #[test]
    fn a_span_that_fits_is_kept_though_a_doubled_batch_would_not() {
        // As if other batches held all but 3 MiB.
        let mut waiting = Waiting::new((0, 0));
        waiting.bytes = MAX_WAITING_BYTES - (3 << 20);
        let span = vec![7u8; 1 << 20];
        for _ in 0..3 {
            waiting.add(&span, 10, 512);
        }
        // The third would double the batch to 4 MiB; it takes 3.
        assert_eq!((waiting.spans, waiting.dropped, waiting.bytes), (3, 0, MAX_WAITING_BYTES));
    }
}
