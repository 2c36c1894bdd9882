//! A watched folder of plugin components (`plugin-dir`).
//!
//! Guarantees: every `*.wasm` file in the folder is loaded as a plugin (with
//! default settings) at start; while watched, a new file is loaded, a file
//! whose contents changed is swapped in for the plugin it loaded (through the
//! registry, so the new version is validated first and a bad one leaves the
//! old serving), and a removed file's plugin is unloaded after its work in
//! flight. A file still being written is not read: a burst of events is let
//! settle for [`DEBOUNCE`], and a file whose size changes across
//! [`STABLE_AFTER`] is left for the next event. Load errors are kept by the
//! registry, as for any load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// How long a burst of file events must be quiet before the folder is read.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// A file must keep its size this long to count as written.
pub const STABLE_AFTER: Duration = Duration::from_millis(200);

/// The plugins of one folder.
pub struct PluginFolder {
    dir: PathBuf,
    registry: Arc<Registry>,
    /// Each file loaded: the controller it became, and its contents' sha256.
    loaded: BTreeMap<PathBuf, (String, String)>,
}

impl PluginFolder {
    pub fn new(dir: PathBuf, registry: Arc<Registry>) -> Self {
        Self {
            dir,
            registry,
            loaded: BTreeMap::new(),
        }
    }

    /// The component files in the folder now, sorted.
    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "wasm") && p.is_file())
            .collect();
        files.sort();
        files
    }

    /// Bring the running plugins in line with the folder.
    pub async fn sync(&mut self) {
        let files = self.files();
        for path in &files {
            let Some(bytes) = stable_contents(path).await else {
                tracing::debug!(path = %path.display(), "still being written; later");
                continue;
            };
            // A changed manifest beside the component is a new version too.
            let mut digest = Sha256::new();
            digest.update(&bytes);
            if let Ok(manifest) = tokio::fs::read(path.with_extension("toml")).await {
                digest.update(&manifest);
            }
            let sha = hex::encode(digest.finalize());
            match self.loaded.get(path).cloned() {
                Some((_, old)) if old == sha => {}
                Some((name, _)) => match self.registry.swap_path(&name, path).await {
                    Ok(_) => {
                        tracing::info!(plugin = %name, path = %path.display(), "swapped from the plugin folder");
                        self.loaded.insert(path.clone(), (name, sha));
                    }
                    Err(e) => tracing::error!(plugin = %name, "not swapped: {e}"),
                },
                None => match self.registry.load_path(path).await {
                    Ok(view) => {
                        tracing::info!(plugin = %view.name, path = %path.display(), "loaded from the plugin folder");
                        self.loaded.insert(path.clone(), (view.name, sha));
                    }
                    Err(e) => tracing::error!(path = %path.display(), "not loaded: {e}"),
                },
            }
        }
        let gone: Vec<PathBuf> = self
            .loaded
            .keys()
            .filter(|p| !files.contains(p))
            .cloned()
            .collect();
        for path in gone {
            let (name, _) = self.loaded.remove(&path).expect("listed");
            match self.registry.unload(&name).await {
                Ok(_) => tracing::info!(plugin = %name, "unloaded: its file was removed"),
                Err(e) => tracing::error!(plugin = %name, "not unloaded: {e}"),
            }
        }
    }

    /// Load the folder, then follow it until `shutdown`.
    pub async fn watch(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let _ = tx.send(event);
            })?;
        notify::Watcher::watch(&mut watcher, &self.dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", self.dir.display()))?;
        self.sync().await;
        while super::next_burst(&mut rx, DEBOUNCE, &shutdown).await {
            self.sync().await;
        }
        Ok(())
    }
}

/// The file's contents, if its size held still for [`STABLE_AFTER`].
async fn stable_contents(path: &Path) -> Option<Vec<u8>> {
    let before = tokio::fs::metadata(path).await.ok()?.len();
    tokio::time::sleep(STABLE_AFTER).await;
    let bytes = tokio::fs::read(path).await.ok()?;
    (bytes.len() as u64 == before && before > 0).then_some(bytes)
}
