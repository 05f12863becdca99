//! Compiled code on disk, so a component compiles once per machine rather
//! than once per process. An entry is keyed by a hash of the wasm bytes and
//! of the engine's compilation settings (which include the wasmtime
//! version); a stale or damaged entry is compiled again and replaced.
//!
//! Loading compiled code runs it without validation, so the directory must
//! be writable only by the user that runs stepbox (see SECURITY.md).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use super::component::StepComponent;

/// The sha256 of a component's bytes: what both caches are keyed by.
pub(crate) type Digest = [u8; 32];

pub(crate) fn digest(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// Components a process has loaded, so loading one again (each run loads
/// its workflow's components) costs a hash, not a deserialization, and its
/// attempts reuse the instance slots (and the memory kept resident in them)
/// of the earlier ones.
#[derive(Default)]
pub(crate) struct Loaded {
    inner: Mutex<LoadedInner>,
}

#[derive(Default)]
struct LoadedInner {
    /// Counts uses, to find the least recently used entry.
    clock: u64,
    entries: HashMap<Digest, (u64, StepComponent)>,
}

/// Components kept loaded at most; the least recently used goes first.
const LOADED_CAPACITY: usize = 64;

impl Loaded {
    pub(crate) fn get(&self, digest: &Digest) -> Option<StepComponent> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.clock += 1;
        let clock = inner.clock;
        let (used, component) = inner.entries.get_mut(digest)?;
        *used = clock;
        Some(component.clone())
    }

    pub(crate) fn insert(&self, digest: Digest, component: StepComponent) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.clock += 1;
        let clock = inner.clock;
        if inner.entries.len() >= LOADED_CAPACITY && !inner.entries.contains_key(&digest) {
            let oldest = inner.entries.iter().min_by_key(|(_, (used, _))| *used).map(|(key, _)| *key);
            if let Some(oldest) = oldest {
                inner.entries.remove(&oldest);
            }
        }
        inner.entries.insert(digest, (clock, component));
    }
}

/// What a cache entry holds.
pub(crate) trait Compiled: Sized {
    const EXTENSION: &'static str;
    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self>;
    fn serialize(&self) -> wasmtime::Result<Vec<u8>>;
    /// # Safety
    /// `path` must hold code this process's engine serialized.
    unsafe fn deserialize(engine: &Engine, path: &Path) -> wasmtime::Result<Self>;
}

impl Compiled for Component {
    const EXTENSION: &'static str = "cwasm";
    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        Component::from_binary(engine, bytes)
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Component::serialize(self)
    }
    unsafe fn deserialize(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        // SAFETY: the caller promises the file is the engine's own output.
        unsafe { Component::deserialize_file(engine, path) }
    }
}

impl Compiled for Module {
    const EXTENSION: &'static str = "mwasm";
    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        Module::from_binary(engine, bytes)
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Module::serialize(self)
    }
    unsafe fn deserialize(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        // SAFETY: the caller promises the file is the engine's own output.
        unsafe { Module::deserialize_file(engine, path) }
    }
}

/// A directory of compiled components and modules.
#[derive(Debug, Clone)]
pub(crate) struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    pub(crate) fn new(dir: PathBuf) -> Self {
        CompileCache { dir }
    }

    /// The compiled form of `bytes`: from the cache when it holds a usable
    /// entry, else compiled and stored. A cache that cannot be written only
    /// costs the next process a compile.
    pub(crate) fn get<T: Compiled>(&self, engine: &Engine, bytes: &[u8], digest: &Digest) -> wasmtime::Result<T> {
        let path = self.entry(engine, digest, T::EXTENSION);
        if path.is_file() {
            // SAFETY: entries are written only by `store` below, from this
            // engine's serialization; the name carries the engine's
            // compatibility hash, and wasmtime checks it again on load.
            match unsafe { T::deserialize(engine, &path) } {
                Ok(compiled) => return Ok(compiled),
                Err(err) => tracing::warn!(path = %path.display(), "recompiling a damaged cache entry: {err:#}"),
            }
        }
        let compiled = T::compile(engine, bytes)?;
        if let Err(err) = self.store(&path, &compiled) {
            tracing::warn!(dir = %self.dir.display(), "cannot write the compile cache: {err:#}");
        }
        Ok(compiled)
    }

    /// Compiles through `cache` when there is one.
    pub(crate) fn compile<T: Compiled>(
        cache: Option<&Self>,
        engine: &Engine,
        bytes: &[u8],
        digest: &Digest,
    ) -> wasmtime::Result<T> {
        match cache {
            Some(cache) => cache.get(engine, bytes, digest),
            None => T::compile(engine, bytes),
        }
    }

    fn entry(&self, engine: &Engine, digest: &Digest, extension: &str) -> PathBuf {
        let mut settings = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut settings);
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        self.dir.join(format!("{hex}-{:016x}.{extension}", settings.finish()))
    }

    /// Writes to a temporary file and renames it into place, so a reader
    /// never sees half an entry.
    fn store<T: Compiled>(&self, path: &Path, compiled: &T) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let serialized = compiled.serialize().map_err(|err| anyhow::anyhow!("{err:#}"))?;
        let mut temp = tempfile::NamedTempFile::new_in(&self.dir)?;
        std::io::Write::write_all(&mut temp, &serialized)?;
        temp.persist(path)?;
        Ok(())
    }
}
