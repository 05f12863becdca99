//! `limits.scratch` for components. The `wasi:filesystem` calls that add
//! to or take from what a directory holds are defined again over
//! wasmtime-wasi's own: on a descriptor in the attempt's scratch directory
//! they charge the attempt's [`ScratchSpace`] first (failing the call with
//! `insufficient-space` when it is spent) and then do what wasmtime-wasi
//! does. Streams that write to a scratch file are wrapped so that each
//! write is charged. A link or a move between the scratch directory and
//! elsewhere is refused as `cross-device`: a file must not come in
//! uncharged, nor grow outside and shrink inside. Every other descriptor
//! passes straight through.
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
use crate::sandbox::scratch::{FileId, ScratchHandles, ScratchSpace, file_id};

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
                let entry = match Entry::take(state, &fd)? {
                    Ok(entry) => entry,
                    Err(code) => return Ok((Err(code),)),
                };
                let result = fs(state).create_directory_at(fd, path).await;
                entry.made(result.is_ok());
                answer(state, result)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store, (fd, old, new): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                let state = store.data_mut();
                let entry = match Entry::take(state, &fd)? {
                    Ok(entry) => entry,
                    Err(code) => return Ok((Err(code),)),
                };
                let result = fs(state).symlink_at(fd, old, new).await;
                entry.made(result.is_ok());
                answer(state, result)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.link-at",
        |mut store, (fd, flags, old, new_fd, new): (Resource<Descriptor>, PathFlags, String, Resource<Descriptor>, String)| {
            Box::new(async move {
                let state = store.data_mut();
                if crosses(state, &fd, &new_fd)? {
                    return Ok((Err(ErrorCode::CrossDevice),));
                }
                // The new entry appears in the directory of `new_fd`.
                let entry = match Entry::take(state, &new_fd)? {
                    Ok(entry) => entry,
                    Err(code) => return Ok((Err(code),)),
                };
                let result = fs(state).link_at(fd, flags, old, new_fd, new).await;
                entry.made(result.is_ok());
                answer(state, result)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.rename-at",
        |mut store, (fd, old, new_fd, new): (Resource<Descriptor>, String, Resource<Descriptor>, String)| {
            Box::new(async move {
                let state = store.data_mut();
                // Across the edge of the scratch directory either way: in
                // would bring in what was never charged, out would let a
                // directory opened in scratch lead back in from outside.
                if crosses(state, &fd, &new_fd)? {
                    return Ok((Err(ErrorCode::CrossDevice),));
                }
                // A rename may grow the destination directory, which never
                // shrinks: it costs an entry, like a new name.
                let entry = match Entry::take(state, &new_fd)? {
                    Ok(entry) => entry,
                    Err(code) => return Ok((Err(code),)),
                };
                let result = fs(state).rename_at(fd, old, new_fd, new).await;
                entry.made(result.is_ok());
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

/// The id and size of an open scratch file, by its handle. An `fstat` of
/// an open file on the local disk the data directory lives on does not
/// wait on I/O.
fn size(file: &File) -> std::io::Result<(FileId, u64)> {
    file.metadata().map(|meta| (file_id(&meta), meta.len()))
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
    let (id, before) = match size(&file) {
        Ok(size) => size,
        Err(err) => return Ok((Err(ErrorCode::from(&err)),)),
    };
    let Ok(taken) = space.take_write(id, before, offset, buffer.len() as u64) else {
        return Ok((Err(ErrorCode::InsufficientSpace),));
    };
    let result = fs(state).write(fd, buffer, offset).await;
    // A short or failed write gives back what it did not add.
    let added = result.as_ref().map_or(0, |n| offset.saturating_add(*n).saturating_sub(before));
    space.write_unused(id, taken.saturating_sub(added));
    answer(state, result)
}

async fn set_size(mut store: StoreContextMut<'_, StepState>, (fd, new): (Resource<Descriptor>, u64)) -> Answer<()> {
    let state = store.data_mut();
    let Some((space, file)) = scratch_of(state, &fd)? else {
        let result = fs(state).set_size(fd, new).await;
        return answer(state, result);
    };
    let (id, before) = match size(&file) {
        Ok(size) => size,
        Err(err) => return Ok((Err(ErrorCode::from(&err)),)),
    };
    let Ok(taken) = space.take_write(id, before, new, 0) else {
        return Ok((Err(ErrorCode::InsufficientSpace),));
    };
    let result = fs(state).set_size(fd, new).await;
    match &result {
        Ok(()) => space.truncated(id, before.saturating_sub(new)),
        Err(_) => space.write_unused(id, taken),
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
    let (mut new_entry, mut truncated) = (false, 0);
    if open_flags.intersects(OpenFlags::CREATE | OpenFlags::TRUNCATE) {
        let parent = Resource::new_borrow(fd.rep());
        match fs(state).stat_at(parent, path_flags, path.clone()).await {
            Ok(stat) if open_flags.contains(OpenFlags::TRUNCATE) => truncated = stat.size,
            Ok(_) => {}
            Err(_) if open_flags.contains(OpenFlags::CREATE) => {
                if space.take_entry().is_err() {
                    return Ok((Err(ErrorCode::InsufficientSpace),));
                }
                new_entry = true;
            }
            Err(_) => {}
        }
    }
    let result = fs(state).open_at(fd, path_flags, path, open_flags, flags).await;
    match &result {
        Ok(opened) => {
            let handle = handle(state.table.get(opened)?).clone();
            if truncated > 0
                && let Ok((id, _)) = size(&handle)
            {
                space.truncated(id, truncated);
            }
            if let Some(scratch) = &mut state.scratch {
                scratch.handles.insert(&handle);
            }
        }
        Err(_) if new_entry => space.entry_not_made(),
        Err(_) => {}
    }
    answer(state, result)
}

/// Whether a link or move from `from` to `to` would cross the edge of the
/// scratch directory, which stepbox refuses: a file reachable both ways
/// could grow outside the space and shrink inside it, and one moved in
/// would come in uncharged.
fn crosses(state: &StepState, from: &Resource<Descriptor>, to: &Resource<Descriptor>) -> wasmtime::Result<bool> {
    Ok(scratch_of(state, from)?.is_some() != scratch_of(state, to)?.is_some())
}

/// A directory entry a call on `fd` makes, charged to the scratch space
/// when `fd` is a scratch directory.
struct Entry(Option<ScratchSpace>);

impl Entry {
    /// Takes the entry's cost before the call that makes it, or answers
    /// that the space is spent.
    fn take(state: &StepState, fd: &Resource<Descriptor>) -> wasmtime::Result<Result<Self, ErrorCode>> {
        let space = scratch_of(state, fd)?.map(|(space, _)| space);
        if let Some(space) = &space
            && space.take_entry().is_err()
        {
            return Ok(Err(ErrorCode::InsufficientSpace));
        }
        Ok(Ok(Entry(space)))
    }

    /// Gives the cost back if the call did not make the entry after all.
    fn made(&self, ok: bool) {
        if let (Some(space), false) = (&self.0, ok) {
            space.entry_not_made();
        }
    }
}

/// A stream to a scratch file that charges each write for what it adds
/// past the end of the file. wasmtime-wasi's file stream writes in the
/// background but finishes one write before it takes the next, so the
/// file's size is current when the next is charged; until then the write
/// is in flight (see [`ScratchSpace::truncated`]).
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
        let (id, size) = size(&self.file).map_err(failed)?;
        let taken = self.space.take_write(id, size, self.position.unwrap_or(size), len).map_err(failed)?;
        if let Err(err) = self.inner.write(bytes) {
            self.space.write_unused(id, taken);
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
