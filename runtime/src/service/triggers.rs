//! Runs started by triggers declared in the workflow file (`on:`): a
//! signed webhook, and cron schedules. Each start is made once: a webhook
//! by its delivery id, a schedule tick by its time, through the same
//! idempotency keys as the API's, so a replay or a restart starts nothing
//! twice.

use crate::traces::TraceParent;
use std::collections::BTreeMap;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::runs::Once;
use super::{Scope, Service, ServiceError};
use crate::run::Run;
use crate::store::WorkflowVersion;
use crate::workflow::spec::CatchUp;
use crate::workflow::{Schedule, template};

/// A tick handled within this of its time is on time; an older one was
/// missed (the service was down), and `catch_up` decides.
const ON_TIME_MS: f64 = 60_000.0;
/// Missed ticks `catch_up: all` runs at most, per schedule: the latest.
const MAX_CATCH_UP: usize = 100;
/// Ticks looked at at most when catching up one schedule.
const MAX_TICKS_SCANNED: usize = 1_000_000;

/// The longest delivery id, in bytes.
const MAX_DELIVERY: usize = 256;

/// A webhook request as the server received it.
pub struct Delivery<'a> {
    /// `X-Stepbox-Signature-256`: `sha256=` and the hex HMAC-SHA256 of the
    /// body under the webhook's secret.
    pub signature: Option<&'a str>,
    /// `X-Stepbox-Delivery`: the sender's id of this delivery; a replay
    /// carries the same.
    pub id: Option<&'a str>,
    /// The headers, by lowercase name, for the input template.
    pub headers: BTreeMap<String, String>,
    /// The body as sent.
    pub body: &'a [u8],
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`; compared in constant time.
fn signed(secret: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("sha256=") else { return false };
    let Some(bytes) = decode_hex(hex) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

impl Service {
    /// Starts a run of `tenant`'s workflow `name` from a webhook delivery:
    /// its signature checked against the workflow's secret, its inputs from
    /// the `with` template (or the body), once per delivery id. Returns the
    /// run, and whether it is new (a replay returns the first delivery's).
    pub async fn webhook(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        delivery: Delivery<'_>,
    ) -> Result<(Run, bool), ServiceError> {
        self.accepting()?;
        // Every way the hook is not there answers alike.
        let missing = || ServiceError::NotFound(format!("no webhook at /v1/hooks/{tenant}/{name}"));
        let scope = Scope::Tenant(tenant.to_owned());
        let version = self.workflow(&scope, name, None).await.map_err(|_| missing())?;
        let deployed = self.deployed(&version).await?;
        let webhook = deployed.workflow.triggers.webhook.as_ref().ok_or_else(missing)?;
        let signature = delivery.signature.ok_or_else(|| {
            ServiceError::Unauthorized(
                "sign the body: send X-Stepbox-Signature-256: sha256=<hex HMAC-SHA256 of the body with the webhook's secret>"
                    .into(),
            )
        })?;
        if !signed(&webhook.secret, delivery.body, signature) {
            return Err(ServiceError::Unauthorized(
                "X-Stepbox-Signature-256 does not match the body: sign the exact bytes sent with the webhook's secret"
                    .into(),
            ));
        }
        let id = delivery.id.filter(|id| !id.is_empty() && id.len() <= MAX_DELIVERY).ok_or_else(|| {
            ServiceError::BadRequest {
                code: "invalid_delivery",
                message: format!(
                    "send X-Stepbox-Delivery with an id of this delivery (1 to {MAX_DELIVERY} bytes); a replay sends the same"
                ),
            }
        })?;
        let invalid = |message: String| ServiceError::Invalid { code: "invalid_inputs", message };
        let body: serde_json::Value = serde_json::from_slice(delivery.body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(delivery.body).into_owned()));
        let inputs = match &webhook.with {
            Some(with) => {
                let context = minijinja::context! {
                    body => template::to_jinja(&body),
                    headers => template::to_jinja(&delivery.headers),
                };
                template::render_value(with, &context).map_err(|err| invalid(format!("the webhook's `with`: {err}")))?
            }
            None => body,
        };
        let serde_json::Value::Object(inputs) = inputs else {
            return Err(invalid(format!("the webhook's inputs must be a JSON object, not {inputs}")));
        };
        let labels =
            BTreeMap::from([("trigger".to_owned(), "webhook".to_owned()), ("delivery".to_owned(), id.to_owned())]);
        let once = Once {
            // The name's length first: names may hold `:`.
            key: format!("webhook:{}:{name}:{id}", name.len()),
            request: format!("{:x}", Sha256::digest(delivery.body)),
            named: "delivery id",
        };
        let parent = delivery.headers.get("traceparent").and_then(|value| TraceParent::parse(value));
        self.start_version(&version, &inputs, labels, Some(once), parent).await
    }
}

/// A schedule's ticks after `after_ms` up to `until_ms`, as unix ms, the
/// latest [`MAX_CATCH_UP`] of the missed ones and every on-time one.
fn due_ticks(schedule: &Schedule, after_ms: f64, until_ms: f64) -> Vec<f64> {
    let Ok(after) = jiff::Timestamp::from_millisecond(after_ms as i64) else { return Vec::new() };
    let mut due = std::collections::VecDeque::new();
    for tick in schedule.cron.iter_after(after.to_zoned(schedule.timezone.clone())).take(MAX_TICKS_SCANNED) {
        let ms = tick.timestamp().as_millisecond() as f64;
        if ms > until_ms {
            break;
        }
        due.push_back(ms);
        if due.len() > MAX_CATCH_UP && until_ms - due[0] > ON_TIME_MS {
            due.pop_front();
        }
    }
    due.into()
}

/// Which of the due ticks to run: the on-time ones, and of the missed ones
/// what `catch_up` says.
fn to_run(due: &[f64], now_ms: f64, catch_up: CatchUp) -> Vec<f64> {
    let (missed, on_time): (Vec<f64>, Vec<f64>) = due.iter().partition(|&&tick| now_ms - tick > ON_TIME_MS);
    let missed = match catch_up {
        CatchUp::None => Vec::new(),
        CatchUp::Latest => missed.last().copied().into_iter().collect(),
        CatchUp::All => missed,
    };
    missed.into_iter().chain(on_time).collect()
}

/// The schedule's first tick after `after_ms`.
fn next_tick(schedule: &Schedule, after_ms: f64) -> Option<f64> {
    let after = jiff::Timestamp::from_millisecond(after_ms as i64).ok()?.to_zoned(schedule.timezone.clone());
    let next = schedule.cron.find_next_occurrence(&after, false).ok()?;
    Some(next.timestamp().as_millisecond() as f64)
}

impl Service {
    /// Starts a run for each tick of each schedule of each deployed
    /// workflow (its newest version), as it comes and, after a restart,
    /// for ticks missed meanwhile as each schedule's `catch_up` says.
    /// Each tick is recorded as handled, and its run is started once by
    /// its time, so a restart never runs a tick twice.
    pub(super) async fn run_schedules(self: Arc<Self>) {
        loop {
            let deployed = self.deployed_now.notified();
            let next = self.handle_ticks().await;
            let clock = self.config.clock.clone();
            let sleep = async {
                match next {
                    Some(ms) => clock.sleep_until(ms).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                () = deployed => {}
                () = self.closing.cancelled() => return,
            }
        }
    }

    /// Handles every due tick; returns when the next one is.
    async fn handle_ticks(self: &Arc<Self>) -> Option<f64> {
        let now = self.config.clock.now_ms();
        let versions = match self.blocking(|db| Ok(db.all_workflows()?)).await {
            Ok(versions) => versions,
            Err(err) => {
                tracing::error!("cannot read the deployed workflows' schedules: {err}");
                return Some(now + ON_TIME_MS);
            }
        };
        let mut next: Option<f64> = None;
        for version in versions {
            let deployed = match self.deployed(&version).await {
                Ok(deployed) => deployed,
                Err(err) => {
                    tracing::warn!(
                        workflow = version.name,
                        tenant = version.tenant,
                        "cannot load for its schedules: {err}"
                    );
                    continue;
                }
            };
            for (i, schedule) in deployed.workflow.triggers.schedules.iter().enumerate() {
                let key = format!("{i}:{}@{}", schedule.pattern, schedule.timezone.iana_name().unwrap_or("UTC"));
                match self.handle_schedule(&version, schedule, &key, now).await {
                    Ok(last) => {
                        let upcoming = next_tick(schedule, last.max(now));
                        next = match (next, upcoming) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    Err(err) => tracing::warn!(workflow = version.name, schedule = key, "schedule failed: {err}"),
                }
            }
        }
        next
    }

    /// Runs the due ticks of one schedule; returns the last tick handled.
    async fn handle_schedule(
        self: &Arc<Self>,
        version: &WorkflowVersion,
        schedule: &Schedule,
        key: &str,
        now: f64,
    ) -> Result<f64, ServiceError> {
        let (tenant, name, schedule_key) = (version.tenant.clone(), version.name.clone(), key.to_owned());
        let last = self.blocking(move |db| Ok(db.schedule_tick(&tenant, &name, &schedule_key)?)).await?;
        // A new schedule starts from now: what came before it is not missed.
        let last = last.unwrap_or(now);
        let due = due_ticks(schedule, last, now);
        for tick in to_run(&due, now, schedule.catch_up) {
            let when = jiff::Timestamp::from_millisecond(tick as i64).map(|t| t.to_string()).unwrap_or_default();
            let labels = BTreeMap::from([
                ("trigger".to_owned(), "schedule".to_owned()),
                ("schedule".to_owned(), schedule.pattern.clone()),
                ("tick".to_owned(), when),
            ]);
            let once_key = format!("schedule:{}:{}:{key}:{tick}", version.name.len(), version.name);
            let once = Once { key: once_key.clone(), request: once_key, named: "schedule tick" };
            if let Err(err) = self.start_version(version, &schedule.inputs, labels, Some(once), None).await {
                tracing::warn!(workflow = version.name, schedule = key, tick, "a tick could not start its run: {err}");
            }
        }
        let handled = due.last().copied().unwrap_or(last);
        let (tenant, name, schedule_key) = (version.tenant.clone(), version.name.clone(), key.to_owned());
        self.blocking(move |db| Ok(db.set_schedule_tick(&tenant, &name, &schedule_key, handled)?)).await?;
        Ok(handled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hmac_of_the_exact_body_under_the_secret_is_a_signature() {
        let secret = "0123456789abcdef";
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(b"{\"a\":1}");
        let good =
            format!("sha256={}", mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>());
        assert!(signed(secret, b"{\"a\":1}", &good));
        assert!(!signed(secret, b"{\"a\":2}", &good), "another body");
        assert!(!signed("another secret!!", b"{\"a\":1}", &good), "another secret");
        assert!(!signed(secret, b"{\"a\":1}", &good.replace("sha256=", "sha1=")));
        assert!(!signed(secret, b"{\"a\":1}", &good[..good.len() - 2]), "a cut signature");
        assert!(!signed(secret, b"{\"a\":1}", "sha256=zz"));
    }

    fn schedule(pattern: &str, zone: &str) -> Schedule {
        Schedule {
            pattern: pattern.into(),
            cron: pattern.parse().unwrap(),
            timezone: jiff::tz::TimeZone::get(zone).unwrap(),
            inputs: Default::default(),
            catch_up: CatchUp::Latest,
        }
    }

    fn ms(text: &str) -> f64 {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond() as f64
    }

    #[test]
    fn ticks_follow_the_pattern_in_its_time_zone_and_catch_up_as_asked() {
        // 09:00 in Paris is 08:00 UTC in winter.
        let paris = schedule("0 9 * * *", "Europe/Paris");
        assert_eq!(next_tick(&paris, ms("2026-12-03T07:00:00Z")), Some(ms("2026-12-03T08:00:00Z")));
        let every5 = schedule("*/5 * * * *", "UTC");
        let due = due_ticks(&every5, ms("2026-12-03T10:00:00Z"), ms("2026-12-03T10:12:00Z"));
        assert_eq!(due, [ms("2026-12-03T10:05:00Z"), ms("2026-12-03T10:10:00Z")]);
        let now = ms("2026-12-03T10:12:00Z");
        assert_eq!(to_run(&due, now, CatchUp::None), Vec::<f64>::new());
        assert_eq!(to_run(&due, now, CatchUp::Latest), [ms("2026-12-03T10:10:00Z")]);
        assert_eq!(to_run(&due, now, CatchUp::All), due);
        // A tick handled on time runs whatever catch_up says.
        let on_time = [ms("2026-12-03T10:10:00Z")];
        assert_eq!(to_run(&on_time, ms("2026-12-03T10:10:00.5Z"), CatchUp::None), on_time);
        // Down for a year with a tick a minute: only the latest are kept.
        let every_minute = schedule("* * * * *", "UTC");
        let due = due_ticks(&every_minute, ms("2025-12-03T10:00:00Z"), ms("2026-12-03T10:00:00Z"));
        assert_eq!(due.len(), MAX_CATCH_UP);
        assert_eq!(due.last(), Some(&ms("2026-12-03T10:00:00Z")));
    }
}
