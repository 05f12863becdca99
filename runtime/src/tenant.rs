//! Tenants: who a run belongs to, and the ceilings a platform sets for each
//! — concurrency and scheduling weight, per-attempt limits, fuel per run,
//! the size of fan-outs, includes and retries, and which component paths,
//! host directories, addresses, HTTP hosts and secrets their workflows may
//! use. Ceilings fail closed: a dimension a tenant entry leaves out grants
//! nothing, and `any` must be written to allow everything. A workflow over a
//! ceiling fails validation with a message that names the ceiling.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::sandbox::{DirGrant, HttpGrant, Limits};
use crate::store::KvQuota;
use crate::workflow::spec::{LimitsSpec, SecretSource};
use crate::workflow::{Action, Diagnostic, StepSecret, Workflow, WorkflowError, read_file};

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

/// What a tenant may be granted along one dimension (directories,
/// addresses, ...): everything (`any`, written out), or only what is listed.
/// Left out of a tenant entry, it is the empty list: nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed<T> {
    /// Everything.
    Any,
    /// Only these.
    Only(Vec<T>),
}

impl<T> Default for Allowed<T> {
    fn default() -> Self {
        Allowed::Only(Vec::new())
    }
}

impl<T> Allowed<T> {
    /// Whether something is allowed: always under `any`, else when `fits`
    /// one of the listed entries.
    pub fn permits(&self, fits: impl Fn(&T) -> bool) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::Only(list) => list.iter().any(fits),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Allowed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AllowedVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for AllowedVisitor<T> {
            type Value = Allowed<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`any` or a list")
            }

            fn visit_str<E: de::Error>(self, word: &str) -> Result<Self::Value, E> {
                if word == "any" {
                    return Ok(Allowed::Any);
                }
                Err(E::custom(format!(
                    "`{word}` is not a list; write `any` to allow everything, or list what is allowed"
                )))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut list = Vec::new();
                while let Some(entry) = seq.next_element()? {
                    list.push(entry);
                }
                Ok(Allowed::Only(list))
            }
        }
        deserializer.deserialize_any(AllowedVisitor(PhantomData))
    }
}

/// A secret a tenant may use, written `env:NAME` or `file:NAME`; a NAME
/// ending in `*` allows every name with that prefix (`env:ACME_*`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SecretGrant {
    /// The source, with the name or prefix.
    source: SecretSource,
    /// Whether the name is a prefix.
    prefix: bool,
}

impl SecretGrant {
    /// Whether a step may read `secret` under this grant.
    pub fn allows(&self, secret: &SecretSource) -> bool {
        let fits = |granted: &str, wanted: &str| {
            if self.prefix { wanted.starts_with(granted) } else { wanted == granted }
        };
        match (&self.source, secret) {
            (SecretSource::Env(granted), SecretSource::Env(wanted)) => fits(granted, wanted),
            (SecretSource::File(granted), SecretSource::File(wanted)) => fits(granted, wanted),
            _ => false,
        }
    }
}

impl TryFrom<String> for SecretGrant {
    type Error = String;

    fn try_from(spec: String) -> Result<Self, Self::Error> {
        let usage = || format!("`{spec}` is not a secret grant; write env:NAME or file:NAME (NAME may end in `*`)");
        let (kind, name) = spec.split_once(':').ok_or_else(usage)?;
        let (name, prefix) = match name.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (name, false),
        };
        if name.is_empty() && !prefix || name.contains('*') {
            return Err(usage());
        }
        let source = match kind {
            "env" => SecretSource::Env(name.to_owned()),
            "file" => SecretSource::File(name.to_owned()),
            _ => return Err(usage()),
        };
        Ok(SecretGrant { source, prefix })
    }
}

/// The tenants file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    tenants: BTreeMap<String, TenantSpec>,
}

