//! A watched set of manifest files and folders (`.yaml`, `.yml`, `.json`).
//!
//! Guarantees:
//! - [`Manifests::sync`] applies every object in the files, one file per
//!   transaction, and deletes the objects that came from these files but are in
//!   none of them any more (a removed file, or a document removed from one).
//! - A file that cannot be read or parsed, or names a kind no plugin reconciles,
//!   is reported and changes nothing: its objects are neither applied nor deleted.
//!   Half-written files therefore never delete anything.
//! - Which object came from which file is kept in the store, so a file removed
//!   while the daemon was down is noticed at the next start.
//! - [`Manifests::watch`] syncs again after every burst of file-system events
//!   (debounced by [`DEBOUNCE`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio_util::sync::CancellationToken;

use crate::controller::KnownKinds;
use crate::object::{Object, ObjectKey, parse_all};
use crate::store::Store;

/// How long the folder must be quiet before a sync.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// The store's key-value space that records each object's source file.
const ORIGIN: &str = "@manifests";

/// What one sync did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub applied: usize,
    pub deleted: Vec<ObjectKey>,
    /// Files refused, with why.
    pub errors: Vec<(PathBuf, String)>,
}

/// The manifest paths and where their objects go.
pub struct Manifests {
    paths: Vec<PathBuf>,
    store: Store,
    kinds: Arc<dyn KnownKinds>,
}

impl Manifests {
    /// `kinds`: the kinds some plugin stands for, asked at every read; files
    /// with others are refused.
    pub fn new(paths: Vec<PathBuf>, store: Store, kinds: Arc<dyn KnownKinds>) -> Self {
        Self {
            paths,
            store,
            kinds,
        }
    }

    /// Every manifest file under the paths, in order.
    fn files(&self) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in self.paths.iter().filter(|p| p.exists()) {
            match manifest_files(path) {
                Ok(found) => files.extend(found),
                Err(e) => errors.push((path.clone(), format!("cannot read the folder: {e}"))),
            }
        }
        files.sort();
        (files, errors)
    }

    /// Apply the files as they are now; delete what they no longer hold.
    pub fn sync(&self) -> SyncReport {
        let mut report = SyncReport::default();
        let (files, errors) = self.files();
        report.errors = errors;
        // Where each stored object came from, as recorded by earlier syncs.
        let recorded: BTreeMap<String, String> = self
            .store
            .kv_keys(ORIGIN, "")
            .into_iter()
            .filter_map(|k| {
                let file = self.store.kv_get(ORIGIN, &k)?;
                Some((k, String::from_utf8_lossy(&file).into_owned()))
            })
            .collect();
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        let mut failed: BTreeSet<String> = BTreeSet::new();
        for file in &files {
            let name = file.display().to_string();
            match self.read(file) {
                Ok(objects) => {
                    let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
                    if let Some(dup) = keys.iter().find(|k| wanted.contains_key(*k)) {
                        report.errors.push((
                            file.clone(),
                            format!(
                                "{dup} is also in {}; an object belongs to one file",
                                wanted[dup]
                            ),
                        ));
                        failed.insert(name);
                        continue;
                    }
                    match self.store.apply_all(objects) {
                        Ok(applied) => {
                            report.applied += applied.iter().filter(|a| a.action.is_some()).count();
                            for k in keys {
                                wanted.insert(k, name.clone());
                            }
                        }
                        Err(e) => {
                            report.errors.push((file.clone(), e.to_string()));
                            failed.insert(name);
                        }
                    }
                }
                Err(e) => {
                    report.errors.push((file.clone(), e));
                    failed.insert(name);
                }
            }
        }
        // A file in error keeps its objects: it may be half-written.
        for (key, file) in &recorded {
            if wanted.contains_key(key) || failed.contains(file) {
                continue;
            }
            let Ok(parsed) = key.parse::<ObjectKey>() else {
                continue;
            };
            match self.store.delete(&parsed, None) {
                Ok(_) | Err(crate::store::StoreError::NotFound(_)) => {
                    let _ = self.store.kv_delete(ORIGIN, key);
                    report.deleted.push(parsed);
                }
                Err(e) => report
                    .errors
                    .push((PathBuf::from(file), format!("cannot delete {key}: {e}"))),
            }
        }
        for (key, file) in wanted {
            if recorded.get(&key) != Some(&file) {
                let _ = self.store.kv_set(ORIGIN, &key, file.into_bytes());
            }
        }
        report
    }

    fn read(&self, file: &Path) -> Result<Vec<Object>, String> {
        let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read it: {e}"))?;
        let objects = parse_all(&text).map_err(|e| e.to_string())?;
        let kinds = self.kinds.kinds();
        if let Some(o) = objects.iter().find(|o| !kinds.contains_key(&o.kind)) {
            return Err(format!(
                "{} is of kind {:?}, which no loaded plugin reconciles",
                o.key(),
                o.kind
            ));
        }
        Ok(objects)
    }

    /// Sync now, then again after every burst of changes, until `shutdown`.
    pub async fn watch(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let _ = tx.send(event);
            })?;
        for path in &self.paths {
            // A file is watched through its folder: editors replace files by renaming.
            let dir = if path.is_dir() {
                path.clone()
            } else {
                path.parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            };
            watcher
                .watch(&dir, notify::RecursiveMode::NonRecursive)
                .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
        }
        self.log(self.sync());
        while super::next_burst(&mut rx, DEBOUNCE, &shutdown).await {
            self.log(self.sync());
        }
        Ok(())
    }

    fn log(&self, report: SyncReport) {
        for (file, why) in &report.errors {
            tracing::error!(file = %file.display(), "manifest not applied: {why}");
        }
        if report.applied > 0 || !report.deleted.is_empty() {
            tracing::info!(
                applied = report.applied,
                deleted = report.deleted.len(),
                "manifests synced"
            );
        }
    }
}

