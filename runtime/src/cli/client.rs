//! The CLI's HTTP client: commands given `--server` talk to a `stepbox
//! serve` through its API. An API error becomes the CLI's own error, with
//! the service's message and the exit code a local failure of the same
//! kind would have.

use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use tokio::sync::mpsc;

use super::CliError;
use crate::scheduler::RunEvent;
use crate::server::ErrorBody;

/// A connection to one service, as one token.
pub(crate) struct Client {
    base: Url,
    token: String,
    http: reqwest::Client,
}

impl Client {
    /// A client of the service at `server`, acting as `token`.
    pub(crate) fn new(server: Option<&str>, token: Option<&str>) -> Result<Client, CliError> {
        let server = server.ok_or_else(|| {
            CliError::Usage("give the service's address with --server URL (or STEPBOX_SERVER)".into())
        })?;
        let base = Url::parse(server)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base())
            .ok_or_else(|| {
                CliError::Usage(format!("`{server}` is not a service address like http://127.0.0.1:7433"))
            })?;
        let token = token
            .ok_or_else(|| {
                CliError::Usage(
                    "give an API token with --token TOKEN (or STEPBOX_TOKEN); `stepbox token create` makes one".into(),
                )
            })?
            .to_owned();
        let http = reqwest::Client::builder()
            .user_agent(concat!("stepbox/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| CliError::Failed(format!("cannot set up the HTTP client: {err}")))?;
        Ok(Client { base, token, http })
    }

    /// The URL of the API path `/v1/` + `segments`, each escaped.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("v1").extend(segments);
        }
        url
    }

    /// Sends a request; returns the answer's body and whether it was 201.
    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<(T, bool), CliError> {
        let mut request = self.http.request(method, self.url(segments)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.answer(request).await
    }

    /// Sends a request and reads its JSON answer, and whether it was 201.
    async fn answer<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<(T, bool), CliError> {
        let response = request.send().await.map_err(|err| {
            CliError::Failed(format!("cannot reach {}: {err}; is `stepbox serve` running there?", self.base))
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.refusal(response).await);
        }
        let url = response.url().clone();
        let bytes =
            response.bytes().await.map_err(|err| CliError::Failed(format!("{url}: the answer broke off: {err}")))?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|err| CliError::Failed(format!("{url}: the answer is not what stepbox expects: {err}")))?;
        Ok((value, status == StatusCode::CREATED))
    }

    /// The error for a refused request: the service's message, with the
    /// exit code of the same failure in local mode.
    async fn refusal(&self, response: reqwest::Response) -> CliError {
        let (status, url) = (response.status(), response.url().clone());
        let bytes = response.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|body| body.error.message)
            .unwrap_or_else(|_| format!("{url} answered {status}"));
        match status {
            StatusCode::UNPROCESSABLE_ENTITY => CliError::Invalid(format!("error: {message}")),
            status if status.is_client_error() => CliError::Usage(message),
            _ => CliError::Failed(message),
        }
    }

    /// `GET` with a query.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<T, CliError> {
        let mut url = self.url(segments);
        url.query_pairs_mut().extend_pairs(query);
        let request = self.http.get(url).bearer_auth(&self.token);
        Ok(self.answer(request).await?.0)
    }

    /// `POST`: the answer, and whether it created something.
    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<(T, bool), CliError> {
        self.send(Method::POST, segments, Some(body)).await
    }

    /// Follows run `id`'s events to its end, sending each to `events`; a
    /// dropped connection is taken up again where it broke off.
    pub(crate) async fn follow(&self, id: &str, events: mpsc::UnboundedSender<RunEvent>) -> Result<(), CliError> {
        let mut last = 0u64;
        let mut retries = 0;
        loop {
            let request = self
                .http
                .get(self.url(&["runs", id, "events"]))
                .bearer_auth(&self.token)
                .header("Last-Event-ID", last.to_string());
            let mut response = match request.send().await {
                Ok(response) if response.status().is_success() => response,
                Ok(response) => return Err(self.refusal(response).await),
                Err(err) if retries < 10 => {
                    tracing::warn!("lost the event stream ({err}); reconnecting");
                    retries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
                Err(err) => return Err(CliError::Failed(format!("cannot follow run {id} on {}: {err}", self.base))),
            };
            let mut buffer = String::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let frame: String = buffer.drain(..end + 2).collect();
                    let mut number = None;
                    let mut event = None;
                    for line in frame.lines() {
                        if let Some(value) = line.strip_prefix("id: ") {
                            number = value.parse().ok();
                        } else if let Some(value) = line.strip_prefix("data: ") {
                            // Events of a newer service are skipped.
                            event = serde_json::from_str::<RunEvent>(value).ok();
                        }
                    }
                    last = number.unwrap_or(last);
                    if let Some(event) = event {
                        let finished = matches!(event, RunEvent::RunFinished { .. });
                        let _ = events.send(event);
                        if finished {
                            return Ok(());
                        }
                    }
                }
            }
            retries += 1;
            if retries > 10 {
                return Err(CliError::Failed(format!("the event stream of run {id} keeps breaking off")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// `PUT`: the answer, and whether it created something.
    pub(crate) async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<(T, bool), CliError> {
        self.send(Method::PUT, segments, Some(body)).await
    }
}
