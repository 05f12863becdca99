//! The process's metrics, in the Prometheus text format: attempts by
//! tenant, component and outcome with their duration, fuel and peak memory;
//! journal commits; the compile cache; the API's requests; and, read when
//! scraped, attempts waiting and running per tenant.
//!
//! One set per process, as Prometheus scrapes processes: the places that
//! count (the scheduler as an attempt ends, the journal writers, the
//! compile cache, the API) record into it without a handle threaded through
//! every layer. Nothing is recorded until something serves the metrics
//! ([`record`]), so a process nobody scrapes pays one atomic load per event.
//!
//! Labels stay bounded whatever tenants do: no run ids, and at most
//! [`MAX_TENANTS`] tenants, [`MAX_COMPONENTS`] component names per tenant
//! and [`MAX_PAIRS`] in all get series of their own, each name at most 64
//! bytes of letters, digits, `_`, `-` and `.`; the rest count as
//! [`OTHER`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::run::{Attempt, Outcome};

/// Tenants with series of their own.
pub const MAX_TENANTS: usize = 1_000;
/// Component names with series of their own, per tenant.
pub const MAX_COMPONENTS: usize = 100;
/// Tenant and component pairs with series of their own, in all.
pub const MAX_PAIRS: usize = 10_000;
/// The label value everything past those counts under (not a name a
/// workflow's component can have).
pub const OTHER: &str = "(other)";

/// The `Content-Type` of what [`render`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

static ENABLED: AtomicBool = AtomicBool::new(false);
static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Starts recording (or, `false`, stops): whatever serves the metrics
/// starts it.
pub fn record(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The process's metrics, while they are recorded.
pub fn recording() -> Option<&'static Metrics> {
    ENABLED.load(Ordering::Relaxed).then(|| &*METRICS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    tenant: String,
    component: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// Bucket bounds for attempts' durations.
const SECONDS: [f64; 15] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0];
/// Bucket bounds for commits and requests.
const FAST_SECONDS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every series the process records.
pub struct Metrics {
    attempts: Family<AttemptLabels, Counter>,
    attempt_seconds: Histograms<TenantLabels>,
    attempt_fuel: Histograms<TenantLabels>,
    attempt_memory: Histograms<TenantLabels>,
    commit_seconds: Histograms<StoreLabels>,
    commit_records: Histograms<StoreLabels>,
    compiles: Family<CacheLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Histograms<RouteLabels>,
    labels: Mutex<Bounded>,
    /// Each tenant's components' attempt series, by their labels: found in
    /// the families once, as a family hashes the labels on every lookup.
    attempt_series: Mutex<HashMap<String, HashMap<String, Arc<AttemptSeries>>>>,
}

/// The attempt series of one tenant's component (handles that share
/// their counts with the families').
struct AttemptSeries {
    tenant: String,
    component: String,
    /// The counter of each outcome seen so far.
    outcomes: Mutex<Vec<(&'static str, Counter)>>,
    seconds: Histogram,
    fuel: Histogram,
    memory: Histogram,
}

impl AttemptSeries {
    /// Counts an attempt that ended in `outcome`.
    fn count(&self, metrics: &Metrics, outcome: &'static str) {
        let mut outcomes = self.outcomes.lock();
        match outcomes.iter().find(|(seen, _)| *seen == outcome) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                let labels = AttemptLabels { tenant: self.tenant.clone(), component: self.component.clone(), outcome };
                let counter = metrics.attempts.get_or_create(&labels).clone();
                counter.inc();
                outcomes.push((outcome, counter));
            }
        }
    }
}

/// Where a component came from when a run or an attempt asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    /// Already loaded in this process.
    Memory,
    /// Compiled code from the on-disk cache.
    Disk,
    /// Compiled now.
    Compiled,
}