/// A manifest file: `.yaml`, `.yml` or `.json`.
/// The manifest files of `path`: a folder's `.yaml`/`.yml`/`.json` files,
/// sorted, or the file itself.
pub fn manifest_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if is_manifest(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(name: &str, who: &str) -> String {
        format!("kind: Greeting\nmetadata:\n  name: {name}\nspec:\n  who: {who}\n")
    }

    fn rig(dir: &Path, store: &Store) -> Manifests {
        Manifests::new(
            vec![dir.to_path_buf()],
            store.clone(),
            Arc::new(BTreeSet::from(["Greeting".to_string()])),
        )
    }

    #[test]
    fn sync_applies_files_and_deletes_what_a_removed_file_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new();
        std::fs::write(dir.path().join("a.yaml"), greeting("a", "x")).unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            format!("{}---\n{}", greeting("b", "y"), greeting("c", "z")),
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let report = rig(dir.path(), &store).sync();
        assert_eq!((report.applied, report.errors.len()), (3, 0), "{report:?}");

        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), greeting("b", "y2")).unwrap();
        let report = rig(dir.path(), &store).sync();
        let mut deleted: Vec<String> = report.deleted.iter().map(|k| k.to_string()).collect();
        deleted.sort();
        assert_eq!(deleted, vec!["Greeting:a", "Greeting:c"]);
        assert_eq!(report.applied, 1);
        assert_eq!(store.keys("Greeting").len(), 1);
    }

    #[test]
    fn a_broken_file_changes_nothing_and_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, greeting("a", "x")).unwrap();
        rig(dir.path(), &store).sync();
        std::fs::write(&file, "kind: Greeting\nmetadata: [half-writ").unwrap();
        let report = rig(dir.path(), &store).sync();
        assert_eq!(report.errors.len(), 1);
        assert!(report.deleted.is_empty());
        assert_eq!(store.keys("Greeting").len(), 1);
    }

    #[test]
    fn a_file_with_a_kind_no_plugin_reconciles_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new();
        std::fs::write(
            dir.path().join("a.yaml"),
            format!(
                "{}---\nkind: Nope\nmetadata: {{name: n}}\n",
                greeting("a", "x")
            ),
        )
        .unwrap();
        let report = rig(dir.path(), &store).sync();
        assert!(
            report.errors[0].1.contains("no loaded plugin reconciles"),
            "{report:?}"
        );
        assert!(store.keys("Greeting").is_empty());
    }
}
