//! The workflow file as written: YAML (or JSON, which is YAML too) decoded
//! into these types. Values that validation may complain about keep their
//! source location.

use std::collections::BTreeMap;
use std::time::Duration;

use bytesize::ByteSize;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_saphyr::Spanned;

use super::RetryPolicy;
use crate::run::FailureKind;
use crate::sandbox::Limits;

/// A workflow file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// The workflow's name; key-value state is shared by runs of the same name.
    pub name: String,
    /// A version label for people; stepbox does not interpret it.
    #[serde(default)]
    pub version: Option<String>,
    /// What the workflow does.
    #[serde(default)]
    pub description: Option<String>,
    /// The inputs a run is started with, by name.
    #[serde(default)]
    pub inputs: BTreeMap<String, InputSpec>,
    /// Constants for templates, as `vars.<name>`.
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Settings every step starts from.
    #[serde(default)]
    pub defaults: DefaultsSpec,
    /// Step components by name: a path relative to this file, or a table with
    /// the path and per-component policies.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ComponentSpec>")]
    pub components: BTreeMap<String, Spanned<ComponentSpec>>,
    /// The steps. Order does not matter: `depends_on` does.
    pub steps: Vec<StepSpec>,
    /// The workflow's outputs: templates over `steps`, `inputs` and `vars`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub outputs: BTreeMap<String, Spanned<String>>,
    /// What starts runs of the workflow once it is deployed to `stepbox
    /// serve`: schedules and a webhook.
    #[serde(default, rename = "on")]
    pub triggers: TriggersSpec,
}

/// What starts runs of a deployed workflow.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggersSpec {
    /// Cron schedules: each tick starts one run.
    #[serde(default)]
    pub schedule: Vec<ScheduleSpec>,
    /// `POST /v1/hooks/{tenant}/{workflow}`, signed with a secret, starts a
    /// run.
    #[serde(default)]
    pub webhook: Option<WebhookSpec>,
}

/// A cron schedule.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Five fields, minute hour day month weekday: `*/5 * * * *`.
    pub cron: String,
    /// The IANA time zone the fields are read in (`Europe/Paris`); UTC when
    /// left out.
    #[serde(default)]
    pub timezone: Option<String>,
    /// The runs' inputs.
    #[serde(default)]
    pub with: serde_json::Map<String, serde_json::Value>,
    /// What happens to ticks missed while the service was down: `latest`
    /// (the default) runs the last of them, `all` runs each, `none` skips
    /// them.
    #[serde(default)]
    pub catch_up: CatchUp,
}

/// What happens to the ticks of a schedule missed while the service was
/// down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Skip them.
    None,
    /// Run the last of them.
    #[default]
    Latest,
    /// Run each of them.
    All,
}

/// A webhook.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// The shared secret (at least 16 characters) the sender signs each
    /// body with: `X-Stepbox-Signature-256: sha256=<hex HMAC-SHA256>`.
    pub secret: String,
    /// The run's inputs: a template over `body` (the request's JSON, or its
    /// text) and `headers` (by lowercase name). Without it, the body (a JSON
    /// object) is the inputs.
    #[serde(default)]
    pub with: Option<serde_json::Value>,
}

/// A declared input.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// The JSON type the value must have.
    #[serde(default, rename = "type")]
    pub kind: InputType,
    /// Whether a run must give it (an input with a default never must).
    #[serde(default)]
    pub required: bool,
    /// The value when a run does not give one.
    #[serde(default)]
    pub default: Option<serde_json::Value>,
    #[serde(default)]
    /// What it is for.
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
/// The JSON type an input must have.
pub enum InputType {
    /// Any JSON value.
    #[default]
    Any,
    /// A string.
    String,
    /// A number.
    Number,
    /// A whole number.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A map.
    Object,
    /// A list.
    Array,
}

/// Settings every step starts from; a step's own settings override them
/// field by field.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSpec {
    #[serde(default)]
    /// Per-attempt limits.
    pub limits: LimitsSpec,
    #[serde(default)]
    /// How failed attempts are retried.
    pub retry: RetrySpec,
    /// The circuit breaker of every component that does not set its own.
    #[serde(default)]
    pub circuit_breaker: Option<BreakerSpec>,
}