impl Metrics {
    fn new() -> Self {
        Metrics {
            attempts: Family::default(),
            attempt_seconds: Family::new_with_constructor(|| Histogram::new(SECONDS)),
            attempt_fuel: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1e3, 10.0, 10))),
            attempt_memory: Family::new_with_constructor(|| Histogram::new(exponential_buckets(65_536.0, 4.0, 10))),
            commit_seconds: Family::new_with_constructor(|| Histogram::new(FAST_SECONDS)),
            commit_records: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 11))),
            compiles: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(|| Histogram::new(FAST_SECONDS)),
            labels: Mutex::new(Bounded::default()),
            attempt_series: Mutex::default(),
        }
    }

    /// An attempt of `tenant`'s `component` ended (or was refused, or
    /// lost). Its duration, fuel and memory count only if it ran: a
    /// refused or lost one measured nothing of its own.
    pub fn attempt_ended(&self, tenant: &str, component: &str, attempt: &Attempt) {
        let series = self.attempt_series(tenant, component);
        let outcome = match &attempt.outcome {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed { failure } => failure.kind.as_str(),
            Outcome::Running => "running",
        };
        series.count(self, outcome);
        // An instance that ran held some memory.
        if attempt.peak_memory == 0 {
            return;
        }
        if let Some(finished) = attempt.finished_ms {
            series.seconds.observe((finished - attempt.started_ms).max(0.0) / 1000.0);
        }
        series.fuel.observe(attempt.fuel_consumed as f64);
        series.memory.observe(attempt.peak_memory as f64);
    }

    /// The series of `tenant`'s `component`, under their bounded labels.
    fn attempt_series(&self, tenant: &str, component: &str) -> Arc<AttemptSeries> {
        let mut kept = self.attempt_series.lock();
        if let Some(series) = kept.get(tenant).and_then(|components| components.get(component)) {
            return series.clone();
        }
        // Kept under the labels, so names that count as `(other)` share
        // one entry and tenants cannot grow the map.
        let (tenant, component) = self.labels.lock().component(tenant, component);
        let labels = TenantLabels { tenant: tenant.clone() };
        let series = AttemptSeries {
            seconds: self.attempt_seconds.get_or_create(&labels).clone(),
            fuel: self.attempt_fuel.get_or_create(&labels).clone(),
            memory: self.attempt_memory.get_or_create(&labels).clone(),
            outcomes: Mutex::default(),
            tenant: tenant.clone(),
            component: component.clone(),
        };
        kept.entry(tenant).or_default().entry(component).or_insert_with(|| Arc::new(series)).clone()
    }

    /// A journal writer committed `records` in one transaction.
    pub fn journal_committed(&self, store: &'static str, records: usize, took: Duration) {
        let labels = StoreLabels { store };
        self.commit_seconds.get_or_create(&labels).observe(took.as_secs_f64());
        self.commit_records.get_or_create(&labels).observe(records as f64);
    }

    /// A component was asked for and came from `source`.
    pub fn component_loaded(&self, source: CompileSource) {
        let result = match source {
            CompileSource::Memory => "memory",
            CompileSource::Disk => "disk",
            CompileSource::Compiled => "compiled",
        };
        self.compiles.get_or_create(&CacheLabels { result }).inc();
    }

    /// The API answered a request to `route` (its pattern, such as
    /// `/v1/runs/{id}`, never the path itself) with `status`.
    pub fn request_answered(&self, route: &str, method: &str, status: u16, took: Duration) {
        let (route, method) = (route.to_owned(), method.to_owned());
        self.requests.get_or_create(&RequestLabels { route: route.clone(), method, status }).inc();
        self.request_seconds.get_or_create(&RouteLabels { route }).observe(took.as_secs_f64());
    }
}

/// The labels series were made for, so that what tenants name cannot grow
/// them without end.
#[derive(Default)]
struct Bounded {
    tenants: HashMap<String, HashSet<String>>,
    pairs: usize,
}

/// A name that may be a label value of its own.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
}

