//! Turning a [`WorkflowSpec`] into a [`Workflow`]: components resolved,
//! step references turned into indices, settings merged over the defaults,
//! grants parsed, literal includes loaded; every problem reported with its
//! place and its fix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use serde_saphyr::Spanned;

use super::diagnostic::{Diagnostics, WorkflowError, did_you_mean};
use super::grants::StepGrants;
use super::inputs::check_type;
use super::spec::{ComponentSpec, RetrySpec, WorkflowSpec};
use super::template::check::{check_list, check_templates};
use super::template::is_template;
use super::{Action, Component, FanOut, RetryPolicy, Step, Workflow, graph, parse};
use crate::sandbox::ExitCodes;
use crate::tenant::Tenant;

/// Where a load is in its tree of includes.
#[derive(Default)]
pub(super) struct Loading<'a> {
    /// The files that include the one being loaded, to refuse include
    /// cycles.
    including: Vec<PathBuf>,
    /// Included files loaded so far, each load counted: a tree of
    /// includes that branches at every level would otherwise be loaded an
    /// exponential number of times.
    loaded: usize,
    /// When set, an include outside what this tenant may include is
    /// refused before it is read: its contents could otherwise show up in
    /// an error message, and a device file would never end. Includes
    /// deeper than the tenant's `max_include_depth` are refused unread too.
    tenant: Option<&'a Tenant>,
}

/// Included files one workflow may load in all, counting each time a file
/// is included.
const MAX_INCLUDES_LOADED: usize = 1_000;

/// How deep includes may nest without a tenant's ceiling: deep enough for
/// any real workflow, shallow enough for the stack.
const MAX_INCLUDE_DEPTH: usize = 64;

impl<'a> Loading<'a> {
    /// A load whose includes `tenant` must be allowed to include.
    pub(super) fn for_tenant(tenant: &'a Tenant) -> Self {
        Loading { tenant: Some(tenant), ..Default::default() }
    }

    /// How deep includes may nest, the including workflow counted as 1.
    fn max_depth(&self) -> usize {
        self.tenant.map_or(MAX_INCLUDE_DEPTH, |tenant| tenant.spec.run.max_include_depth.min(MAX_INCLUDE_DEPTH))
    }
}

/// Reads and validates the workflow file at `path`.
pub(super) fn load_file(path: &Path, loading: &mut Loading<'_>) -> Result<Workflow, WorkflowError> {
    let text = parse::read_text(path, "workflow file")?;
    let spec: WorkflowSpec = parse::decode(path, &text)?;
    let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
    let mut workflow = validate(spec, path, &base_dir, loading)?;
    workflow.parsed = Some(crate::sandbox::digest(text.as_bytes()));
    Ok(workflow)
}

