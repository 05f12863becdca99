//! `limits.scratch` for preview1 modules. wasmtime-wasi writes a preview1
//! module's files without going through `wasi:filesystem`, so the
//! preview1 calls that add to or take from a directory are defined again
//! over its own, the way `host::filesystem` does for components: on a
//! descriptor in the scratch directory they charge the attempt's scratch
//! space first (failing with `ENOSPC` when it is spent, and a link or move
//! across its edge with `EXDEV`), then call wasmtime-wasi's implementation.
//!
//! The scratch directory is the first directory a module is given (it is
//! preopened before any grant), so descriptor 3; descriptors opened
//! beneath it are followed through `path_open`, `fd_renumber` and
//! `fd_close`.

use wasmtime::{AsContextMut, Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::types::{Errno, Fd, Fdflags, Filetype, Lookupflags, Oflags};
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as abi, WasiSnapshotPreview1};
use wiggle::{GuestMemory, GuestPtr};

use super::StepState;
use crate::sandbox::scratch::{FileId, ScratchSpace};

const MODULE: &str = "wasi_snapshot_preview1";

/// The scratch directory's descriptor in a module given one.
pub(crate) const SCRATCH_FD: u32 = 3;

/// What a call answers when the scratch space is spent.
const QUOTA: i32 = Errno::Nospc as i32;

/// What a call answers that would link or move a file across the edge of
/// the scratch directory: `EXDEV`, as between two filesystems, which
/// programs handle by copying.
const CROSS_DEVICE: i32 = Errno::Xdev as i32;

