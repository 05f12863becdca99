//! What handlers take from a request, each refusing with an [`ApiError`]:
//! the caller (from its bearer token), a JSON body, path parameters and a
//! query string.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Json, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::service::{Principal, Scope, Service, authenticate};

/// The header an admin token names the tenant it acts for with.
pub const TENANT_HEADER: &str = "stepbox-tenant";

/// Who is calling, as the scope of what it may see.
pub struct Caller(pub Scope);

impl FromRequestParts<Arc<Service>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, service: &Arc<Service>) -> Result<Self, ApiError> {
        let unauthorized = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).ok_or_else(|| {
            unauthorized("send an API token as `Authorization: Bearer TOKEN` (`stepbox token create`)")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer TOKEN`"))?
            .to_owned();
        let principal = match service.tokens().get(&token) {
            Some(principal) => principal,
            None => {
                let (db, secret) = (service.database().clone(), token.clone());
                let asked = std::time::Instant::now();
                let principal = tokio::task::spawn_blocking(move || authenticate(db.as_ref(), &secret))
                    .await
                    .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", err.to_string()))?
                    .map_err(|err| ApiError::from(crate::service::ServiceError::Store(err)))?
                    .ok_or_else(|| unauthorized("the API token is not valid, or it was revoked"))?;
                service.tokens().remember(&token, principal.clone(), asked);
                principal
            }
        };
        let acting = match parts.headers.get(TENANT_HEADER) {
            Some(value) => Some(value.to_str().ok().filter(|name| !name.is_empty()).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_tenant", "the Stepbox-Tenant header must name a tenant")
            })?),
            None => None,
        };
        let scope = match (principal, acting) {
            (Principal::Tenant(own), None) => Scope::Tenant(own),
            (Principal::Tenant(own), Some(named)) if named == own => Scope::Tenant(own),
            (Principal::Tenant(own), Some(named)) => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "this token acts for tenant `{own}` only, not `{named}`; leave out the Stepbox-Tenant header"
                    ),
                ));
            }
            (Principal::Admin, Some(named)) => Scope::Tenant(named.to_owned()),
            (Principal::Admin, None) => Scope::All,
        };
        Ok(Caller(scope))
    }
}

/// A JSON body, refused with a JSON error.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(Body(value))
    }
}

/// A query string, refused with a JSON error when it does not parse.
pub struct Queried<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Queried<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(value) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", rejection.body_text()))?;
        Ok(Queried(value))
    }
}

/// Path parameters, refused with a JSON error.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(Params(value))
    }
}