pub(super) fn validate(
    spec: WorkflowSpec,
    file: &Path,
    base_dir: &Path,
    loading: &mut Loading<'_>,
) -> Result<Workflow, WorkflowError> {
    let mut d = Diagnostics::new(file);
    if spec.name.trim().is_empty() {
        d.nowhere("the workflow's `name` is empty", Some("give the workflow a name".into()));
    }
    for (name, input) in &spec.inputs {
        if let Some(Err(message)) = input.default.as_ref().map(|default| check_type(name, input.kind, default)) {
            d.nowhere(format!("the default of input `{name}`: {message}"), None);
        }
    }

    let defaults_retry = spec.defaults.retry.over(&RetryPolicy::default());
    check_retry(&mut d, &spec.defaults.retry, "defaults.retry");
    check_duration(&mut d, spec.defaults.limits.timeout, "defaults.limits.timeout");
    if let Some(breaker) = spec.defaults.circuit_breaker {
        check_duration(&mut d, Some(breaker.cool_down), "defaults.circuit_breaker.cool_down");
    }

    // Components: declared ones, then paths used directly by steps.
    let mut components: BTreeMap<String, Component> = BTreeMap::new();
    for (name, component) in &spec.components {
        let (rate_limit, breaker) = match &component.value {
            ComponentSpec::Path(_) => (None, spec.defaults.circuit_breaker),
            ComponentSpec::Table(table) => (table.rate_limit, table.circuit_breaker.or(spec.defaults.circuit_breaker)),
        };
        if rate_limit.is_some_and(|limit| limit.starts == 0 || limit.per.is_zero()) {
            d.on(
                component,
                format!("component `{name}` has a rate limit of zero"),
                Some("use at least 1 start per a non-zero interval".into()),
            );
        }
        check_duration(&mut d, rate_limit.map(|limit| limit.per), &format!("component `{name}`: rate_limit.per"));
        check_duration(
            &mut d,
            breaker.map(|breaker| breaker.cool_down),
            &format!("component `{name}`: circuit_breaker.cool_down"),
        );
        if breaker.is_some_and(|breaker| breaker.failures == 0) {
            d.on(component, format!("component `{name}`: circuit_breaker.failures must be at least 1"), None);
        }
        let path = base_dir.join(component.value.path());
        if !path.is_file() {
            d.on(
                component,
                format!("component `{name}`: {} does not exist", path.display()),
                Some("paths are relative to the workflow file; build the component or fix the path".into()),
            );
        }
        components.insert(
            name.clone(),
            Component { name: name.clone(), path, rate_limit, breaker, location: component.referenced, digest: None },
        );
    }

    // Step ids: valid and unique.
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, step) in spec.steps.iter().enumerate() {
        let id = step.id.value.as_str();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            d.on(&step.id, format!("step id `{id}` is not valid"), Some("use letters, digits, `_` and `-`".into()));
        }
        if let Some(&first) = index.get(id) {
            let line = spec.steps[first].id.referenced.line();
            d.on(
                &step.id,
                format!("duplicate step id `{id}`"),
                Some(format!("it is first used on line {line}; ids must be unique")),
            );
        } else {
            index.insert(id, i);
        }
    }
    let ids: Vec<&str> = spec.steps.iter().map(|step| step.id.value.as_str()).collect();
    let resolve = |d: &mut Diagnostics, reference: &Spanned<String>, what: &str| -> Option<usize> {
        let found = index.get(reference.value.as_str()).copied();
        if found.is_none() {
            d.on(
                reference,
                format!("{what} unknown step `{}`", reference.value),
                did_you_mean(&reference.value, ids.iter().copied()),
            );
        }
        found
    };

    let mut steps = Vec::with_capacity(spec.steps.len());
    for (i, step) in spec.steps.iter().enumerate() {
        let id = step.id.value.clone();
        let depends_on: Vec<usize> =
            step.depends_on.iter().filter_map(|dep| resolve(&mut d, dep, &format!("step `{id}` depends on"))).collect();
        if depends_on.contains(&i) {
            d.on(&step.id, format!("step `{id}` depends on itself"), Some("remove it from its own depends_on".into()));
        }
        let on_failure: Vec<usize> = step
            .on_failure
            .iter()
            .filter_map(|h| resolve(&mut d, h, &format!("step `{id}`'s on_failure names an")))
            .collect();
        let kinds = [step.uses.is_some(), step.include.is_some(), step.wait.is_some()];
        let action = match (&step.uses, &step.include, &step.wait) {
            (Some(uses), None, None) => {
                Some(Action::Run { component: resolve_uses(&mut d, uses, &mut components, base_dir) })
            }
            (None, Some(include), None) => Some(Action::Include {
                path: include.value.clone(),
                workflow: load_include(&mut d, include, base_dir, loading).map(Arc::new),
            }),
            (None, None, Some(wait)) => {
                check_wait(&mut d, wait, step, &id);
                Some(Action::Wait { event: wait.value.event.clone(), timeout: wait.value.timeout })
            }
            _ if kinds.iter().filter(|&&kind| kind).count() > 1 => {
                d.on(
                    &step.id,
                    format!("step `{id}` has more than one of `uses`, `include` and `wait`"),
                    Some("a step runs one component, runs one sub-workflow or waits for one event; keep one".into()),
                );
                None
            }
            _ => {
                d.on(
                    &step.id,
                    format!("step `{id}` has neither `uses`, `include` nor `wait`"),
                    Some("add `uses: <component>`, `include: <file>` or `wait: { event: <name> }`".into()),
                );
                None
            }
        };
        let fan_out = match (&step.for_each, &step.matrix) {
            (Some(_), Some(_)) => {
                d.on(&step.id, format!("step `{id}` has both `for_each` and `matrix`"), Some("use one of them".into()));
                FanOut::None
            }
            (Some(list), None) => {
                check_list(&mut d, list, "for_each");
                FanOut::ForEach(list.value.clone())
            }
            (None, Some(matrix)) => {
                if matrix.value.is_empty() {
                    d.on(matrix, "`matrix` is empty", Some("give at least one key with a list of values".into()));
                }
                for (key, values) in &matrix.value {
                    let spanned = Spanned::new(values.clone(), matrix.referenced, matrix.defined);
                    check_list(&mut d, &spanned, &format!("matrix.{key}"));
                }
                FanOut::Matrix(matrix.value.clone())
            }
            (None, None) => FanOut::None,
        };
        match step.max_concurrent {
            Some(0) => d.on(&step.id, format!("step `{id}`: max_concurrent must be at least 1"), None),
            Some(_) if fan_out == FanOut::None => d.on(
                &step.id,
                format!("step `{id}` sets max_concurrent without for_each or matrix"),
                Some("max_concurrent limits a fan-out; remove it".into()),
            ),
            _ => {}
        }
        if let Some(retry) = &step.retry {
            check_retry(&mut d, retry, &format!("step `{id}`'s retry"));
        }
        check_duration(&mut d, step.limits.as_ref().and_then(|l| l.timeout), &format!("step `{id}`: limits.timeout"));
        let grants = StepGrants::from_spec(&mut d, step, &id, base_dir);
        steps.push(Step {
            id,
            action: action.unwrap_or(Action::Run { component: String::new() }),
            with: step.with.as_ref().map(|with| with.value.clone()).unwrap_or(Value::Object(Default::default())),
            depends_on,
            when: step.when.as_ref().map(|when| when.value.clone()),
            required: step.required,
            always: step.always,
            on_failure,
            handles: Vec::new(),
            retry: step.retry.as_ref().map_or_else(|| defaults_retry.clone(), |retry| retry.over(&defaults_retry)),
            limits: step
                .limits
                .as_ref()
                .map_or_else(|| spec.defaults.limits.clone(), |limits| limits.over_spec(&spec.defaults.limits)),
            fan_out,
            max_concurrent: step.max_concurrent,
            grants,
            exit_codes: step
                .exit_codes
                .as_ref()
                .map(|codes| ExitCodes { retryable: codes.retryable.clone() })
                .unwrap_or_default(),
        });
    }
    // A failure handler runs after the step it handles.
    for i in 0..steps.len() {
        for h in steps[i].on_failure.clone() {
            if h == i {
                d.on(&spec.steps[i].id, format!("step `{}` names itself in on_failure", steps[i].id), None);
                continue;
            }
            steps[h].handles.push(i);
            if !steps[h].depends_on.contains(&i) {
                steps[h].depends_on.push(i);
            }
        }
    }
    d.finish()?;

    let mut d = Diagnostics::new(file);
    if let Some(cycle) = graph::find_cycle(&steps) {
        let names: Vec<&str> = cycle.iter().map(|&i| steps[i].id.as_str()).collect();
        let first = &spec.steps[cycle[0]].id;
        d.on(
            first,
            format!("the steps depend on each other in a cycle: {} (each depends on the next)", names.join(" → ")),
            Some("remove one of these dependencies".into()),
        );
        return Err(d.into_error());
    }

    check_templates(&mut d, &spec, &steps);
    let triggers = check_triggers(&mut d, &spec.triggers);
    d.finish()?;
    let workflow = Workflow {
        name: spec.name,
        file: file.to_owned(),
        base_dir: base_dir.to_owned(),
        inputs: spec.inputs,
        vars: spec.vars.into_iter().collect(),
        components,
        steps,
        outputs: spec.outputs.into_iter().map(|(name, value)| (name, value.value)).collect(),
        triggers,
        parsed: None,
    };
    // A schedule's inputs are literal, so they are bound now, not at 3 a.m.
    let mut d = Diagnostics::new(file);
    for schedule in &workflow.triggers.schedules {
        if let Err(err) = workflow.bind_inputs(&schedule.inputs) {
            for diagnostic in err.diagnostics {
                d.nowhere(format!("schedule `{}`: {}", schedule.pattern, diagnostic.message), diagnostic.help);
            }
        }
    }
    d.finish()?;
    Ok(workflow)
}

