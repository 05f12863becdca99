//! The host memory one attempt makes stepbox hold for it: its stdout and
//! stderr captures, its log records and its key-value compare-and-swap
//! handles. They share one budget (`limits.host_memory`), so a guest cannot
//! grow the host's memory by piling up buffers its own memory limit does
//! not see; past the budget the attempt fails as `memory-limit`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// One attempt's budget; clones share it.
#[derive(Debug, Clone)]
pub(crate) struct HostMemory {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: u64,
    used: AtomicU64,
    /// Why the budget was refused, the first time it was.
    refused: Mutex<Option<String>>,
}

/// The error a host call fails with when the budget is spent: it ends the
/// attempt, which is reported as [`HostMemory::refused`] says.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostMemorySpent(String);

impl HostMemory {
    pub(crate) fn new(limit: bytesize::ByteSize) -> Self {
        HostMemory {
            inner: Arc::new(Inner { limit: limit.as_u64(), used: AtomicU64::new(0), refused: Mutex::new(None) }),
        }
    }

    /// Takes `bytes` for `what` until the returned charge is dropped, or
    /// refuses (and remembers why) when they do not fit.
    pub(crate) fn charge(&self, bytes: usize, what: &str) -> Result<Charge, HostMemorySpent> {
        self.take(bytes, what)?;
        Ok(Charge { memory: self.clone(), bytes: bytes as u64 })
    }

    /// Takes `bytes` for `what` for the rest of the attempt.
    pub(crate) fn take(&self, bytes: usize, what: &str) -> Result<(), HostMemorySpent> {
        let bytes = bytes as u64;
        let taken = self.inner.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            used.checked_add(bytes).filter(|total| *total <= self.inner.limit)
        });
        if taken.is_ok() {
            return Ok(());
        }
        let why = format!(
            "the step made the host hold more than its host memory limit of {} for it ({what}); raise \
             `limits.host_memory` if it needs more",
            bytesize::ByteSize(self.inner.limit).display().iec()
        );
        self.inner.refused.lock().get_or_insert_with(|| why.clone());
        Err(HostMemorySpent(why))
    }

    /// Why the budget was refused, if it was: the attempt's failure.
    pub(crate) fn refused(&self) -> Option<String> {
        self.inner.refused.lock().clone()
    }
}

/// Bytes taken from a budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    memory: HostMemory,
    bytes: u64,
}

impl Charge {
    /// Takes over `other`'s bytes, for what moved into this charge's holder.
    pub(crate) fn absorb(&mut self, mut other: Charge) {
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Keeps the bytes taken for the rest of the attempt, for what went
    /// where it cannot be followed.
    pub(crate) fn keep(mut self) {
        self.bytes = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.memory.inner.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_refused_past_the_limit_and_given_back_when_dropped() {
        let memory = HostMemory::new(bytesize::ByteSize::b(100));
        let first = memory.charge(60, "a").unwrap();
        assert!(memory.charge(41, "b").is_err());
        assert!(memory.refused().unwrap().contains("(b)"));
        drop(first);
        memory.take(100, "c").unwrap();
        assert!(memory.take(1, "d").is_err());
        // The first refusal is the one reported.
        assert!(memory.refused().unwrap().contains("(b)"));
    }
}
