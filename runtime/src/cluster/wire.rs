//! What a task in the queue holds, and what its worker gives back: an
//! attempt as data. Secrets travel as names and directories as paths; the
//! worker reads the one and opens the other itself, after holding both to
//! its own tenants file, so no secret value is ever written to the store.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;

use serde::{Deserialize, Serialize};

use crate::run::Attempt;
use crate::sandbox::{AttemptRequest, DirGrant, ExitCodes, Grants, HttpGrant, Limits, StepContext};
use crate::scheduler::Prepared;
use crate::store::KvQuota;
use crate::tenant::Tenant;
use crate::workflow::StepSecret;
use crate::workflow::spec::SecretSource;

/// One attempt, as a task's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskRequest {
    /// The component's sha256 (hex), as the store keeps its bytes.
    pub(crate) component: String,
    pub(crate) run_id: String,
    pub(crate) step_id: String,
    pub(crate) attempt: u32,
    pub(crate) idempotency_key: String,
    pub(crate) tenant: String,
    pub(crate) workflow: String,
    pub(crate) kv_max_bytes: u64,
    pub(crate) kv_max_keys: u64,
    pub(crate) input: String,
    pub(crate) limits: Ceilings,
    pub(crate) retryable_exit_codes: Vec<i32>,
    pub(crate) dirs: Vec<Dir>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) config: BTreeMap<String, String>,
    pub(crate) stdin: String,
    pub(crate) args: Vec<String>,
    pub(crate) scratch: bool,
    pub(crate) deterministic: Option<u64>,
    pub(crate) network: Vec<SocketAddr>,
    pub(crate) http: Vec<String>,
    pub(crate) secrets: BTreeMap<String, Secret>,
    /// The coordinator counts the attempt's start against a rate limit:
    /// the worker says when it starts to run ([`crate::store::Queue::start`]).
    #[serde(default)]
    pub(crate) announce_start: bool,
    /// The coordinator's span of the attempt, for the attempt's outgoing
    /// HTTP requests.
    #[serde(default)]
    pub(crate) trace_parent: Option<crate::traces::TraceParent>,
}

/// [`Limits`] in exact numbers: their own serde form writes sizes rounded,
/// as a person would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ceilings {
    fuel: u64,
    timeout_ns: u64,
    memory: u64,
    table_elements: u32,
    stdio: u64,
    output: u64,
    logs: u64,
    host_resources: u32,
    host_memory: u64,
    scratch: u64,
}

impl From<&Limits> for Ceilings {
    fn from(limits: &Limits) -> Self {
        Ceilings {
            fuel: limits.fuel,
            timeout_ns: u64::try_from(limits.timeout.as_nanos()).unwrap_or(u64::MAX),
            memory: limits.memory.as_u64(),
            table_elements: limits.table_elements,
            stdio: limits.stdio.as_u64(),
            output: limits.output.as_u64(),
            logs: limits.logs.as_u64(),
            host_resources: limits.host_resources,
            host_memory: limits.host_memory.as_u64(),
            scratch: limits.scratch.as_u64(),
        }
    }
}

impl From<Ceilings> for Limits {
    fn from(c: Ceilings) -> Self {
        Limits {
            fuel: c.fuel,
            timeout: Duration::from_nanos(c.timeout_ns),
            memory: ByteSize(c.memory),
            table_elements: c.table_elements,
            stdio: ByteSize(c.stdio),
            output: ByteSize(c.output),
            logs: ByteSize(c.logs),
            host_resources: c.host_resources,
            host_memory: ByteSize(c.host_memory),
            scratch: ByteSize(c.scratch),
        }
    }
}

/// A directory grant by path: opened on the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Dir {
    pub(crate) host: PathBuf,
    pub(crate) guest: String,
    pub(crate) read_only: bool,
}

/// A secret by name: read on the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Secret {
    pub(crate) source: SecretSource,
    pub(crate) send_to: Vec<String>,
}

/// What a worker gives back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskResult {
    pub(crate) attempt: Attempt,
}

