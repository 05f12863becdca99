//! Loading a step component: compile once, check that it is a step the host
//! can link, and keep an `InstancePre` so each attempt only instantiates.

use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::bindings::StepCorePre;
use super::host::StepState;

/// Why a file could not be loaded as a step. Each message names the file and
/// says what would fix it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is empty: expected a WebAssembly component built for wasm32-wasip2")]
    Empty { path: PathBuf },
    #[error(
        "{path} is not WebAssembly (it does not start with the `\\0asm` magic bytes); expected a component built for wasm32-wasip2"
    )]
    NotWasm { path: PathBuf },
    #[error(
        "{path} is a core WebAssembly module, not a component; build it for the wasm32-wasip2 target \
         (or wrap a module with `wasm-tools component new`)"
    )]
    CoreModule { path: PathBuf },
    #[error("{path} asks for more than any step may have: {message}; make its initial tables or memories smaller")]
    OverLimits { path: PathBuf, message: String },
    #[error("{path} is truncated or corrupt: {message}; rebuild it")]
    Malformed { path: PathBuf, message: String },
    #[error(
        "{path} imports `{import}`, which stepbox does not provide; a step may import only the interfaces \
         of the `stepbox:step/step` world in wit/step.wit (wasi:cli, wasi:io, wasi:clocks, wasi:filesystem, \
         wasi:random, wasi:sockets, wasi:http/outgoing-handler, wasi:logging, wasi:keyvalue, wasi:config)"
    )]
    UnknownImport { path: PathBuf, import: String },
    #[error(
        "{path} does not export `run`, so it is not a stepbox step (its exports: {exports}); write it \
         with stepbox-sdk's #[step] or target the `stepbox:step/step` world in wit/step.wit"
    )]
    MissingRun { path: PathBuf, exports: String },
    #[error("{path} exports `run` with the wrong signature: {message}; it must match wit/step.wit")]
    WrongRun { path: PathBuf, message: String },
    #[error("{path} cannot be linked: {message}")]
    Link { path: PathBuf, message: String },
}

/// A compiled, validated step, ready to instantiate many times.
#[derive(Clone)]
pub struct StepComponent {
    path: PathBuf,
    pub(crate) pre: StepCorePre<StepState>,
}

impl std::fmt::Debug for StepComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepComponent").field("path", &self.path).finish_non_exhaustive()
    }
}

impl StepComponent {
    /// Where the component was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

const MAGIC: &[u8; 4] = b"\0asm";
/// Bytes 4..8 of a core module: version 1, layer 0.
const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];

pub(crate) fn load(engine: &Engine, linker: &Linker<StepState>, path: &Path) -> Result<StepComponent, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
    load_bytes(engine, linker, path, &bytes)
}

pub(crate) fn load_bytes(
    engine: &Engine,
    linker: &Linker<StepState>,
    path: &Path,
    bytes: &[u8],
) -> Result<StepComponent, LoadError> {
    let path = path.to_owned();
    if bytes.is_empty() {
        return Err(LoadError::Empty { path });
    }
    if !bytes.starts_with(MAGIC) {
        return Err(LoadError::NotWasm { path });
    }
    if bytes.get(4..8) == Some(&CORE_VERSION[..]) {
        return Err(LoadError::CoreModule { path });
    }
    let component = Component::from_binary(engine, bytes).map_err(|err| {
        let message = format!("{err:#}");
        // The pooling allocator checks initial sizes when compiling.
        if message.contains("pooling allocator") {
            LoadError::OverLimits { path: path.clone(), message }
        } else {
            LoadError::Malformed { path: path.clone(), message }
        }
    })?;

    let instance_pre = linker.instantiate_pre(&component).map_err(|err| {
        let message = format!("{err:#}");
        match first_quoted(&message) {
            Some(import) => LoadError::UnknownImport { path: path.clone(), import },
            None => LoadError::Link { path: path.clone(), message },
        }
    })?;
    let exports: Vec<String> = component.component_type().exports(engine).map(|(name, _)| name.to_owned()).collect();
    if !exports.iter().any(|name| name == "run") {
        let exports = if exports.is_empty() { "none".to_owned() } else { exports.join(", ") };
        return Err(LoadError::MissingRun { path, exports });
    }

    let pre = StepCorePre::new(instance_pre)
        .map_err(|err| LoadError::WrongRun { path: path.clone(), message: format!("{err:#}") })?;
    Ok(StepComponent { path, pre })
}

/// The first name in backquotes: how wasmtime names the import it could not
/// satisfy.
fn first_quoted(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}
