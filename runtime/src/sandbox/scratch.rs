//! Scratch directories. An attempt that asks for one gets a fresh, empty
//! directory under the data directory's `scratch/` (not `$TMPDIR`, which is
//! often memory), removed when the attempt ends. Each process keeps its
//! attempts' directories in a subdirectory of its own and holds a lock for
//! it while it lives, so the next process to start removes what a killed
//! one left behind, and never what a live one is using.
//!
//! What an attempt's directory holds is held to `limits.scratch` by
//! [`ScratchSpace`], which the filesystem calls in `host::filesystem` and
//! `host::preview1` charge before they write.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// This process's part of a `scratch/` directory.
pub(crate) struct ScratchRoot {
    /// The `scratch/` directory every process's part is in.
    parent: PathBuf,
    dir: PathBuf,
    lock_path: PathBuf,
    /// Locked for as long as this process lives.
    _lock: File,
}

impl ScratchRoot {
    /// Claims a part of `parent` for this process, after removing the parts
    /// of processes that are gone.
    pub(crate) fn claim(parent: &Path) -> io::Result<Self> {
        crate::store::create_private_dir(parent)?;
        remove_abandoned(parent)?;
        let id = uuid::Uuid::now_v7().to_string();
        // The lock file appears under its final name already locked (it is
        // renamed into place), so another process starting at the same time
        // never mistakes it for an abandoned one.
        let pending = parent.join(format!(".{id}.pending"));
        let lock = File::create(&pending)?;
        lock.try_lock().map_err(io::Error::other)?;
        let lock_path = parent.join(format!("{id}.lock"));
        std::fs::rename(&pending, &lock_path)?;
        let dir = parent.join(&id);
        crate::store::create_private_dir(&dir)?;
        Ok(ScratchRoot { parent: parent.to_owned(), dir, lock_path, _lock: lock })
    }

    /// The `scratch/` directory every process's part is in, which no grant
    /// may reach.
    pub(crate) fn parent(&self) -> &Path {
        &self.parent
    }