/// One tenant's ceilings. Grants it leaves out are refused; limits it leaves
/// out are stepbox's defaults. The default is an empty entry: no grants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// Attempt slots per turn when tenants compete (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Attempts of this tenant running at once.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// Per-attempt ceilings: no step may ask for more, and a ceiling below
    /// stepbox's default is the default of this tenant's steps.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Fuel all attempts of one run may use together.
    #[serde(default)]
    pub max_run_fuel: Option<u64>,
    /// The ceilings on a run's shape.
    #[serde(flatten)]
    pub run: RunCeilings,
    /// Component files must lie under one of these directories.
    #[serde(default)]
    pub components: Allowed<PathBuf>,
    /// Directories included workflows may come from besides the including
    /// workflow's own directory (the default: an include cannot reach out
    /// of it with `..`, an absolute path or a symlink).
    #[serde(default)]
    pub includes: Allowed<PathBuf>,
    /// Granted host directories must lie under one of these.
    #[serde(default)]
    pub dirs: Allowed<PathBuf>,
    /// The only addresses steps may be granted.
    #[serde(default)]
    pub network: Allowed<SocketAddr>,
    /// The widest HTTP grants steps may have, written like a step's
    /// (`[METHODS@]HOST[:PORT]`); each step grant must fit inside one.
    #[serde(default)]
    pub http: Allowed<HttpGrant>,
    /// The secrets steps may read.
    #[serde(default)]
    pub secrets: Allowed<SecretGrant>,
    /// How much key-value state the tenant's steps may keep, over all its
    /// workflows (default 64 MiB and 100,000 keys).
    #[serde(default)]
    pub kv: KvQuota,
}

impl TenantSpec {
    /// Everything allowed, with stepbox's default limits and run ceilings:
    /// what a run gets when there is no tenants file.
    fn unconstrained() -> Self {
        TenantSpec {
            weight: None,
            max_concurrent: None,
            limits: LimitsSpec::default(),
            max_run_fuel: None,
            run: RunCeilings::default(),
            components: Allowed::Any,
            includes: Allowed::Only(Vec::new()),
            dirs: Allowed::Any,
            network: Allowed::Any,
            http: Allowed::Any,
            secrets: Allowed::Any,
            kv: KvQuota::default(),
        }
    }
}

/// Ceilings on the shape of a run, each with a default that is safe for
/// untrusted workflows; they hold with or without a tenants file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunCeilings {
    /// Items of one `for_each` or `matrix`.
    pub max_items: usize,
    /// Workflows included inside one another, the run's own counted as 1.
    pub max_include_depth: usize,
    /// Attempts of one execution (`retry.attempts`).
    pub max_attempts: u32,
    /// Executions of one run, over all its steps and includes: each is
    /// journaled and waits for a slot, so this bounds what a run can queue
    /// and write however its fan-outs multiply.
    pub max_executions: usize,
}

impl Default for RunCeilings {
    fn default() -> Self {
        RunCeilings { max_items: 10_000, max_include_depth: 8, max_attempts: 100, max_executions: 100_000 }
    }
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

    /// The tenant called `name`; an unknown tenant is refused.
    pub fn get(&self, name: &str) -> Result<Tenant, WorkflowError> {
        let spec = self.tenants.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.tenants.keys().map(String::as_str).collect();
            WorkflowError::single(
                &self.file,
                format!("tenant `{name}` is not in the tenants file"),
                Some(format!("the tenants are: {}", known.join(", "))),
            )
        })?;
        Ok(Tenant { name: name.to_owned(), spec: spec.clone(), file: Some(self.file.clone()) })
    }

    /// Every tenant's share of the workers, as the queue hands out claims.
    pub fn shares(&self) -> crate::store::Shares {
        let tenants = self.tenants.keys().filter_map(|name| Some((name.clone(), self.get(name).ok()?.share())));
        crate::store::Shares { tenants: tenants.collect(), default: Share::default() }
    }
}

/// One tenant as its runs see it: its name and its ceilings.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// The name; key-value state and fair shares are kept per name.
    pub name: String,
    /// Its ceilings.
    pub spec: TenantSpec,
    /// The tenants file they come from, for messages; `None` without one.
    file: Option<PathBuf>,
}

impl Tenant {
    /// A tenant when there is no tenants file: every grant allowed, with
    /// stepbox's default limits and run ceilings.
    pub fn unconstrained(name: impl Into<String>) -> Self {
        Tenant { name: name.into(), spec: TenantSpec::unconstrained(), file: None }
    }

