//! The one wasmtime engine of a process.

use bytesize::ByteSize;

use super::limits::{MAX_INSTANCES, MAX_MEMORIES, MAX_TABLES};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Bytes of each table slot kept resident between attempts (a guest's
/// tables are a few KiB).
const TABLE_KEEP_RESIDENT: usize = 64 * 1024;

/// Process-wide sandbox settings: they size the instance pool, so they are
/// fixed when the engine is built.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Attempts that may run at the same time.
    pub max_concurrent_attempts: u32,
    /// The largest memory limit any attempt may be given.
    pub max_memory: ByteSize,
    /// The data directory: compiled components are kept in its `compiled/`
    /// between processes, attempts' scratch directories are made in its
    /// `scratch/`, and no directory grant may reach into it. `None` compiles
    /// every time and makes scratch directories under the system's
    /// temporary directory.
    pub data_dir: Option<std::path::PathBuf>,
    /// Memory of each instance slot kept resident between attempts. Makes a
    /// short attempt about twice as fast (see BENCHMARKS.md); costs up to
    /// this much resident memory per recently used slot.
    pub keep_resident: ByteSize,
    /// Address space reserved for each linear memory of the pool, at least
    /// `max_memory`. At 4 GiB (the default) guard pages do the bounds
    /// checks of 32-bit memories; below it compiled code checks bounds
    /// itself, a little slower, and the pool reserves less: for a process
    /// whose address space is limited (`ulimit -v`, valgrind's 128 GiB).
    pub memory_reservation: ByteSize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_concurrent_attempts: 64,
            max_memory: ByteSize::gib(4),
            data_dir: None,
            keep_resident: ByteSize::mib(4),
            memory_reservation: ByteSize::gib(4),
        }
    }
}

pub(crate) fn build(config: &EngineConfig) -> anyhow::Result<Engine> {
    anyhow::ensure!(
        config.max_memory <= config.memory_reservation,
        "the largest memory limit ({}) is above the address space reserved for a memory ({}); raise the \
         reservation or lower the limit",
        config.max_memory.display().iec(),
        config.memory_reservation.display().iec()
    );
    let instances = config.max_concurrent_attempts.max(1);
    let mut pool = PoolingAllocationConfig::default();
    // The pool holds, for every attempt that may run, as many core
    // instances, memories and tables as one attempt may create, so an
    // attempt at its caps cannot starve another of slots.
    let (core_instances, memories, tables) = (MAX_INSTANCES as u32, MAX_MEMORIES as u32, MAX_TABLES as u32);
    pool.total_component_instances(instances)
        .max_core_instances_per_component(core_instances)
        .max_memories_per_component(memories)
        .max_tables_per_component(tables)
        .total_core_instances(instances * core_instances)
        .total_memories(instances * memories)
        .total_tables(instances * tables)
        .total_stacks(instances)
        .max_memory_size(usize::try_from(config.max_memory.as_u64()).unwrap_or(usize::MAX));
    // Resetting a slot's memory in place (only the pages the attempt
    // touched) instead of handing it back to the kernel saves the page
    // faults and cross-core TLB flushes that otherwise dominate a short
    // attempt.
    pool.linear_memory_keep_resident(usize::try_from(config.keep_resident.as_u64()).unwrap_or(usize::MAX))
        .table_keep_resident(TABLE_KEEP_RESIDENT);

    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .memory_reservation(config.memory_reservation.as_u64())
        // Fuel, not epochs, keeps guests to time (see `meter`).
        .consume_fuel(true)
        .strategy(wasmtime::Strategy::Cranelift)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&wasm).map_err(|err| anyhow::anyhow!("could not create the wasm engine: {err:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_limit_above_the_reservation_is_refused_by_name() {
        let config =
            EngineConfig { max_memory: ByteSize::gib(2), memory_reservation: ByteSize::gib(1), ..Default::default() };
        let err = build(&config).unwrap_err().to_string();
        assert!(
            err.contains("(2.0 GiB)") && err.contains("(1.0 GiB)") && err.contains("raise the reservation"),
            "{err}"
        );
        let fits = EngineConfig {
            max_concurrent_attempts: 1,
            max_memory: ByteSize::gib(1),
            memory_reservation: ByteSize::gib(1),
            ..Default::default()
        };
        build(&fits).unwrap();
    }
}
