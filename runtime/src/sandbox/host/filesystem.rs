//! `limits.scratch` for components. The `wasi:filesystem` calls that add
//! to or take from what a directory holds are defined again over
//! wasmtime-wasi's own: on a descriptor in the attempt's scratch directory
//! they charge the attempt's [`ScratchSpace`] first (failing the call with
//! `insufficient-space` when it is spent) and then do what wasmtime-wasi does. Streams
//! that write to a scratch file are wrapped so that each write is charged.
//! Every other descriptor passes straight through.
//!
//! (Preview1 modules do not reach these calls; `host::preview1` holds them
//! to the same space.)

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::preopens::Host as _;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    DescriptorFlags, ErrorCode, Host as _, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::{DynOutputStream, FsResult, OutputStream, Pollable, StreamError, StreamResult};

use super::StepState;
use crate::sandbox::grants::SCRATCH;
use crate::sandbox::scratch::{ENTRY_BYTES, ScratchHandles, ScratchSpace};

/// The WASI 0.2 filesystem interfaces wasmtime-wasi defines; components
/// importing any 0.2 version link to these.
const TYPES: &str = "wasi:filesystem/types@0.2.12";
const PREOPENS: &str = "wasi:filesystem/preopens@0.2.12";

/// What an attempt's filesystem calls know of its scratch directory.
#[derive(Debug)]
pub(crate) struct ScratchUse {
    pub(crate) space: ScratchSpace,
    /// The components' descriptors that lie in it.
    pub(crate) handles: ScratchHandles,
    /// The preview1 descriptor numbers that lie in it.
    pub(crate) preview1_fds: std::collections::HashSet<u32>,
}

type Answer<T> = wasmtime::Result<(Result<T, ErrorCode>,)>;

