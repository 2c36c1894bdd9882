//! `files`: keeps one file per `File` object in a directory the operator grants
//! (seen by the plugin as `/data`). The file's content is the spec's `content`;
//! deleting the object removes the file; `prune` removes files no object wants.
//! Status reports the path and size written.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use setpoint_sdk::{Action, Error, Host, Info, Level, Outcome, Reconciler, Request, ResultExt};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub content: String,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Status {
    pub path: String,
    pub bytes: usize,
}

/// The plugin, writing under `root` (`/data` in a component).
pub struct Files {
    pub root: PathBuf,
}

impl Default for Files {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/data"),
        }
    }
}

/// The file name for an object key `File:ns/name` (or `File:name`).
fn file_name(key: &str) -> String {
    let name = key.split_once(':').map_or(key, |(_, rest)| rest);
    name.replace('/', ".")
}

impl Reconciler for Files {
    type Spec = Spec;
    type Status = Status;

    fn describe(&self) -> Info {
        Info::new("files", env!("CARGO_PKG_VERSION"), ["File"])
    }

    fn reconcile(&self, host: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
        let path = self.root.join(file_name(&req.key));
        if req.object.deleting {
            match std::fs::remove_file(&path) {
                Ok(()) => host.log(
                    Level::Info,
                    "removed",
                    &[("path", &path.display().to_string())],
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::retry(format!(
                        "cannot remove {}: {e}",
                        path.display()
                    )));
                }
            }
            return Ok(Outcome::done());
        }
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref() != Some(req.spec.content.as_str()) {
            // Nothing changed on our side, yet the file differs: someone else
            // touched it. Say so; a full reconciliation counts it.
            if req.action == Action::Resynced {
                let what = if current.is_some() {
                    "edited"
                } else {
                    "missing"
                };
                host.report_drift(&format!("{} was {what}", path.display()));
            }
            std::fs::write(&path, &req.spec.content)
                .or_retry(&format!("cannot write {}", path.display()))?;
            host.log(
                Level::Info,
                "written",
                &[("path", &path.display().to_string())],
            );
        }
        Ok(Outcome::done().with_status(Status {
            path: path.display().to_string(),
            bytes: req.spec.content.len(),
        }))
    }

    fn prune(&self, host: &dyn Host, desired_keys: &[String]) -> Result<(), Error> {
        let wanted: Vec<String> = desired_keys.iter().map(|k| file_name(k)).collect();
        let entries = std::fs::read_dir(&self.root)
            .or_retry(&format!("cannot list {}", self.root.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wanted.contains(&name) {
                std::fs::remove_file(entry.path()).or_retry(&format!("cannot remove {name}"))?;
                host.log(Level::Info, "pruned", &[("file", &name)]);
            }
        }
        Ok(())
    }
}

setpoint_sdk::export!(Files);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use setpoint_sdk::Object;
    use setpoint_sdk::testing::FakeHost;

    fn temp_root(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("setpoint-files-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_writes_updates_and_removes_on_delete() {
        let plugin = Files {
            root: temp_root("lifecycle"),
        };
        let host = FakeHost::new();
        let mut motd = Object::new("File", "motd", json!({"content": "hi"}));
        host.reconcile(&plugin, Action::Created, &motd).unwrap();
        let path = plugin.root.join("motd");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hi");
        motd.spec = json!({"content": "hello"});
        let outcome = host.reconcile(&plugin, Action::Updated, &motd).unwrap();
        assert_eq!(outcome.status.unwrap().bytes, 5);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello");
        host.reconcile(&plugin, Action::Deleted, &motd).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn files_reports_drift_only_when_a_resync_finds_the_file_changed() {
        let plugin = Files {
            root: temp_root("drift"),
        };
        let host = FakeHost::new();
        let motd = Object::new("File", "motd", json!({"content": "hi"}));
        host.reconcile(&plugin, Action::Created, &motd).unwrap();
        host.reconcile(&plugin, Action::Resynced, &motd).unwrap();
        assert!(host.drift().is_empty(), "in line: no drift");
        std::fs::write(plugin.root.join("motd"), "edited by hand").unwrap();
        host.reconcile(&plugin, Action::Resynced, &motd).unwrap();
        assert_eq!(host.drift().len(), 1);
        assert!(
            host.drift()[0].ends_with("motd was edited"),
            "{:?}",
            host.drift()
        );
        assert_eq!(
            std::fs::read_to_string(plugin.root.join("motd")).unwrap(),
            "hi"
        );
    }

    #[test]
    fn files_prune_removes_only_strays() {
        let plugin = Files {
            root: temp_root("prune"),
        };
        let host = FakeHost::new();
        let keep = Object {
            namespace: "ns".into(),
            ..Object::new("File", "keep", json!({"content": "k"}))
        };
        host.reconcile(&plugin, Action::Created, &keep).unwrap();
        std::fs::write(plugin.root.join("stray"), "x").unwrap();
        host.prune(&plugin).unwrap();
        assert!(plugin.root.join("ns.keep").exists());
        assert!(!plugin.root.join("stray").exists());
    }

    #[test]
    fn files_refuses_an_unknown_spec_field() {
        let plugin = Files {
            root: temp_root("spec"),
        };
        let host = FakeHost::new();
        let bad = Object::new("File", "x", json!({"contents": "typo"}));
        let err = host.reconcile(&plugin, Action::Created, &bad).unwrap_err();
        assert!(err.message.contains("contents"), "{}", err.message);
    }
}
