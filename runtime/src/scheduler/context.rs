//! What templates see: `inputs`, `vars`, `run`, `item` and a live view of
//! `steps`, read on demand so a run of many steps does not copy every output
//! into every step's context.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use minijinja::Value;
use minijinja::value::{Enumerator, Object, ObjectRepr};

use crate::run::StepStatus;
use crate::workflow::template::to_jinja;

/// The steps of one workflow of the run, by their index in it: setting a
/// step's state costs neither a hash nor an allocation.
#[derive(Debug)]
pub(crate) struct StepsView {
    /// Each step id's index, for templates that name it.
    index: HashMap<String, usize>,
    results: Mutex<Vec<(StepStatus, Option<serde_json::Value>)>>,
}

impl StepsView {
    /// Steps with these ids, in workflow order, all pending.
    pub(crate) fn new<'a>(ids: impl ExactSizeIterator<Item = &'a str>) -> Self {
        let results = Mutex::new(vec![(StepStatus::Pending, None); ids.len()]);
        StepsView { index: ids.enumerate().map(|(i, id)| (id.to_owned(), i)).collect(), results }
    }

    pub(crate) fn set(&self, i: usize, status: StepStatus, output: Option<serde_json::Value>) {
        if let Some(result) = self.results.lock().get_mut(i) {
            *result = (status, output);
        }
    }
}

impl Object for StepsView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let i = *self.index.get(key.as_str()?)?;
        let results = self.results.lock();
        let (status, output) = results.get(i)?;
        Some(minijinja::context! {
            status => status.as_str(),
            output => to_jinja(output),
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut keys: Vec<Value> = self.index.keys().map(|key| Value::from(key.as_str())).collect();
        keys.sort();
        Enumerator::Values(keys)
    }
}

/// The parts of the context that are the same for every step of a run.
#[derive(Debug, Clone)]
pub(crate) struct RunContext {
    pub(crate) steps: Arc<StepsView>,
    /// `inputs`, `vars`, `run`, `steps` and no `item`, built once: a step
    /// without an item renders against this (a cheap clone).
    shared: Value,
}

impl RunContext {
    pub(crate) fn new(inputs: Value, vars: Value, run: Value, steps: Arc<StepsView>) -> Self {
        let shared = minijinja::context! {
            inputs => inputs,
            vars => vars,
            run => run,
            steps => Value::from_dyn_object(steps.clone()),
            item => (),
        };
        RunContext { steps, shared }
    }

    pub(crate) fn with_item(&self, item: Option<&serde_json::Value>) -> Value {
        match item {
            None => self.shared.clone(),
            Some(item) => minijinja::context! { item => to_jinja(item), ..self.shared.clone() },
        }
    }
}