/// A component: a path, or a table with the path and its policies.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ComponentSpec {
    /// Just the path, relative to the workflow file.
    Path(String),
    /// The path with the component's policies.
    Table(ComponentTable),
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
/// A component with its policies.
pub struct ComponentTable {
    /// Path to the .wasm file, relative to the workflow file.
    pub path: String,
    /// Start at most this many attempts per interval.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Stop calling the component for a while after repeated failures.
    #[serde(default)]
    pub circuit_breaker: Option<BreakerSpec>,
}

impl ComponentSpec {
    /// The .wasm path, relative to the workflow file.
    pub fn path(&self) -> &str {
        match self {
            ComponentSpec::Path(path) => path,
            ComponentSpec::Table(table) => &table.path,
        }
    }
}

/// At most `starts` attempt starts per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Attempt starts allowed per interval.
    pub starts: u32,
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    /// The interval.
    pub per: Duration,
}

/// After `failures` consecutive failed attempts the breaker opens: attempts
/// fail at once as `circuit-open` for `cool_down`, then one probe may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    /// Consecutive failed attempts that open the breaker.
    pub failures: u32,
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    /// How long it stays open.
    pub cool_down: Duration,
}

/// Per-attempt limits; unset fields come from `defaults.limits`, then from
/// stepbox's own defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Fuel units; `_` separators are allowed (`500_000_000`).
    #[serde(default, deserialize_with = "count")]
    #[schemars(with = "Option<String>")]
    pub fuel: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    /// Wall-clock time per attempt, host calls included.
    pub timeout: Option<Duration>,
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    /// Linear memory for the whole instance.
    pub memory: Option<ByteSize>,
    /// Size of the step's output.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub output: Option<ByteSize>,
    /// Bytes of stdout (and of stderr) kept.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub stdio: Option<ByteSize>,
    /// Memory the host may hold for an attempt outside its linear memory.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub host_memory: Option<ByteSize>,
    /// What a scratch directory may hold.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub scratch: Option<ByteSize>,
}

impl LimitsSpec {
    /// These limits over `base`'s: each field set here wins. A step's are
    /// taken over `defaults.limits`.
    pub fn over_spec(&self, base: &LimitsSpec) -> LimitsSpec {
        LimitsSpec {
            fuel: self.fuel.or(base.fuel),
            timeout: self.timeout.or(base.timeout),
            memory: self.memory.or(base.memory),
            output: self.output.or(base.output),
            stdio: self.stdio.or(base.stdio),
            host_memory: self.host_memory.or(base.host_memory),
            scratch: self.scratch.or(base.scratch),
        }
    }

    /// These limits over `base`: each field set here wins, the rest come
    /// from `base`. A step's are taken over its tenant's default limits when
    /// it runs; `stepbox step run` takes its flags the same way.
    pub fn over(&self, base: &Limits) -> Limits {
        Limits {
            fuel: self.fuel.unwrap_or(base.fuel),
            timeout: self.timeout.unwrap_or(base.timeout),
            memory: self.memory.unwrap_or(base.memory),
            output: self.output.unwrap_or(base.output),
            stdio: self.stdio.unwrap_or(base.stdio),
            host_memory: self.host_memory.unwrap_or(base.host_memory),
            scratch: self.scratch.unwrap_or(base.scratch),
            ..base.clone()
        }
    }
}

/// How failed attempts are retried; unset fields come from `defaults.retry`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included (1: no retries).
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    /// How the delay grows.
    pub backoff: Option<Backoff>,
    /// The delay before the first retry.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub initial: Option<Duration>,
    /// The longest delay between attempts.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub max: Option<Duration>,
    /// Growth factor of exponential backoff.
    #[serde(default)]
    pub multiplier: Option<f64>,
    /// Randomize each delay between half and all of it, so retries of many
    /// steps do not arrive together.
    #[serde(default)]
    pub jitter: Option<bool>,
    /// The failure classes that are retried.
    #[serde(default)]
    pub on: Option<Vec<FailureKind>>,
    /// No attempt starts later than this after the step's first attempt.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub deadline: Option<Duration>,
}

