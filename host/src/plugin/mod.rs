//! The plugin runtime: loading components, caching their compiled form,
//! instantiating them under limits, and the host side of the WIT contract.
//!
//! - [`Runtime`] owns the wasmtime engine, the linker with the host imports, the
//!   compile cache and the epoch ticker. Make one per process.
//! - [`Runtime::load`] turns a component file into a [`Plugin`]: it checks the
//!   file is a component of the `setpoint:reconciler` world at a supported
//!   version, compiles it (or takes it from the cache), pre-instantiates it, and
//!   calls `describe()`. A file that fails any step never becomes a `Plugin`;
//!   the [`LoadError`] says which step and what to do.
//! - [`Plugin::instance`] gives a worker its [`Instance`]: a warm instance reused
//!   across calls, or a fresh one per call, each call bounded in time and memory.
//!   A trap, a timeout or running out of memory fails that call only, and the
//!   instance it happened in is thrown away.

mod cache;
mod compat;
pub mod http;
mod imports;
mod instance;
mod limits;
mod runtime;
pub mod settings;
mod stderr;

pub use cache::{CacheOutcome, CompileCache, sha256_hex};
pub use compat::{CONTRACT_VERSION, PACKAGE, SUPPORTED_VERSIONS, WORLD};
pub use imports::object_to_wit;
pub use instance::{CallError, Instance};
pub use runtime::{LoadError, LoadReport, Plugin, Runtime};
pub use settings::{
    Capabilities, DirGrant, DirRequest, Grants, HttpCapability, HttpGrant, InstanceMode, Limits,
    RuntimeConfig, Settings,
};

/// The WIT contract as Rust types, generated from `wit/` at build time.
pub mod wit {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin-with-batch",
        exports: { default: async },
    });

    pub use self::exports::setpoint::reconciler::admission::{
        Guest as Admission, GuestIndices as AdmissionIndices,
    };
    pub use self::exports::setpoint::reconciler::batch_reconciler::{
        Guest as BatchReconciler, GuestIndices as BatchReconcilerIndices,
    };
    pub use self::exports::setpoint::reconciler::pruner::{
        Guest as Pruner, GuestIndices as PrunerIndices,
    };
    pub use self::exports::setpoint::reconciler::reconciler::{
        Guest as Reconciler, GuestIndices as ReconcilerIndices,
    };
    pub use self::setpoint::reconciler::types::{
        Action, Failure, Info, Object, Outcome, ReconcileError, Request, RetryAfter,
    };
}
