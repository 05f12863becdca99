//! Compiled code on disk, so a component compiles once per machine rather
//! than once per process. An entry is keyed by a hash of the wasm bytes and
//! of the engine's compilation settings (which include the wasmtime
//! version); a stale or damaged entry is compiled again and replaced.
//!
//! Loading compiled code runs it without validation, so the directory must
//! be writable only by the user that runs stepbox (see SECURITY.md).

use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lru::LruCache;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use super::component::StepComponent;
use crate::failpoint::failpoint;
use crate::metrics::CompileSource;

/// The sha256 of a component's bytes: what both caches are keyed by.
pub(crate) type Digest = [u8; 32];

pub(crate) fn digest(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

/// Components a process has loaded, so loading one again (each run loads
/// its workflow's components) costs a hash, not a deserialization, and its
/// attempts reuse the instance slots (and the memory kept resident in them)
/// of the earlier ones. The least recently used goes first.
pub(crate) struct Loaded {
    entries: Mutex<LruCache<Digest, StepComponent>>,
}

/// Components kept loaded at most.
const LOADED_CAPACITY: NonZeroUsize = NonZeroUsize::new(64).unwrap();

impl Default for Loaded {
    fn default() -> Self {
        Loaded { entries: Mutex::new(LruCache::new(LOADED_CAPACITY)) }
    }
}

impl Loaded {
    pub(crate) fn get(&self, digest: &Digest) -> Option<StepComponent> {
        self.entries.lock().get(digest).cloned()
    }

    pub(crate) fn insert(&self, digest: Digest, component: StepComponent) {
        self.entries.lock().put(digest, component);
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
    /// The engine's compilation settings, hashed: part of every entry's
    /// name, so code compiled with other settings (another wasmtime) is
    /// never loaded.
    settings: String,
}

/// A `Hasher` over sha256: the engine's settings hash the same way in every
/// build of stepbox, where std's `DefaultHasher` promises no such thing.
struct StableHasher(Sha256);

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }
}

/// What [`Sandbox::gc_cache`](super::Sandbox::gc_cache) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheGc {
    /// Entries removed.
    pub entries: usize,
    /// Their size on disk, in bytes.
    pub bytes: u64,
}

/// A temporary file older than this was left by a process that died
/// mid-write.
const ABANDONED_TEMP: Duration = Duration::from_secs(3600);

/// Compiles `bytes`, counted as a compile-cache miss.
fn compile<T: Compiled>(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<T> {
    let compiled = T::compile(engine, bytes)?;
    if let Some(metrics) = crate::metrics::recording() {
        metrics.component_loaded(CompileSource::Compiled);
    }
    Ok(compiled)
}

impl CompileCache {
    pub(crate) fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut hasher = StableHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let settings = hex(&hasher.0.finalize()[..8]);
        CompileCache { dir, settings }
    }

    /// The compiled form of `bytes`: from the cache when it holds a usable
    /// entry, else compiled and stored. A cache that cannot be written only
    /// costs the next process a compile.
    pub(crate) fn get<T: Compiled>(&self, engine: &Engine, bytes: &[u8], digest: &Digest) -> wasmtime::Result<T> {
        let path = self.entry(digest, T::EXTENSION);
        if path.is_file() {
            // SAFETY: entries are written only by `store` below, from this
            // engine's serialization; the name carries the engine's
            // compatibility hash, and wasmtime checks it again on load.
            match unsafe { T::deserialize(engine, &path) } {
                Ok(compiled) => {
                    // The modification time says when the entry was last
                    // used, for `stepbox gc --cache --older-than`.
                    let _ = std::fs::File::open(&path).and_then(|file| file.set_modified(SystemTime::now()));
                    if let Some(metrics) = crate::metrics::recording() {
                        metrics.component_loaded(CompileSource::Disk);
                    }
                    return Ok(compiled);
                }
                Err(err) => tracing::warn!(path = %path.display(), "recompiling a damaged cache entry: {err:#}"),
            }
        }
        let compiled = compile(engine, bytes)?;
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
            None => compile(engine, bytes),
        }
    }

    fn entry(&self, digest: &Digest, extension: &str) -> PathBuf {
        self.dir.join(format!("{}-{}.{extension}", hex(digest), self.settings))
    }

    /// Writes to a temporary file and renames it into place, so a reader
    /// never sees half an entry.
    fn store<T: Compiled>(&self, path: &Path, compiled: &T) -> anyhow::Result<()> {
        crate::store::create_private_dir(&self.dir)?;
        let serialized = compiled.serialize().map_err(|err| anyhow::anyhow!("{err:#}"))?;
        let mut temp = tempfile::NamedTempFile::new_in(&self.dir)?;
        std::io::Write::write_all(&mut temp, &serialized)?;
        failpoint!("cache.before-persist");
        temp.persist(path)?;
        failpoint!("cache.after-persist");
        Ok(())
    }

    /// Removes entries this engine cannot use (compiled with other settings,
    /// by another wasmtime), entries not used for `unused_for` when given,
    /// and temporary files abandoned by a process that died mid-write.
    pub(crate) fn gc(&self, unused_for: Option<Duration>) -> std::io::Result<CacheGc> {
        let mut removed = CacheGc::default();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(err) => return Err(err),
        };
        let now = SystemTime::now();
        for entry in entries {
            let entry = entry?;
            let metadata = entry.metadata()?;
            if !metadata.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let age = metadata.modified().ok().and_then(|at| now.duration_since(at).ok()).unwrap_or_default();
            let is_entry = name.ends_with(".cwasm") || name.ends_with(".mwasm");
            let stale = if is_entry {
                let current = name.rsplit_once('.').is_some_and(|(stem, _)| stem.ends_with(&self.settings));
                !current || unused_for.is_some_and(|limit| age > limit)
            } else {
                name.starts_with(".tmp") && age > ABANDONED_TEMP
            };
            if stale {
                std::fs::remove_file(entry.path())?;
                removed.entries += 1;
                removed.bytes += metadata.len();
            }
        }
        Ok(removed)
    }
}