/// Defines the charged calls over the ones already in `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<StepState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    linker.instance(PREOPENS)?.func_wrap("get-directories", |mut store, ()| {
        let state = store.data_mut();
        let directories = fs(state).get_directories()?;
        if let Some(scratch) = &mut state.scratch {
            for (dir, name) in &directories {
                if name == SCRATCH {
                    scratch.handles.insert(handle(state.table.get(dir)?));
                }
            }
        }
        Ok((directories,))
    })?;
    let mut types = linker.instance(TYPES)?;
    types.func_wrap_async("[method]descriptor.write", |store, params| Box::new(write(store, params)))?;
    types.func_wrap_async("[method]descriptor.set-size", |store, params| Box::new(set_size(store, params)))?;
    types.func_wrap("[method]descriptor.write-via-stream", |store, (fd, offset)| stream(store, fd, Some(offset)))?;
    types.func_wrap("[method]descriptor.append-via-stream", |store, (fd,)| stream(store, fd, None))?;
    types.func_wrap_async("[method]descriptor.open-at", |store, params| Box::new(open_at(store, params)))?;
    types.func_wrap_async(
        "[method]descriptor.create-directory-at",
        |mut store, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                let state = store.data_mut();
                let entry = Entry::of(state, &fd)?;
                if let Err(code) = entry.take() {
                    return Ok((Err(code),));
                }
                let result = fs(state).create_directory_at(fd, path).await;
                entry.added(result.is_ok());
                answer(state, result)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store, (fd, old, new): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                let state = store.data_mut();
                let entry = Entry::of(state, &fd)?;
                if let Err(code) = entry.take() {
                    return Ok((Err(code),));
                }
                let result = fs(state).symlink_at(fd, old, new).await;
                entry.added(result.is_ok());
                answer(state, result)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.link-at",
        |mut store, (fd, flags, old, new_fd, new): (Resource<Descriptor>, PathFlags, String, Resource<Descriptor>, String)| {
            Box::new(async move {
                let state = store.data_mut();
                // The new entry appears in the directory of `new_fd`.
                let entry = Entry::of(state, &new_fd)?;
                if let Err(code) = entry.take() {
                    return Ok((Err(code),));
                }
                let result = fs(state).link_at(fd, flags, old, new_fd, new).await;
                entry.added(result.is_ok());
                answer(state, result)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.unlink-file-at",
        |mut store, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                let state = store.data_mut();
                let entry = Entry::of(state, &fd)?;
                let result = fs(state).unlink_file_at(fd, path).await;
                entry.removed(result.is_ok());
                answer(state, result)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.remove-directory-at",
        |mut store, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                let state = store.data_mut();
                let entry = Entry::of(state, &fd)?;
                let result = fs(state).remove_directory_at(fd, path).await;
                entry.removed(result.is_ok());
                answer(state, result)
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// wasmtime-wasi's filesystem over the attempt's table.
fn fs(state: &mut StepState) -> WasiFilesystemCtxView<'_> {
    WasiFilesystemCtxView { ctx: state.wasi.filesystem(), table: &mut state.table }
}

/// The shared handle of a descriptor's file or directory.
fn handle(descriptor: &Descriptor) -> &Arc<File> {
    match descriptor {
        Descriptor::File(file) => &file.file,
        Descriptor::Dir(dir) => &dir.dir,
    }
}

/// The scratch space `fd` writes into, with its handle, or `None` when it
/// lies outside the scratch directory.
fn scratch_of(state: &StepState, fd: &Resource<Descriptor>) -> wasmtime::Result<Option<(ScratchSpace, Arc<File>)>> {
    let Some(scratch) = &state.scratch else { return Ok(None) };
    let handle = handle(state.table.get(fd)?);
    Ok(scratch.handles.contains(handle).then(|| (scratch.space.clone(), handle.clone())))
}

/// The answer wasmtime-wasi's `result` gives the guest: its error as an
/// error code, or a trap.
fn answer<T>(state: &mut StepState, result: FsResult<T>) -> Answer<T> {
    match result {
        Ok(value) => Ok((Ok(value),)),
        Err(err) => Ok((Err(fs(state).convert_error_code(err)?),)),
    }
}

/// The size of an open scratch file, by its handle. An `fstat` of an open
/// file on the local disk the data directory lives on does not wait on I/O.
fn size(file: &File) -> Result<u64, ErrorCode> {
    file.metadata().map(|meta| meta.len()).map_err(|err| ErrorCode::from(&err))
}

async fn write(
    mut store: StoreContextMut<'_, StepState>,
    (fd, buffer, offset): (Resource<Descriptor>, Vec<u8>, u64),
) -> Answer<u64> {
    let state = store.data_mut();
    let Some((space, file)) = scratch_of(state, &fd)? else {
        let result = fs(state).write(fd, buffer, offset).await;
        return answer(state, result);
    };
    let before = match size(&file) {
        Ok(size) => size,
        Err(code) => return Ok((Err(code),)),
    };
    let Ok(taken) = space.take_write(before, offset, buffer.len() as u64) else {
        return Ok((Err(ErrorCode::InsufficientSpace),));
    };
    let result = fs(state).write(fd, buffer, offset).await;
    // A short or failed write gives back what it did not add.
    let written = result.as_ref().map_or(0, |n| *n);
    space.give_back(taken - offset.saturating_add(written).saturating_sub(before).min(taken));
    answer(state, result)
}

async fn set_size(mut store: StoreContextMut<'_, StepState>, (fd, new): (Resource<Descriptor>, u64)) -> Answer<()> {
    let state = store.data_mut();
    let Some((space, file)) = scratch_of(state, &fd)? else {
        let result = fs(state).set_size(fd, new).await;
        return answer(state, result);
    };
    let before = match size(&file) {
        Ok(size) => size,
        Err(code) => return Ok((Err(code),)),
    };
    let Ok(taken) = space.take_write(before, new, 0) else { return Ok((Err(ErrorCode::InsufficientSpace),)) };
    let result = fs(state).set_size(fd, new).await;
    match &result {
        Ok(()) => space.give_back_truncated(before.saturating_sub(new)),
        Err(_) => space.give_back(taken),
    }
    answer(state, result)
}

/// A stream writing at `offset` (or appending, for `None`) to `fd`,
/// charged per write when `fd` is a scratch file.
fn stream(
    mut store: StoreContextMut<'_, StepState>,
    fd: Resource<Descriptor>,
    offset: Option<u64>,
) -> Answer<Resource<DynOutputStream>> {
    let state = store.data_mut();
    let scratch = scratch_of(state, &fd)?;
    let result = match offset {
        Some(offset) => fs(state).write_via_stream(fd, offset),
        None => fs(state).append_via_stream(fd),
    };
    let stream = match (result, scratch) {
        (Ok(stream), Some((space, file))) => {
            let inner = state.table.delete(stream)?;
            let charged: DynOutputStream =
                Box::new(ChargedStream { inner, file, space, position: offset, in_flight: false });
            Ok(state.table.push(charged)?)
        }
        (result, _) => result,
    };
    answer(state, stream)
}

async fn open_at(
    mut store: StoreContextMut<'_, StepState>,
    (fd, path_flags, path, open_flags, flags): (Resource<Descriptor>, PathFlags, String, OpenFlags, DescriptorFlags),
) -> Answer<Resource<Descriptor>> {
    let state = store.data_mut();
    let Some((space, _)) = scratch_of(state, &fd)? else {
        let result = fs(state).open_at(fd, path_flags, path, open_flags, flags).await;
        return answer(state, result);
    };
    let (mut taken, mut truncated) = (0, 0);
    if open_flags.intersects(OpenFlags::CREATE | OpenFlags::TRUNCATE) {
        let parent = Resource::new_borrow(fd.rep());
        match fs(state).stat_at(parent, path_flags, path.clone()).await {
            Ok(stat) if open_flags.contains(OpenFlags::TRUNCATE) => truncated = stat.size,
            Ok(_) => {}
            Err(_) if open_flags.contains(OpenFlags::CREATE) => {
                if space.take(ENTRY_BYTES).is_err() {
                    return Ok((Err(ErrorCode::InsufficientSpace),));
                }
                taken = ENTRY_BYTES;
            }
            Err(_) => {}
        }
    }
    let result = fs(state).open_at(fd, path_flags, path, open_flags, flags).await;
    match &result {
        Ok(opened) => {
            space.give_back_truncated(truncated);
            let handle = handle(state.table.get(opened)?).clone();
            if let Some(scratch) = &mut state.scratch {
                scratch.handles.insert(&handle);
            }
        }
        Err(_) => space.give_back(taken),
    }
    answer(state, result)
}

/// A directory entry a call on `fd` adds or removes, charged to the
/// scratch space when `fd` is a scratch directory.
struct Entry(Option<ScratchSpace>);

impl Entry {
    fn of(state: &StepState, fd: &Resource<Descriptor>) -> wasmtime::Result<Self> {
        Ok(Entry(scratch_of(state, fd)?.map(|(space, _)| space)))
    }

    /// Takes the entry's cost before the call that adds it.
    fn take(&self) -> Result<(), ErrorCode> {
        self.0.as_ref().map_or(Ok(()), |space| space.take(ENTRY_BYTES).map_err(|_| ErrorCode::InsufficientSpace))
    }

    /// Gives the cost back if the call did not add the entry after all.
    fn added(&self, ok: bool) {
        if let (Some(space), false) = (&self.0, ok) {
            space.give_back(ENTRY_BYTES);
        }
    }

    /// Gives the cost back once a call has removed the entry.
    fn removed(&self, ok: bool) {
        if let (Some(space), true) = (&self.0, ok) {
            space.give_back(ENTRY_BYTES);
        }
    }
}

/// A stream to a scratch file that charges each write for what it adds
/// past the end of the file. wasmtime-wasi's file stream writes in the
/// background but finishes one write before it takes the next, so the
/// file's size is current when the next is charged; until then the write
/// is in flight (see [`ScratchSpace::give_back_truncated`]).
struct ChargedStream {
    inner: DynOutputStream,
    file: Arc<File>,
    space: ScratchSpace,
    /// Where the next write lands; `None` when appending.
    position: Option<u64>,
    /// Whether a write may not have landed yet.
    in_flight: bool,
}

impl ChargedStream {
    fn landed(&mut self) {
        if std::mem::take(&mut self.in_flight) {
            self.space.write_in_flight(false);
        }
    }
}

impl Drop for ChargedStream {
    fn drop(&mut self) {
        if self.in_flight {
            self.space.write_abandoned();
        }
    }
}

fn failed(err: std::io::Error) -> StreamError {
    StreamError::LastOperationFailed(err.into())
}

#[wasmtime_wasi::async_trait]
impl Pollable for ChargedStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for ChargedStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let len = bytes.len() as u64;
        let size = self.file.metadata().map_err(failed)?.len();
        let taken = self.space.take_write(size, self.position.unwrap_or(size), len).map_err(failed)?;
        if let Err(err) = self.inner.write(bytes) {
            self.space.give_back(taken);
            return Err(err);
        }
        if !self.in_flight {
            self.in_flight = true;
            self.space.write_in_flight(true);
        }
        if let Some(position) = &mut self.position {
            *position = position.saturating_add(len);
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let result = self.inner.check_write();
        // Room to write (or an error) means the last write is done.
        if !matches!(result, Ok(0)) {
            self.landed();
        }
        result
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
        self.landed();
    }
}
