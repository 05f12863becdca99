//! Scratch directories. An attempt that asks for one gets a fresh, empty
//! directory under the data directory's `scratch/` (not `$TMPDIR`, which is
//! often memory), removed when the attempt ends. Each process keeps its
//! attempts' directories in a subdirectory of its own and holds a lock for
//! it while it lives, so the next process to start removes what a killed
//! one left behind, and never what a live one is using.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

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

fn ignore_missing(err: io::Error) -> io::Result<()> {
    if err.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(err) }
}

#[cfg(test)]
mod tests {
    use super::*;

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