impl RetrySpec {
    /// This policy over `base`, field by field, as [`LimitsSpec::over`].
    pub fn over(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            attempts: self.attempts.unwrap_or(base.attempts),
            backoff: self.backoff.unwrap_or(base.backoff),
            initial: self.initial.unwrap_or(base.initial),
            max: self.max.unwrap_or(base.max),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
            jitter: self.jitter.unwrap_or(base.jitter),
            on: self.on.clone().unwrap_or_else(|| base.on.clone()),
            deadline: self.deadline.or(base.deadline),
        }
    }
}

/// How the delay between attempts grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// The same delay each time.
    Constant,
    /// `initial` times the attempt number.
    Linear,
    /// `initial` times `multiplier` to the power of the retry.
    Exponential,
}

/// One step.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Unique within the workflow: letters, digits, `_` and `-`.
    #[schemars(with = "String")]
    pub id: Spanned<String>,
    /// A name from `components`, or a path to a .wasm file.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub uses: Option<Spanned<String>>,
    /// A sub-workflow file to run as this step, instead of `uses`; its steps
    /// are recorded as `<this id>.<their id>`. The path may be a template.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub include: Option<Spanned<String>>,
    /// The step's input (for `include`: the sub-workflow's inputs). Strings
    /// are templates; a string that is one `{{ expression }}` keeps the
    /// expression's type.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub with: Option<Spanned<serde_json::Value>>,
    /// Wait for an event instead of running something (`uses`, `include`):
    /// the run parks, holding no instance and no slot, until the event is
    /// sent to it (`POST /v1/runs/{id}/events/{event}` on `stepbox serve`);
    /// the event's JSON is the step's output.
    #[serde(default)]
    #[schemars(with = "Option<WaitSpec>")]
    pub wait: Option<Spanned<WaitSpec>>,
    /// Steps that must finish first.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub depends_on: Vec<Spanned<String>>,
    /// An expression; the step is skipped when it is false.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub when: Option<Spanned<String>>,
    /// When false, the step's failure does not fail the run.
    #[serde(default = "yes")]
    pub required: bool,
    /// Run even when a dependency failed or was skipped (cleanup).
    #[serde(default)]
    pub always: bool,
    /// Steps to run when this one fails; they run only then.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub on_failure: Vec<Spanned<String>>,
    #[serde(default)]
    /// How failed attempts are retried (over `defaults.retry`).
    pub retry: Option<RetrySpec>,
    #[serde(default)]
    /// Per-attempt limits (over `defaults.limits`).
    pub limits: Option<LimitsSpec>,
    /// Run once per item of this list (a literal list or an expression);
    /// the output is the list of the items' outputs, in order.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub for_each: Option<Spanned<serde_json::Value>>,
    /// Run once per combination of these lists; `item` is a map with one
    /// value per key.
    #[serde(default)]
    #[schemars(with = "Option<BTreeMap<String, serde_json::Value>>")]
    pub matrix: Option<Spanned<BTreeMap<String, serde_json::Value>>>,
    /// At most this many items of a fan-out run at once.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Values the step reads through `wasi:config`; templates.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Environment variables; templates.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host directories, `HOST:GUEST[:ro]`, HOST relative to this file.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub dirs: Vec<Spanned<String>>,
    /// Secret values the step reads through `wasi:config`, taken from the
    /// host's environment or secrets directory when it runs; never recorded
    /// anywhere. A secret with `send_to` reaches the step only as a
    /// placeholder, which the host swaps for the value in the
    /// `authorization` header of HTTPS requests those rules allow.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSpec>,
    /// Command-line arguments; templates.
    #[serde(default)]
    pub args: Vec<String>,
    /// Text on the step's stdin; a template.
    #[serde(default)]
    pub stdin: Option<String>,
    /// A private, empty directory at `/scratch` for each attempt, removed
    /// afterwards.
    #[serde(default)]
    pub scratch: bool,
    /// A fixed clock and randomness seeded from the input, so the same input
    /// gives the same output.
    #[serde(default)]
    pub deterministic: bool,
    /// Network access; none without it.
    #[serde(default)]
    pub network: Option<NetworkSpec>,
    /// For a WASI command (a program with `main`): which non-zero exit
    /// codes are worth another attempt.
    #[serde(default)]
    pub exit_codes: Option<ExitCodesSpec>,
}

