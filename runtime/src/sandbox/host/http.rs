//! The host side of `wasi:http/outgoing-handler`: wasmtime-wasi-http builds
//! and sends the requests; this decides which may leave.

use std::sync::Arc;

use http::uri::Scheme;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::sandbox::grants::HttpGrant;

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
const OUTGOING_CHUNK: usize = 64 * 1024;

/// The most bytes of header names and values one `fields` may hold (the
/// default is 128 KiB).
pub(crate) const FIELDS_LIMIT: usize = 64 * 1024;

/// Lets a request out only when one of the step's grants allows its method,
/// host and port; the guest sees `HTTP-request-denied` otherwise.
pub(crate) struct HttpPolicy {
    grants: Arc<[HttpGrant]>,
}

impl HttpPolicy {
    pub(crate) fn new(grants: Vec<HttpGrant>) -> Self {
        HttpPolicy { grants: grants.into() }
    }

    fn allows(&self, request: &http::Request<WasiBody>) -> bool {
        let uri = request.uri();
        let default_port = if uri.scheme() == Some(&Scheme::HTTPS) { 443 } else { 80 };
        let (Some(host), method) = (uri.host(), request.method().as_str()) else { return false };
        let port = uri.port_u16().unwrap_or(default_port);
        self.grants.iter().any(|grant| grant.allows(method, host, port, default_port))
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
        if !self.allows(&request) {
            tracing::debug!(method = %request.method(), uri = %request.uri(), "HTTP request denied: not granted");
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, connection) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(BodyExt::boxed_unsync), Box::new(connection) as Box<dyn Future<Output = _> + Send>))
        })
    }
}
