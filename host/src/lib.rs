//! Setpoint: a host runtime for control loops whose reconcilers are sandboxed
//! WebAssembly components.
//!
//! The crate is laid out one idea per module:
//!
//! - [`object`]: the Kubernetes-style object model and its keys.
//! - [`store`]: the desired-state store and each object's reconcile status.
//! - [`queue`]: the per-key deduplicating work queue and the retry back-off.
//! - [`controller`]: one plugin with its queue and workers.
//! - [`plugin`]: the wasmtime engine, compile cache, instances, limits and host imports.
//! - [`config`]: the daemon's configuration, every setting defaulted.
//! - [`cli`]: the `setpoint` command line.

pub mod cli;
pub mod config;
pub mod controller;
pub mod object;
pub mod plugin;
pub mod queue;
pub mod store;
