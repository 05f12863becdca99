//! Templates and expressions (minijinja) over `inputs`, `vars`, `steps`,
//! `item` and `run`.
//!
//! A string value is a template when it contains `{{` or `{%`. A string that
//! is exactly one `{{ expression }}` evaluates to the expression's value with
//! its type (a list stays a list), so outputs can flow between steps as
//! JSON.

pub(crate) mod check;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// The names a template may start from.
pub const ROOTS: [&str; 5] = ["inputs", "vars", "steps", "item", "run"];

/// Instructions one template or expression may execute.
const TEMPLATE_FUEL: u64 = 1_000_000;

/// The largest value one template or expression may build, as JSON text. A
/// few instructions can describe a huge value (`[0] * 100000000` is a
/// lazy sequence); it is refused while it is written out, before it fills
/// the host's memory.
pub const MAX_TEMPLATE_VALUE: usize = 16 * 1024 * 1024;

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // A typo in a name is an error, not an empty string.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Workflow files may come from tenants: bound the work of one
        // template or expression.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env
    })
}

/// Any serializable value as a template value.
pub fn to_jinja<T: serde::Serialize>(value: &T) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(value))
}

/// Whether a string is a template at all.
pub fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// The expression inside a string that is exactly one `{{ ... }}`.
fn sole_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%")).then_some(inner.trim())
}

/// The bare expression of a `when` or `for_each`: with or without braces.
pub fn expression_text(text: &str) -> &str {
    sole_expression(text).unwrap_or(text.trim())
}

/// Checks a template or expression and returns the dotted paths it reads
/// (`steps.a.output`, `inputs.x`), or the syntax error. minijinja's own
/// globals (`range`, `dict`, `namespace`, ...) are not reads.
pub fn referenced_paths(text: &str, is_expression: bool) -> Result<BTreeSet<String>, String> {
    let env = env();
    let undeclared = if is_expression || sole_expression(text).is_some() {
        env.compile_expression(expression_text(text)).map_err(describe)?.undeclared_variables(true)
    } else {
        env.template_from_str(text).map_err(describe)?.undeclared_variables(true)
    };
    let is_global = |path: &String| {
        let root = path.split('.').next().unwrap_or_default();
        env.globals().any(|(name, _)| name == root)
    };
    Ok(undeclared.into_iter().filter(|path| !is_global(path)).collect())
}

/// Evaluates an expression; reading a name that does not exist is an error.
fn eval(text: &str, context: &minijinja::Value) -> Result<minijinja::Value, String> {
    let text = expression_text(text);
    let expression = env().compile_expression(text).map_err(describe)?;
    let value = expression.eval(context).map_err(describe)?;
    if value.is_undefined() {
        return Err(format!("`{text}` is undefined"));
    }
    Ok(value)
}

/// Evaluates an expression (`when`, `for_each`) to JSON.
pub fn evaluate(text: &str, context: &minijinja::Value) -> Result<Value, String> {
    to_json(&eval(text, context)?)
}

/// Whether an expression is true, in Jinja's sense.
pub fn is_true(text: &str, context: &minijinja::Value) -> Result<bool, String> {
    Ok(eval(text, context)?.is_true())
}

