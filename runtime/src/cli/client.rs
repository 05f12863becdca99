//! The CLI's HTTP client: commands given `--server` talk to a `stepbox
//! serve` through its API. An API error becomes the CLI's own error, with
//! the service's message and the exit code a local failure of the same
//! kind would have.

use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::CliError;
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
        let url = self.url(segments);
        let mut request = self.http.request(method, url.clone()).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|err| {
            CliError::Failed(format!("cannot reach {}: {err}; is `stepbox serve` running there?", self.base))
        })?;
        let status = response.status();
        let bytes =
            response.bytes().await.map_err(|err| CliError::Failed(format!("{url}: the answer broke off: {err}")))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|body| body.error.message)
                .unwrap_or_else(|_| format!("{url} answered {status}"));
            return Err(match status {
                StatusCode::UNPROCESSABLE_ENTITY => CliError::Invalid(format!("error: {message}")),
                status if status.is_client_error() => CliError::Usage(message),
                _ => CliError::Failed(message),
            });
        }
        let value = serde_json::from_slice(&bytes)
            .map_err(|err| CliError::Failed(format!("{url}: the answer is not what stepbox expects: {err}")))?;
        Ok((value, status == StatusCode::CREATED))
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
