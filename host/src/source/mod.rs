//! Event sources beyond the store's own change feed and the HTTP API (which
//! lives in [`crate::api`], CloudEvents included).
//!
//! - [`manifests`]: a watched set of manifest files and folders.
//! - [`plugins`]: a watched folder of plugin components.

pub mod manifests;
pub mod plugins;
