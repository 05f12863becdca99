//! Every refusal as JSON: `{"error": {"code": ..., "message": ...}}`, with
//! a stable code for programs and a message that says what to fix. The
//! extractors' own refusals (a body that is not JSON, a path that does not
//! parse) are mapped to the same form, so no response is a bare 4xx or a
//! 500 for bad input.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::service::ServiceError;

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable code, e.g. `not_found`, `invalid_workflow`, `too_many_runs`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

/// An error the API answers with.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after: None }
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        let status = match &err {
            ServiceError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ServiceError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServiceError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ServiceError::Conflict { .. } => StatusCode::CONFLICT,
            ServiceError::TooManyRuns { .. } => StatusCode::TOO_MANY_REQUESTS,
            ServiceError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::Store(_) | ServiceError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{err}");
        }
        let retry_after = match &err {
            ServiceError::TooManyRuns { .. } => Some(1),
            ServiceError::ShuttingDown => Some(5),
            _ => None,
        };
        ApiError { status, code: err.code(), message: err.to_string(), retry_after }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let (status, code) = match &rejection {
            JsonRejection::MissingJsonContentType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_json"),
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            }
            _ => (StatusCode::BAD_REQUEST, "invalid_body"),
        };
        let message = match code {
            "not_json" => "send the body as JSON, with `Content-Type: application/json`".to_owned(),
            "body_too_large" => format!("{}; send less, or split the request", rejection.body_text()),
            _ => rejection.body_text(),
        };
        ApiError::new(status, code, message)
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_owned(), message: self.message } };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was never read, so the connection
            // cannot carry another request: say so, or a client that sends
            // one on it gets no answer.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
