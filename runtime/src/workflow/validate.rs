//! Turning a [`WorkflowSpec`] into a [`Workflow`], reporting every problem
//! with its place and its fix.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use serde_saphyr::{Location, Spanned};

use super::diagnostic::{Diagnostics, WorkflowError, did_you_mean};
use super::spec::{ComponentSpec, InputType, LimitsSpec, RetrySpec, WorkflowSpec};
use super::template::{self, ROOTS};
use super::{Action, Component, FanOut, RetryPolicy, Step, Workflow};
use crate::sandbox::{DirGrant, ExitCodes, Limits};

/// Parses and validates `path`. `including` holds the files that include
/// this one, to refuse include cycles.
pub(super) fn load_file(path: &Path, including: &mut Vec<PathBuf>) -> Result<Workflow, WorkflowError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        WorkflowError::single(path, format!("cannot read the workflow file: {err}"), Some("check the path".into()))
    })?;
    let spec = parse(path, &text)?;
    let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
    validate(spec, path, &base_dir, including)
}

/// Decodes YAML or JSON text (a workflow, a tenants file) with located
/// errors.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, WorkflowError> {
    serde_saphyr::from_str::<T>(text).map_err(|err| {
        let mut diagnostics = Diagnostics::new(path);
        let location = err.location().unwrap_or(Location::UNKNOWN);
        let message = err.without_snippet().to_string();
        let mut message = message.lines().next().unwrap_or_default().to_owned();
        // The location is already in front of the message.
        if let Some(at) = message.rfind(" at line ") {
            message.truncate(at);
        }
        let help = unknown_field_help(&message);
        diagnostics.at(location, message, help);
        diagnostics.into_error()
    })
}

/// For "unknown field `x`, expected one of a, b, c": the nearest known
/// field, or the list.
fn unknown_field_help(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest
        .split_once("expected ")
        .map(|(_, list)| list.trim_start_matches("one of ").split(", ").map(|name| name.trim_matches('`')).collect())
        .unwrap_or_default();
    did_you_mean(field, expected.iter().copied())
}

