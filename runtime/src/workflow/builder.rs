//! Building a workflow in code. The builder produces the same
//! [`WorkflowSpec`] a file decodes to, so it is validated the same way.

use std::path::{Path, PathBuf};

use serde_json::Value;
use serde_saphyr::{Location, Spanned};

use super::spec::{ComponentSpec, LimitsSpec, RetrySpec, StepSpec, WorkflowSpec};
use super::{Workflow, WorkflowError};

fn spanned<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

/// A workflow assembled in code:
///
/// ```no_run
/// use stepbox::workflow::{StepBuilder, WorkflowBuilder};
///
/// let workflow = WorkflowBuilder::new("greet")
///     .component("hello", "guests/hello.wasm")
///     .step(StepBuilder::new("a", "hello").with(serde_json::json!({ "name": "Ada" })))
///     .step(StepBuilder::new("b", "hello").depends_on(["a"]).optional())
///     .build()?;
/// # Ok::<(), stepbox::workflow::WorkflowError>(())
/// ```
#[derive(Debug, Clone)]
pub struct WorkflowBuilder {
    spec: WorkflowSpec,
    base_dir: PathBuf,
}

impl WorkflowBuilder {
    /// A workflow named `name`, with no steps yet.
    pub fn new(name: impl Into<String>) -> Self {
        WorkflowBuilder {
            spec: WorkflowSpec {
                name: name.into(),
                version: None,
                description: None,
                inputs: Default::default(),
                vars: Default::default(),
                defaults: Default::default(),
                components: Default::default(),
                steps: Vec::new(),
                outputs: Default::default(),
                triggers: Default::default(),
            },
            base_dir: PathBuf::from("."),
        }
    }

    /// Relative component paths resolve against this directory (default:
    /// the current one).
    pub fn base_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.base_dir = dir.as_ref().to_owned();
        self
    }

    /// Declares component `name` at `path`.
    pub fn component(mut self, name: impl Into<String>, path: impl Into<String>) -> Self {
        self.spec.components.insert(name.into(), spanned(ComponentSpec::Path(path.into())));
        self
    }

    /// Limits every step starts from.
    pub fn default_limits(mut self, limits: LimitsSpec) -> Self {
        self.spec.defaults.limits = limits;
        self
    }

    /// The retry policy every step starts from.
    pub fn default_retry(mut self, retry: RetrySpec) -> Self {
        self.spec.defaults.retry = retry;
        self
    }

    /// Adds a step.
    pub fn step(mut self, step: StepBuilder) -> Self {
        self.spec.steps.push(step.spec);
        self
    }

    /// Adds an output: a template over the steps, inputs and vars.
    pub fn output(mut self, name: impl Into<String>, template: impl Into<String>) -> Self {
        self.spec.outputs.insert(name.into(), spanned(template.into()));
        self
    }

    /// The spec as built, to adjust further or to serialize.
    pub fn spec(&self) -> &WorkflowSpec {
        &self.spec
    }

    /// Validates the workflow exactly as a file would be.
    pub fn build(self) -> Result<Workflow, WorkflowError> {
        let name = format!("<workflow {}>", self.spec.name);
        Workflow::from_spec(self.spec, &name, &self.base_dir)
    }
}

/// One step of a [`WorkflowBuilder`].
#[derive(Debug, Clone)]
pub struct StepBuilder {
    spec: StepSpec,
}

impl StepBuilder {
    /// A step `id` that runs the component `uses` (a component name or a
    /// .wasm path).
    pub fn new(id: impl Into<String>, uses: impl Into<String>) -> Self {
        StepBuilder {
            spec: StepSpec {
                id: spanned(id.into()),
                uses: Some(spanned(uses.into())),
                include: None,
                wait: None,
                with: None,
                depends_on: Vec::new(),
                when: None,
                required: true,
                always: false,
                on_failure: Vec::new(),
                retry: None,
                limits: None,
                for_each: None,
                matrix: None,
                max_concurrent: None,
                config: Default::default(),
                env: Default::default(),
                dirs: Vec::new(),
                secrets: Default::default(),
                args: Vec::new(),
                stdin: None,
                scratch: false,
                deterministic: false,
                network: None,
                exit_codes: None,
            },
        }
    }

    /// The step's input; strings in it are templates.
    pub fn with(mut self, input: Value) -> Self {
        self.spec.with = Some(spanned(input));
        self
    }

    /// Steps that must finish first.
    pub fn depends_on<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ids: I) -> Self {
        self.spec.depends_on.extend(ids.into_iter().map(|id| spanned(id.into())));
        self
    }

    /// Skips the step when the expression is false.
    pub fn when(mut self, expression: impl Into<String>) -> Self {
        self.spec.when = Some(spanned(expression.into()));
        self
    }

    /// Its failure does not fail the run.
    pub fn optional(mut self) -> Self {
        self.spec.required = false;
        self
    }

    /// Runs even when a dependency failed.
    pub fn always(mut self) -> Self {
        self.spec.always = true;
        self
    }

    /// Steps that run only when this one fails.
    pub fn on_failure<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ids: I) -> Self {
        self.spec.on_failure.extend(ids.into_iter().map(|id| spanned(id.into())));
        self
    }

    /// How failed attempts are retried.
    pub fn retry(mut self, retry: RetrySpec) -> Self {
        self.spec.retry = Some(retry);
        self
    }

    /// Per-attempt limits.
    pub fn limits(mut self, limits: LimitsSpec) -> Self {
        self.spec.limits = Some(limits);
        self
    }

    /// Fans out over a list or an expression that gives one.
    pub fn for_each(mut self, list: Value) -> Self {
        self.spec.for_each = Some(spanned(list));
        self
    }

    /// Items of the fan-out running at once, at most.
    pub fn max_concurrent(mut self, n: u32) -> Self {
        self.spec.max_concurrent = Some(n);
        self
    }

    /// A config value the step reads through `wasi:config`; a template.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.config.insert(key.into(), value.into());
        self
    }
}
