//! What the registry is asked to load: a [`PluginSpec`], the component's path
//! with everything its manifest (or the daemon's configuration) says about
//! it, and the checks that hold a loaded version to that manifest.
//!
//! Guarantee: [`Expect::check`] passes only a version whose sha256, version
//! and kinds are the ones pinned, and names the first that is not.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::controller::Engine;
use crate::plugin::{Capabilities, Grants, Plugin, Settings};

/// A plugin to load or swap in.
#[derive(Clone)]
pub struct PluginSpec {
    /// The component file.
    pub path: PathBuf,
    /// How its instances are made, and its controller's name
    /// ([`Settings::name`]; `None`: what `describe()` says).
    pub settings: Settings,
    /// Its controller's engine settings (a swap keeps the running ones).
    pub engine: Engine,
    /// What a loaded version must be.
    pub expect: Expect,
    /// What the plugin's manifest asks to be granted. `None` (no manifest
    /// section): it gets [`Settings::grants`] as they are.
    pub capabilities: Option<Capabilities>,
    /// What the operator granted this plugin alongside its settings (an
    /// inline `[[plugin]]` table's `grants`), used when the registry's own
    /// table has no entry for it.
    pub granted: Option<Grants>,
}

impl PluginSpec {
    /// A component with default settings and no manifest.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            settings: Settings::default(),
            engine: Engine::default(),
            expect: Expect::default(),
            capabilities: None,
            granted: None,
        }
    }
}

/// Pins a manifest puts on the component it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expect {
    /// The manifest's name: what a signature covers, with `sha256` and
    /// `version` (the name the plugin runs under is [`Settings::name`]).
    pub name: Option<String>,
    /// The component's sha256, in hex.
    pub sha256: Option<String>,
    /// The version its `describe()` must give.
    pub version: Option<String>,
    /// The kinds its `describe()` must list (in any order). Known before the
    /// component loads, so the objects of a plugin that fails to load wait for
    /// it instead of being refused.
    pub kinds: Option<Vec<String>>,
}

impl Expect {
    /// `Err` if the component's bytes are not the pinned ones.
    pub fn check_sha256(&self, path: &std::path::Path, sha256: &str) -> Result<(), String> {
        match &self.sha256 {
            Some(pin) if !pin.eq_ignore_ascii_case(sha256) => Err(format!(
                "{} has sha256 {sha256}, but its manifest pins {pin}: the file is not the one \
                 the manifest was written for. Check where it came from, or update the pin",
                path.display()
            )),
            _ => Ok(()),
        }
    }

    /// `Err` if the loaded plugin is not the version or kinds pinned.
    pub fn check(&self, plugin: &Plugin) -> Result<(), String> {
        let info = plugin.info();
        let path = plugin.report().path.display();
        if let Some(want) = &self.version
            && want != &info.version
        {
            return Err(format!(
                "{path} says it is version {}, but its manifest says {want}: update the manifest \
                 or load the matching build",
                info.version
            ));
        }
        if let Some(want) = &self.kinds {
            let sorted = |kinds: &[String]| {
                let mut kinds = kinds.to_vec();
                kinds.sort();
                kinds
            };
            if sorted(want) != sorted(&info.kinds) {
                return Err(format!(
                    "{path} reconciles {:?}, but its manifest says {:?}: update the manifest's \
                     `kinds`",
                    info.kinds, want
                ));
            }
        }
        Ok(())
    }
}

/// The operator's grants, by plugin name.
pub type GrantTable = BTreeMap<String, Grants>;