/// Defines the charged calls over the ones already in `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<StepState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap_async(MODULE, "fd_write", |mut caller, (fd, iovs, len, nwritten): (i32, i32, i32, i32)| {
        Box::new(async move {
            let (mut memory, state, fuel) = parts(&mut caller)?;
            let charge = match Charge::write(&mut memory, state, fuel, fd, (iovs, len), None).await {
                Ok(charge) => charge,
                Err(errno) => return Ok(errno),
            };
            let errno = abi::fd_write(state.preview1(), &mut memory, fd, iovs, len, nwritten).await?;
            charge.settle(&mut memory, state).await;
            Ok(errno)
        })
    })?;
    linker.func_wrap_async(
        MODULE,
        "fd_pwrite",
        |mut caller, (fd, iovs, len, offset, nwritten): (i32, i32, i32, i64, i32)| {
            Box::new(async move {
                let (mut memory, state, fuel) = parts(&mut caller)?;
                let charge = match Charge::write(&mut memory, state, fuel, fd, (iovs, len), Some(offset as u64)).await {
                    Ok(charge) => charge,
                    Err(errno) => return Ok(errno),
                };
                let errno = abi::fd_pwrite(state.preview1(), &mut memory, fd, iovs, len, offset, nwritten).await?;
                charge.settle(&mut memory, state).await;
                Ok(errno)
            })
        },
    )?;
    linker.func_wrap_async(MODULE, "fd_filestat_set_size", |mut caller, (fd, size): (i32, i64)| {
        Box::new(async move {
            let (mut memory, state, _) = parts(&mut caller)?;
            let charge = match Charge::resize(&mut memory, state, fd, size as u64).await {
                Ok(charge) => charge,
                Err(errno) => return Ok(errno),
            };
            let errno = abi::fd_filestat_set_size(state.preview1(), &mut memory, fd, size).await?;
            charge.settle(&mut memory, state).await;
            Ok(errno)
        })
    })?;
    linker.func_wrap_async(
        MODULE,
        "path_open",
        |mut caller,
         (dir, lookup, path, path_len, oflags, base, inheriting, fdflags, opened): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i64,
            i64,
            i32,
            i32,
        )| {
            Box::new(async move {
                let (mut memory, state, fuel) = parts(&mut caller)?;
                let space = scratch_of(state, dir);
                let oflags_set = Oflags::from_bits_truncate(oflags as u16);
                let (mut new_entry, mut truncated) = (false, None);
                if let Some(space) = &space
                    && oflags_set.intersects(Oflags::CREAT | Oflags::TRUNC)
                {
                    let lookup = Lookupflags::from_bits_truncate(lookup as u32);
                    let at = GuestPtr::<str>::new((path as u32, path_len as u32));
                    match state.preview1().path_filestat_get(&mut memory, Fd::from(dir as u32), lookup, at).await {
                        Ok(stat) if oflags_set.contains(Oflags::TRUNC) => {
                            truncated = Some(((stat.dev, stat.ino), stat.size));
                        }
                        Ok(_) => {}
                        Err(_) if oflags_set.contains(Oflags::CREAT) => {
                            if space.take_entry().is_err() {
                                return Ok(QUOTA);
                            }
                            new_entry = true;
                        }
                        Err(_) => {}
                    }
                    // The lookup spent some of the call's allowance.
                    state.preview1().set_hostcall_fuel(fuel);
                }
                let ctx = state.preview1();
                let errno = abi::path_open(
                    ctx,
                    &mut memory,
                    dir,
                    lookup,
                    path,
                    path_len,
                    oflags,
                    base,
                    inheriting,
                    fdflags,
                    opened,
                )
                .await?;
                let Some(space) = space else { return Ok(errno) };
                if errno == 0 {
                    if let Some((id, size)) = truncated {
                        space.truncated(id, size);
                    }
                    let fd = memory.read(GuestPtr::<u32>::new(opened as u32))?;
                    if let Some(scratch) = &mut state.scratch {
                        scratch.preview1_fds.insert(fd);
                    }
                } else if new_entry {
                    space.entry_not_made();
                }
                Ok(errno)
            })
        },
    )?;
    linker.func_wrap_async(MODULE, "fd_close", |mut caller, (fd,): (i32,)| {
        Box::new(async move {
            let (mut memory, state, _) = parts(&mut caller)?;
            let errno = abi::fd_close(state.preview1(), &mut memory, fd).await?;
            if let (Some(scratch), 0) = (&mut state.scratch, errno) {
                scratch.preview1_fds.remove(&(fd as u32));
            }
            Ok(errno)
        })
    })?;
    linker.func_wrap_async(MODULE, "fd_renumber", |mut caller, (from, to): (i32, i32)| {
        Box::new(async move {
            let (mut memory, state, _) = parts(&mut caller)?;
            let errno = abi::fd_renumber(state.preview1(), &mut memory, from, to).await?;
            if let (Some(scratch), 0) = (&mut state.scratch, errno) {
                // `to` now holds what `from` held, and `from` is closed.
                let moved = scratch.preview1_fds.remove(&(from as u32));
                scratch.preview1_fds.remove(&(to as u32));
                if moved {
                    scratch.preview1_fds.insert(to as u32);
                }
            }
            Ok(errno)
        })
    })?;
    linker.func_wrap_async(MODULE, "path_create_directory", |mut caller, (dir, path, len): (i32, i32, i32)| {
        Box::new(async move {
            let (mut memory, state, _) = parts(&mut caller)?;
            let entry = match Entry::new(state, dir) {
                Ok(entry) => entry,
                Err(errno) => return Ok(errno),
            };
            let errno = abi::path_create_directory(state.preview1(), &mut memory, dir, path, len).await?;
            Ok(entry.added(errno))
        })
    })?;
    linker.func_wrap_async(
        MODULE,
        "path_symlink",
        |mut caller, (old, old_len, dir, new, new_len): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let (mut memory, state, _) = parts(&mut caller)?;
                let entry = match Entry::new(state, dir) {
                    Ok(entry) => entry,
                    Err(errno) => return Ok(errno),
                };
                let errno = abi::path_symlink(state.preview1(), &mut memory, old, old_len, dir, new, new_len).await?;
                Ok(entry.added(errno))
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "path_link",
        |mut caller, (old_dir, flags, old, old_len, dir, new, new_len): (i32, i32, i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let (mut memory, state, _) = parts(&mut caller)?;
                if scratch_of(state, old_dir).is_some() != scratch_of(state, dir).is_some() {
                    return Ok(CROSS_DEVICE);
                }
                let entry = match Entry::new(state, dir) {
                    Ok(entry) => entry,
                    Err(errno) => return Ok(errno),
                };
                let ctx = state.preview1();
                let errno = abi::path_link(ctx, &mut memory, old_dir, flags, old, old_len, dir, new, new_len).await?;
                Ok(entry.added(errno))
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "path_rename",
        |mut caller, (old_dir, old, old_len, dir, new, new_len): (i32, i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let (mut memory, state, _) = parts(&mut caller)?;
                // Across the edge of the scratch directory either way, as
                // for components.
                if scratch_of(state, dir).is_some() != scratch_of(state, old_dir).is_some() {
                    return Ok(CROSS_DEVICE);
                }
                // A rename may grow the destination directory: an entry.
                let entry = match Entry::new(state, dir) {
                    Ok(entry) => entry,
                    Err(errno) => return Ok(errno),
                };
                let ctx = state.preview1();
                let errno = abi::path_rename(ctx, &mut memory, old_dir, old, old_len, dir, new, new_len).await?;
                Ok(entry.added(errno))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The guest's memory and the attempt's state, as wasmtime-wasi's own
/// preview1 calls take them (with the host-call allowance passed on).
fn parts<'a>(caller: &'a mut Caller<'_, StepState>) -> wasmtime::Result<(GuestMemory<'a>, &'a mut StepState, usize)> {
    let fuel = caller.as_context_mut().hostcall_fuel();
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        wasmtime::bail!("a preview1 module must export its memory as `memory`");
    };
    let (bytes, state) = memory.data_and_store_mut(caller);
    state.preview1().set_hostcall_fuel(fuel);
    Ok((GuestMemory::Unshared(bytes), state, fuel))
}

/// The scratch space `fd` writes into, if it lies in the scratch directory.
fn scratch_of(state: &StepState, fd: i32) -> Option<ScratchSpace> {
    let scratch = state.scratch.as_ref()?;
    scratch.preview1_fds.contains(&(fd as u32)).then(|| scratch.space.clone())
}

/// What a write or a resize of a scratch file took, to be settled against
/// what it really added once it is done.
struct Charge(Option<Taken>);

struct Taken {
    space: ScratchSpace,
    fd: i32,
    file: FileId,
    size_before: u64,
    taken: u64,
}

impl Charge {
    /// Takes what writing the first non-empty buffer of `iovs` (all a
    /// preview1 write writes) at `offset` (or the descriptor's position)
    /// adds to `fd`, or answers `ENOSPC`. Whatever cannot be read here is
    /// left to the call itself to report.
    async fn write(
        memory: &mut GuestMemory<'_>,
        state: &mut StepState,
        fuel: usize,
        fd: i32,
        (iovs, count): (i32, i32),
        offset: Option<u64>,
    ) -> Result<Self, i32> {
        let Some(space) = scratch_of(state, fd) else { return Ok(Charge(None)) };
        // The call refuses more buffers than its allowance covers.
        if (count as u32 as usize).saturating_mul(8) > fuel {
            return Ok(Charge(None));
        }
        let Some(len) = first_non_empty(memory, iovs, count) else { return Ok(Charge(None)) };
        let ctx = state.preview1();
        let Some((file, size)) = file_size(ctx, memory, fd).await else { return Ok(Charge(None)) };
        let Ok(fdstat) = ctx.fd_fdstat_get(memory, Fd::from(fd as u32)).await else { return Ok(Charge(None)) };
        // Appending ignores the offset, as on Linux.
        let position = match offset {
            _ if fdstat.fs_flags.contains(Fdflags::APPEND) => size,
            Some(offset) => offset,
            None => match ctx.fd_tell(memory, Fd::from(fd as u32)) {
                Ok(position) => position,
                Err(_) => return Ok(Charge(None)),
            },
        };
        match space.take_write(file, size, position, len) {
            Ok(taken) => Ok(Charge(Some(Taken { space, fd, file, size_before: size, taken }))),
            Err(_) => Err(QUOTA),
        }
    }

    /// Takes what resizing `fd` to `new` adds, or answers `ENOSPC`.
    async fn resize(memory: &mut GuestMemory<'_>, state: &mut StepState, fd: i32, new: u64) -> Result<Self, i32> {
        let Some(space) = scratch_of(state, fd) else { return Ok(Charge(None)) };
        let Some((file, size)) = file_size(state.preview1(), memory, fd).await else { return Ok(Charge(None)) };
        match space.take_write(file, size, new, 0) {
            Ok(taken) => Ok(Charge(Some(Taken { space, fd, file, size_before: size, taken }))),
            Err(_) => Err(QUOTA),
        }
    }

    /// Settles what was taken against the file's size now: a short or
    /// failed write gives back what it did not add, a truncation what it
    /// removed.
    async fn settle(self, memory: &mut GuestMemory<'_>, state: &mut StepState) {
        let Some(Taken { space, fd, file, size_before, taken }) = self.0 else { return };
        let size_after = file_size(state.preview1(), memory, fd).await.map_or(size_before, |(_, size)| size);
        space.write_unused(file, taken.saturating_sub(size_after.saturating_sub(size_before)));
        space.truncated(file, size_before.saturating_sub(size_after));
    }
}

/// The id and size of the regular file `fd`, if it is one.
async fn file_size(ctx: &mut WasiP1Ctx, memory: &mut GuestMemory<'_>, fd: i32) -> Option<(FileId, u64)> {
    let stat = ctx.fd_filestat_get(memory, Fd::from(fd as u32)).await.ok()?;
    (stat.filetype == Filetype::RegularFile).then_some(((stat.dev, stat.ino), stat.size))
}

/// The length of the first non-empty buffer of the `count` at `iovs`.
fn first_non_empty(memory: &GuestMemory<'_>, iovs: i32, count: i32) -> Option<u64> {
    let iovs = GuestPtr::<[wasmtime_wasi::p1::types::Ciovec]>::new((iovs as u32, count as u32));
    for iov in iovs.iter() {
        let iov = memory.read(iov.ok()?).ok()?;
        if iov.buf_len > 0 {
            return Some(u64::from(iov.buf_len));
        }
    }
    Some(0)
}

/// A directory entry a call makes, charged to the scratch space when its
/// directory is in the scratch directory.
struct Entry(Option<ScratchSpace>);

impl Entry {
    /// Takes the entry's cost before the call that makes it, or fails with
    /// `ENOSPC` (as an `Err` carrying the answer).
    fn new(state: &StepState, dir: i32) -> Result<Self, i32> {
        let space = scratch_of(state, dir);
        match &space {
            Some(space) if space.take_entry().is_err() => Err(QUOTA),
            _ => Ok(Entry(space)),
        }
    }

    /// Gives the cost back if the call failed; passes its answer on.
    fn added(self, errno: i32) -> i32 {
        if let (Some(space), true) = (&self.0, errno != 0) {
            space.entry_not_made();
        }
        errno
    }
}
