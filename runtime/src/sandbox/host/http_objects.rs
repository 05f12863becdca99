//! The `wasi:http` objects a guest builds, in the attempt's host memory
//! budget. Any step can build header fields, requests and responses with
//! bodies (only sending needs a grant), so each is charged the most it can
//! make the host hold when it is created, and given back when it is
//! dropped: header fields [`FIELDS_BYTES`], a request or a response the
//! body chunks queued for it (its body's writes wait in that queue, which
//! the request or response owns) and, for a request, its method, scheme,
//! authority and path, each held to a length here. Header fields move into
//! the request or response built from them, and a request's charge into
//! its response future once sent; trailers, which go where stepbox does
//! not follow, keep theirs for the rest of the attempt.
//!
//! The calls that create, take or drop these objects are defined again
//! over wasmtime-wasi-http's own, which do the work.

use std::collections::HashMap;

use wasmtime::component::{Linker, Resource, ResourceType};
use wasmtime_wasi_http::p2::bindings::http::outgoing_handler::Host as _;
use wasmtime_wasi_http::p2::bindings::http::types::{self as wit, ErrorCode, HeaderError, Host as _, Method, Scheme};
use wasmtime_wasi_http::p2::body::HostOutgoingBody;
use wasmtime_wasi_http::p2::types::{HostFutureIncomingResponse, HostOutgoingRequest, HostOutgoingResponse};
use wasmtime_wasi_http::{FieldMap, RequestOptions, WasiHttpView};

use super::StepState;
use super::http::{FIELDS_LIMIT, OUTGOING_CHUNK};
use crate::sandbox::host_memory::{Charge, HostMemorySpent};

/// The WASI 0.2 HTTP interfaces wasmtime-wasi-http defines; components
/// importing any 0.2 version link to these.
const TYPES: &str = "wasi:http/types@0.2.12";
const HANDLER: &str = "wasi:http/outgoing-handler@0.2.12";

/// The longest path and query a request may have: twice what common
/// servers accept.
const PATH_LIMIT: usize = 16 * 1024;
/// The longest authority (`host:port`, with user info) a request may have.
const AUTHORITY_LIMIT: usize = 1024;
/// The longest method or scheme name a request may have.
const NAME_LIMIT: usize = 64;

/// What one `fields` may make the host hold: its content is held to
/// [`FIELDS_LIMIT`] (names and values), and the map around them costs
/// about as much again and more as it grows.
const FIELDS_BYTES: usize = 4 * FIELDS_LIMIT;

/// The body chunks queued for a request or response: the queue holds one
/// more than its length (wasmtime-wasi-http's body channel).
const QUEUE_BYTES: usize = 2 * OUTGOING_CHUNK;
/// What a request holds besides its headers.
const REQUEST_BYTES: usize = QUEUE_BYTES + PATH_LIMIT + AUTHORITY_LIMIT + 2 * NAME_LIMIT;

/// Charges for the attempt's live HTTP objects, by handle.
#[derive(Debug, Default)]
pub(crate) struct HttpHeld(HashMap<u32, Charge>);

impl HttpHeld {
    /// Takes the charge of `rep`, which a call is about to consume.
    fn take(&mut self, rep: u32) -> Option<Charge> {
        self.0.remove(&rep)
    }
}

/// The charge of the header fields `rep`, which a call is about to consume.
/// A view of another object's fields (a request's `headers()`) carries
/// none, yet the map it shares is copied or kept by what consumes it: it
/// is charged now.
fn fields_charge(state: &mut StepState, rep: u32) -> Result<Charge, HostMemorySpent> {
    match state.http_held.take(rep) {
        Some(charge) => Ok(charge),
        None => state.host_memory.charge(FIELDS_BYTES, "HTTP header fields"),
    }
}

/// `charge` with that of the header fields `rep` added, which a call is
/// about to consume into the holder of `charge`.
fn absorbed(state: &mut StepState, rep: u32, mut charge: Charge) -> Result<Charge, HostMemorySpent> {
    charge.absorb(fields_charge(state, rep)?);
    Ok(charge)
}