/// What a waiting step waits for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitSpec {
    /// The event's name: letters, digits, `_`, `-` and `.`.
    pub event: String,
    /// How long to wait from when the step is reached; past it the step
    /// fails as `timeout`. Without it, the step waits as long as it takes.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
}

/// How a command's exit codes are classified: 0 succeeds, the `retryable`
/// codes are retryable failures, every other code is fatal.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExitCodesSpec {
    /// Default: `[75]` (`EX_TEMPFAIL`).
    pub retryable: Vec<i32>,
}

/// Where a secret's value comes from: `{ env: VAR }` or `{ file: NAME }`.
/// A tenant may read only the secrets its tenants-file entry grants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretSource {
    /// A host environment variable.
    Env(String),
    /// A file in the secrets directory (`--secrets-dir`), as container
    /// platforms mount secrets.
    File(String),
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "env:{name}"),
            SecretSource::File(name) => write!(f, "file:{name}"),
        }
    }
}

/// One secret of a step: where its value comes from, and, for a secret the
/// step may only send, where to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(try_from = "RawSecret", into = "RawSecret")]
pub struct SecretSpec {
    /// Where the value comes from.
    pub source: SecretSource,
    /// `[METHOD,METHOD@]HOST[:PORT]` rules, as in `network.http`: when
    /// given, the step sees a placeholder, and only requests these rules
    /// allow carry the value, in place of the placeholder in their headers.
    pub send_to: Vec<String>,
}

/// A secret as written: `{ env: VAR }` or `{ file: NAME }`, with an
/// optional `send_to`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    /// A host environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env: Option<String>,
    /// A file in the secrets directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    /// Where the value may be sent; see [`SecretSpec::send_to`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    send_to: Vec<String>,
}

impl TryFrom<RawSecret> for SecretSpec {
    type Error = String;

    fn try_from(raw: RawSecret) -> Result<Self, Self::Error> {
        let source = match (raw.env, raw.file) {
            (Some(var), None) => SecretSource::Env(var),
            (None, Some(name)) => SecretSource::File(name),
            _ => return Err("a secret is `{ env: VAR }` or `{ file: NAME }`, exactly one of them".into()),
        };
        Ok(SecretSpec { source, send_to: raw.send_to })
    }
}

impl From<SecretSpec> for RawSecret {
    fn from(secret: SecretSpec) -> Self {
        let (env, file) = match secret.source {
            SecretSource::Env(var) => (Some(var), None),
            SecretSource::File(name) => (None, Some(name)),
        };
        RawSecret { env, file, send_to: secret.send_to }
    }
}

/// What a step may reach over the network.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// `IP:PORT` addresses the step may connect to (TCP) or send to (UDP)
    /// through `wasi:sockets`. Names are not resolved: name lookups stay off.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub connect: Vec<Spanned<String>>,
    /// Outbound HTTP through `wasi:http`, each written
    /// `[METHOD,METHOD@]HOST[:PORT]`: `api.example.com` (any method, ports 80
    /// and 443), `GET@*.example.com:8443` (reads from every subdomain on
    /// 8443). Any other request fails with `HTTP-request-denied`.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub http: Vec<Spanned<String>>,
}

fn yes() -> bool {
    true
}

/// A count written as a number or as a string with `_` separators.
fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Count {
        Number(u64),
        Text(String),
    }
    match Option::<Count>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Count::Number(n)) => Ok(Some(n)),
        Some(Count::Text(text)) => text
            .replace('_', "")
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a whole number"))),
    }
}