impl Bounded {
    fn tenant(&mut self, tenant: &str) -> String {
        if self.tenants.contains_key(tenant) {
            return tenant.to_owned();
        }
        if self.tenants.len() < MAX_TENANTS && plain(tenant) {
            self.tenants.insert(tenant.to_owned(), HashSet::new());
            return tenant.to_owned();
        }
        self.tenants.entry(OTHER.to_owned()).or_default();
        OTHER.to_owned()
    }

    fn component(&mut self, tenant: &str, component: &str) -> (String, String) {
        let tenant = self.tenant(tenant);
        let components = self.tenants.entry(tenant.clone()).or_default();
        if components.contains(component) {
            return (tenant, component.to_owned());
        }
        if components.len() < MAX_COMPONENTS && self.pairs < MAX_PAIRS && plain(component) {
            components.insert(component.to_owned());
            self.pairs += 1;
            return (tenant, component.to_owned());
        }
        (tenant, OTHER.to_owned())
    }
}

/// Gauges read when scraped: attempts of each tenant in some state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Attempts waiting for a slot (in this process) or a worker (in the
    /// queue), by tenant.
    pub waiting: Vec<(String, u64)>,
    /// Attempts running (in this process, or held by workers), by tenant.
    pub running: Vec<(String, u64)>,
    /// What `waiting` and `running` count: `process` or `queue`.
    pub source: &'static str,
}

/// The queue's snapshot from `store`; `None`, and a warning, when the
/// database cannot say (the scrape goes on without it).
pub fn queue_snapshot(store: &dyn crate::store::Store) -> Option<Snapshot> {
    store.snapshot().map_err(|err| tracing::warn!("the metrics leave out the queue: {err}")).ok()
}

/// The metrics in the Prometheus text format, with `snapshots` as gauges.
pub fn render(snapshots: &[Snapshot]) -> String {
    let metrics = &*METRICS;
    let mut registry = Registry::with_prefix("stepbox");
    registry.register("attempts", "Attempts that ended, by tenant, component and outcome", metrics.attempts.clone());
    registry.register("attempt_seconds", "How long attempts ran", metrics.attempt_seconds.clone());
    registry.register(
        "attempt_fuel",
        "Fuel attempts used (about one unit per instruction)",
        metrics.attempt_fuel.clone(),
    );
    registry.register(
        "attempt_peak_memory_bytes",
        "The most linear memory attempts held at once",
        metrics.attempt_memory.clone(),
    );
    registry.register("journal_commit_seconds", "How long a journal commit took", metrics.commit_seconds.clone());
    registry.register("journal_commit_records", "Records committed together", metrics.commit_records.clone());
    registry.register(
        "components_loaded",
        "Components asked for, by where they came from (memory and disk are compile-cache hits)",
        metrics.compiles.clone(),
    );
    registry.register("http_requests", "API requests, by route pattern, method and status", metrics.requests.clone());
    registry.register("http_request_seconds", "How long API requests took to answer", metrics.request_seconds.clone());
    let mut bounded = metrics.labels.lock();
    for snapshot in snapshots {
        let gauges = [
            ("attempts_waiting", "Attempts waiting for a slot or a worker, by tenant", &snapshot.waiting),
            ("attempts_running", "Attempts running, by tenant", &snapshot.running),
        ];
        for (name, help, counts) in gauges {
            let family = Family::<TenantLabels, Gauge>::default();
            for (tenant, count) in counts {
                let labels = TenantLabels { tenant: bounded.tenant(tenant) };
                family.get_or_create(&labels).inc_by(i64::try_from(*count).unwrap_or(i64::MAX));
            }
            registry.register(format!("{}_{name}", snapshot.source), help, family);
        }
    }
    drop(bounded);
    let mut text = String::new();
    // Writing to a String does not fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

/// What a metrics endpoint reads when scraped, besides what was recorded;
/// called off the async threads (it may ask the database).
pub type Snapshots = std::sync::Arc<dyn Fn() -> Vec<Snapshot> + Send + Sync>;

/// How long a reading of the snapshots serves later scrapes.
const FRESH: Duration = Duration::from_secs(2);
/// How long a scrape waits for the snapshots (the database may be away).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The last snapshots read. Scrapes read them one at a time and reuse a
/// fresh reading, so a flood of scrapes costs the database one query every
/// [`FRESH`], not one each.
static LAST: tokio::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<Vec<Snapshot>>)>> =
    tokio::sync::Mutex::const_new(None);

