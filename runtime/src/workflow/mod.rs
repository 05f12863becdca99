//! Workflow files: parse, validate, and resolve them into a [`Workflow`]
//! the scheduler can run. See docs/workflow.md for the format.

mod builder;
mod diagnostic;
mod grants;
mod graph;
mod inputs;
mod parse;
pub mod spec;
pub mod template;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use serde_saphyr::Location;

pub use builder::{StepBuilder, WorkflowBuilder};
pub use diagnostic::{Diagnostic, WorkflowError};
pub use grants::{StepGrants, StepSecret, resolve_secrets};
pub use inputs::Inputs;
pub(crate) use parse::read as read_file;
pub use spec::WorkflowSpec;

use crate::run::FailureKind;
use crate::sandbox::Digest;
use crate::tenant::Tenant;

use spec::{Backoff, BreakerSpec, InputSpec, LimitsSpec, RateLimitSpec};

/// A validated workflow: every reference resolved, the graph acyclic.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// The name from the file; key-value state is scoped by it.
    pub name: String,
    /// The file it was read from (or a name for a built workflow), for
    /// messages.
    pub file: PathBuf,
    /// Relative paths in the workflow resolve against this directory.
    pub base_dir: PathBuf,
    /// The declared inputs, by name.
    pub inputs: BTreeMap<String, InputSpec>,
    /// Constants templates read as `vars.<name>`.
    pub vars: serde_json::Map<String, Value>,
    /// The components the steps use, by name (a path used directly is its own name).
    pub components: BTreeMap<String, Component>,
    /// In file order; `depends_on` and friends are indices into this list.
    pub steps: Vec<Step>,
    /// The workflow's outputs: templates rendered when the run ends.
    pub outputs: BTreeMap<String, String>,
    /// What starts its runs once deployed to `stepbox serve`.
    pub triggers: Triggers,
    /// The sha256 of the file's bytes as they were parsed; `None` for a
    /// workflow not read from a file.
    pub(crate) parsed: Option<Digest>,
}

/// What starts runs of a deployed workflow, checked.
#[derive(Debug, Clone, Default)]
pub struct Triggers {
    /// Cron schedules, in file order.
    pub schedules: Vec<Schedule>,
    /// The webhook, if there is one.
    pub webhook: Option<Webhook>,
}

/// A checked cron schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The pattern as written, which names the schedule.
    pub pattern: String,
    /// The pattern, parsed.
    pub cron: croner::Cron,
    /// The time zone its fields are read in.
    pub timezone: jiff::tz::TimeZone,
    /// The runs' inputs, as written (bound when a tick starts a run).
    pub inputs: serde_json::Map<String, Value>,
    /// What happens to ticks missed while the service was down.
    pub catch_up: spec::CatchUp,
}

/// A checked webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The secret bodies are signed with.
    pub secret: String,
    /// The template of the run's inputs, over `body` and `headers`.
    pub with: Option<Value>,
}

/// A component the workflow uses.
#[derive(Debug, Clone)]
pub struct Component {
    /// Its name in the workflow.
    pub name: String,
    /// The .wasm file, resolved against the workflow file's directory.
    pub path: PathBuf,
    /// At most this many attempt starts per interval.
    pub rate_limit: Option<RateLimitSpec>,
    /// The circuit breaker shared by the steps that use it.
    pub breaker: Option<BreakerSpec>,
    /// Where it is declared, for load errors.
    pub location: Location,
    /// The sha256 its bytes had when [`Workflow::pin`] read them.
    pub(crate) digest: Option<Digest>,
}

/// What a step runs.
#[derive(Debug, Clone)]
pub enum Action {
    /// A component, by its name in [`Workflow::components`].
    Run {
        /// The component's name.
        component: String,
    },
    /// A sub-workflow file, run as one step.
    Include {
        /// The file, relative to the including workflow; may be a template.
        path: String,
        /// The included workflow, loaded and validated with this one when
        /// `path` is literal; a templated path is loaded when reached.
        workflow: Option<Arc<Workflow>>,
    },
    /// Waits for the event `event` to be sent to the run; its payload is
    /// the step's output.
    Wait {
        /// The event's name.
        event: String,
        /// Past this, counted from when the step is reached, it fails as
        /// `timeout`.
        timeout: Option<Duration>,
    },
}

/// How a step fans out.
#[derive(Debug, Clone, PartialEq)]
pub enum FanOut {
    /// One execution.
    None,
    /// One execution per item of a list (a literal or an expression).
    ForEach(Value),
    /// One execution per combination; each value a literal list or an
    /// expression.
    Matrix(BTreeMap<String, Value>),
}