/// Schedules one workflow may have.
const MAX_SCHEDULES: usize = 16;

/// The shortest webhook secret.
const MIN_WEBHOOK_SECRET: usize = 16;

fn check_triggers(d: &mut Diagnostics, spec: &super::spec::TriggersSpec) -> super::Triggers {
    let mut schedules = Vec::new();
    if spec.schedule.len() > MAX_SCHEDULES {
        d.nowhere(
            format!("the workflow has {} schedules; at most {MAX_SCHEDULES} are allowed", spec.schedule.len()),
            Some("combine them: one cron pattern can name several minutes, hours and days".into()),
        );
    }
    for schedule in spec.schedule.iter().take(MAX_SCHEDULES) {
        // Five fields: a tick a minute at most, so schedules cannot keep
        // the service busy.
        let parser = croner::parser::CronParser::builder().seconds(croner::parser::Seconds::Disallowed).build();
        let cron = match parser.parse(&schedule.cron) {
            Ok(cron) => cron,
            Err(err) => {
                d.nowhere(
                    format!("schedule `{}` is not a cron pattern: {err}", schedule.cron),
                    Some("write five fields, minute hour day month weekday, like `*/5 * * * *`".into()),
                );
                continue;
            }
        };
        let timezone = match schedule.timezone.as_deref() {
            None => jiff::tz::TimeZone::UTC,
            Some(name) => match jiff::tz::TimeZone::get(name) {
                Ok(zone) => zone,
                Err(_) => {
                    d.nowhere(
                        format!("schedule `{}`: `{name}` is not a time zone", schedule.cron),
                        Some("use an IANA name like `Europe/Paris` or `America/New_York`".into()),
                    );
                    continue;
                }
            },
        };
        // A pattern that never matches (the 30th of February) would have
        // the service search the calendar on every round.
        let fires = jiff::Timestamp::now().to_zoned(timezone.clone());
        if cron.find_next_occurrence(&fires, false).is_err() {
            d.nowhere(
                format!("schedule `{}` never comes", schedule.cron),
                Some("check the day and month fields".into()),
            );
            continue;
        }
        schedules.push(super::Schedule {
            pattern: schedule.cron.clone(),
            cron,
            timezone,
            inputs: schedule.with.clone(),
            catch_up: schedule.catch_up,
        });
    }
    let webhook = spec.webhook.as_ref().map(|webhook| {
        if webhook.secret.len() < MIN_WEBHOOK_SECRET {
            d.nowhere(
                format!(
                    "the webhook's secret is {} characters long; it must have at least {MIN_WEBHOOK_SECRET}",
                    webhook.secret.len()
                ),
                Some("use a long random value, e.g. `openssl rand -hex 32`".into()),
            );
        }
        super::Webhook { secret: webhook.secret.clone(), with: webhook.with.clone() }
    });
    super::Triggers { schedules, webhook }
}

