//! The sandbox: one engine per process, components compiled once, and each
//! attempt run in a fresh, limited instance.

mod attempt;
mod bindings;
mod cache;
mod capture;
mod component;
mod engine;
mod grants;
mod host;
mod host_memory;
mod limits;
mod meter;
mod redact;
mod scratch;

use std::path::Path;
use std::sync::Arc;

use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

pub use attempt::{AttemptRequest, ExitCodes, StepContext};
pub use cache::CacheGc;
pub(crate) use cache::{Digest, digest, hex};
pub use component::{LoadError, StepComponent};
pub use engine::EngineConfig;
pub use grants::{DirGrant, Grants, HttpGrant, HttpSecret, SCRATCH};
pub use limits::Limits;
pub use meter::{FUEL_SLICE, meter};
pub use redact::REDACTED;

use crate::run::{Attempt, Failure, FailureKind, now_ms};
use crate::store::KeyValueStore;
use cache::{CompileCache, Loaded};
use component::Linkers;
use host::StepState;
use scratch::ScratchRoot;

/// Runs step components. Cheap to clone; build one per process.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linkers: Arc<Linkers>,
    cache: Option<CompileCache>,
    loaded: Arc<Loaded>,
    kv: host::keyvalue::SharedKv,
    scratch: Arc<ScratchRoot>,
    /// Host resources (open files among them) one attempt may hold: its
    /// share of the process's open-files limit.
    resource_share: u32,
    /// One permit per instance slot of the pool: an attempt waits for a
    /// free slot rather than failing to instantiate.
    slots: Arc<tokio::sync::Semaphore>,
    config: EngineConfig,
}