/// Renders every template string inside a JSON value.
pub fn render_value(value: &Value, context: &minijinja::Value) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) => render_string(text, context)?,
        Value::Array(items) => {
            Value::Array(items.iter().map(|item| render_value(item, context)).collect::<Result<_, _>>()?)
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item)| Ok((key.clone(), render_value(item, context)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Renders one string: a sole expression keeps its type, anything else
/// renders to text.
pub fn render_string(text: &str, context: &minijinja::Value) -> Result<Value, String> {
    if !is_template(text) {
        return Ok(Value::String(text.to_owned()));
    }
    if sole_expression(text).is_some() {
        return evaluate(text, context);
    }
    // Rendered into a capped buffer: text can hold a huge value too
    // (`{{ [0] * 100000000 }} and more`).
    let template = env().template_from_str(text).map_err(describe)?;
    let mut out = Capped::default();
    if let Err(err) = template.render_captured_to(context, &mut out) {
        return Err(if out.full { too_large() } else { describe(err) });
    }
    String::from_utf8(out.bytes).map(Value::String).map_err(|err| format!("the template rendered invalid text: {err}"))
}

/// A buffer that refuses to grow past [`MAX_TEMPLATE_VALUE`].
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    /// Whether a write was refused.
    full: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + bytes.len() > MAX_TEMPLATE_VALUE {
            self.full = true;
            return Err(std::io::Error::other(too_large()));
        }
        self.bytes.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn too_large() -> String {
    format!(
        "the template builds a value larger than {}, the most a template may build",
        bytesize::ByteSize(MAX_TEMPLATE_VALUE as u64).display().iec()
    )
}

/// Renders a template to text (config values, environment variables).
pub fn render_text(text: &str, context: &minijinja::Value) -> Result<String, String> {
    match render_string(text, context)? {
        Value::String(text) => Ok(text),
        other => Ok(other.to_string()),
    }
}

/// The value as JSON, written out as text under [`MAX_TEMPLATE_VALUE`]
/// first, so a huge value stops while it is written rather than after.
fn to_json(value: &minijinja::Value) -> Result<Value, String> {
    let mut text = Capped::default();
    if let Err(err) = serde_json::to_writer(&mut text, value) {
        return Err(if text.full { too_large() } else { format!("the value cannot be turned into JSON: {err}") });
    }
    serde_json::from_slice(&text.bytes).map_err(|err| format!("the value cannot be turned into JSON: {err}"))
}

/// minijinja's message plus its detail, on one line.
fn describe(err: minijinja::Error) -> String {
    let mut message = err.to_string();
    if let Some(detail) = err.detail().filter(|detail| !message.contains(detail)) {
        message.push_str(&format!(": {detail}"));
    }
    message
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ctx() -> minijinja::Value {
        to_jinja(&json!({ "inputs": { "n": 2, "name": "Ada" }, "item": [1, 2] }))
    }

    #[test]
    fn a_sole_expression_keeps_its_type() {
        assert_eq!(render_string("{{ item }}", &ctx()).unwrap(), json!([1, 2]));
        assert_eq!(render_string("{{ inputs.n + 1 }}", &ctx()).unwrap(), json!(3));
        assert_eq!(render_string("Hi {{ inputs.name }}", &ctx()).unwrap(), json!("Hi Ada"));
        assert_eq!(render_string("plain", &ctx()).unwrap(), json!("plain"));
    }

    #[test]
    fn undefined_names_are_errors() {
        assert!(render_string("{{ inputs.nope }}", &ctx()).is_err());
        assert!(is_true("inputs.n > 1", &ctx()).unwrap());
    }

    #[test]
    fn finds_the_paths_a_template_reads() {
        let paths = referenced_paths("{{ steps.a.output.x }} and {{ inputs.n }}", false).unwrap();
        assert!(paths.contains("steps.a.output.x") && paths.contains("inputs.n"), "{paths:?}");
        assert!(referenced_paths("{{ oops", false).is_err());
    }

    #[test]
    fn a_template_that_computes_too_long_runs_out_of_its_budget() {
        let endless = "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}";
        let err = render_string(endless, &ctx()).unwrap_err();
        assert!(err.contains("fuel"), "{err}");
        // A template well within it renders.
        assert_eq!(render_string("{% for i in range(100) %}{% endfor %}done", &ctx()).unwrap(), json!("done"));
    }

    #[test]
    fn a_huge_value_is_refused_while_it_is_built() {
        for huge in [
            "{{ [0] * 100000000 }}",
            "{{ [[0] * 10000] * 10000 }}",
            "{{ 'x' * 100000000 }} and more",
            "{{ [0] * 100000000 }} and more",
        ] {
            let err = render_string(huge, &ctx()).unwrap_err();
            assert!(
                err.contains("builds a value larger than 16.0 MiB, the most a template may build"),
                "{huge}: {err}"
            );
        }
    }

    #[test]
    fn minijinja_globals_are_not_reads() {
        let paths = referenced_paths("{{ range(inputs.n)|list }}", true).unwrap();
        assert_eq!(paths.into_iter().collect::<Vec<_>>(), ["inputs.n"]);
        assert_eq!(evaluate("range(3)|list", &ctx()).unwrap(), json!([0, 1, 2]));
        assert_eq!(evaluate("dict(a=inputs.n)", &ctx()).unwrap(), json!({ "a": 2 }));
    }
}