/// `uses` names a component, or is a path to a .wasm file (registered as a
/// component under its path).
fn resolve_uses(
    d: &mut Diagnostics,
    uses: &Spanned<String>,
    components: &mut BTreeMap<String, Component>,
    base_dir: &Path,
) -> String {
    let name = uses.value.clone();
    if components.contains_key(&name) {
        return name;
    }
    if name.ends_with(".wasm") {
        let path = base_dir.join(&name);
        if !path.is_file() {
            d.on(
                uses,
                format!("{} does not exist", path.display()),
                Some("paths are relative to the workflow file".into()),
            );
        }
        components.insert(
            name.clone(),
            Component {
                name: name.clone(),
                path,
                rate_limit: None,
                breaker: None,
                location: uses.referenced,
                digest: None,
            },
        );
        return name;
    }
    let known: Vec<&str> = components.keys().map(String::as_str).collect();
    d.on(
        uses,
        format!("`uses: {name}` names no component"),
        did_you_mean(&name, known.iter().copied())
            .or_else(|| Some("declare it under `components`, or give a path ending in .wasm".into())),
    );
    name
}

/// A literal include is loaded and validated now, once; a templated one
/// when it is reached.
fn load_include(
    d: &mut Diagnostics,
    include: &Spanned<String>,
    base_dir: &Path,
    loading: &mut Loading<'_>,
) -> Option<Workflow> {
    if is_template(&include.value) {
        return None;
    }
    let path = base_dir.join(&include.value);
    if let Some(Err(problem)) = loading.tenant.map(|tenant| tenant.confine_include(base_dir, &path)) {
        d.on(include, problem, None);
        return None;
    }
    // The file being loaded and those including it, then this one.
    if loading.including.len() + 2 > loading.max_depth() {
        d.on(
            include,
            format!("includes nest more than {} workflows deep", loading.max_depth()),
            Some("include fewer levels (max_include_depth in the tenants file)".into()),
        );
        return None;
    }
    loading.loaded += 1;
    if loading.loaded > MAX_INCLUDES_LOADED {
        d.on(
            include,
            format!("the workflow includes files more than {MAX_INCLUDES_LOADED} times in all"),
            Some("include each file from fewer places".into()),
        );
        return None;
    }
    let key = path.canonicalize().unwrap_or_else(|_| path.clone());
    if loading.including.contains(&key) {
        d.on(
            include,
            format!("{} includes itself (through {} file(s))", path.display(), loading.including.len()),
            Some("remove the include cycle".into()),
        );
        return None;
    }
    loading.including.push(key);
    let loaded = load_file(&path, loading);
    loading.including.pop();
    match loaded {
        Ok(workflow) => Some(workflow),
        Err(err) => {
            let first = err.diagnostics.first().map(ToString::to_string).unwrap_or_default();
            d.on(include, format!("the included workflow {} is not valid:\n{first}", path.display()), None);
            None
        }
    }
}