impl Sandbox {
    /// Builds the engine, links the host interfaces and claims a part of
    /// the scratch directory (removing what killed processes left there).
    /// `kv` backs every step's `wasi:keyvalue`.
    pub fn new(config: EngineConfig, kv: Arc<dyn KeyValueStore>) -> anyhow::Result<Self> {
        let engine = engine::build(&config)?;
        let mut component = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component)?;
        host::filesystem::add_to_linker(&mut component)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component)?;
        host::http_objects::add_to_linker(&mut component)?;
        bindings::StepCore::add_to_linker::<_, HasSelf<_>>(&mut component, |state| state)?;
        let mut module = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module, StepState::preview1)?;
        host::preview1::add_to_linker(&mut module)?;
        let cache = config.data_dir.as_ref().map(|dir| CompileCache::new(dir.join("compiled"), &engine));
        let scratch = match &config.data_dir {
            Some(dir) => dir.join("scratch"),
            None => std::env::temp_dir().join("stepbox-scratch"),
        };
        let scratch = ScratchRoot::claim(&scratch)
            .map_err(|err| anyhow::anyhow!("cannot set up the scratch directory {}: {err}", scratch.display()))?;
        let resource_share = resource_share(config.max_concurrent_attempts)?;
        let linkers = Arc::new(Linkers { component, module });
        let scratch = Arc::new(scratch);
        let slots = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_attempts.max(1) as usize));
        let kv = host::keyvalue::SharedKv::new(kv);
        Ok(Sandbox { engine, linkers, cache, loaded: Arc::default(), kv, scratch, resource_share, slots, config })
    }

    /// The engine every attempt runs on (for benchmarks that compare
    /// against wasmtime alone).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles and validates the component at `path`. Compiling is
    /// CPU-heavy: call it from a blocking context.
    pub fn load(&self, path: &Path) -> Result<StepComponent, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        self.load_bytes(path, &bytes)
    }

    /// Like [`Sandbox::load`], for bytes already in memory; `path` is only
    /// used in messages. The same bytes load once per sandbox.
    pub fn load_bytes(&self, path: &Path, bytes: &[u8]) -> Result<StepComponent, LoadError> {
        let digest = cache::digest(bytes);
        match self.loaded(path, &digest) {
            Some(loaded) => Ok(loaded),
            None => self.compile(path, bytes, digest),
        }
    }

    /// Compiles `bytes`, whose sha256 is `digest`, and keeps it loaded.
    fn compile(&self, path: &Path, bytes: &[u8], digest: Digest) -> Result<StepComponent, LoadError> {
        let loaded = component::load_bytes(&self.engine, &self.linkers, self.cache.as_ref(), path, bytes, &digest)?;
        self.loaded.insert(digest, loaded.clone());
        Ok(loaded)
    }

    /// The component at `path` whose bytes hash to `pinned`, as
    /// [`crate::workflow::Workflow::pin`] read them: from memory when this
    /// sandbox has loaded those bytes, else read and refused if they changed.
    pub(crate) fn load_pinned(&self, path: &Path, pinned: &Digest) -> Result<StepComponent, LoadError> {
        if let Some(loaded) = self.loaded(path, pinned) {
            return Ok(loaded);
        }
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        if cache::digest(&bytes) != *pinned {
            return Err(LoadError::Changed { path: path.to_owned() });
        }
        self.compile(path, &bytes, *pinned)
    }

    /// The component with this digest, if this sandbox holds it loaded.
    pub(crate) fn loaded(&self, path: &Path, digest: &Digest) -> Option<StepComponent> {
        let loaded = self.loaded.get(digest)?;
        if let Some(metrics) = crate::metrics::recording() {
            metrics.component_loaded(crate::metrics::CompileSource::Memory);
        }
        Some(loaded.at(path))
    }

    /// Cleans the compile cache (when there is one): removes entries this
    /// engine cannot use, entries not used for `unused_for` when given, and
    /// temporary files abandoned mid-write.
    pub fn gc_cache(&self, unused_for: Option<std::time::Duration>) -> std::io::Result<CacheGc> {
        self.cache.as_ref().map_or(Ok(CacheGc::default()), |cache| cache.gc(unused_for))
    }

    /// Runs one attempt. Never fails: every way an attempt can end is an
    /// [`crate::run::Outcome`] of the attempt.
    pub async fn run(&self, component: &StepComponent, request: AttemptRequest) -> Attempt {
        if request.limits.memory > self.config.max_memory {
            let failure = Failure::new(
                FailureKind::Fatal,
                format!(
                    "the memory limit {} is above this sandbox's maximum of {}",
                    request.limits.memory.display().iec(),
                    self.config.max_memory.display().iec()
                ),
            );
            return Attempt::refused(request.context.attempt, now_ms(), failure);
        }
        // Never closed, so this always gets a permit.
        let _slot = self.slots.acquire().await.ok();
        let reserved: Vec<&Path> = self.config.data_dir.as_deref().into_iter().chain([self.scratch.parent()]).collect();
        let places =
            attempt::Places { scratch: &self.scratch, reserved: &reserved, max_resources: self.resource_share };
        attempt::run(&self.engine, self.kv.clone(), &places, component, request).await
    }
}

/// The SHA-256 of a component's bytes in hex, as [`StepComponent::digest`]
/// gives it: what components travel by between machines.
pub fn component_digest(bytes: &[u8]) -> String {
    cache::hex(&cache::digest(bytes))
}

/// Host resources one attempt may hold so that `slots` attempts at once
/// cannot use up the process's open files: every open file or socket of a
/// guest is a resource, so the shares together stay within the open-files
/// limit, less a reserve for the process's own (the database, the cache,
/// connections).
fn resource_share(slots: u32) -> anyhow::Result<u32> {
    let (open_files, _) = rlimit::Resource::NOFILE.get()?;
    let reserve = (open_files / 10).max(256);
    let share = open_files.saturating_sub(reserve) / u64::from(slots.max(1));
    if share < 32 {
        anyhow::bail!(
            "the open-files limit ({open_files}) is too low for {slots} attempts at once; \
             raise it (ulimit -n) or run fewer attempts at once"
        );
    }
    Ok(u32::try_from(share).unwrap_or(u32::MAX))
}