impl TaskRequest {
    /// `attempt` of the component with `digest`, as a task; `announce_start`
    /// when its coordinator waits to hear it start.
    pub(crate) fn new(digest: String, attempt: &Prepared, announce_start: bool) -> Self {
        let (request, grants) = (&attempt.request, &attempt.request.grants);
        let context = &request.context;
        TaskRequest {
            component: digest,
            run_id: context.run_id.clone(),
            step_id: context.step_id.clone(),
            attempt: context.attempt,
            idempotency_key: context.idempotency_key.clone(),
            tenant: context.tenant.clone(),
            workflow: context.workflow.clone(),
            kv_max_bytes: context.kv_quota.max_bytes.as_u64(),
            kv_max_keys: context.kv_quota.max_keys,
            input: request.input.clone(),
            limits: Ceilings::from(&request.limits),
            retryable_exit_codes: request.exit_codes.retryable.clone(),
            dirs: grants
                .dirs
                .iter()
                .map(|dir| Dir { host: dir.host.clone(), guest: dir.guest.clone(), read_only: dir.read_only })
                .collect(),
            env: grants.env.clone(),
            config: grants.config.clone(),
            stdin: String::from_utf8_lossy(&grants.stdin).into_owned(),
            args: grants.args.clone(),
            scratch: grants.scratch,
            deterministic: grants.deterministic,
            network: grants.network.clone(),
            http: grants.http.iter().map(ToString::to_string).collect(),
            secrets: attempt
                .secrets
                .iter()
                .map(|(key, secret)| {
                    let send_to = secret.send_to.iter().map(ToString::to_string).collect();
                    (key.clone(), Secret { source: secret.source.clone(), send_to })
                })
                .collect(),
            announce_start,
            trace_parent: attempt.request.span.traceparent().cloned(),
        }
    }

    /// The attempt to run, as attempt `number` (its number in the task
    /// plus the claims lost before this one), held to `tenant`'s ceilings
    /// as this worker's tenants file sets them, its directories opened and
    /// its secrets read here. The error says what was refused.
    pub(crate) fn into_request(
        self,
        number: u32,
        tenant: &Tenant,
        secrets_dir: Option<&Path>,
    ) -> Result<AttemptRequest, String> {
        let parse =
            |rules: Vec<String>| rules.iter().map(|rule| rule.parse::<HttpGrant>()).collect::<Result<Vec<_>, String>>();
        let http = parse(self.http)?;
        let mut secrets = BTreeMap::new();
        for (key, secret) in self.secrets {
            secrets.insert(key, StepSecret { source: secret.source, send_to: parse(secret.send_to)? });
        }
        let dirs = self
            .dirs
            .iter()
            .map(|dir| DirGrant::new(&dir.host, dir.guest.clone(), dir.read_only))
            .collect::<Result<Vec<_>, String>>()?;
        let limits = Limits::from(self.limits);
        let problems = tenant.attempt_problems(&limits, &dirs, &http, &self.network, &secrets);
        if !problems.is_empty() {
            return Err(format!("this worker's tenants file refuses the attempt: {}", problems.join("; ")));
        }
        let grants = Grants {
            dirs: tenant.confine(dirs)?,
            env: self.env,
            config: self.config,
            stdin: self.stdin.into_bytes(),
            secrets: BTreeMap::new(),
            args: self.args,
            scratch: self.scratch,
            deterministic: self.deterministic,
            network: self.network,
            http,
            http_secrets: Vec::new(),
        };
        let request = AttemptRequest {
            context: StepContext {
                run_id: self.run_id,
                step_id: self.step_id,
                attempt: number,
                idempotency_key: self.idempotency_key,
                tenant: self.tenant,
                workflow: self.workflow,
                kv_quota: KvQuota { max_bytes: ByteSize(self.kv_max_bytes), max_keys: self.kv_max_keys },
            },
            input: self.input,
            limits,
            grants,
            exit_codes: ExitCodes { retryable: self.retryable_exit_codes },
            span: self.trace_parent.map(crate::traces::Span::remote).unwrap_or_default(),
        };
        Prepared { request, secrets }.resolve(secrets_dir).map_err(|refused| {
            refused.failure().map_or_else(|| "its secrets could not be read".into(), |failure| failure.message.clone())
        })
    }
}
