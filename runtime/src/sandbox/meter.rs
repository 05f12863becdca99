//! How a guest is held to its fuel and to the clock: fuel counts its
//! work, and it yields to the async runtime often enough for a timeout or
//! a cancellation to stop it, and for other attempts to share the threads.
//!
//! A guest yields when a slice of fuel runs out (compiled code counts fuel
//! in a register and checks it at function entries and loop headers), and
//! on its way back from a host call when [`YIELD_AFTER`] has passed since
//! it last yielded there. A slice is small because a unit of fuel is not a
//! unit of time: ordinary code runs a unit in under a nanosecond, but a
//! load that misses the caches and the TLB takes 100–300 ns for its one
//! unit, so a guest chasing pointers through its memory runs a slice of a
//! million units for 150–300 ms (`guests/chase.wat`). Fuel alone does not
//! bound time either: host work costs the guest no fuel, so a loop of
//! cheap calls into slow host code (a huge log message, copied, checked and
//! redacted on every call) could run through one slice for an hour; the
//! hook sees to that. wasmtime's epoch interruption would bound both, but
//! it checks a counter at every loop header and function entry on top of
//! the fuel check, which cost CPU-bound guests more than the slices and
//! the hook do (BENCHMARKS.md, "Fuel and time"). One instruction is never
//! cut short: a `memory.fill` over a 4 GiB memory runs to its end (paying
//! a unit of fuel a byte before it starts), as it did under epochs.

use std::time::{Duration, Instant};

use wasmtime::{CallHook, CallHookHandler, Store, StoreContextMut};

/// Fuel handed to compiled code at a time (see `fuel_async_yield_interval`):
/// a tenth of a millisecond of ordinary code, and some 30 ms at most when
/// every unit waits on memory.
pub const FUEL_SLICE: u64 = 100_000;

/// How long a guest may run, counting its host calls, before it yields on
/// its way back from one.
const YIELD_AFTER: Duration = Duration::from_millis(5);

/// Gives `store` `fuel`, handed out in slices, and the hook that yields
/// after slow host calls.
pub fn meter<T: Send + 'static>(store: &mut Store<T>, fuel: u64) {
    // Fuel cannot fail to be set on an engine built with fuel metering.
    let _ = store.set_fuel(fuel);
    let _ = store.fuel_async_yield_interval(Some(FUEL_SLICE));
    store.call_hook_async(YieldAfterHost { since: parking_lot::Mutex::new(Instant::now()) });
}

/// The hook: when the guest comes back from the host, yields if it last
/// did so [`YIELD_AFTER`] ago or more.
struct YieldAfterHost {
    since: parking_lot::Mutex<Instant>,
}

#[async_trait::async_trait]
impl<T: Send> CallHookHandler<T> for YieldAfterHost {
    async fn handle_call_event(&self, _: StoreContextMut<'_, T>, hook: CallHook) -> wasmtime::Result<()> {
        if !matches!(hook, CallHook::ReturningFromHost) {
            return Ok(());
        }
        let now = Instant::now();
        let due = {
            let mut since = self.since.lock();
            let due = now.duration_since(*since) >= YIELD_AFTER;
            if due {
                *since = now;
            }
            due
        };
        if due {
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}
