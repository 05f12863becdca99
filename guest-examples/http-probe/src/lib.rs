//! Makes one HTTP request through `wasi:http/outgoing-handler`:
//! `{"method": "GET", "url": "http://127.0.0.1:8080/path", "body": "..."}`.
//! The output is `{"status": 200, "body": "..."}`, or `{"refused": "..."}`
//! with the error code the host answered with. With `"bearer": KEY` it
//! sends `authorization: Bearer <config value KEY>` (or under the header
//! `"bearer_header"` names), and says what it put there as `"sent"`.
use serde::{Deserialize, Serialize};
use stepbox_sdk::{StepError, step};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

#[derive(Deserialize)]
struct Input {
    #[serde(default = "get")]
    method: String,
    url: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    bearer: Option<String>,
    #[serde(default = "authorization")]
    bearer_header: String,
}

fn authorization() -> String {
    "authorization".into()
}

fn get() -> String {
    "GET".into()
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Output {
    Response {
        status: u16,
        body: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        sent: Option<String>,
    },
    Refused(String),
}

#[step]
fn run(input: Input) -> Result<Output, StepError> {
    let authorization = match &input.bearer {
        Some(key) => Some(format!("Bearer {}", stepbox_sdk::config::require(key)?)),
        None => None,
    };
    Ok(match send(&input, authorization.as_deref().map(|value| (input.bearer_header.as_str(), value))) {
        Ok((status, body)) => Output::Response { status, body, sent: authorization },
        Err(code) => Output::Refused(format!("{code:?}")),
    })
}

fn send(input: &Input, authorization: Option<(&str, &str)>) -> Result<(u16, String), ErrorCode> {
    let (scheme, rest) = input.url.split_once("://").ok_or(ErrorCode::HttpRequestUriInvalid)?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let length = input.body.len().to_string().into_bytes();
    let mut fields = vec![("content-length".into(), length)];
    if let Some((header, value)) = authorization {
        fields.push((header.into(), value.as_bytes().to_vec()));
    }
    let headers = Fields::from_list(&fields).map_err(|err| ErrorCode::InternalError(Some(format!("{err:?}"))))?;
    let request = OutgoingRequest::new(headers);
    let method = match input.method.as_str() {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => Method::Other(other.into()),
    };
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.into()),
    };
    let invalid = |_| ErrorCode::HttpRequestUriInvalid;
    request.set_method(&method).map_err(|_| ErrorCode::HttpRequestMethodInvalid)?;
    request.set_scheme(Some(&scheme)).map_err(invalid)?;
    request.set_authority(Some(authority)).map_err(invalid)?;
    request.set_path_with_query(Some(path)).map_err(invalid)?;

    let body = request.body().map_err(|_| ErrorCode::InternalError(Some("no request body".into())))?;
    if !input.body.is_empty() {
        let stream = body.write().map_err(|_| ErrorCode::InternalError(Some("no body stream".into())))?;
        stream
            .blocking_write_and_flush(input.body.as_bytes())
            .map_err(|err| ErrorCode::InternalError(Some(format!("{err:?}"))))?;
    }
    let future = outgoing_handler::handle(request, None)?;
    OutgoingBody::finish(body, None)?;
    future.subscribe().block();
    let response = future
        .get()
        .ok_or_else(|| ErrorCode::InternalError(Some("response not ready".into())))?
        .map_err(|()| ErrorCode::InternalError(Some("response taken twice".into())))??;

    let status = response.status();
    let incoming = response.consume().map_err(|()| ErrorCode::InternalError(Some("no response body".into())))?;
    let stream = incoming.stream().map_err(|()| ErrorCode::InternalError(Some("no body stream".into())))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend(chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(err)) => {
                return Err(ErrorCode::InternalError(Some(err.to_debug_string())));
            }
        }
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
