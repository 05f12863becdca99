//! Loading a step: compile once, check that it is something the host can
//! link and call, and keep an `InstancePre` so each attempt only
//! instantiates.
//!
//! Three kinds of file run as steps: a step component (it exports `run`), a
//! `wasi:cli/command` component (it exports `wasi:cli/run`), and a WASI
//! preview1 command module (a core module exporting `_start`), run with
//! wasmtime's own preview1 implementation so its exit code arrives intact.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Module};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::bindings::StepCorePre;
use super::cache::{CompileCache, Digest};
use super::host::StepState;

/// What steps may link against: the component imports of the `step` world,
/// and WASI preview1 for core modules.
pub(crate) struct Linkers {
    pub(crate) component: Linker<StepState>,
    pub(crate) module: wasmtime::Linker<StepState>,
}

/// Why a file could not be loaded as a step. Each message names the file and
/// says what would fix it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    /// The file cannot be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    #[error(
        "{path} changed since the run's workflow was read (its bytes no longer have the hash the run \
         recorded); put the file back, or start a new run (for a deployed workflow, deploy it again)"
    )]
    /// The file's bytes are not the ones its run pinned.
    Changed {
        /// The file.
        path: PathBuf,
    },
    #[error("{path} is empty: expected a WebAssembly component built for wasm32-wasip2")]
    /// The file is empty.
    Empty {
        /// The file.
        path: PathBuf,
    },
    #[error(
        "{path} is not WebAssembly (it does not start with the `\\0asm` magic bytes); expected a component built for wasm32-wasip2"
    )]
    /// The file is not WebAssembly.
    NotWasm {
        /// The file.
        path: PathBuf,
    },
    #[error(
        "{path} is a core WebAssembly module without a `_start` export, so it is neither a WASI command nor a \
         step; build a step for wasm32-wasip2, or a program with `fn main` (a command) for wasm32-wasip1"
    )]
    /// A core module that is not a WASI program.
    CoreModule {
        /// The file.
        path: PathBuf,
    },
    #[error(
        "{path} asks for more than any step may have: {message}; make its initial tables or memories smaller, \
         or use fewer of them (a step may create {instances} core instances, {memories} memories and {tables} tables)",
        instances = super::limits::MAX_INSTANCES,
        memories = super::limits::MAX_MEMORIES,
        tables = super::limits::MAX_TABLES
    )]
    /// Its initial memories or tables, or their number, or its instances,
    /// exceed what any attempt may have.
    OverLimits {
        /// The file.
        path: PathBuf,
        /// wasmtime's message.
        message: String,
    },
    #[error("{path} is truncated or corrupt: {message}; rebuild it")]
    /// It does not compile.
    Malformed {
        /// The file.
        path: PathBuf,
        /// wasmtime's message.
        message: String,
    },
    #[error(
        "{path} imports `{import}`, which stepbox does not provide; a step may import only the interfaces \
         of the `stepbox:step/step` world in wit/step.wit (wasi:cli, wasi:io, wasi:clocks, wasi:filesystem, \
         wasi:random, wasi:sockets, wasi:http/outgoing-handler, wasi:logging, wasi:keyvalue, wasi:config, \
         stepbox:step/trace)"
    )]
    /// It imports an interface stepbox does not provide.
    UnknownImport {
        /// The file.
        path: PathBuf,
        /// The import.
        import: String,
    },
    #[error(
        "{path} exports neither `run` nor `wasi:cli/run`, so it is neither a stepbox step nor a WASI command \
         (its exports: {exports}); write it with stepbox-sdk's #[step], target the `stepbox:step/step` world in \
         wit/step.wit, or build a program with `fn main`"
    )]
    /// It exports no entry point stepbox knows.
    MissingRun {
        /// The file.
        path: PathBuf,
        /// What it exports.
        exports: String,
    },
    #[error("{path} exports `run` with the wrong signature: {message}; it must match wit/step.wit")]
    /// Its `run` export has the wrong type.
    WrongRun {
        /// The file.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    #[error("{path} cannot be linked: {message}")]
    /// Its imports cannot be linked.
    Link {
        /// The file.
        path: PathBuf,
        /// wasmtime's message.
        message: String,
    },
}

/// A compiled, validated step, ready to instantiate many times.
#[derive(Clone)]
pub struct StepComponent {
    path: PathBuf,
    /// The sha256 of its bytes in hex, what it travels by to other
    /// machines; made once, as every attempt's span carries it.
    digest: Arc<str>,
    pub(crate) entry: Entry,
}

