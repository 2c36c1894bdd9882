//! Per-instance resource limits and the per-call time limit.
//!
//! Memory and tables are bounded by a [`Limiter`] installed where the `Store` is
//! made; it remembers that it refused a request, so a failed call can be reported
//! as "out of memory" rather than as whatever trap the guest's allocator turned the
//! refusal into. Time is bounded with epoch interruption: the runtime's ticker
//! advances the engine's epoch every tick, and a call gets `ticks` of them; at
//! each tick the call yields to the async executor, and once its ticks are spent
//! it fails with [`DeadlineExceeded`].

use wasmtime::ResourceLimiter;

use super::settings::Limits;

/// The error a call fails with when it runs past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the call ran past its time limit")]
pub struct DeadlineExceeded;

/// Bounds one instance's memory, tables and instance count.
pub struct Limiter {
    memory_bytes: usize,
    tables: usize,
    table_elements: usize,
    /// Set when a memory grow was refused; reset before each call.
    pub memory_refused: bool,
}

impl Limiter {
    pub fn new(limits: &Limits) -> Self {
        Self {
            memory_bytes: (limits.memory_mib as usize).saturating_mul(1 << 20),
            tables: limits.tables as usize,
            table_elements: limits.table_elements,
            memory_refused: false,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_bytes && maximum.is_none_or(|m| desired <= m);
        if !allowed {
            self.memory_refused = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements && maximum.is_none_or(|m| desired <= m))
    }

    fn instances(&self) -> usize {
        // A component instantiates several core instances (its own modules plus
        // adapters); this bounds them, not the number of component instances.
        1000
    }

    fn tables(&self) -> usize {
        self.tables
    }

    fn memories(&self) -> usize {
        // Components built by componentize-py and componentize-js carry a few
        // memories; the memory size limit above is what bounds their total use.
        16
    }
}
