//! Deploying workflows: a bundle is checked in a staging directory (its
//! paths, its workflow, the tenant's ceilings, its components compiled)
//! and only then stored and recorded as the workflow's next version, so a
//! refused deploy leaves nothing behind.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use super::{Bundle, BundleUpload, Scope, Service, ServiceError};
use crate::store::WorkflowVersion;
use crate::workflow::Workflow;

/// A deployed bundle, loaded: what a run of it needs.
pub struct Deployed {
    /// The bundle's directory.
    pub dir: PathBuf,
    /// Its workflow.
    pub workflow: Arc<Workflow>,
    /// The hashes of its files, as runs record them.
    pub fingerprint: Value,
}

/// The longest workflow name, in bytes.
const MAX_NAME: usize = 128;

/// A workflow name must be usable as one segment of a URL path.
fn check_name(name: &str) -> Result<(), ServiceError> {
    // `.` and `..` would be path segments of their own in a URL.
    if name.is_empty()
        || name.len() > MAX_NAME
        || name.contains('/')
        || name.chars().any(char::is_control)
        || name == "."
        || name == ".."
    {
        return Err(ServiceError::Invalid {
            code: "invalid_name",
            message: format!(
                "`{}` cannot name a deployed workflow: use 1 to {MAX_NAME} bytes, without `/` or control characters, \
                 other than `.` and `..`",
                name.escape_debug()
            ),
        });
    }
    Ok(())
}

/// The answer for a workflow name nothing was deployed under.
pub(super) fn not_deployed(name: &str) -> ServiceError {
    ServiceError::NotFound(format!("no workflow `{name}` is deployed; deploy it with `PUT /v1/workflows/{name}`"))
}

impl Service {
    /// Deploys `upload` as the newest version of the scope's tenant's
    /// workflow `name`, unless the newest version is that same bundle.
    /// Returns the version and whether it is new.
    pub async fn deploy(
        &self,
        scope: &Scope,
        name: &str,
        upload: BundleUpload,
    ) -> Result<(WorkflowVersion, bool), ServiceError> {
        self.accepting()?;
        let tenant_name = scope.tenant()?.to_owned();
        check_name(name)?;
        let tenant = self.tenant(&tenant_name)?;
        let invalid = |message: String| ServiceError::Invalid { code: "invalid_bundle", message };
        let bundle = Bundle::decode(upload).map_err(invalid)?;
        if bundle.size() as u64 > self.config.max_bundle_bytes {
            return Err(invalid(format!(
                "the bundle's files hold {} bytes; a bundle may hold at most {}",
                bundle.size(),
                self.config.max_bundle_bytes
            )));
        }
        let digest = bundle.digest();
        let bundles = self.bundles.clone();
        let wanted = name.to_owned();
        let checked = tokio::task::spawn_blocking(move || {
            let staged = bundles.stage(&bundle).map_err(|err| ServiceError::Internal(format!("cannot store the bundle: {err}")))?;
            let tenant = tenant.for_bundle(staged.path());
            let workflow =
                Workflow::load_for(&staged.path().join(&bundle.entry), &tenant).map_err(ServiceError::invalid_workflow)?;
            if workflow.name != wanted {
                return Err(ServiceError::Invalid {
                    code: "name_mismatch",
                    message: format!(
                        "the bundle's workflow is named `{}`, not `{wanted}`: deploy it under its own name, or rename it",
                        workflow.name
                    ),
                });
            }
            tenant.check(&workflow).map_err(ServiceError::invalid_workflow)?;
            let stored = bundle.to_stored();
            Ok((staged, bundle.entry, workflow, stored))
        })
        .await
        .unwrap_or_else(|err| Err(ServiceError::Internal(format!("checking the bundle failed: {err}"))))?;
        let (staged, entry, workflow, stored) = checked;
        crate::scheduler::compile(&workflow, &self.sandbox)
            .await
            .map_err(|err| ServiceError::Invalid { code: "invalid_component", message: err.to_string() })?;
        let bundles = self.bundles.clone();
        let committed = digest.clone();
        tokio::task::spawn_blocking(move || bundles.commit(staged, &committed))
            .await
            .map_err(|err| ServiceError::Internal(err.to_string()))?
            .map_err(|err| ServiceError::Internal(format!("cannot store the bundle: {err}")))?;
        let name = name.to_owned();
        // The bundle is in the store before its version is: every node
        // sharing the store can load whatever version it sees.
        let deployed = self
            .blocking(move |db| {
                db.put_blob(&digest, &stored)?;
                Ok(db.deploy(&tenant_name, &name, &digest, &entry)?)
            })
            .await?;
        self.deployed_now.notify_one();
        Ok(deployed)
    }

    /// The newest version of each of the scope's tenant's workflows.
    pub async fn workflows(&self, scope: &Scope) -> Result<Vec<WorkflowVersion>, ServiceError> {
        let tenant = scope.tenant()?.to_owned();
        self.blocking(move |db| Ok(db.list_workflows(&tenant)?)).await
    }

    /// A version of one of the scope's tenant's workflows (the newest when
    /// `version` is `None`).
    pub async fn workflow(
        &self,
        scope: &Scope,
        name: &str,
        version: Option<u32>,
    ) -> Result<WorkflowVersion, ServiceError> {
        let (tenant, wanted) = (scope.tenant()?.to_owned(), name.to_owned());
        let found = self.blocking(move |db| Ok(db.workflow_version(&tenant, &wanted, version)?)).await?;
        found.ok_or_else(|| match version {
            Some(version) => ServiceError::NotFound(format!(
                "workflow `{name}` has no version {version}; `GET /v1/workflows/{name}/versions` lists them"
            )),
            None => not_deployed(name),
        })
    }

    /// The loaded bundle of `version`, from the cache or its directory.
    pub(super) async fn deployed(&self, version: &WorkflowVersion) -> Result<Arc<Deployed>, ServiceError> {
        if let Some(deployed) = self.deployed.lock().get(&version.digest) {
            return Ok(deployed.clone());
        }
        let tenant = self.tenant(&version.tenant)?;
        let (bundles, db, digest, entry) =
            (self.bundles.clone(), self.db.clone(), version.digest.clone(), version.entry.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            let dir = bundles.fetch(&*db, &digest).map_err(ServiceError::Internal)?;
            let tenant = tenant.for_bundle(&dir);
            let entry = dir.join(entry);
            let mut workflow = Workflow::load_for(&entry, &tenant).map_err(ServiceError::invalid_workflow)?;
            let fingerprint = workflow.pin().map_err(|err| {
                ServiceError::Internal(format!("cannot read the deployed bundle {}: {err}", dir.display()))
            })?;
            Ok(Deployed { dir, workflow: Arc::new(workflow), fingerprint })
        })
        .await
        .unwrap_or_else(|err| Err(ServiceError::Internal(err.to_string())))?;
        let loaded = Arc::new(loaded);
        self.deployed.lock().put(version.digest.clone(), loaded.clone());
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_one_url_segment_are_refused() {
        for name in ["", "a/b", "tab\there", ".", "..", &"x".repeat(MAX_NAME + 1)] {
            assert_eq!(check_name(name).unwrap_err().code(), "invalid_name", "{name:?}");
        }
        check_name("order-processing.v2").unwrap();
    }
}