/// One validated step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Unique within the workflow.
    pub id: String,
    /// A component or an included workflow.
    pub action: Action,
    /// The input; strings in it are templates.
    pub with: Value,
    /// The steps it waits for, as indices into [`Workflow::steps`].
    pub depends_on: Vec<usize>,
    /// An expression; the step is skipped when it is false.
    pub when: Option<String>,
    /// Whether its failure fails the run.
    pub required: bool,
    /// It runs even when a dependency failed (cleanup).
    pub always: bool,
    /// Handlers that run only when this step fails.
    pub on_failure: Vec<usize>,
    /// The steps whose `on_failure` names this one: it runs only when one
    /// of them failed.
    pub handles: Vec<usize>,
    /// When failed attempts are tried again.
    pub retry: RetryPolicy,
    /// The per-attempt limits the step (or the workflow's defaults) sets;
    /// the rest are its tenant's defaults, filled in when it runs.
    pub limits: LimitsSpec,
    /// One execution, or one per item.
    pub fan_out: FanOut,
    /// Items of a fan-out running at once, at most.
    pub max_concurrent: Option<u32>,
    /// What the step may reach beyond its own memory.
    pub grants: StepGrants,
    /// How a plain program's exit codes are classified.
    pub exit_codes: crate::sandbox::ExitCodes,
}

/// When and how often a failed attempt is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// How the delay grows.
    pub backoff: Backoff,
    /// The delay before the first retry.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Growth factor of exponential backoff.
    pub multiplier: f64,
    /// Randomize each delay between half and all of it.
    pub jitter: bool,
    /// The failure classes that are retried.
    pub on: Vec<FailureKind>,
    /// No attempt starts later than this after the first.
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    /// One attempt; when `attempts` is raised, exponential backoff from 1s
    /// up to 30s with jitter, on `retryable`, `timeout` and `trap`.
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            backoff: Backoff::Exponential,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: true,
            on: FailureKind::ALL.into_iter().filter(|kind| kind.retryable_by_default()).collect(),
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// Whether a failure of `kind` on attempt `attempt` may be retried.
    pub fn retries(&self, kind: FailureKind, attempt: u32) -> bool {
        attempt < self.attempts && self.on.contains(&kind)
    }

    /// The delay after failed attempt `attempt` (1-based), before jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let n = attempt.saturating_sub(1);
        let delay = match self.backoff {
            Backoff::Constant => self.initial,
            Backoff::Linear => self.initial.saturating_mul(attempt),
            Backoff::Exponential => {
                let factor = self.multiplier.powi(i32::try_from(n).unwrap_or(i32::MAX));
                Duration::try_from_secs_f64(self.initial.as_secs_f64() * factor).unwrap_or(self.max)
            }
        };
        delay.min(self.max)
    }
}

impl Workflow {
    /// Reads and validates a workflow file (YAML or JSON).
    pub fn load(path: &Path) -> Result<Workflow, WorkflowError> {
        validate::load_file(path, &mut validate::Loading::default())
    }

    /// Like [`Workflow::load`], for a file `tenant` controls: an include
    /// outside what the tenant may include is refused before it is read.
    /// The rest of the tenant's ceilings are checked by [`Tenant::check`].
    pub fn load_for(path: &Path, tenant: &Tenant) -> Result<Workflow, WorkflowError> {
        validate::load_file(path, &mut validate::Loading::for_tenant(tenant))
    }

    /// Validates a workflow given as a spec (from the builder, or decoded by
    /// the caller); relative paths resolve against `base_dir`.
    pub fn from_spec(spec: WorkflowSpec, name_for_messages: &str, base_dir: &Path) -> Result<Workflow, WorkflowError> {
        validate::validate(spec, Path::new(name_for_messages), base_dir, &mut validate::Loading::default())
    }

    /// The position of step `id` in [`Workflow::steps`].
    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|step| step.id == id)
    }

    /// Step `start` and every step that depends on it, directly or not, in
    /// file order: what `stepbox retry --from` runs again.
    pub fn downstream(&self, start: usize) -> impl Iterator<Item = usize> {
        graph::downstream(&self.steps, start).into_iter()
    }

    /// Hashes the workflow file (the bytes that were parsed), each component
    /// and each literal include (with its own components), so a resumed run
    /// can refuse files that changed since it started, and pins each
    /// component to the hash read here: a run of this workflow loads exactly
    /// those bytes (from memory, without reading the file, when the sandbox
    /// holds them) and refuses a file that changed since. Returns the
    /// hashes, as runs record them.
    pub fn pin(&mut self) -> std::io::Result<Value> {
        fn hash(path: &Path) -> std::io::Result<Digest> {
            Ok(crate::sandbox::digest(&std::fs::read(path)?))
        }
        let mut components = serde_json::Map::new();
        for component in self.components.values_mut() {
            let digest = hash(&component.path)?;
            component.digest = Some(digest);
            components.insert(component.name.clone(), Value::String(crate::sandbox::hex(&digest)));
        }
        let mut includes = serde_json::Map::new();
        for step in &mut self.steps {
            if let Action::Include { workflow: Some(included), .. } = &mut step.action {
                includes.insert(step.id.clone(), Arc::make_mut(included).pin()?);
            }
        }
        // The bytes parsed, not the file as it is now: a run records the
        // workflow it runs.
        let workflow = crate::sandbox::hex(&match self.parsed {
            Some(parsed) => parsed,
            None => hash(&self.file)?,
        });
        Ok(serde_json::json!({ "workflow": workflow, "components": components, "includes": includes }))
    }

    /// The events its waiting steps wait for, its literal includes' too;
    /// `None` when a workflow it includes through a template (known only
    /// when the run reaches it) could wait for any event.
    pub fn wait_events(&self) -> Option<std::collections::BTreeSet<String>> {
        let mut events = std::collections::BTreeSet::new();
        for step in &self.steps {
            match &step.action {
                Action::Wait { event, .. } => {
                    events.insert(event.clone());
                }
                Action::Include { workflow: Some(included), .. } => events.extend(included.wait_events()?),
                Action::Include { workflow: None, .. } => return None,
                Action::Run { .. } => {}
            }
        }
        Some(events)
    }

    /// Checks the inputs a run was given against the declared ones and fills
    /// in defaults.
    pub fn bind_inputs(&self, given: &serde_json::Map<String, Value>) -> Result<Inputs, WorkflowError> {
        inputs::bind(self, given)
    }
}