    /// A tenant `stepbox serve` knows no ceilings for (there is no tenants
    /// file): an empty entry's, so a service grants nothing beyond the
    /// sandbox until its operator writes a tenants file.
    pub fn restricted(name: impl Into<String>) -> Self {
        Tenant { name: name.into(), spec: TenantSpec::default(), file: None }
    }

    /// This tenant running a deployed bundle stored at `root`: its
    /// components and includes must lie inside the bundle, whatever the
    /// tenants file allows for local files.
    pub fn for_bundle(&self, root: &Path) -> Tenant {
        let mut tenant = self.clone();
        tenant.spec.components = Allowed::Only(vec![root.to_owned()]);
        tenant.spec.includes = Allowed::Only(vec![root.to_owned()]);
        tenant
    }

    /// How the dispatcher serves this tenant.
    pub fn share(&self) -> Share {
        Share { weight: self.spec.weight.unwrap_or(1), max_concurrent: self.spec.max_concurrent.unwrap_or(usize::MAX) }
    }

    /// The limits of a step that sets none: stepbox's defaults, each held to
    /// this tenant's ceiling, so a low ceiling does not refuse every
    /// workflow that leaves the limit out.
    pub fn default_limits(&self) -> Limits {
        let ceiling = &self.spec.limits;
        let defaults = Limits::default();
        Limits {
            fuel: ceiling.fuel.map_or(defaults.fuel, |max| max.min(defaults.fuel)),
            timeout: ceiling.timeout.map_or(defaults.timeout, |max| max.min(defaults.timeout)),
            memory: ceiling.memory.map_or(defaults.memory, |max| max.min(defaults.memory)),
            output: ceiling.output.map_or(defaults.output, |max| max.min(defaults.output)),
            stdio: ceiling.stdio.map_or(defaults.stdio, |max| max.min(defaults.stdio)),
            host_memory: ceiling.host_memory.map_or(defaults.host_memory, |max| max.min(defaults.host_memory)),
            scratch: ceiling.scratch.map_or(defaults.scratch, |max| max.min(defaults.scratch)),
            ..defaults
        }
    }

    /// `dirs`, each to be opened beneath the ceiling directory that holds it
    /// when an attempt starts, so a symlink swapped onto its path since the
    /// run was checked cannot lead out of the tenant's ceiling.
    pub fn confine(&self, dirs: Vec<DirGrant>) -> Result<Vec<DirGrant>, String> {
        let Allowed::Only(ceilings) = &self.spec.dirs else { return Ok(dirs) };
        let ceilings: Vec<PathBuf> = ceilings.iter().filter_map(|ceiling| ceiling.canonicalize().ok()).collect();
        dirs.into_iter()
            .map(|dir| match ceilings.iter().find(|ceiling| dir.host.starts_with(ceiling)) {
                Some(ceiling) => Ok(dir.beneath(ceiling.clone())),
                None => Err(format!(
                    "directory {} is not under tenant `{}`'s allowed dirs ({})",
                    dir.host.display(),
                    self.name,
                    self.source()
                )),
            })
            .collect()
    }

    /// Whether a workflow included from a workflow in `base_dir` may be the
    /// file at `path`: it must lie in `base_dir`'s tree, or under one of the
    /// tenant's `includes`. Compared after resolving `..` and symlinks.
    pub fn confine_include(&self, base_dir: &Path, path: &Path) -> Result<(), String> {
        // A missing file is reported by whoever reads it.
        if !path.exists() {
            return Ok(());
        }
        let allowed = under(path, base_dir) || self.spec.includes.permits(|dir| under(path, dir));
        if allowed {
            return Ok(());
        }
        Err(format!(
            "the included workflow {} is outside the including workflow's directory and tenant `{}`'s allowed includes ({})",
            path.display(),
            self.name,
            self.source()
        ))
    }

    /// Where a ceiling is set, for messages.
    fn source(&self) -> String {
        match &self.file {
            Some(file) => file.display().to_string(),
            None => "stepbox's default".into(),
        }
    }

    /// Every way `workflow` goes over this tenant's ceilings, literal
    /// includes and their components included.
    pub fn check(&self, workflow: &Workflow) -> Result<(), WorkflowError> {
        self.check_at(workflow, 1)
    }

