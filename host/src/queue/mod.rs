//! Work queues and retry timing.
//!
//! - [`WorkQueue`]: a per-key deduplicating queue with client-go's dirty/processing
//!   semantics, so no key is processed twice at once.
//! - [`Backoff`]: exponential back-off with jitter between a min and a max.

mod backoff;
mod workqueue;

pub use backoff::Backoff;
pub use workqueue::WorkQueue;