/// Defines the charged calls over the ones already in `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<StepState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(TYPES)?;
    types.resource("fields", ResourceType::host::<FieldMap>(), |mut store, rep| {
        let state = store.data_mut();
        state.http_held.take(rep);
        wit::HostFields::drop(&mut state.http(), Resource::new_own(rep))
    })?;
    types.resource("outgoing-request", ResourceType::host::<HostOutgoingRequest>(), |mut store, rep| {
        let state = store.data_mut();
        state.http_held.take(rep);
        wit::HostOutgoingRequest::drop(&mut state.http(), Resource::new_own(rep))
    })?;
    types.resource("outgoing-response", ResourceType::host::<HostOutgoingResponse>(), |mut store, rep| {
        let state = store.data_mut();
        state.http_held.take(rep);
        wit::HostOutgoingResponse::drop(&mut state.http(), Resource::new_own(rep))
    })?;
    types.resource(
        "future-incoming-response",
        ResourceType::host::<HostFutureIncomingResponse>(),
        |mut store, rep| {
            let state = store.data_mut();
            state.http_held.take(rep);
            wit::HostFutureIncomingResponse::drop(&mut state.http(), Resource::new_own(rep))
        },
    )?;

    types.func_wrap("[constructor]fields", |mut store, ()| {
        let state = store.data_mut();
        let charge = state.host_memory.charge(FIELDS_BYTES, "HTTP header fields")?;
        let fields = wit::HostFields::new(&mut state.http())?;
        state.http_held.0.insert(fields.rep(), charge);
        Ok((fields,))
    })?;
    types.func_wrap("[static]fields.from-list", |mut store, (entries,): (Vec<(String, Vec<u8>)>,)| {
        let state = store.data_mut();
        let charge = state.host_memory.charge(FIELDS_BYTES, "HTTP header fields")?;
        let result: Result<_, HeaderError> = match wit::HostFields::from_list(&mut state.http(), entries) {
            Ok(fields) => {
                state.http_held.0.insert(fields.rep(), charge);
                Ok(fields)
            }
            Err(err) => Err(state.http().convert_header_error(err)?),
        };
        Ok((result,))
    })?;
    types.func_wrap("[method]fields.clone", |mut store, (fields,): (Resource<FieldMap>,)| {
        let state = store.data_mut();
        let charge = state.host_memory.charge(FIELDS_BYTES, "HTTP header fields")?;
        let copy = wit::HostFields::clone(&mut state.http(), fields)?;
        state.http_held.0.insert(copy.rep(), charge);
        Ok((copy,))
    })?;

    types.func_wrap("[constructor]outgoing-request", |mut store, (headers,): (Resource<FieldMap>,)| {
        let state = store.data_mut();
        let charge = state.host_memory.charge(REQUEST_BYTES, "HTTP requests")?;
        let charge = absorbed(state, headers.rep(), charge)?;
        let request = wit::HostOutgoingRequest::new(&mut state.http(), headers)?;
        state.http_held.0.insert(request.rep(), charge);
        Ok((request,))
    })?;
    types.func_wrap("[constructor]outgoing-response", |mut store, (headers,): (Resource<FieldMap>,)| {
        let state = store.data_mut();
        let charge = state.host_memory.charge(QUEUE_BYTES, "HTTP responses")?;
        let charge = absorbed(state, headers.rep(), charge)?;
        let response = wit::HostOutgoingResponse::new(&mut state.http(), headers)?;
        state.http_held.0.insert(response.rep(), charge);
        Ok((response,))
    })?;
    types.func_wrap(
        "[method]outgoing-request.set-method",
        |mut store, (request, method): (Resource<HostOutgoingRequest>, Method)| {
            if matches!(&method, Method::Other(name) if name.len() > NAME_LIMIT) {
                return Ok((Err(()),));
            }
            Ok((wit::HostOutgoingRequest::set_method(&mut store.data_mut().http(), request, method)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-scheme",
        |mut store, (request, scheme): (Resource<HostOutgoingRequest>, Option<Scheme>)| {
            if matches!(&scheme, Some(Scheme::Other(name)) if name.len() > NAME_LIMIT) {
                return Ok((Err(()),));
            }
            Ok((wit::HostOutgoingRequest::set_scheme(&mut store.data_mut().http(), request, scheme)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-authority",
        |mut store, (request, authority): (Resource<HostOutgoingRequest>, Option<String>)| {
            if authority.as_ref().is_some_and(|authority| authority.len() > AUTHORITY_LIMIT) {
                return Ok((Err(()),));
            }
            Ok((wit::HostOutgoingRequest::set_authority(&mut store.data_mut().http(), request, authority)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-path-with-query",
        |mut store, (request, path): (Resource<HostOutgoingRequest>, Option<String>)| {
            if path.as_ref().is_some_and(|path| path.len() > PATH_LIMIT) {
                return Ok((Err(()),));
            }
            Ok((wit::HostOutgoingRequest::set_path_with_query(&mut store.data_mut().http(), request, path)?,))
        },
    )?;
    types.func_wrap(
        "[static]outgoing-body.finish",
        |mut store, (body, trailers): (Resource<HostOutgoingBody>, Option<Resource<FieldMap>>)| {
            let state = store.data_mut();
            if let Some(trailers) = &trailers {
                fields_charge(state, trailers.rep())?.keep();
            }
            let result: Result<(), ErrorCode> = match wit::HostOutgoingBody::finish(&mut state.http(), body, trailers) {
                Ok(()) => Ok(()),
                Err(err) => Err(state.http().convert_error_code(err)?),
            };
            Ok((result,))
        },
    )?;

    linker.instance(HANDLER)?.func_wrap(
        "handle",
        |mut store, (request, options): (Resource<HostOutgoingRequest>, Option<Resource<RequestOptions>>)| {
            let state = store.data_mut();
            let charge = state.http_held.take(request.rep());
            let result: Result<_, ErrorCode> = match state.http().handle(request, options) {
                Ok(future) => {
                    if let Some(charge) = charge {
                        state.http_held.0.insert(future.rep(), charge);
                    }
                    Ok(future)
                }
                Err(err) => Err(state.http().convert_error_code(err)?),
            };
            Ok((result,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
