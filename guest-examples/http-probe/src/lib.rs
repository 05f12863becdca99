//! Makes one HTTP request through `wasi:http/outgoing-handler`:
//! `{"method": "GET", "url": "http://127.0.0.1:8080/path", "body": "..."}`.
//! The output is `{"status": 200, "body": "..."}`, or `{"refused": "..."}`
//! with the error code the host answered with.
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
}

fn get() -> String {
    "GET".into()
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Output {
    Response { status: u16, body: String },
    Refused(String),
}

#[step]
fn run(input: Input) -> Result<Output, StepError> {
    Ok(match send(&input) {
        Ok((status, body)) => Output::Response { status, body },
        Err(code) => Output::Refused(format!("{code:?}")),
    })
}

fn send(input: &Input) -> Result<(u16, String), ErrorCode> {
    let (scheme, rest) = input.url.split_once("://").ok_or(ErrorCode::HttpRequestUriInvalid)?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let length = input.body.len().to_string().into_bytes();
    let headers = Fields::from_list(&[("content-length".into(), length)])
        .map_err(|err| ErrorCode::InternalError(Some(format!("{err:?}"))))?;
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
