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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// This process's part of a `scratch/` directory.
pub(crate) struct ScratchRoot {
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
        Ok(ScratchRoot { dir, lock_path, _lock: lock })
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

/// The bytes one attempt's scratch directory may still take; clones share
/// them. A write is charged for what it adds past the end of its file
/// (holes included), a new entry for [`ENTRY_BYTES`]; truncating a file and
/// removing an entry give theirs back. Removing a file does not give back
/// its contents, which stay on disk while any descriptor holds the file.
#[derive(Debug, Clone)]
pub(crate) struct ScratchSpace {
    inner: Arc<Space>,
}

#[derive(Debug)]
struct Space {
    cap: u64,
    used: AtomicU64,
    /// Stream writes that may not have landed yet.
    writes_in_flight: AtomicU64,
    /// Set when a stream was dropped with a write that may still land.
    unsettled: AtomicBool,
}

impl ScratchSpace {
    pub(crate) fn new(cap: bytesize::ByteSize) -> Self {
        ScratchSpace {
            inner: Arc::new(Space {
                cap: cap.as_u64(),
                used: AtomicU64::new(0),
                writes_in_flight: AtomicU64::new(0),
                unsettled: AtomicBool::new(false),
            }),
        }
    }

    /// Takes `bytes`, or fails as a full disk (`ENOSPC`, which the guest
    /// sees as its write failing, as programs expect of a full disk) when
    /// they do not fit.
    pub(crate) fn take(&self, bytes: u64) -> io::Result<()> {
        self.inner
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.inner.cap)
            })
            .map(drop)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))
    }

    /// Gives back `bytes` taken before.
    pub(crate) fn give_back(&self, bytes: u64) {
        let _ =
            self.inner.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| Some(used.saturating_sub(bytes)));
    }

    /// Takes what writing `len` bytes at `offset` adds to a file of `size`
    /// bytes, returning it.
    pub(crate) fn take_write(&self, size: u64, offset: u64, len: u64) -> io::Result<u64> {
        let growth = offset.saturating_add(len).saturating_sub(size);
        self.take(growth)?;
        Ok(growth)
    }

    /// Gives back what truncating a file freed, unless a stream write may
    /// still land: it was charged against the size before the truncation,
    /// and landing after it would leave an uncharged hole that later
    /// writes could fill for free.
    pub(crate) fn give_back_truncated(&self, bytes: u64) {
        let settled = self.inner.writes_in_flight.load(Ordering::Acquire) == 0;
        if settled && !self.inner.unsettled.load(Ordering::Acquire) {
            self.give_back(bytes);
        }
    }

    /// Notes a stream write started (`true`) or known to have landed.
    pub(crate) fn write_in_flight(&self, started: bool) {
        if started {
            self.inner.writes_in_flight.fetch_add(1, Ordering::AcqRel);
        } else {
            self.inner.writes_in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Notes a stream dropped with a write that may land at any time:
    /// truncations give nothing back from then on.
    pub(crate) fn write_abandoned(&self) {
        self.inner.unsettled.store(true, Ordering::Release);
        self.write_in_flight(false);
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
    fn scratch_space_is_taken_given_back_and_kept_while_a_write_may_land() {
        let space = ScratchSpace::new(bytesize::ByteSize::b(100));
        assert_eq!(space.take_write(10, 20, 50).unwrap(), 60, "the hole counts");
        assert_eq!(space.take(41).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        space.take(40).unwrap();
        space.give_back(30);
        // A write charged against the old size may land after a
        // truncation: nothing is given back until it has.
        space.write_in_flight(true);
        space.give_back_truncated(70);
        assert!(space.take(31).is_err());
        space.write_in_flight(false);
        space.give_back_truncated(70);
        space.take(100).unwrap();
        // A stream dropped mid-write leaves truncations giving nothing back.
        space.write_in_flight(true);
        space.write_abandoned();
        space.give_back_truncated(100);
        assert!(space.take(1).is_err());
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
