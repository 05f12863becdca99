//! `/v1/hooks/{tenant}/{workflow}`: webhooks. No bearer token: the body's
//! HMAC-SHA256 signature under the workflow's webhook secret is the
//! credential.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};

use super::error::{ApiError, ErrorBody};
use super::extract::Params;
use crate::run::Run;
use crate::service::{Delivery, Service};

/// Starts a run of a workflow whose file declares `on: { webhook: ... }`.
/// A delivery id seen before returns the run its first delivery started.
#[utoipa::path(
    post,
    path = "/v1/hooks/{tenant}/{workflow}",
    tag = "runs",
    params(
        ("tenant" = String, Path, description = "The tenant that deployed the workflow"),
        ("workflow" = String, Path, description = "The workflow's name"),
        ("X-Stepbox-Signature-256" = String, Header, description = "`sha256=` and the hex HMAC-SHA256 of the body with the webhook's secret"),
        ("X-Stepbox-Delivery" = String, Header, min_length = 1, max_length = 256, description = "This delivery's id; a replay sends the same"),
    ),
    request_body(content = String, description = "Any body; JSON is parsed for the inputs", content_type = "application/json"),
    responses(
        (status = 201, description = "A run started", body = Run),
        (status = 200, description = "A replayed delivery: the run the first one started", body = Run),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
pub async fn deliver(
    State(service): State<Arc<Service>>,
    Params((tenant, workflow)): Params<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        ApiError::new(
            status,
            if status == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "invalid_body" },
            rejection.body_text(),
        )
    })?;
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let delivery = Delivery {
        signature: header("x-stepbox-signature-256"),
        id: header("x-stepbox-delivery"),
        headers: headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect::<BTreeMap<_, _>>(),
        body: &body,
    };
    let (run, created) = service.webhook(&tenant, &workflow, delivery).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(run)))
}
