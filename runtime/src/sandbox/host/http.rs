//! The host side of `wasi:http/outgoing-handler`: wasmtime-wasi-http builds
//! and sends the requests; this decides which may leave.

use std::sync::Arc;

use http::uri::Scheme;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::sandbox::grants::{HttpGrant, HttpSecret};
use crate::traces::Span;
use opentelemetry::KeyValue;

/// The response future wasmtime-wasi-http expects from a hook.
type Sent = Box<
    dyn Future<Output = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>>
        + Send,
>;

/// The most bytes one write to an outgoing body may pass. wasmtime-wasi-http
/// holds up to two such chunks per body until the request is sent, and any
/// step may create bodies (the types are linked for every step, the
/// handler refuses requests without a grant), so this bounds what each
/// body can make the host hold: 128 KiB instead of 2 MiB.
pub(crate) const OUTGOING_CHUNK: usize = 64 * 1024;

/// The most bytes of header names and values one `fields` a guest builds
/// may hold (the default is 128 KiB): twice what common servers accept, and
/// what each such `fields` is charged to the attempt's host memory.
pub(crate) const FIELDS_LIMIT: usize = 16 * 1024;

/// Lets a request out only when one of the step's grants allows its method,
/// host and port; the guest sees `HTTP-request-denied` otherwise.
pub(crate) struct HttpPolicy {
    grants: Arc<[HttpGrant]>,
    secrets: Arc<[HttpSecret]>,
    /// The attempt's span: sent as `traceparent` unless the step sends its
    /// own, and where a refused request is told, as an event.
    span: Span,
}

impl HttpPolicy {
    pub(crate) fn new(grants: Vec<HttpGrant>, secrets: Vec<HttpSecret>, span: Span) -> Self {
        HttpPolicy { grants: grants.into(), secrets: secrets.into(), span }
    }

    /// Whether one of `grants` lets `request` out.
    fn allowed_by(grants: &[HttpGrant], request: &http::Request<WasiBody>) -> bool {
        let uri = request.uri();
        let default_port = if uri.scheme() == Some(&Scheme::HTTPS) { 443 } else { 80 };
        let (Some(host), method) = (uri.host(), request.method().as_str()) else { return false };
        let port = uri.port_u16().unwrap_or(default_port);
        grants.iter().any(|grant| grant.allows(method, host, port, default_port))
    }

    /// Puts each secret's value in place of its placeholder in the
    /// `authorization` header of a request its `send_to` allows, sent over
    /// HTTPS (or to a loopback address); elsewhere the placeholder stays,
    /// and tells the receiver nothing. A placeholder anywhere else (another
    /// header, the URI) refuses the request, so a server that echoes such
    /// headers back cannot hand the value to the step.
    fn fill_in_secrets(&self, request: &mut http::Request<WasiBody>) -> Result<(), Error> {
        if self.secrets.is_empty() {
            return Ok(());
        }
        let holds = |bytes: &[u8]| {
            self.secrets.iter().any(|secret| {
                let placeholder = secret.placeholder.as_bytes();
                bytes.windows(placeholder.len()).any(|window| window == placeholder)
            })
        };
        let misplaced = holds(request.uri().to_string().as_bytes())
            || request
                .headers()
                .iter()
                .any(|(name, value)| name != http::header::AUTHORIZATION && holds(value.as_bytes()));
        if misplaced {
            return Err(Error::InternalError(Some(
                "a send-only secret may go only in the `authorization` header".into(),
            )));
        }
        let uri = request.uri();
        let loopback = uri.host().and_then(|host| host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok());
        let private = uri.scheme() == Some(&Scheme::HTTPS) || loopback.is_some_and(|ip| ip.is_loopback());
        let sendable: Vec<&HttpSecret> =
            self.secrets.iter().filter(|secret| private && Self::allowed_by(&secret.send_to, request)).collect();
        if sendable.is_empty() {
            return Ok(());
        }
        for (name, value) in request.headers_mut().iter_mut() {
            if name != http::header::AUTHORIZATION {
                continue;
            }
            let Ok(text) = value.to_str() else { continue };
            if !sendable.iter().any(|secret| text.contains(&secret.placeholder)) {
                continue;
            }
            let filled =
                sendable.iter().fold(text.to_owned(), |text, secret| text.replace(&secret.placeholder, &secret.value));
            // A value that cannot be a header value (a line break) is never
            // sent, nor shown.
            *value = http::HeaderValue::from_str(&filled)
                .map_err(|_| Error::InternalError(Some("a secret's value cannot be sent in a header".into())))?;
            value.set_sensitive(true);
        }
        Ok(())
    }
}

impl WasiHttpHooks for HttpPolicy {
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        OUTGOING_CHUNK
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_errors: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Sent {
        if !Self::allowed_by(&self.grants, &request) {
            // An event of the attempt's span, where traces are exported.
            self.span.event("capability denied", || {
                vec![
                    KeyValue::new("stepbox.capability", "http"),
                    KeyValue::new("stepbox.method", request.method().to_string()),
                    KeyValue::new("stepbox.host", request.uri().host().unwrap_or("").to_owned()),
                ]
            });
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        let mut request = request;
        if let Some(parent) =
            self.span.traceparent().and_then(|parent| http::HeaderValue::from_str(parent.as_str()).ok())
        {
            request.headers_mut().entry("traceparent").or_insert(parent);
        }
        if let Err(err) = self.fill_in_secrets(&mut request) {
            return Box::new(async { Err(err) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, connection) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(BodyExt::boxed_unsync), Box::new(connection) as Box<dyn Future<Output = _> + Send>))
        })
    }
}
