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

#[derive(Debug, Default)]
pub(crate) struct StepsView {
    results: Mutex<HashMap<String, (StepStatus, Option<serde_json::Value>)>>,
}

impl StepsView {
    pub(crate) fn set(&self, id: &str, status: StepStatus, output: Option<serde_json::Value>) {
        self.results.lock().insert(id.to_owned(), (status, output));
    }
}

impl Object for StepsView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let results = self.results.lock();
        let (status, output) = results.get(key.as_str()?)?;
        Some(minijinja::context! {
            status => status.as_str(),
            output => to_jinja(output),
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let results = self.results.lock();
        let mut keys: Vec<Value> = results.keys().map(|key| Value::from(key.as_str())).collect();
        keys.sort();
        Enumerator::Values(keys)
    }
}

/// The parts of the context that are the same for every step of a run.
#[derive(Debug, Clone)]
pub(crate) struct RunContext {
    pub(crate) inputs: Value,
    pub(crate) vars: Value,
    pub(crate) run: Value,
    pub(crate) steps: Arc<StepsView>,
}

impl RunContext {
    pub(crate) fn with_item(&self, item: Option<&serde_json::Value>) -> Value {
        minijinja::context! {
            inputs => self.inputs.clone(),
            vars => self.vars.clone(),
            run => self.run.clone(),
            steps => Value::from_dyn_object(self.steps.clone()),
            item => item.map(to_jinja),
        }
    }
}
