//! Setpoint: a host runtime for control loops whose reconcilers are sandboxed
//! WebAssembly components.
//!
//! The crate is laid out one idea per module:
//!
//! - [`object`]: the Kubernetes-style object model and its keys.
//! - [`store`]: the desired-state store and each object's reconcile status.
//! - [`queue`]: work queue, delay scheduler, retry and dequeue policies, worker routing.
//! - [`controller`]: one plugin with its queue and workers; the manager of many.
//! - [`etcd`]: the etcd connection; leases, leader election and shards
//!   across replicas, and the fences their writes carry.
//! - [`ownership`]: which keys this process may reconcile (all, none, or some shards).
//! - [`metrics`]: Prometheus metrics.
//! - [`plugin`]: the wasmtime engine, compile cache, instances, limits and host imports.
//! - [`registry`]: plugin versions (loaded, failed, active, history); load,
//!   swap, rollback and unload at runtime.
//! - [`trust`]: signing keys, detached signatures and the trust policy.
//! - [`oci`]: `oci://` references; plugins pushed to and pulled from OCI
//!   registries, cached by digest.
//! - [`config`]: the daemon's configuration, every setting defaulted.
//! - [`api`]: the HTTP admin API (objects, status, watch, CloudEvents) and `/metrics`.
//! - [`source`]: event sources: watched manifest folders.
//! - [`client`]: the command line's client of the API.
//! - [`scaffold`]: `setpoint new`, plugin projects in Rust, Python and JavaScript.
//! - [`daemon`]: composes the process (store, plugins, controllers, sources,
//!   API) and stops it in order.
//! - [`cli`]: the `setpoint` command line: argument parsing and client commands.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod etcd;
pub mod metrics;
pub mod object;
pub mod oci;
pub mod ownership;
pub mod plugin;
pub mod queue;
pub mod registry;
pub mod scaffold;
pub mod source;
pub mod store;
pub mod trust;
