//! Compatibility checks between a component and this host. Each check is a small
//! function whose error says what was required and what was found.

use wasmtime::Engine;
use wasmtime::component::Component;

/// The WIT package every plugin is built against.
pub const PACKAGE: &str = "setpoint:reconciler";
/// The world a plugin implements.
pub const WORLD: &str = "setpoint:reconciler/plugin";
/// The version of the WIT package in `wit/`, which this host implements.
pub const CONTRACT_VERSION: &str = "0.1.3";
/// The package versions this host accepts, as a semver requirement.
pub const SUPPORTED_VERSIONS: &str = "0.1.x (>=0.1.0, <0.2.0)";

const REQUIRED_EXPORT: &str = "setpoint:reconciler/reconciler";

/// Why a component does not fit this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The component does not export the reconciler interface at all.
    MissingExport { found: Vec<String> },
    /// It targets a version of the package this host does not support.
    UnsupportedVersion { name: String, version: String },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::MissingExport { found } => {
                let found = if found.is_empty() {
                    "nothing".to_string()
                } else {
                    found
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                write!(
                    f,
                    "it is not a Setpoint plugin: a plugin must export `{REQUIRED_EXPORT}@{CONTRACT_VERSION}` \
                     (world `{WORLD}`), and this component exports {found}. Build it against \
                     the WIT in Setpoint's `wit/` folder, e.g. with the setpoint-sdk crate"
                )
            }
            Mismatch::UnsupportedVersion { name, version } => write!(
                f,
                "it is built against {PACKAGE}@{version} (it uses `{name}`), and this host \
                 supports {PACKAGE} {SUPPORTED_VERSIONS}. Rebuild the plugin with an SDK for \
                 {PACKAGE}@0.1, or run a Setpoint host that supports {version}"
            ),
        }
    }
}

/// True if `version` is one this host accepts.
pub fn is_supported(version: &str) -> bool {
    let mut parts = version.split(['.', '-', '+']);
    matches!((parts.next(), parts.next()), (Some("0"), Some("1")))
}

/// The version part of a `setpoint:reconciler/...@version` name, if it is one.
fn package_version(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
    Some(rest.split_once('@').map_or("", |(_, v)| v))
}

/// The full name under which the component exports the package's `interface`
/// (e.g. `setpoint:reconciler/reconciler@0.1.1`); this host's own name for it
/// if the component does not export it.
pub fn export_name(
    pre: &wasmtime::component::InstancePre<super::imports::HostState>,
    engine: &Engine,
    interface: &str,
) -> String {
    let base = format!("{PACKAGE}/{interface}");
    pre.component()
        .component_type()
        .exports(engine)
        .map(|(name, _)| name)
        .find(|name| *name == base || name.starts_with(&format!("{base}@")))
        .map_or_else(|| format!("{base}@{CONTRACT_VERSION}"), str::to_string)
}

/// Check that the component exports the reconciler interface and that every
/// `setpoint:reconciler` name it uses is at a supported version.
pub fn check(component: &Component, engine: &Engine) -> Result<(), Mismatch> {
    let ty = component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let imports = ty.imports(engine).map(|(n, _)| n.to_string());
    for name in exports.iter().cloned().chain(imports) {
        if let Some(version) = package_version(&name)
            && !is_supported(version)
        {
            return Err(Mismatch::UnsupportedVersion {
                version: version.to_string(),
                name,
            });
        }
    }
    let has_reconciler = exports
        .iter()
        .any(|n| n == REQUIRED_EXPORT || n.starts_with(&format!("{REQUIRED_EXPORT}@")));
    if !has_reconciler {
        return Err(Mismatch::MissingExport { found: exports });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_0_1_versions_are_supported() {
        assert!(is_supported("0.1.0"));
        assert!(is_supported("0.1.7"));
        assert!(is_supported("0.1.0-rc.1"));
        assert!(!is_supported("0.2.0"));
        assert!(!is_supported("1.0.0"));
        assert!(!is_supported(""));
    }

    #[test]
    fn package_version_reads_only_setpoint_names() {
        assert_eq!(
            package_version("setpoint:reconciler/log@0.1.0"),
            Some("0.1.0")
        );
        assert_eq!(package_version("wasi:cli/stdout@0.2.0"), None);
        assert_eq!(package_version("setpoint:reconcilerx/a@0.1.0"), None);
    }
}
