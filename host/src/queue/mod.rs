//! Work queues, delay scheduling and retry timing.
//!
//! - [`WorkQueue`]: a bounded per-key deduplicating queue with one lane per worker,
//!   with client-go's dirty/processing semantics: no key is processed twice at once,
//!   and [`Priority`] lanes (live changes, due retries, sweeps) that never starve.
//! - [`Timers`] / [`DelayScheduler`]: keys due later, earliest deadline wins, at a
//!   configurable resolution and capacity.
//! - [`Backoff`] and [`DequeuePolicy`]: when to retry, and whether a new event
//!   replaces a pending retry.
//! - [`WorkerHasher`]: which worker lane a key goes to.

mod hasher;
mod retry;
mod scheduler;
mod workqueue;

pub use hasher::{Fnv1a, WorkerHasher};
pub use retry::{Backoff, DequeuePolicy, EventRef};
pub use scheduler::{DelayScheduler, Scheduled, SchedulerFull, Timers};
pub use workqueue::{Added, CYCLE, Priority, QueueError, Timings, WorkQueue};
