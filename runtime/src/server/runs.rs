//! `/v1/runs`: listing runs, reading their reports and logs, following
//! their events live, and cancelling, resuming and retrying them.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt, stream};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorBody};
use super::extract::{Body, Caller, Params, Queried};
use crate::run::{Run, RunReport, RunStatus, StepReport};
use crate::service::{Numbered, RunPage, Service};
use crate::store::RunFilter;

/// Runs a page holds when the request does not say.
const DEFAULT_PAGE: usize = 20;
/// The most runs a page holds.
const MAX_PAGE: usize = 500;
/// The most `label` filters a query may give, as many as a run may have.
const MAX_LABEL_FILTERS: usize = 32;

/// Which runs to list. `label` may be given many times.
#[derive(Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only runs with this status.
    #[param(inline)]
    status: Option<RunStatus>,
    /// Only runs of this workflow.
    workflow: Option<String>,
    /// Only runs with this label, `KEY=VALUE`; repeat for several.
    #[param(schema_with = label_filters)]
    label: Option<Vec<String>>,
    /// Runs per page, 1 to 500 (default 20).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// The `next_cursor` of the page before.
    #[param(min_length = 1)]
    cursor: Option<String>,
}

/// The schema of `label` filters: `KEY=VALUE`, the key not empty.
fn label_filters() -> utoipa::openapi::schema::Array {
    let filter = utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some("^[^=]+="));
    utoipa::openapi::schema::ArrayBuilder::new().items(filter).build()
}

impl RunsQuery {
    /// Reads the query string; repeated `label`s are kept, anything
    /// unknown is refused.
    fn parse(raw: Option<&str>) -> Result<RunsQuery, ApiError> {
        let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message);
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
            .map_err(|err| bad(format!("the query string: {err}")))?;
        let mut query = RunsQuery::default();
        for (name, value) in pairs {
            match name.as_str() {
                "status" => query.status = Some(value.parse().map_err(bad)?),
                "workflow" => query.workflow = Some(value),
                "label" => {
                    let labels = query.label.get_or_insert_default();
                    if labels.len() == MAX_LABEL_FILTERS {
                        return Err(bad(format!("at most {MAX_LABEL_FILTERS} label filters may be given")));
                    }
                    labels.push(value);
                }
                "limit" => {
                    query.limit = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|limit| (1..=MAX_PAGE).contains(limit))
                            .ok_or_else(|| bad(format!("limit `{value}` is not a number from 1 to {MAX_PAGE}")))?,
                    );
                }
                "cursor" => query.cursor = Some(value),
                other => {
                    return Err(bad(format!(
                        "unknown query parameter `{other}`; use status, workflow, label, limit or cursor"
                    )));
                }
            }
        }
        Ok(query)
    }

    /// The filter the query asks for.
    fn filter(self) -> Result<RunFilter, ApiError> {
        let mut labels = Vec::new();
        for label in self.label.unwrap_or_default() {
            let (key, value) = label.split_once('=').filter(|(key, _)| !key.is_empty()).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("label `{label}` is not KEY=VALUE"))
            })?;
            labels.push((key.to_owned(), value.to_owned()));
        }
        Ok(RunFilter {
            status: self.status,
            workflow: self.workflow,
            labels,
            limit: self.limit.unwrap_or(DEFAULT_PAGE),
            before: self.cursor,
            tenant: None,
        })
    }
}

/// Lists runs, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    params(RunsQuery),
    responses(
        (status = 200, body = RunPage),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<RunPage>, ApiError> {
    let filter = RunsQuery::parse(query.as_deref())?.filter()?;
    Ok(Json(service.runs(&scope, filter).await?))
}

/// How much of a report to read.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// `false` leaves out the attempts' logs, stdout and stderr and the
    /// executions' inputs (`/logs` has them): for a view that reads the
    /// report again as the run changes. `true` when left out.
    records: Option<bool>,
}

/// A run's report: its steps, executions and attempts.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id"), ReportQuery),
    responses(
        (status = 200, body = RunReport),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(id): Params<String>,
    Queried(query): Queried<ReportQuery>,
) -> Result<Json<RunReport>, ApiError> {
    Ok(Json(match query.records {
        Some(false) => service.summary(&scope, &id).await?,
        _ => service.report(&scope, &id).await?,
    }))
}

/// The steps of a run with their attempts' logs, stdout and stderr.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Logs {
    /// Every step (included workflows' after their include step), or the
    /// one asked for.
    pub steps: Vec<StepReport>,
}

/// Which step's logs.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only this step (its path, like `billing.charge`).
    step: Option<String>,
}

/// A run's logs.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/logs",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id"), LogsQuery),
    responses(
        (status = 200, body = Logs),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn logs(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(id): Params<String>,
    Queried(query): Queried<LogsQuery>,
) -> Result<Json<Logs>, ApiError> {
    let report = service.report(&scope, &id).await?;
    let steps: Vec<StepReport> = report
        .all_steps()
        .into_iter()
        .filter(|step| query.step.as_ref().is_none_or(|wanted| step.id.to_string() == *wanted))
        .cloned()
        .collect();
    if let Some(wanted) = query.step.filter(|_| steps.is_empty()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("run {id} has no step `{wanted}` with records"),
        ));
    }
    Ok(Json(Logs { steps }))
}