    /// A new, empty directory for one attempt; removed when dropped.
    pub(crate) fn attempt_dir(&self) -> io::Result<tempfile::TempDir> {
        tempfile::Builder::new().prefix("attempt-").tempdir_in(&self.dir)
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Removes every part of `parent` whose lock no live process holds.
fn remove_abandoned(parent: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(parent)? {
        let path = entry?.path();
        let Some(id) = path.file_name().and_then(|name| name.to_str()).and_then(|name| name.strip_suffix(".lock"))
        else {
            continue;
        };
        let Ok(lock) = File::open(&path) else { continue };
        if lock.try_lock().is_ok() {
            std::fs::remove_dir_all(parent.join(id)).or_else(ignore_missing)?;
            std::fs::remove_file(&path).or_else(ignore_missing)?;
        }
    }
    Ok(())
}

/// What a new directory entry (file, directory, link) costs before its
/// first byte: a block on most filesystems. Without it a guest could fill
/// the disk with empty files and directories for free.
pub(crate) const ENTRY_BYTES: u64 = 4096;

/// Which file a charge is for: its device and inode, as the host or
/// wasmtime's preview1 layer tells them.
pub(crate) type FileId = (u64, u64);

/// The id of the file `metadata` describes.
pub(crate) fn file_id(metadata: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

/// The bytes one attempt's scratch directory may still take; clones share
/// them. A write is charged for what it adds past the end of its file
/// (holes included), a new entry (file, directory, link) for
/// [`ENTRY_BYTES`]. Truncating a file gives back what it freed, never more
/// than that file was charged; nothing else gives anything back (a removed
/// file's contents stay on disk while a descriptor holds it, a directory
/// does not shrink when its entries go).
#[derive(Debug, Clone)]
pub(crate) struct ScratchSpace {
    cap: u64,
    inner: Arc<Mutex<Space>>,
}

#[derive(Debug, Default)]
struct Space {
    used: u64,
    /// What each file's contents were charged and have not given back.
    files: HashMap<FileId, u64>,
    /// Stream writes that may not have landed yet.
    writes_in_flight: u64,
    /// Set when a stream was dropped with a write that may still land.
    unsettled: bool,
}

/// The error a call over the space fails with: a full disk (`ENOSPC`),
/// which the guest sees as its call failing, as programs expect of a full
/// disk.
fn full() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl ScratchSpace {
    pub(crate) fn new(cap: bytesize::ByteSize) -> Self {
        ScratchSpace { cap: cap.as_u64(), inner: Arc::default() }
    }

    fn take(space: &mut Space, cap: u64, bytes: u64) -> io::Result<()> {
        space.used = space.used.checked_add(bytes).filter(|total| *total <= cap).ok_or_else(full)?;
        Ok(())
    }

    /// Takes what a new directory entry costs.
    pub(crate) fn take_entry(&self) -> io::Result<()> {
        Self::take(&mut self.inner.lock(), self.cap, ENTRY_BYTES)
    }

    /// Gives back an entry's cost when the call that was to make it failed.
    pub(crate) fn entry_not_made(&self) {
        let mut space = self.inner.lock();
        space.used = space.used.saturating_sub(ENTRY_BYTES);
    }

    /// Takes what writing `len` bytes at `offset` adds to `file`, now
    /// `size` bytes, returning it.
    pub(crate) fn take_write(&self, file: FileId, size: u64, offset: u64, len: u64) -> io::Result<u64> {
        let growth = offset.saturating_add(len).saturating_sub(size);
        let mut space = self.inner.lock();
        Self::take(&mut space, self.cap, growth)?;
        *space.files.entry(file).or_default() += growth;
        Ok(growth)
    }

    /// Gives back what a write took and did not add (it failed, or wrote
    /// less).
    pub(crate) fn write_unused(&self, file: FileId, bytes: u64) {
        let mut space = self.inner.lock();
        let charged = space.files.entry(file).or_default();
        let bytes = bytes.min(*charged);
        *charged -= bytes;
        space.used = space.used.saturating_sub(bytes);
    }

    /// Gives back what truncating `file` freed, at most what it was
    /// charged, unless a stream write may still land: charged against the
    /// size before the truncation, landing after it would leave an
    /// uncharged hole that later writes could fill for free.
    pub(crate) fn truncated(&self, file: FileId, freed: u64) {
        let settled = {
            let space = self.inner.lock();
            space.writes_in_flight == 0 && !space.unsettled
        };
        if settled {
            self.write_unused(file, freed);
        }
    }

    /// Notes a stream write started (`true`) or known to have landed.
    pub(crate) fn write_in_flight(&self, started: bool) {
        let mut space = self.inner.lock();
        if started {
            space.writes_in_flight += 1;
        } else {
            space.writes_in_flight = space.writes_in_flight.saturating_sub(1);
        }
    }

    /// Notes a stream dropped with a write that may land at any time:
    /// truncations give nothing back from then on.
    pub(crate) fn write_abandoned(&self) {
        let mut space = self.inner.lock();
        space.unsettled = true;
        space.writes_in_flight = space.writes_in_flight.saturating_sub(1);
    }
}

/// The open files and directories of one attempt that lie in its scratch
/// directory, known by the address of their shared handle. Each entry
/// holds a weak reference, which keeps that address from being reused
/// while it is listed.
#[derive(Debug, Default)]
pub(crate) struct ScratchHandles {
    handles: HashMap<usize, Weak<File>>,
    /// Entries at the last sweep of closed handles.
    swept: usize,
}

impl ScratchHandles {
    pub(crate) fn insert(&mut self, handle: &Arc<File>) {
        if self.handles.len() >= self.swept.saturating_mul(2).max(64) {
            self.handles.retain(|_, weak| weak.strong_count() > 0);
            self.swept = self.handles.len();
        }
        self.handles.insert(Arc::as_ptr(handle) as usize, Arc::downgrade(handle));
    }

    pub(crate) fn contains(&self, handle: &Arc<File>) -> bool {
        self.handles.contains_key(&(Arc::as_ptr(handle) as usize))
    }
}

fn ignore_missing(err: io::Error) -> io::Result<()> {
    if err.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(err) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_space_is_taken_and_given_back_only_as_far_as_each_file_was_charged() {
        let (a, b) = ((1, 1), (1, 2));
        let space = ScratchSpace::new(bytesize::ByteSize::b(100));
        assert_eq!(space.take_write(a, 10, 20, 50).unwrap(), 60, "the hole counts");
        assert_eq!(space.take_write(b, 0, 0, 41).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        space.take_write(b, 0, 0, 40).unwrap();
        // Truncating gives back at most what the file was charged: `a`
        // may have grown far beyond what it was charged here.
        space.truncated(a, 1_000_000);
        space.take_write(b, 40, 40, 60).unwrap();
        assert!(space.take_write(a, 0, 0, 1).is_err());
        space.write_unused(b, 100);
        space.take_write(b, 0, 0, 90).unwrap();
        // A write charged against the old size may land after a
        // truncation: nothing is given back until it has.
        space.write_in_flight(true);
        space.truncated(b, 90);
        assert!(space.take_write(a, 0, 0, 11).is_err());
        space.write_in_flight(false);
        space.truncated(b, 90);
        space.take_write(a, 0, 0, 100).unwrap();
        // A stream dropped mid-write leaves truncations giving nothing back.
        space.write_in_flight(true);
        space.write_abandoned();
        space.truncated(a, 100);
        assert!(space.take_write(b, 0, 0, 1).is_err());
    }

    #[test]
    fn a_new_process_removes_what_a_dead_one_left_and_keeps_a_live_ones() {
        let parent = std::env::temp_dir().join(format!("stepbox-scratch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let live = ScratchRoot::claim(&parent).unwrap();
        let kept = live.attempt_dir().unwrap().keep();
        std::fs::write(kept.join("file"), "live").unwrap();
        // What a killed process leaves: its part, and a lock nobody holds.
        let dead = parent.join("dead");
        std::fs::create_dir_all(dead.join("attempt-1")).unwrap();
        std::fs::write(parent.join("dead.lock"), "").unwrap();

        let next = ScratchRoot::claim(&parent).unwrap();
        assert!(!dead.exists() && !parent.join("dead.lock").exists());
        assert_eq!(std::fs::read_to_string(kept.join("file")).unwrap(), "live");
        drop(live);
        assert!(!kept.exists());
        drop(next);
        assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0);
        std::fs::remove_dir_all(parent).unwrap();
    }
}