/// How an attempt calls into the component.
#[derive(Clone)]
pub(crate) enum Entry {
    /// `run(ctx, input) -> result<output, step-error>`.
    Step(StepCorePre<StepState>),
    /// `wasi:cli/run`: the input on stdin, the output from stdout, the exit
    /// code as the result.
    Command(CommandPre<StepState>),
    /// A preview1 module's `_start`, called like a command.
    Module(wasmtime::InstancePre<StepState>),
}

impl std::fmt::Debug for StepComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepComponent").field("path", &self.path).finish_non_exhaustive()
    }
}

impl StepComponent {
    /// The same compiled component, as loaded from `path`.
    pub(crate) fn at(&self, path: &Path) -> StepComponent {
        StepComponent { path: path.to_owned(), digest: self.digest.clone(), entry: self.entry.clone() }
    }

    /// Where the component was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sha256 of its bytes, in hex.
    pub fn digest(&self) -> &Arc<str> {
        &self.digest
    }

    /// Whether it is a WASI command (or preview1 module) rather than a step
    /// component.
    pub fn is_command(&self) -> bool {
        matches!(self.entry, Entry::Command(_) | Entry::Module(_))
    }
}

const MAGIC: &[u8; 4] = b"\0asm";
/// Bytes 4..8 of a core module: version 1, layer 0.
const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];

/// Compiles (or takes from `cache`) and validates `bytes`, whose sha256 is
/// `digest`.
pub(crate) fn load_bytes(
    engine: &Engine,
    linkers: &Linkers,
    cache: Option<&CompileCache>,
    path: &Path,
    bytes: &[u8],
    digest: &Digest,
) -> Result<StepComponent, LoadError> {
    let path = path.to_owned();
    if bytes.is_empty() {
        return Err(LoadError::Empty { path });
    }
    if !bytes.starts_with(MAGIC) {
        return Err(LoadError::NotWasm { path });
    }
    let compile_error = |err: wasmtime::Error| {
        let message = format!("{err:#}");
        // The pooling allocator checks initial sizes when compiling.
        if message.contains("pooling allocator") {
            LoadError::OverLimits { path: path.clone(), message }
        } else {
            LoadError::Malformed { path: path.clone(), message }
        }
    };
    let link_error = |err: wasmtime::Error| {
        let message = format!("{err:#}");
        match first_quoted(&message) {
            Some(import) => LoadError::UnknownImport { path: path.clone(), import },
            None => LoadError::Link { path: path.clone(), message },
        }
    };
    if bytes.get(4..8) == Some(&CORE_VERSION[..]) {
        let module: Module = CompileCache::compile(cache, engine, bytes, digest).map_err(compile_error)?;
        if !matches!(module.get_export("_start"), Some(wasmtime::ExternType::Func(_))) {
            return Err(LoadError::CoreModule { path });
        }
        let pre = linkers.module.instantiate_pre(&module).map_err(link_error)?;
        return Ok(StepComponent { path, digest: hex(digest), entry: Entry::Module(pre) });
    }
    let component: Component = CompileCache::compile(cache, engine, bytes, digest).map_err(compile_error)?;
    let instance_pre = linkers.component.instantiate_pre(&component).map_err(link_error)?;
    let exports: Vec<String> = component.component_type().exports(engine).map(|(name, _)| name.to_owned()).collect();
    let entry = if exports.iter().any(|name| name == "run") {
        let pre = StepCorePre::new(instance_pre)
            .map_err(|err| LoadError::WrongRun { path: path.clone(), message: format!("{err:#}") })?;
        Entry::Step(pre)
    } else if exports.iter().any(|name| name.starts_with("wasi:cli/run@0.2.")) {
        let pre = CommandPre::new(instance_pre)
            .map_err(|err| LoadError::WrongRun { path: path.clone(), message: format!("{err:#}") })?;
        Entry::Command(pre)
    } else {
        let exports = if exports.is_empty() { "none".to_owned() } else { exports.join(", ") };
        return Err(LoadError::MissingRun { path, exports });
    };
    Ok(StepComponent { path, digest: hex(digest), entry })
}

fn hex(digest: &Digest) -> Arc<str> {
    super::cache::hex(digest).into()
}

/// The first name in backquotes: how wasmtime names the import it could not
/// satisfy.
fn first_quoted(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}