pub(super) fn validate(
    spec: WorkflowSpec,
    file: &Path,
    base_dir: &Path,
    including: &mut Vec<PathBuf>,
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

    let defaults_limits = merge_limits(&Limits::default(), &spec.defaults.limits);
    let defaults_retry = merge_retry(&RetryPolicy::default(), &spec.defaults.retry);
    check_retry(&mut d, &spec.defaults.retry, "defaults.retry");

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
            Component { name: name.clone(), path, rate_limit, breaker, location: component.referenced },
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
        let action = match (&step.uses, &step.include) {
            (Some(uses), None) => {
                Some(Action::Run { component: resolve_uses(&mut d, uses, &mut components, base_dir) })
            }
            (None, Some(include)) => {
                check_include(&mut d, include, base_dir, including);
                Some(Action::Include { path: include.value.clone() })
            }
            (Some(_), Some(_)) => {
                d.on(
                    &step.id,
                    format!("step `{id}` has both `uses` and `include`"),
                    Some("a step runs one component or one sub-workflow; keep one".into()),
                );
                None
            }
            (None, None) => {
                d.on(
                    &step.id,
                    format!("step `{id}` has neither `uses` nor `include`"),
                    Some("add `uses: <component>` or `include: <file>`".into()),
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
        let mut dirs = Vec::new();
        for dir in &step.dirs {
            match dir.value.parse::<DirGrant>() {
                Ok(mut grant) => {
                    grant.host = base_dir.join(&grant.host);
                    if !grant.host.is_dir() {
                        d.on(
                            dir,
                            format!("step `{id}`: directory {} does not exist", grant.host.display()),
                            Some("host paths are relative to the workflow file".into()),
                        );
                    }
                    dirs.push(grant);
                }
                Err(message) => d.on(dir, message, None),
            }
        }
        let mut network = Vec::new();
        for address in step.network.iter().flat_map(|network| &network.connect) {
            match address.value.parse() {
                Ok(address) => network.push(address),
                Err(_) => d.on(
                    address,
                    format!("step `{id}`: `{}` is not an IP:PORT address", address.value),
                    Some(
                        "write an IP address and a port, like 10.0.0.5:443 or [::1]:8080; names are not resolved"
                            .into(),
                    ),
                ),
            }
        }
        let mut http = Vec::new();
        for rule in step.network.iter().flat_map(|network| &network.http) {
            match rule.value.parse() {
                Ok(rule) => http.push(rule),
                Err(message) => d.on(rule, format!("step `{id}`: {message}"), None),
            }
        }
        for key in step.secrets.keys().filter(|key| step.config.contains_key(*key)) {
            d.on(
                &step.id,
                format!("step `{id}`: `{key}` is both a config value and a secret"),
                Some("keep one".into()),
            );
        }
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
            retry: step
                .retry
                .as_ref()
                .map(|retry| merge_retry(&defaults_retry, retry))
                .unwrap_or_else(|| defaults_retry.clone()),
            limits: step
                .limits
                .as_ref()
                .map(|limits| merge_limits(&defaults_limits, limits))
                .unwrap_or_else(|| defaults_limits.clone()),
            fan_out,
            max_concurrent: step.max_concurrent,
            config: step.config.clone(),
            env: step.env.clone(),
            dirs,
            secrets: step.secrets.iter().map(|(key, secret)| (key.clone(), secret.env.clone())).collect(),
            args: step.args.clone(),
            stdin: step.stdin.clone(),
            scratch: step.scratch,
            deterministic: step.deterministic,
            network,
            http,
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
    if let Some(cycle) = find_cycle(&steps) {
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
    d.finish()?;
    Ok(Workflow {
        name: spec.name,
        file: file.to_owned(),
        base_dir: base_dir.to_owned(),
        inputs: spec.inputs,
        vars: spec.vars.into_iter().collect(),
        components,
        steps,
        outputs: spec.outputs.into_iter().map(|(name, value)| (name, value.value)).collect(),
    })
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
            Component { name: name.clone(), path, rate_limit: None, breaker: None, location: uses.referenced },
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

/// A literal include is validated now (a templated one when it is reached).
fn check_include(d: &mut Diagnostics, include: &Spanned<String>, base_dir: &Path, including: &mut Vec<PathBuf>) {
    if template::is_template(&include.value) {
        return;
    }
    let path = base_dir.join(&include.value);
    let key = path.canonicalize().unwrap_or_else(|_| path.clone());
    if including.contains(&key) {
        d.on(
            include,
            format!("{} includes itself (through {} file(s))", path.display(), including.len()),
            Some("remove the include cycle".into()),
        );
        return;
    }
    including.push(key);
    if let Err(err) = load_file(&path, including) {
        let first = err.diagnostics.first().map(ToString::to_string).unwrap_or_default();
        d.on(include, format!("the included workflow {} is not valid:\n{first}", path.display()), None);
    }
    including.pop();
}

/// A fan-out list: a literal list or an expression.
fn check_list(d: &mut Diagnostics, list: &Spanned<Value>, what: &str) {
    match &list.value {
        Value::Array(_) => {}
        Value::String(text) => {
            if let Err(message) = template::referenced_paths(text, true) {
                d.on(list, format!("`{what}` is not a valid expression: {message}"), None);
            }
        }
        _ => d.on(list, format!("`{what}` must be a list or an expression that gives a list"), None),
    }
}

fn check_retry(d: &mut Diagnostics, retry: &RetrySpec, what: &str) {
    if retry.attempts == Some(0) {
        d.nowhere(format!("{what}: attempts must be at least 1 (1 means no retries)"), None);
    }
    if retry.multiplier.is_some_and(|m| !(m >= 1.0 && m.is_finite())) {
        d.nowhere(format!("{what}: multiplier must be a number of at least 1"), None);
    }
}

fn merge_limits(base: &Limits, spec: &LimitsSpec) -> Limits {
    Limits {
        fuel: spec.fuel.unwrap_or(base.fuel),
        timeout: spec.timeout.unwrap_or(base.timeout),
        memory: spec.memory.unwrap_or(base.memory),
        output: spec.output.unwrap_or(base.output),
        stdio: spec.stdio.unwrap_or(base.stdio),
        ..base.clone()
    }
}

fn merge_retry(base: &RetryPolicy, spec: &RetrySpec) -> RetryPolicy {
    RetryPolicy {
        attempts: spec.attempts.unwrap_or(base.attempts),
        backoff: spec.backoff.unwrap_or(base.backoff),
        initial: spec.initial.unwrap_or(base.initial),
        max: spec.max.unwrap_or(base.max),
        multiplier: spec.multiplier.unwrap_or(base.multiplier),
        jitter: spec.jitter.unwrap_or(base.jitter),
        on: spec.on.clone().unwrap_or_else(|| base.on.clone()),
        deadline: spec.deadline.or(base.deadline),
    }
}

/// A cycle in the dependency graph, if there is one, as the steps on it.
/// Iterative, so a chain of thousands of steps cannot overflow the stack.
fn find_cycle(steps: &[Step]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; steps.len()];
    for start in 0..steps.len() {
        if mark[start] != Mark::New {
            continue;
        }
        // (step, next dependency to visit)
        let mut stack = vec![(start, 0usize)];
        mark[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&dep) = steps[node].depends_on.get(*next) {
                *next += 1;
                match mark[dep] {
                    Mark::New => {
                        mark[dep] = Mark::Open;
                        stack.push((dep, 0));
                    }
                    Mark::Open => {
                        let from = stack.iter().position(|&(n, _)| n == dep).unwrap_or(0);
                        // Each step on the stack depends on the next.
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|&(n, _)| n).collect();
                        cycle.push(cycle[0]);
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    None
}

/// Whether `ancestor` is reachable from `step` through dependencies.
fn depends_on(steps: &[Step], step: usize, ancestor: usize) -> bool {
    let mut seen = HashSet::new();
    let mut todo = vec![step];
    while let Some(node) = todo.pop() {
        for &dep in &steps[node].depends_on {
            if dep == ancestor {
                return true;
            }
            if seen.insert(dep) {
                todo.push(dep);
            }
        }
    }
    false
}

/// Syntax and references of every template and expression.
fn check_templates(d: &mut Diagnostics, spec: &WorkflowSpec, steps: &[Step]) {
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, step)| (step.id.as_str(), i)).collect();
    let inputs: Vec<&str> = spec.inputs.keys().map(String::as_str).collect();
    let check = |d: &mut Diagnostics,
                 location: Location,
                 what: &str,
                 text: &str,
                 expression: bool,
                 step: Option<usize>| {
        if !expression && !template::is_template(text) {
            return;
        }
        let paths = match template::referenced_paths(text, expression) {
            Ok(paths) => paths,
            Err(message) => {
                d.at(location, format!("{what}: template error: {message}"), None);
                return;
            }
        };
        for path in paths {
            let mut parts = path.split('.');
            let root = parts.next().unwrap_or_default();
            let name = parts.next();
            match root {
                "inputs" => {
                    if let Some(name) = name.filter(|name| !spec.inputs.contains_key(*name)) {
                        d.at(
                            location,
                            format!("{what} reads `inputs.{name}`, which is not declared under `inputs`"),
                            did_you_mean(name, inputs.iter().copied()),
                        );
                    }
                }
                "vars" => {
                    if let Some(name) = name.filter(|name| !spec.vars.contains_key(*name)) {
                        d.at(
                            location,
                            format!("{what} reads `vars.{name}`, which is not declared under `vars`"),
                            did_you_mean(name, spec.vars.keys().map(String::as_str)),
                        );
                    }
                }
                "steps" => match name.map(|name| (name, index.get(name))) {
                    Some((name, None)) => {
                        d.at(
                            location,
                            format!("{what} reads `steps.{name}`, but there is no step `{name}`"),
                            did_you_mean(name, index.keys().copied()),
                        );
                    }
                    Some((name, Some(&target))) => {
                        if let Some(step) = step.filter(|&step| !depends_on(steps, step, target)) {
                            d.at(
                                location,
                                format!(
                                    "{what} reads `steps.{name}`, but step `{}` does not depend on `{name}`",
                                    steps[step].id
                                ),
                                Some(format!("add `{name}` to its depends_on, so it runs after `{name}`")),
                            );
                        }
                    }
                    None => {}
                },
                "item" => {
                    if step.is_some_and(|step| steps[step].fan_out == FanOut::None) {
                        d.at(location, format!("{what} reads `item`, but the step has no for_each or matrix"), None);
                    }
                }
                "run" => {}
                other => d.at(
                    location,
                    format!("{what} reads `{other}`, which is not defined"),
                    did_you_mean(other, ROOTS).or_else(|| Some(format!("templates can read {}", ROOTS.join(", ")))),
                ),
            }
        }
    };
    for (i, (step, spec_step)) in steps.iter().zip(&spec.steps).enumerate() {
        let what = format!("step `{}`", step.id);
        let at = spec_step.id.referenced;
        if let Some(with) = &spec_step.with {
            for_each_string(&with.value, &mut |text| {
                check(d, with.referenced, &format!("{what}'s `with`"), text, false, Some(i))
            });
        }
        if let Some(when) = &spec_step.when {
            check(d, when.referenced, &format!("{what}'s `when`"), &when.value, true, Some(i));
        }
        if let Some(include) = &spec_step.include {
            check(d, include.referenced, &format!("{what}'s `include`"), &include.value, false, Some(i));
        }
        let fan_out_strings: Vec<(Location, &str)> = match (&spec_step.for_each, &spec_step.matrix) {
            (Some(list), _) => list.value.as_str().map(|text| (list.referenced, text)).into_iter().collect(),
            (_, Some(matrix)) => {
                matrix.value.values().filter_map(Value::as_str).map(|text| (matrix.referenced, text)).collect()
            }
            _ => Vec::new(),
        };
        for (location, text) in fan_out_strings {
            // The list is computed before there is an item.
            if template::referenced_paths(text, true)
                .is_ok_and(|paths| paths.iter().any(|p| p == "item" || p.starts_with("item.")))
            {
                d.at(location, format!("{what}'s fan-out list cannot read `item`"), None);
            }
            check(d, location, &format!("{what}'s fan-out list"), text, true, Some(i));
        }
        for (key, value) in spec_step.config.iter().chain(&spec_step.env) {
            check(d, at, &format!("{what}'s config/env `{key}`"), value, false, Some(i));
        }
        for text in spec_step.args.iter().chain(&spec_step.stdin) {
            check(d, at, &format!("{what}'s args/stdin"), text, false, Some(i));
        }
    }
    for (name, output) in &spec.outputs {
        check(d, output.referenced, &format!("output `{name}`"), &output.value, false, None);
    }
}

fn for_each_string(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::String(text) => f(text),
        Value::Array(items) => items.iter().for_each(|item| for_each_string(item, f)),
        Value::Object(map) => map.values().for_each(|item| for_each_string(item, f)),
        _ => {}
    }
}

fn check_type(name: &str, kind: InputType, value: &Value) -> Result<(), String> {
    let ok = match kind {
        InputType::Any => true,
        InputType::String => value.is_string(),
        InputType::Number => value.is_number(),
        InputType::Integer => value.is_i64() || value.is_u64(),
        InputType::Boolean => value.is_boolean(),
        InputType::Object => value.is_object(),
        InputType::Array => value.is_array(),
    };
    if ok { Ok(()) } else { Err(format!("input `{name}` must be of type {kind:?}, not {value}").to_lowercase()) }
}

pub(super) fn bind_inputs(
    workflow: &Workflow,
    given: &serde_json::Map<String, Value>,
) -> Result<serde_json::Map<String, Value>, WorkflowError> {
    let mut d = Diagnostics::new(&workflow.file);
    let declared: Vec<&str> = workflow.inputs.keys().map(String::as_str).collect();
    for name in given.keys() {
        if !workflow.inputs.contains_key(name) {
            d.nowhere(
                format!("unknown input `{name}`"),
                did_you_mean(name, declared.iter().copied())
                    .or_else(|| Some(format!("the workflow's inputs are: {}", declared.join(", ")))),
            );
        }
    }
    let mut bound = serde_json::Map::new();
    for (name, input) in &workflow.inputs {
        match given.get(name).or(input.default.as_ref()) {
            Some(value) => {
                if let Err(message) = check_type(name, input.kind, value) {
                    d.nowhere(message, None);
                }
                bound.insert(name.clone(), value.clone());
            }
            None if input.required => {
                d.nowhere(
                    format!("the required input `{name}` is missing"),
                    Some(format!("pass it with --input {name}=VALUE")),
                );
            }
            None => {
                bound.insert(name.clone(), Value::Null);
            }
        }
    }
    d.finish()?;
    Ok(bound)
}