/// What differs between two fingerprints, for people: empty when nothing
/// did.
pub fn fingerprint_changes(before: &Value, now: &Value) -> Vec<String> {
    let mut changes = Vec::new();
    if before["workflow"] != now["workflow"] {
        changes.push("the workflow file changed".to_owned());
    }
    let empty = serde_json::Map::new();
    let (old, new) = (before["includes"].as_object().unwrap_or(&empty), now["includes"].as_object().unwrap_or(&empty));
    for step in old.keys().chain(new.keys().filter(|step| !old.contains_key(*step))) {
        if old.get(step) != new.get(step) {
            changes.push(format!("the workflow included by step `{step}` changed"));
        }
    }
    let (old, new) =
        (before["components"].as_object().unwrap_or(&empty), now["components"].as_object().unwrap_or(&empty));
    for (name, hash) in old {
        match new.get(name) {
            None => changes.push(format!("component `{name}` was removed")),
            Some(other) if other != hash => changes.push(format!("component `{name}` changed")),
            Some(_) => {}
        }
    }
    for name in new.keys().filter(|name| !old.contains_key(*name)) {
        changes.push(format!("component `{name}` was added"));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_are_checked_when_the_workflow_is() {
        let dir = tempfile::tempdir().unwrap();
        let check = |on: &str| {
            let path = dir.path().join("w.yaml");
            std::fs::write(&path, format!("name: w\non:\n{on}\nsteps: []\n")).unwrap();
            Workflow::load(&path).map(|_| ()).map_err(|err| err.to_string())
        };
        check("  schedule: [{ cron: '*/5 * * * *', timezone: Europe/Paris }]").unwrap();
        for (on, why) in [
            ("  schedule: [{ cron: '* * * * * *' }]", "not a cron pattern"),
            ("  schedule: [{ cron: '0 0 30 2 *' }]", "never comes"),
            ("  schedule: [{ cron: '* * * * *', timezone: Mars/Olympus }]", "not a time zone"),
            ("  schedule: [{ cron: '* * * * *', with: { nope: 1 } }]", "nope"),
            ("  webhook: { secret: short }", "at least 16"),
        ] {
            let err = check(on).unwrap_err();
            assert!(err.contains(why), "{on}: {err}");
        }
        let many: Vec<String> = (0..17).map(|minute| format!("{{ cron: '{minute} * * * *' }}")).collect();
        let err = check(&format!("  schedule: [{}]", many.join(", "))).unwrap_err();
        assert!(err.contains("at most 16"), "{err}");
    }

    #[test]
    fn includes_that_branch_or_nest_without_end_are_refused_before_they_are_all_read() {
        let dir = tempfile::tempdir().unwrap();
        // Each level includes the next twice: 2^30 loads if nothing stopped it.
        for level in 0..30 {
            let next = format!("l{}.yaml", level + 1);
            std::fs::write(
                dir.path().join(format!("l{level}.yaml")),
                format!("name: l{level}\nsteps:\n  - id: a\n    include: {next}\n  - id: b\n    include: {next}\n"),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("l30.yaml"), "name: leaf\nsteps: []\n").unwrap();
        let err = Workflow::load(&dir.path().join("l0.yaml")).unwrap_err().to_string();
        assert!(err.contains("more than 1000 times"), "{err}");
        // A chain deeper than a tenant allows is refused at the ceiling.
        let tenant = Tenant::restricted("t");
        let err = Workflow::load_for(&dir.path().join("l0.yaml"), &tenant).unwrap_err().to_string();
        assert!(err.contains("more than 8 workflows deep"), "{err}");
    }

    #[test]
    fn backoff_grows_as_configured_and_stops_at_max() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            ..RetryPolicy::default()
        };
        let delays: Vec<u128> = (1..=4).map(|n| policy.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        let linear = RetryPolicy { backoff: Backoff::Linear, ..policy.clone() };
        assert_eq!(linear.delay(3).as_millis(), 300);
        let constant = RetryPolicy { backoff: Backoff::Constant, ..policy };
        assert_eq!(constant.delay(4).as_millis(), 100);
    }
}
