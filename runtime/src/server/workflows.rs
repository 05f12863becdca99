//! `/v1/workflows`: deploying workflows, reading their versions, and
//! starting runs of them.

use crate::traces::TraceParent;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, Caller, Params, Queried};
use crate::run::Run;
use crate::service::{BundleUpload, Outline, Service, StartRun};
use crate::store::WorkflowVersion;

/// The deployed workflows.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkflowList {
    /// The newest version of each, by name.
    pub workflows: Vec<WorkflowVersion>,
}

/// A workflow's versions.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionList {
    /// Every version, newest first.
    pub versions: Vec<WorkflowVersion>,
}

/// Which version to read.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VersionQuery {
    /// A version number; the newest when left out.
    version: Option<u32>,
}

/// Deploys a bundle as the workflow's next version.
#[utoipa::path(
    put,
    path = "/v1/workflows/{name}",
    tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name, as in its file")),
    request_body = BundleUpload,
    responses(
        (status = 201, description = "A new version", body = WorkflowVersion),
        (status = 200, description = "The newest version already is this bundle", body = WorkflowVersion),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn deploy(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(name): Params<String>,
    Body(upload): Body<BundleUpload>,
) -> Result<(StatusCode, Json<WorkflowVersion>), ApiError> {
    let (version, created) = service.deploy(&scope, &name, upload).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(version)))
}

/// Lists the deployed workflows.
#[utoipa::path(
    get,
    path = "/v1/workflows",
    tag = "workflows",
    responses(
        (status = 200, body = WorkflowList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(State(service): State<Arc<Service>>, Caller(scope): Caller) -> Result<Json<WorkflowList>, ApiError> {
    Ok(Json(WorkflowList { workflows: service.workflows(&scope).await? }))
}

/// Reads one version of a workflow.
#[utoipa::path(
    get,
    path = "/v1/workflows/{name}",
    tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name"), VersionQuery),
    responses(
        (status = 200, body = WorkflowVersion),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(name): Params<String>,
    Queried(query): Queried<VersionQuery>,
) -> Result<Json<WorkflowVersion>, ApiError> {
    Ok(Json(service.workflow(&scope, &name, query.version).await?))
}

/// Lists every version of a workflow, newest first.
#[utoipa::path(
    get,
    path = "/v1/workflows/{name}/versions",
    tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name")),
    responses(
        (status = 200, body = VersionList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn versions(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(name): Params<String>,
) -> Result<Json<VersionList>, ApiError> {
    Ok(Json(VersionList { versions: service.versions(&scope, &name).await? }))
}

/// One version of a workflow as a client draws it: its inputs, its steps
/// with their edges (`depends_on`, `on_failure`), its schedules and
/// whether a webhook starts it.
#[utoipa::path(
    get,
    path = "/v1/workflows/{name}/outline",
    tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name"), VersionQuery),
    responses(
        (status = 200, body = Outline),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn outline(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(name): Params<String>,
    Queried(query): Queried<VersionQuery>,
) -> Result<Json<Outline>, ApiError> {
    Ok(Json(service.outline(&scope, &name, query.version).await?))
}

/// Starts a run of a deployed workflow. With an `Idempotency-Key`, a
/// repeated request returns the run the first one started (200).
#[utoipa::path(
    post,
    path = "/v1/workflows/{name}/runs",
    tag = "runs",
    params(
        ("name" = String, Path, description = "The workflow's name"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 256,
            description = "Makes a repeated request return the same run"),
    ),
    request_body = StartRun,
    responses(
        (status = 201, description = "The run started", body = Run),
        (status = 200, description = "A repeated request: the run the first one started", body = Run),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn start_run(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(name): Params<String>,
    headers: HeaderMap,
    Body(request): Body<StartRun>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    let key = match headers.get("idempotency-key") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_idempotency_key",
                        "the Idempotency-Key must be visible ASCII",
                    )
                })?
                .to_owned(),
        ),
        None => None,
    };
    // A malformed one is ignored (the run starts a trace of its own), as
    // the W3C recommendation asks.
    let parent = headers.get("traceparent").and_then(|value| TraceParent::parse(value.to_str().ok()?));
    let (run, created) = service.start_run(&scope, &name, request, key, parent).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(run)))
}
