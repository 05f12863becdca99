//! What one attempt may use, and the store limiter that enforces memory and
//! table sizes across the whole instance.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Per-attempt ceilings. Every attempt gets all of them; there is no
/// "unlimited" for a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Fuel units, roughly one per executed wasm instruction.
    pub fuel: u64,
    /// Wall-clock time for the whole attempt, including time spent blocked
    /// in host calls (a clock wait, a file read).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Linear memory for the whole instance: the sum over all its memories.
    pub memory: ByteSize,
    /// Elements per table.
    pub table_elements: u32,
    /// Bytes of stdout kept (and the same for stderr); the rest is dropped
    /// and the capture is marked truncated.
    pub stdio: ByteSize,
    /// Size of the output the step returns; more is an `output-limit` failure.
    pub output: ByteSize,
    /// Bytes of log messages kept per attempt; later messages are dropped.
    pub logs: ByteSize,
    /// Host resources (open files, streams, buckets) held at once, so a
    /// guest cannot grow host memory by opening handles in a loop.
    pub host_resources: u32,
    /// Memory the host may hold for the attempt outside its linear memory:
    /// stdout and stderr captures, log records, key-value compare-and-swap
    /// handles. More is a `memory-limit` failure.
    pub host_memory: ByteSize,
    /// What a scratch directory may hold: file contents past their ends,
    /// and a block per file or directory. Past it the guest's write fails
    /// (`ENOSPC`, "no space left on device").
    pub scratch: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 2_000_000_000,
            timeout: Duration::from_secs(10),
            memory: ByteSize::mib(64),
            table_elements: 20_000,
            stdio: ByteSize::mib(1),
            output: ByteSize::mib(1),
            logs: ByteSize::mib(1),
            host_resources: 10_000,
            host_memory: ByteSize::mib(16),
            scratch: ByteSize::mib(64),
        }
    }
}

/// Which ceiling a failed growth hit; kept so a trap that follows (an
/// allocation failure) is reported as the limit it really is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LimitHit(pub String);

/// Sums the memories of one instance, so the memory limit covers the instance
/// rather than each memory on its own, and records the peak.
pub(crate) struct InstanceLimiter {
    memory_limit: usize,
    table_elements: usize,
    memory_in_use: usize,
    peak_memory: usize,
    hit: Option<LimitHit>,
}

/// Core instances one attempt may create: a step component needs a handful;
/// hostile ones do not get thousands. The instance pool holds this many per
/// attempt slot, as it does memories and tables.
pub(crate) const MAX_INSTANCES: usize = 64;
/// Linear memories one attempt may create.
pub(crate) const MAX_MEMORIES: usize = 16;
/// Tables one attempt may create.
pub(crate) const MAX_TABLES: usize = 64;

impl InstanceLimiter {
    pub(crate) fn new(limits: &Limits) -> Self {
        InstanceLimiter {
            memory_limit: usize::try_from(limits.memory.as_u64()).unwrap_or(usize::MAX),
            table_elements: limits.table_elements as usize,
            memory_in_use: 0,
            peak_memory: 0,
            hit: None,
        }
    }

    pub(crate) fn peak_memory(&self) -> u64 {
        self.peak_memory as u64
    }

    pub(crate) fn hit(&self) -> Option<&LimitHit> {
        self.hit.as_ref()
    }
}

impl wasmtime::ResourceLimiter for InstanceLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.memory_in_use - current + desired;
        if total > self.memory_limit {
            self.hit = Some(LimitHit(format!(
                "the step tried to use {} of memory; its limit is {} (raise `limits.memory` if it needs more)",
                ByteSize(total as u64).display().iec(),
                ByteSize(self.memory_limit as u64).display().iec(),
            )));
            // Growth fails like any memory.grow at its maximum: a guest that
            // handles allocation failure keeps running.
            return Ok(false);
        }
        self.memory_in_use = total;
        self.peak_memory = self.peak_memory.max(total);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.hit = Some(LimitHit(format!(
                "the step tried to grow a table to {desired} elements; the limit is {}",
                self.table_elements
            )));
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter;

    use super::*;

    #[test]
    fn the_memory_limit_covers_all_memories_together() {
        let limits = Limits { memory: ByteSize::kib(128), ..Limits::default() };
        let mut limiter = InstanceLimiter::new(&limits);
        assert!(limiter.memory_growing(0, 64 * 1024, None).unwrap());
        assert!(limiter.memory_growing(0, 64 * 1024, None).unwrap());
        assert!(!limiter.memory_growing(64 * 1024, 128 * 1024, None).unwrap());
        assert_eq!(limiter.peak_memory(), 128 * 1024);
        assert!(limiter.hit().unwrap().0.contains("limit is 128.0 KiB"), "{:?}", limiter.hit());
    }

    #[test]
    fn the_defaults_are_the_ones_security_md_lists() {
        let limits = Limits::default();
        assert_eq!(limits.fuel, 2_000_000_000);
        assert_eq!(limits.timeout, Duration::from_secs(10));
        assert_eq!(limits.memory, ByteSize::mib(64));
        assert_eq!(limits.table_elements, 20_000);
        assert_eq!((limits.stdio, limits.output, limits.logs), (ByteSize::mib(1), ByteSize::mib(1), ByteSize::mib(1)));
        assert_eq!(limits.host_resources, 10_000);
        assert_eq!(limits.host_memory, ByteSize::mib(16));
        assert_eq!(limits.scratch, ByteSize::mib(64));
    }
}
