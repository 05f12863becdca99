//! Static checks of every template and expression in a workflow: syntax,
//! and that each name read exists (`inputs.x` is declared, `steps.a` is a
//! step this one depends on, `item` is read only inside a fan-out).

use std::collections::HashMap;

use serde_json::Value;
use serde_saphyr::{Location, Spanned};

use super::{ROOTS, is_template, referenced_paths};
use crate::workflow::diagnostic::{Diagnostics, did_you_mean};
use crate::workflow::spec::WorkflowSpec;
use crate::workflow::{FanOut, Step, graph};

/// A fan-out list: a literal list or an expression.
pub(crate) fn check_list(d: &mut Diagnostics, list: &Spanned<Value>, what: &str) {
    match &list.value {
        Value::Array(_) => {}
        Value::String(text) => {
            if let Err(message) = referenced_paths(text, true) {
                d.on(list, format!("`{what}` is not a valid expression: {message}"), None);
            }
        }
        _ => d.on(list, format!("`{what}` must be a list or an expression that gives a list"), None),
    }
}

/// Syntax and references of every template and expression of `spec`,
/// whose validated steps are `steps`.
pub(crate) fn check_templates(d: &mut Diagnostics, spec: &WorkflowSpec, steps: &[Step]) {
    let checker = Checker {
        spec,
        steps,
        index: steps.iter().enumerate().map(|(i, step)| (step.id.as_str(), i)).collect(),
        inputs: spec.inputs.keys().map(String::as_str).collect(),
    };
    for (i, (step, spec_step)) in steps.iter().zip(&spec.steps).enumerate() {
        let what = format!("step `{}`", step.id);
        let at = spec_step.id.referenced;
        if let Some(with) = &spec_step.with {
            for_each_string(&with.value, &mut |text| {
                checker.check(d, with.referenced, &format!("{what}'s `with`"), text, false, Some(i))
            });
        }
        if let Some(when) = &spec_step.when {
            checker.check(d, when.referenced, &format!("{what}'s `when`"), &when.value, true, Some(i));
        }
        if let Some(include) = &spec_step.include {
            checker.check(d, include.referenced, &format!("{what}'s `include`"), &include.value, false, Some(i));
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
            if referenced_paths(text, true)
                .is_ok_and(|paths| paths.iter().any(|p| p == "item" || p.starts_with("item.")))
            {
                d.at(location, format!("{what}'s fan-out list cannot read `item`"), None);
            }
            checker.check(d, location, &format!("{what}'s fan-out list"), text, true, Some(i));
        }
        for (key, value) in spec_step.config.iter().chain(&spec_step.env) {
            checker.check(d, at, &format!("{what}'s config/env `{key}`"), value, false, Some(i));
        }
        for text in spec_step.args.iter().chain(&spec_step.stdin) {
            checker.check(d, at, &format!("{what}'s args/stdin"), text, false, Some(i));
        }
    }
    for (name, output) in &spec.outputs {
        checker.check(d, output.referenced, &format!("output `{name}`"), &output.value, false, None);
    }
}

/// What the names in templates are checked against.
struct Checker<'a> {
    spec: &'a WorkflowSpec,
    steps: &'a [Step],
    index: HashMap<&'a str, usize>,
    inputs: Vec<&'a str>,
}

impl Checker<'_> {
    /// Checks one template (or, with `expression`, one bare expression)
    /// found at `location`, read by step `step` (`None`: an output).
    fn check(
        &self,
        d: &mut Diagnostics,
        location: Location,
        what: &str,
        text: &str,
        expression: bool,
        step: Option<usize>,
    ) {
        if !expression && !is_template(text) {
            return;
        }
        let paths = match referenced_paths(text, expression) {
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
                    if let Some(name) = name.filter(|name| !self.spec.inputs.contains_key(*name)) {
                        d.at(
                            location,
                            format!("{what} reads `inputs.{name}`, which is not declared under `inputs`"),
                            did_you_mean(name, self.inputs.iter().copied()),
                        );
                    }
                }
                "vars" => {
                    if let Some(name) = name.filter(|name| !self.spec.vars.contains_key(*name)) {
                        d.at(
                            location,
                            format!("{what} reads `vars.{name}`, which is not declared under `vars`"),
                            did_you_mean(name, self.spec.vars.keys().map(String::as_str)),
                        );
                    }
                }
                "steps" => match name.map(|name| (name, self.index.get(name))) {
                    Some((name, None)) => {
                        d.at(
                            location,
                            format!("{what} reads `steps.{name}`, but there is no step `{name}`"),
                            did_you_mean(name, self.index.keys().copied()),
                        );
                    }
                    Some((name, Some(&target))) => {
                        if let Some(step) = step.filter(|&step| !graph::depends_on(self.steps, step, target)) {
                            d.at(
                                location,
                                format!(
                                    "{what} reads `steps.{name}`, but step `{}` does not depend on `{name}`",
                                    self.steps[step].id
                                ),
                                Some(format!("add `{name}` to its depends_on, so it runs after `{name}`")),
                            );
                        }
                    }
                    None => {}
                },
                "item" => {
                    if step.is_some_and(|step| self.steps[step].fan_out == FanOut::None) {
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
    }
}

/// Calls `f` on every string inside a JSON value.
fn for_each_string(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::String(text) => f(text),
        Value::Array(items) => items.iter().for_each(|item| for_each_string(item, f)),
        Value::Object(map) => map.values().for_each(|item| for_each_string(item, f)),
        _ => {}
    }
}
