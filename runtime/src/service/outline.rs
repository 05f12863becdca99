//! A deployed workflow as a client draws it: its inputs, its steps and the
//! edges between them, and its triggers. Read from the loaded bundle, never
//! stored, so it always says what the version runs.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Scope, Service, ServiceError};
use crate::store::WorkflowVersion;
use crate::workflow::spec::{CatchUp, InputSpec};
use crate::workflow::{Action, FanOut, Workflow};

/// One version of a workflow, outlined.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Outline {
    /// The version.
    #[serde(flatten)]
    pub version: WorkflowVersion,
    /// The declared inputs, by name: `{type, required, default, description}`.
    #[schema(value_type = Object)]
    pub inputs: BTreeMap<String, InputSpec>,
    /// The steps, in file order.
    pub steps: Vec<StepOutline>,
    /// The names of the run's outputs.
    pub outputs: Vec<String>,
    /// Its cron schedules.
    pub schedules: Vec<ScheduleOutline>,
    /// Whether `POST /v1/hooks/{tenant}/{name}` starts its runs.
    pub webhook: bool,
}

/// What a step does.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// It runs a component.
    Run,
    /// It runs a sub-workflow.
    Include,
    /// It waits for an event.
    Wait,
}

/// A step and its edges.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StepOutline {
    /// Its id.
    pub id: String,
    /// What it does.
    pub kind: StepKind,
    /// The component it runs (`run`).
    pub component: Option<String>,
    /// The sub-workflow file, perhaps a template (`include`).
    pub include: Option<String>,
    /// The event it waits for (`wait`).
    pub event: Option<String>,
    /// The steps it waits for.
    pub depends_on: Vec<String>,
    /// The steps that run only when it fails.
    pub on_failure: Vec<String>,
    /// Whether it fans out (`for_each` or `matrix`).
    pub fan_out: bool,
    /// Whether its failure fails the run.
    pub required: bool,
}

/// A cron schedule.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScheduleOutline {
    /// The pattern, as written.
    pub cron: String,
    /// The IANA time zone its fields are read in.
    pub timezone: String,
    /// What happens to ticks missed while the service was down.
    #[schema(value_type = String)]
    pub catch_up: CatchUp,
}

impl Outline {
    fn of(version: WorkflowVersion, workflow: &Workflow) -> Outline {
        let ids = |indices: &[usize]| indices.iter().map(|&i| workflow.steps[i].id.clone()).collect();
        let steps = workflow
            .steps
            .iter()
            .map(|step| {
                let (kind, component, include, event) = match &step.action {
                    Action::Run { component } => (StepKind::Run, Some(component.clone()), None, None),
                    Action::Include { path, .. } => (StepKind::Include, None, Some(path.clone()), None),
                    Action::Wait { event, .. } => (StepKind::Wait, None, None, Some(event.clone())),
                };
                StepOutline {
                    id: step.id.clone(),
                    kind,
                    component,
                    include,
                    event,
                    depends_on: ids(&step.depends_on),
                    on_failure: ids(&step.on_failure),
                    fan_out: step.fan_out != FanOut::None,
                    required: step.required,
                }
            })
            .collect();
        let schedules = workflow
            .triggers
            .schedules
            .iter()
            .map(|schedule| ScheduleOutline {
                cron: schedule.pattern.clone(),
                timezone: schedule.timezone.iana_name().unwrap_or("UTC").to_owned(),
                catch_up: schedule.catch_up,
            })
            .collect();
        Outline {
            version,
            inputs: workflow.inputs.clone(),
            steps,
            outputs: workflow.outputs.keys().cloned().collect(),
            schedules,
            webhook: workflow.triggers.webhook.is_some(),
        }
    }
}

impl Service {
    /// A version of one of the scope's tenant's workflows (the newest when
    /// `version` is `None`), outlined.
    pub async fn outline(&self, scope: &Scope, name: &str, version: Option<u32>) -> Result<Outline, ServiceError> {
        let version = self.workflow(scope, name, version).await?;
        let deployed = self.deployed(&version).await?;
        Ok(Outline::of(version, &deployed.workflow))
    }

    /// Every version of one of the scope's tenant's workflows, newest first.
    pub async fn versions(&self, scope: &Scope, name: &str) -> Result<Vec<WorkflowVersion>, ServiceError> {
        let (tenant, wanted) = (scope.tenant()?.to_owned(), name.to_owned());
        let versions = self.blocking(move |db| Ok(db.workflow_versions(&tenant, &wanted)?)).await?;
        if versions.is_empty() {
            return Err(super::workflows::not_deployed(name));
        }
        Ok(versions)
    }
}