/// Cancels a run: its running attempts stop, and it ends as `cancelled`.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/cancel",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 202, description = "Cancelling; the run ends shortly", body = Run),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(id): Params<String>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(service.cancel(&scope, &id).await?)))
}

/// Resumes an interrupted, failed or cancelled run: what succeeded is
/// reused, the rest runs.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/resume",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 202, description = "Running again", body = Run),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn resume(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(id): Params<String>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(service.continue_run(&scope, &id, false, None).await?)))
}

/// How to retry.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Run this step and everything after it again; without it, the
    /// failed steps run again.
    #[serde(default)]
    pub from: Option<String>,
}

/// Retries a failed or cancelled run.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/retry",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    request_body = Retry,
    responses(
        (status = 202, description = "Running again", body = Run),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retry(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(id): Params<String>,
    Body(retry): Body<Retry>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(service.continue_run(&scope, &id, true, retry.from).await?)))
}

/// Sends an event to a run: a step waiting for it takes its payload as its
/// output, and a parked run resumes. The first event of a name is kept.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/events/{name}",
    tag = "runs",
    params(
        ("id" = String, Path, description = "The run's id"),
        ("name" = String, Path, description = "The event's name, as a waiting step names it"),
    ),
    request_body(content = serde_json::Value, description = "The event's payload, any JSON: the waiting step's output"),
    responses(
        (status = 202, description = "Received; the waiting step goes on", body = Run),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn send_event(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params((id, name)): Params<(String, String)>,
    Body(payload): Body<serde_json::Value>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(service.send_event(&scope, &id, &name, payload).await?)))
}

/// One server-sent event of a run's stream.
#[derive(Debug, utoipa::ToSchema)]
pub struct EventFrame {
    /// The event's number, from 1: what `Last-Event-ID` takes.
    id: String,
    /// The event as JSON: `{"type": "attempt_started", ...}`.
    data: String,
}

impl From<Numbered> for EventFrame {
    fn from(event: Numbered) -> Self {
        EventFrame { id: event.id.to_string(), data: event.json.to_string() }
    }
}

impl From<EventFrame> for Event {
    fn from(frame: EventFrame) -> Self {
        Event::default().id(frame.id).data(frame.data)
    }
}

/// A run's events as server-sent events, live: each `data` is one event as
/// JSON (`attempt_started`, `retrying`, `step_finished`, `run_finished`),
/// each `id` its number. Reconnect with `Last-Event-ID` to get what
/// followed. The stream ends after `run_finished`.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/events",
    tag = "runs",
    params(
        ("id" = String, Path, description = "The run's id"),
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "The last event seen; the stream goes on after it"),
    ),
    responses(
        (status = 200, description = "A stream of events", content_type = "text/event-stream", body = EventFrame),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(service): State<Arc<Service>>,
    Caller(scope): Caller,
    Params(id): Params<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = match headers.get("last-event-id") {
        // A number as the document gives it: a 64-bit signed integer, not
        // negative.
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_last_event_id",
                    "Last-Event-ID must be an event's number",
                )
            })?,
        None => 0,
    };
    let log = service.events(&scope, &id).await?;
    let closing = service.closing();
    // Each step waits for the events after the last one sent, and ends
    // the stream once the run is over or the service shuts down.
    let batches = stream::unfold((after, false), move |(after, done)| {
        let (log, closing) = (log.clone(), closing.clone());
        async move {
            if done {
                return None;
            }
            let batch = tokio::select! {
                batch = log.after(after) => batch,
                () = closing.cancelled() => return None,
            };
            let last = batch.events.last().map_or(after, |event| event.id);
            let mut out = Vec::new();
            if batch.missed > 0 {
                out.push(Event::default().comment(format!("{} older events are no longer kept", batch.missed)));
            }
            out.extend(batch.events.into_iter().map(|event| Event::from(EventFrame::from(event))));
            Some((stream::iter(out.into_iter().map(Ok)), (last, batch.finished)))
        }
    });
    Ok(Sse::new(batches.flatten()).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runs_query_keeps_repeated_labels_and_refuses_what_it_does_not_know() {
        let parse = |query: &str| RunsQuery::parse(Some(query)).and_then(RunsQuery::filter);
        let filter = parse("status=failed&label=a%3D1&label=b=2&limit=5&cursor=x").unwrap();
        assert_eq!(filter.status, Some(RunStatus::Failed));
        assert_eq!(filter.labels, [("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())]);
        assert_eq!((filter.limit, filter.before.as_deref()), (5, Some("x")));
        assert_eq!(parse("").unwrap().limit, DEFAULT_PAGE);
        for bad in ["status=done", "limit=0", "limit=501", "label=novalue", "label==x", "colour=red"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