/// The longest event name a waiting step may wait for.
const MAX_EVENT_NAME: usize = 64;

/// A waiting step names a usable event and runs nothing: no fan-out,
/// retries, limits or grants.
fn check_wait(d: &mut Diagnostics, wait: &Spanned<super::spec::WaitSpec>, step: &super::spec::StepSpec, id: &str) {
    let event = &wait.value.event;
    let usable = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if event.is_empty() || event.len() > MAX_EVENT_NAME || !event.chars().all(usable) {
        d.on(
            wait,
            format!("step `{id}` waits for `{}`, which is not an event name", event.escape_debug()),
            Some(format!("use 1 to {MAX_EVENT_NAME} letters, digits, `_`, `-` and `.`")),
        );
    }
    check_duration(d, wait.value.timeout, &format!("step `{id}`: wait.timeout"));
    let runs_something = step.for_each.is_some()
        || step.matrix.is_some()
        || step.retry.is_some()
        || step.limits.is_some()
        || step.with.is_some()
        || !step.dirs.is_empty()
        || !step.secrets.is_empty()
        || !step.env.is_empty()
        || !step.config.is_empty()
        || !step.args.is_empty()
        || step.stdin.is_some()
        || step.scratch
        || step.deterministic
        || step.network.is_some()
        || step.exit_codes.is_some();
    if runs_something {
        d.on(
            wait,
            format!("step `{id}` waits for an event, so it cannot fan out, retry, take input, limits or grants"),
            Some(
                "keep `wait` with `depends_on`, `when`, `required` and `always`; move the rest to a step after it"
                    .into(),
            ),
        );
    }
}

/// The longest duration a workflow may name. Deadlines are computed from
/// durations; far beyond this they would overflow the clock.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

fn check_duration(d: &mut Diagnostics, duration: Option<std::time::Duration>, what: &str) {
    if duration.is_some_and(|duration| duration > MAX_DURATION) {
        d.nowhere(
            format!(
                "{what}: {} is longer than the longest duration stepbox accepts",
                humantime::format_duration(duration.unwrap_or_default())
            ),
            Some("use at most 366d".into()),
        );
    }
}

fn check_retry(d: &mut Diagnostics, retry: &RetrySpec, what: &str) {
    check_duration(d, retry.initial, &format!("{what}: initial"));
    check_duration(d, retry.max, &format!("{what}: max"));
    check_duration(d, retry.deadline, &format!("{what}: deadline"));
    if retry.attempts == Some(0) {
        d.nowhere(format!("{what}: attempts must be at least 1 (1 means no retries)"), None);
    }
    if retry.multiplier.is_some_and(|m| !(m >= 1.0 && m.is_finite())) {
        d.nowhere(format!("{what}: multiplier must be a number of at least 1"), None);
    }
}