/// The metrics in the Prometheus text format, with `snapshots` read now
/// (or a moment ago); why not, when they could not be read in time.
pub async fn scrape(snapshots: Snapshots) -> Result<String, String> {
    let mut last = LAST.lock().await;
    let fresh = last.as_ref().filter(|(at, _)| at.elapsed() < FRESH).map(|(_, read)| read.clone());
    let read = match fresh {
        Some(read) => read,
        None => {
            let reading = tokio::task::spawn_blocking(move || snapshots());
            let read = tokio::time::timeout(READ_TIMEOUT, reading)
                .await
                .map_err(|_| format!("the metrics could not be read within {}s", READ_TIMEOUT.as_secs()))?
                .map_err(|err| format!("cannot read the metrics: {err}"))?;
            let read = std::sync::Arc::new(read);
            *last = Some((std::time::Instant::now(), read.clone()));
            read
        }
    };
    drop(last);
    Ok(render(&read))
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves: what
/// `--metrics-listen` starts for `stepbox run` and `stepbox worker`. No
/// token is asked for, so give it an address only operators reach (the
/// metrics name every tenant).
pub async fn serve(
    listener: tokio::net::TcpListener,
    snapshots: Snapshots,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::response::IntoResponse;
    let answer = move || {
        let snapshots = snapshots.clone();
        async move {
            match scrape(snapshots).await {
                Ok(text) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
                Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(answer))
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "only GET /metrics is served here\n") });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Binds `address` for [`serve`] (naming the flag in the error), prints
/// where the metrics are, and starts recording.
pub async fn bind(address: &str) -> Result<tokio::net::TcpListener, String> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|err| format!("cannot listen on {address}: {err}; choose another --metrics-listen"))?;
    let bound = listener.local_addr().map_err(|err| format!("cannot listen on {address}: {err}"))?;
    eprintln!("metrics at http://{bound}/metrics");
    record(true);
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_bounded_whatever_tenants_name() {
        let mut bounded = Bounded::default();
        for n in 0..MAX_COMPONENTS + 50 {
            bounded.component("acme", &format!("c{n}"));
        }
        assert_eq!(bounded.component("acme", "c0"), ("acme".into(), "c0".into()), "known ones keep theirs");
        assert_eq!(bounded.component("acme", "new"), ("acme".into(), OTHER.into()));
        for n in 0..MAX_TENANTS + 10 {
            bounded.tenant(&format!("t{n}"));
        }
        assert_eq!(bounded.tenant("acme"), "acme");
        assert_eq!(bounded.tenant("late"), OTHER);
        assert_eq!(bounded.component("late", "x").0, OTHER);
        // The overflow is one more tenant, never more.
        assert!(bounded.tenants.len() <= MAX_TENANTS + 1, "{}", bounded.tenants.len());
        // Names that are long or odd never get series of their own.
        let mut fresh = Bounded::default();
        assert_eq!(fresh.component("acme", &"x".repeat(65)).1, OTHER);
        assert_eq!(fresh.component("acme", "a\"b").1, OTHER);
        assert_eq!(fresh.tenant("(other)"), OTHER);
        // Nor more pairs than the ceiling over all tenants.
        for n in 0..MAX_PAIRS + 10 {
            fresh.component(&format!("t{}", n % 200), &format!("c{n}"));
        }
        assert_eq!(fresh.pairs, MAX_PAIRS);
    }
}
