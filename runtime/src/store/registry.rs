//! What `stepbox serve` keeps besides runs: API tokens (their hashes
//! only), deployed workflow versions, and the idempotency keys runs were
//! started with.

use serde::{Deserialize, Serialize};

use super::{Pending, StoreError};
use crate::run::Run;

/// An API token as stored: never the token itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    /// A short public id, to list and revoke it by.
    pub id: String,
    /// The tenant it acts for; `None` for an admin token, which may act for
    /// any tenant.
    pub tenant: Option<String>,
    /// What it is for, as its creator named it.
    pub name: String,
    /// When it was created (unix ms).
    pub created_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<i64>,
}

/// One deployed version of a tenant's workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkflowVersion {
    /// The tenant that deployed it.
    pub tenant: String,
    /// The workflow's name.
    pub name: String,
    /// 1 for the first deploy, one more for each deploy that changed
    /// something.
    pub version: u32,
    /// The SHA-256 of the bundle: its files' paths and contents.
    pub digest: String,
    /// The workflow file's path inside the bundle.
    pub entry: String,
    /// When it was deployed (unix ms).
    pub created_ms: i64,
}

/// What starting a run with an idempotency key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// The run was created, its lease held by this process.
    Created(super::Lease),
    /// The key was used before by the same request: this is its run.
    Existing(String),
    /// The key was used before by a different request.
    Conflict(String),
}

/// The service's own records.
pub trait Registry: Send + Sync {
    /// Stores a new token by the SHA-256 `hash` of its secret.
    fn create_token(&self, token: &TokenRecord, hash: &str) -> Result<(), StoreError>;
    /// The live (not revoked) token whose secret hashes to `hash`.
    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Every token, revoked ones too, oldest first.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Revokes token `id`; false if there is no live token with that id.
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;

    /// Records a bundle with `digest` as the newest version of `tenant`'s
    /// workflow `name`, unless the newest version already is that bundle.
    /// Returns the version, and whether it is new.
    fn deploy(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
        entry: &str,
    ) -> Result<(WorkflowVersion, bool), StoreError>;
    /// A version of a tenant's workflow; the newest when `version` is `None`.
    fn workflow_version(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<WorkflowVersion>, StoreError>;
    /// The newest version of each of a tenant's workflows, by name.
    fn list_workflows(&self, tenant: &str) -> Result<Vec<WorkflowVersion>, StoreError>;
    /// Every version of a tenant's workflow, newest first.
    fn workflow_versions(&self, tenant: &str, name: &str) -> Result<Vec<WorkflowVersion>, StoreError>;

    /// Keeps `bytes` under `digest`, for every process of the store to
    /// load: a component's SHA-256 (hex) for workers, a bundle's digest for
    /// the service's other nodes. Whoever loads them checks them against
    /// the digest. A digest already kept is left as it is.
    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// The bytes kept under `digest`, if any.
    fn blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The newest version of every tenant's every workflow.
    fn all_workflows(&self) -> Result<Vec<WorkflowVersion>, StoreError>;
    /// The last tick (unix ms) schedule `schedule` of a tenant's workflow
    /// handled, if it handled one.
    fn schedule_tick(&self, tenant: &str, workflow: &str, schedule: &str) -> Result<Option<f64>, StoreError>;
    /// Records `tick_ms` as the last tick the schedule handled.
    fn set_schedule_tick(&self, tenant: &str, workflow: &str, schedule: &str, tick_ms: f64) -> Result<(), StoreError>;
    /// Parked runs with a wait to settle by `now_ms`: its event has come,
    /// or its deadline has passed.
    fn runs_to_wake(&self, now_ms: f64) -> Result<Vec<String>, StoreError>;
    /// The earliest deadline of a wait of a parked run, if any.
    fn next_wait_deadline(&self) -> Result<Option<f64>, StoreError>;
    /// The run `tenant` started with idempotency key `key`, with the hash
    /// of the request that started it.
    fn idempotency_key(&self, tenant: &str, key: &str) -> Result<Option<(String, String)>, StoreError>;
    /// Creates `run` (as [`super::Journal::create_run`]) unless `tenant`
    /// already started a run with idempotency key `key`; `request` (a hash
    /// of what was asked) tells a repeated request from a different one
    /// reusing the key. One record, checked and written in the commit that
    /// holds it, so two requests racing with one key start one run.
    fn create_run_once(&self, run: &Run, fingerprint: &serde_json::Value, key: &str, request: &str)
    -> Pending<Started>;
}
