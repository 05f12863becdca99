//! Tenants: who a run belongs to, and the ceilings a platform sets for each
//! — concurrency and scheduling weight, per-attempt limits, fuel per run,
//! and which component paths, host directories and addresses their
//! workflows may use. A workflow over a ceiling fails validation with a
//! message that names the ceiling.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::sandbox::HttpGrant;
use crate::workflow::spec::LimitsSpec;
use crate::workflow::{Action, Diagnostic, Workflow, WorkflowError, read_file};

/// How one tenant is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Slots per turn.
    pub weight: u32,
    /// Attempts of this tenant running at once, at most.
    pub max_concurrent: usize,
}

impl Default for Share {
    fn default() -> Self {
        Share { weight: 1, max_concurrent: usize::MAX }
    }
}

/// The tenants file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    tenants: BTreeMap<String, TenantSpec>,
}

/// One tenant's ceilings; anything not set is not limited beyond stepbox's
/// defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// Attempt slots per turn when tenants compete (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Attempts of this tenant running at once.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// Per-attempt ceilings: no step may ask for more.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Fuel all attempts of one run may use together.
    #[serde(default)]
    pub max_run_fuel: Option<u64>,
    /// Component files must lie under one of these directories.
    #[serde(default)]
    pub components: Option<Vec<PathBuf>>,
    /// Granted host directories must lie under one of these.
    #[serde(default)]
    pub dirs: Option<Vec<PathBuf>>,
    /// The only addresses steps may be granted.
    #[serde(default)]
    pub network: Option<Vec<SocketAddr>>,
    /// The widest HTTP grants steps may have, written like a step's
    /// (`[METHODS@]HOST[:PORT]`); each step grant must fit inside one.
    #[serde(default)]
    pub http: Option<Vec<HttpGrant>>,
}

/// The tenants a process knows, read from a tenants file.
#[derive(Debug, Clone)]
pub struct Tenants {
    file: PathBuf,
    tenants: BTreeMap<String, TenantSpec>,
}

impl Tenants {
    /// Reads and checks a tenants file.
    pub fn load(path: &Path) -> Result<Tenants, WorkflowError> {
        let file: TenantsFile = read_file(path, "tenants file")?;
        Ok(Tenants { file: path.to_owned(), tenants: file.tenants })
    }

    /// The ceilings of `tenant`; an unknown tenant is refused.
    pub fn get(&self, tenant: &str) -> Result<&TenantSpec, WorkflowError> {
        self.tenants.get(tenant).ok_or_else(|| {
            let known: Vec<&str> = self.tenants.keys().map(String::as_str).collect();
            WorkflowError::single(
                &self.file,
                format!("tenant `{tenant}` is not in the tenants file"),
                Some(format!("the tenants are: {}", known.join(", "))),
            )
        })
    }

    /// How `tenant` is served by the dispatcher (weight 1, no own limit for an unknown tenant).
    pub fn share(&self, tenant: &str) -> Share {
        let spec = self.tenants.get(tenant).cloned().unwrap_or_default();
        Share { weight: spec.weight.unwrap_or(1), max_concurrent: spec.max_concurrent.unwrap_or(usize::MAX) }
    }

    /// Every way `workflow` goes over `tenant`'s ceilings.
    pub fn check(&self, tenant: &str, workflow: &Workflow) -> Result<(), WorkflowError> {
        let spec = self.get(tenant)?;
        let mut problems = Vec::new();
        let ceiling = |what: &str, asked: String, limit: String| {
            format!(
                "{what} {asked} is over tenant `{tenant}`'s ceiling of {limit} ({} in {})",
                what,
                self.file.display()
            )
        };
        for step in &workflow.steps {
            let id = &step.id;
            // An include step runs nothing itself; a literal include is part
            // of the workflow, so its steps are checked now, not only when
            // it is reached.
            if let Action::Include { path, workflow: included } = &step.action {
                if let Some(included) = included
                    && let Err(err) = self.check(tenant, included)
                {
                    problems.extend(
                        err.diagnostics.into_iter().map(|d| format!("step `{id}` includes {path}: {}", d.message)),
                    );
                }
                continue;
            }
            let limits = &spec.limits;
            if let Some(max) = limits.fuel.filter(|max| step.limits.fuel > *max) {
                problems.push(format!(
                    "step `{id}`: {}",
                    ceiling("limits.fuel", step.limits.fuel.to_string(), max.to_string())
                ));
            }
            if let Some(max) = limits.timeout.filter(|max| step.limits.timeout > *max) {
                let show = |d| humantime::format_duration(d).to_string();
                problems
                    .push(format!("step `{id}`: {}", ceiling("limits.timeout", show(step.limits.timeout), show(max))));
            }
            if let Some(max) = limits.memory.filter(|max| step.limits.memory > *max) {
                let show = |b: bytesize::ByteSize| b.display().iec().to_string();
                problems
                    .push(format!("step `{id}`: {}", ceiling("limits.memory", show(step.limits.memory), show(max))));
            }
            if let Some(allowed) = &spec.dirs {
                for dir in step.grants.dirs.iter().filter(|dir| !under(&dir.host, allowed)) {
                    problems.push(format!(
                        "step `{id}`: directory {} is not under tenant `{tenant}`'s allowed dirs ({})",
                        dir.host.display(),
                        self.file.display()
                    ));
                }
            }
            if let Some(allowed) = &spec.http {
                for rule in step.grants.http.iter().filter(|rule| !allowed.iter().any(|wider| rule.within(wider))) {
                    problems.push(format!(
                        "step `{id}`: HTTP grant `{rule}` is not within tenant `{tenant}`'s allowed http ({})",
                        self.file.display()
                    ));
                }
            }
            if let Some(allowed) = &spec.network {
                for address in step.grants.network.iter().filter(|address| !allowed.contains(address)) {
                    problems.push(format!(
                        "step `{id}`: address {address} is not in tenant `{tenant}`'s allowed network ({})",
                        self.file.display()
                    ));
                }
            }
        }
        if let Some(allowed) = &spec.components {
            for component in workflow.components.values().filter(|c| !under(&c.path, allowed)) {
                problems.push(format!(
                    "component `{}` ({}) is not under tenant `{tenant}`'s allowed component paths ({})",
                    component.name,
                    component.path.display(),
                    self.file.display()
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(WorkflowError {
            diagnostics: problems
                .into_iter()
                .map(|message| Diagnostic { file: workflow.file.clone(), line: 0, column: 0, message, help: None })
                .collect(),
        })
    }
}

/// Whether `path` lies under one of `allowed`, after resolving `..` and
/// symlinks (so a symlink cannot smuggle a path out).
fn under(path: &Path, allowed: &[PathBuf]) -> bool {
    let Ok(path) = path.canonicalize() else { return false };
    allowed.iter().filter_map(|dir| dir.canonicalize().ok()).any(|dir| path.starts_with(dir))
}
