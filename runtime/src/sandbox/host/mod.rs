//! The host state of one attempt and the host side of stepbox's imports:
//! `wasi:logging`, `wasi:keyvalue`, `wasi:config`, `stepbox:step/trace`, the policy of
//! `wasi:http`, and the filesystem calls that hold a scratch directory to
//! its size.

pub(crate) mod config;
pub(crate) mod filesystem;
pub(crate) mod http;
pub(crate) mod http_objects;
pub(crate) mod keyvalue;
pub(crate) mod logging;
pub(crate) mod preview1;
pub(crate) mod trace;

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::host_memory::HostMemory;
use super::limits::InstanceLimiter;
use crate::store::{KvQuota, KvScope};

/// Everything one attempt's `Store` holds. Built fresh per attempt and
/// dropped with it.
pub(crate) struct StepState {
    pub(crate) wasi: WasiCtx,
    /// The WASI context of a preview1 module, which keeps its own resource
    /// table; `None` for components.
    pub(crate) preview1: Option<WasiP1Ctx>,
    pub(crate) table: ResourceTable,
    pub(crate) http: WasiHttpCtx,
    pub(crate) http_policy: http::HttpPolicy,
    /// The attempt's span, while traces are exported.
    pub(crate) span: crate::traces::Span,
    pub(crate) limiter: InstanceLimiter,
    pub(crate) logs: logging::LogBuffer,
    pub(crate) config: Arc<BTreeMap<String, String>>,
    pub(crate) kv: keyvalue::SharedKv,
    pub(crate) kv_scope: Arc<KvScope>,
    pub(crate) kv_quota: KvQuota,
    /// What the host holds for the attempt besides its linear memory.
    pub(crate) host_memory: HostMemory,
    /// The attempt's scratch directory and what it may still take; `None`
    /// without one.
    pub(crate) scratch: Option<filesystem::ScratchUse>,
    /// What the attempt's `wasi:http` objects hold, charged to
    /// `host_memory`.
    pub(crate) http_held: http_objects::HttpHeld,
}

/// `stepbox:step/types` declares types only. A component built against
/// contract 0.1.0 imports `stepbox:step/types@0.1.0`: wasmtime links an
/// import of types only without a definition, and matches `run`'s records
/// and variants by shape, so it is called as 0.2.0's.
impl super::bindings::stepbox::step::types::Host for StepState {}

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl StepState {
    /// The preview1 context, for the preview1 linker. Only preview1 modules
    /// link against it, and their attempts always build one.
    pub(crate) fn preview1(&mut self) -> &mut WasiP1Ctx {
        self.preview1.as_mut().expect("a preview1 module's attempt has a preview1 context")
    }
}

impl WasiHttpView for StepState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_policy }
    }
}

/// Truncates `text` to at most `max` bytes on a character boundary, saying
/// how much was cut, so oversized guest strings stay readable.
pub(crate) fn truncate_with_marker(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let cut = text.len() - max;
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!(" [... {cut} more bytes dropped]"));
}
