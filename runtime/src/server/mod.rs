//! The HTTP API of `stepbox serve`: a thin axum layer over
//! [`crate::service`]. Each handler reads its request, calls the service
//! and writes JSON; the OpenAPI document is generated from the handlers'
//! own annotations and served at `/v1/openapi.json`.

mod console;
mod error;
mod extract;
mod hooks;
mod runs;
mod workflows;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorBody, ErrorDetail};
use extract::Caller;
pub use extract::TENANT_HEADER;

use crate::service::{Scope, Service};

/// The largest request body besides a deploy's.
pub const MAX_BODY: usize = 1024 * 1024;

/// How long a request may take to be answered (a stream's events are not
/// counted: they follow the answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(OpenApi)]
#[openapi(
    info(
        title = "stepbox",
        description = "Deploy workflows of sandboxed WebAssembly steps, start and follow their runs. \
                       Every call takes `Authorization: Bearer TOKEN` (see `stepbox token create`); \
                       an admin token names the tenant it acts for in the `Stepbox-Tenant` header."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "workflows", description = "Deployed workflows and their versions"),
        (name = "runs", description = "Runs: start, list, read, follow, cancel, resume, retry"),
        (name = "session", description = "Who the token acts for"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The API's router, with its OpenAPI document served at
/// `/v1/openapi.json`.
pub fn router(service: Arc<Service>) -> axum::Router {
    // The API serves them, so they are counted from the start.
    crate::metrics::record(true);
    let max_deploy = usize::try_from(service.max_bundle_bytes()).unwrap_or(usize::MAX);
    // Base64 takes 4 bytes for 3, and the JSON around the files a little.
    let deploy_limit = max_deploy.saturating_mul(4) / 3 + MAX_BODY;
    let deploys = OpenApiRouter::new().routes(routes!(workflows::deploy)).layer(DefaultBodyLimit::max(deploy_limit));
    let rest = OpenApiRouter::new()
        .routes(routes!(workflows::list))
        .routes(routes!(workflows::get))
        .routes(routes!(workflows::versions))
        .routes(routes!(workflows::outline))
        .routes(routes!(workflows::start_run))
        .routes(routes!(runs::list))
        .routes(routes!(runs::get))
        .routes(routes!(runs::logs))
        .routes(routes!(runs::events))
        .routes(routes!(runs::send_event))
        .routes(routes!(runs::cancel))
        .routes(routes!(runs::resume))
        .routes(routes!(runs::retry))
        .routes(routes!(hooks::deliver))
        .routes(routes!(me))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    let (router, mut api) = OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(deploys).merge(rest).split_for_parts();
    api.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let document = Arc::new(api);
    router
        .route("/v1/openapi.json", axum::routing::get(move || async move { Json(document.as_ref().clone()) }))
        .route("/metrics", axum::routing::get(metrics))
        .merge(console::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(time_limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        // Outside the panic catcher, so a request that panicked counts.
        .layer(axum::middleware::from_fn(count_request))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(service)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; `GET /v1/openapi.json` lists them")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; `GET /v1/openapi.json` lists what it takes",
    )
}

/// Who a token is.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Me {
    /// The tenant it acts for; `null` for an admin token acting for none.
    pub tenant: Option<String>,
}

/// Says who the token acts for: the console signs in with it.
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "session",
    responses((status = 200, body = Me), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []))
)]
async fn me(Caller(scope): Caller) -> Json<Me> {
    Json(Me {
        tenant: match scope {
            Scope::Tenant(tenant) => Some(tenant),
            Scope::All => None,
        },
    })
}

/// `GET /metrics`: the process's metrics, for an admin token (they name
/// every tenant).
async fn metrics(
    axum::extract::State(service): axum::extract::State<Arc<Service>>,
    Caller(scope): Caller,
) -> Result<Response, ApiError> {
    if scope != Scope::All {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the metrics cover every tenant: scrape them with an admin token (`stepbox token create --admin`), \
             without a Stepbox-Tenant header",
        ));
    }
    let text = crate::metrics::scrape(Arc::new(move || service.metric_snapshots()))
        .await
        .map_err(|why| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why))?;
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Counts each request by its route's pattern (never its path: ids would
/// make a series each), method and status.
async fn count_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let Some(metrics) = crate::metrics::recording() else { return next.run(request).await };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    // A client may send any token as a method; only the standard ones
    // get series of their own.
    let method = match *request.method() {
        Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::HEAD | Method::OPTIONS => {
            request.method().as_str().to_owned()
        }
        _ => "other".to_owned(),
    };
    let began = std::time::Instant::now();
    let response = next.run(request).await;
    metrics.request_answered(&route, &method, response.status().as_u16(), began.elapsed());
    response
}

/// A request not answered in [`REQUEST_TIMEOUT`] gets a 503 that says so.
async fn time_limit(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request took longer than {}s; try again", REQUEST_TIMEOUT.as_secs()),
        )
        .into_response(),
    }
}

/// A bug in a handler: logged, and answered as JSON rather than a dropped
/// connection.
fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "stepbox failed to answer; see its log")
        .into_response()
}

/// Serves the API on `listener` until `shutdown` resolves, then stops
/// taking connections and waits for the answers in flight.
pub async fn serve(
    service: Arc<Service>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(service)).with_graceful_shutdown(shutdown).await
}