    /// [`Tenant::check`] for a workflow included `depth` workflows deep.
    pub fn check_at(&self, workflow: &Workflow, depth: usize) -> Result<(), WorkflowError> {
        let problems = self.problems(workflow, depth);
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

    /// What in one attempt's limits and grants goes over the tenant's
    /// ceilings: part of a workflow's check, and made again by a worker,
    /// with its own tenants file, before it runs an attempt that another
    /// process prepared.
    pub(crate) fn attempt_problems(
        &self,
        limits: &Limits,
        dirs: &[DirGrant],
        http: &[HttpGrant],
        network: &[SocketAddr],
        secrets: &BTreeMap<String, StepSecret>,
    ) -> Vec<String> {
        let spec = &self.spec;
        let tenant = &self.name;
        let source = self.source();
        let mut problems: Vec<String> = limits_over(&spec.limits, limits)
            .into_iter()
            .map(|(what, asked, limit)| {
                format!("{what} {asked} is over tenant `{tenant}`'s ceiling of {limit} ({what} in {source})")
            })
            .collect();
        for dir in dirs.iter().filter(|dir| !spec.dirs.permits(|allowed| under(&dir.host, allowed))) {
            problems.push(format!(
                "directory {} is not under tenant `{tenant}`'s allowed dirs ({source})",
                dir.host.display()
            ));
        }
        for rule in http.iter().filter(|rule| !spec.http.permits(|wider| rule.within(wider))) {
            problems.push(format!("HTTP grant `{rule}` is not within tenant `{tenant}`'s allowed http ({source})"));
        }
        for address in network.iter().filter(|address| !spec.network.permits(|a| a == *address)) {
            problems.push(format!("address {address} is not in tenant `{tenant}`'s allowed network ({source})"));
        }
        for (key, secret) in secrets.iter().filter(|(_, s)| !spec.secrets.permits(|g| g.allows(&s.source))) {
            problems.push(format!(
                "secret `{key}` ({}) is not among tenant `{tenant}`'s allowed secrets ({source})",
                secret.source
            ));
        }
        problems
    }

    fn problems(&self, workflow: &Workflow, depth: usize) -> Vec<String> {
        let spec = &self.spec;
        let tenant = &self.name;
        let source = self.source();
        // `key` is the ceiling's name in the tenants file.
        let over = |what: &str, asked: String, limit: String, key: &str| {
            format!("{what} {asked} is over tenant `{tenant}`'s ceiling of {limit} ({key} in {source})")
        };
        let mut problems = Vec::new();
        if depth > spec.run.max_include_depth {
            problems.push(format!(
                "includes nest {depth} workflows deep, over tenant `{tenant}`'s ceiling of {} (max_include_depth in {source})",
                spec.run.max_include_depth
            ));
            return problems;
        }
        let defaults = self.default_limits();
        for step in &workflow.steps {
            let id = &step.id;
            // An include step runs nothing itself; a literal include is part
            // of the workflow, so its steps are checked now, not only when
            // it is reached.
            if let Action::Include { path, workflow: included } = &step.action {
                if let Some(included) = included {
                    if let Err(problem) = self.confine_include(&workflow.base_dir, &included.file) {
                        problems.push(format!("step `{id}`: {problem}"));
                    }
                    problems.extend(
                        self.problems(included, depth + 1)
                            .into_iter()
                            .map(|problem| format!("step `{id}` includes {path}: {problem}")),
                    );
                }
                continue;
            }
            if step.retry.attempts > spec.run.max_attempts {
                let (asked, limit) = (step.retry.attempts.to_string(), spec.run.max_attempts.to_string());
                problems.push(format!("step `{id}`: {}", over("retry.attempts", asked, limit, "max_attempts")));
            }
            let grants = &step.grants;
            let limits = step.limits.over(&defaults);
            let attempt = self.attempt_problems(&limits, &grants.dirs, &grants.http, &grants.network, &grants.secrets);
            problems.extend(attempt.into_iter().map(|problem| format!("step `{id}`: {problem}")));
        }
        for component in workflow.components.values().filter(|c| !spec.components.permits(|dir| under(&c.path, dir))) {
            problems.push(format!(
                "component `{}` ({}) is not under tenant `{tenant}`'s allowed component paths ({source})",
                component.name,
                component.path.display(),
            ));
        }
        problems
    }
}

/// Each of `limits` over its `ceiling`, as (name, asked, ceiling) for a
/// message.
fn limits_over(ceiling: &LimitsSpec, limits: &Limits) -> Vec<(&'static str, String, String)> {
    let bytes = |b: bytesize::ByteSize| b.display().iec().to_string();
    let time = |d| humantime::format_duration(d).to_string();
    let mut over = Vec::new();
    if let Some(max) = ceiling.fuel.filter(|max| limits.fuel > *max) {
        over.push(("limits.fuel", limits.fuel.to_string(), max.to_string()));
    }
    if let Some(max) = ceiling.timeout.filter(|max| limits.timeout > *max) {
        over.push(("limits.timeout", time(limits.timeout), time(max)));
    }
    for (what, asked, max) in [
        ("limits.memory", limits.memory, ceiling.memory),
        ("limits.output", limits.output, ceiling.output),
        ("limits.stdio", limits.stdio, ceiling.stdio),
        ("limits.host_memory", limits.host_memory, ceiling.host_memory),
        ("limits.scratch", limits.scratch, ceiling.scratch),
    ] {
        if let Some(max) = max.filter(|max| asked > *max) {
            over.push((what, bytes(asked), bytes(max)));
        }
    }
    over
}

/// Whether `path` lies under `allowed`, after resolving `..` and symlinks
/// (so a symlink cannot smuggle a path out).
fn under(path: &Path, allowed: &Path) -> bool {
    let Ok(path) = path.canonicalize() else { return false };
    allowed.canonicalize().is_ok_and(|dir| path.starts_with(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<TenantSpec, String> {
        serde_saphyr::from_str::<TenantSpec>(yaml).map_err(|err| err.to_string())
    }

    #[test]
    fn a_left_out_dimension_grants_nothing_and_any_grants_everything() {
        let closed = spec("{}").unwrap();
        assert_eq!(closed.dirs, Allowed::Only(vec![]));
        assert!(!closed.network.permits(|_| true));
        assert!(!closed.secrets.permits(|_| true));
        let open = spec("{ dirs: any, network: any, http: any, components: any, secrets: any }").unwrap();
        assert!(open.dirs.permits(|_| false) && open.secrets.permits(|_| false));
        let err = spec("{ dirs: all }").unwrap_err();
        assert!(err.contains("`all` is not a list; write `any`"), "{err}");
    }

    #[test]
    fn secret_grants_match_names_and_prefixes_of_one_source() {
        let grant = |text: &str| SecretGrant::try_from(text.to_owned()).unwrap();
        assert!(grant("env:ACME_*").allows(&SecretSource::Env("ACME_TOKEN".into())));
        assert!(!grant("env:ACME_*").allows(&SecretSource::Env("GLOBEX_TOKEN".into())));
        assert!(!grant("env:ACME_*").allows(&SecretSource::File("ACME_TOKEN".into())));
        assert!(grant("file:db").allows(&SecretSource::File("db".into())));
        assert!(!grant("file:db").allows(&SecretSource::File("db2".into())));
        for bad in ["ACME", "env:", "vault:x", "env:A*B*"] {
            assert!(SecretGrant::try_from(bad.to_owned()).unwrap_err().contains("env:NAME or file:NAME"), "{bad}");
        }
    }

    #[test]
    fn the_run_ceilings_default_to_the_numbers_security_md_lists() {
        let ceilings = RunCeilings::default();
        assert_eq!((ceilings.max_items, ceilings.max_include_depth), (10_000, 8));
        assert_eq!((ceilings.max_attempts, ceilings.max_executions), (100, 100_000));
    }

    #[test]
    fn a_ceiling_below_a_default_becomes_the_default() {
        let tenant = Tenant {
            name: "t".into(),
            spec: spec("{ limits: { fuel: 1000, stdio: 1KiB, scratch: 1MiB } }").unwrap(),
            file: None,
        };
        let limits = tenant.default_limits();
        assert_eq!((limits.fuel, limits.stdio), (1000, bytesize::ByteSize::kib(1)));
        assert_eq!(limits.scratch, bytesize::ByteSize::mib(1));
        assert_eq!(limits.memory, bytesize::ByteSize::mib(64), "stepbox's own default where the ceiling is higher");
    }
}
