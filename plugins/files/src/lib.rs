//! `files`: keeps one file per `File` object in a directory the operator grants
//! (seen by the plugin as `/data`). The file's content is the spec's `content`;
//! deleting the object removes the file; `prune` removes files no object wants.
//! Status reports the path and size written.
//!
//! Layout: one folder per namespace, one file per object, `/data/<namespace>/<name>`.
//! Objects in the default (empty) namespace live in `/data/_default/`, a name no
//! namespace can have (`_` is not allowed in one, and is escaped here). Names and
//! namespaces are escaped so the mapping stays one-to-one whatever the host
//! sends: every byte other than `a-z`, `0-9`, `-` and `.` becomes `%XX`, as do the
//! names `.` and `..`, and an empty name becomes `_`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

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

/// The folder for objects of the default (empty) namespace. No escaped
/// namespace can be this: `escape` never leaves a `_` in its output except for
/// the empty string, which it turns into `_` alone.
const DEFAULT_NAMESPACE_FOLDER: &str = "_default";

/// One path segment for a name or namespace: `a-z`, `0-9`, `-` and `.` are kept,
/// every other byte becomes `%XX` (so `/`, `\`, `%`, `_`, upper case and
/// control characters cannot escape the folder or collide), `.` and `..` become
/// `%2E` and `%2E%2E`, and the empty string becomes `_`. One-to-one: decoding
/// `%XX` back gives the input.
fn escape(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    let dots = s == "." || s == "..";
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' if !dots => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The folder for a namespace.
fn folder(namespace: &str) -> String {
    if namespace.is_empty() {
        DEFAULT_NAMESPACE_FOLDER.into()
    } else {
        escape(namespace)
    }
}

/// The (folder, file) an object key `File:ns/name` (or `File:name` in the
/// default namespace) maps to, relative to the root.
fn place(key: &str) -> (String, String) {
    let rest = key.split_once(':').map_or(key, |(_, rest)| rest);
    let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
    (folder(namespace), escape(name))
}

/// Remove a file, treating one that is already gone as removed.
fn remove(path: &Path) -> Result<bool, Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::retry(format!(
            "cannot remove {}: {e}",
            path.display()
        ))),
    }
}

impl Reconciler for Files {
    type Spec = Spec;
    type Status = Status;

    fn describe(&self) -> Info {
        Info::new("files", env!("CARGO_PKG_VERSION"), ["File"])
    }

    fn reconcile(&self, host: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
        let (folder, file) = place(&req.key);
        let dir = self.root.join(folder);
        let path = dir.join(file);
        if req.object.deleting {
            if remove(&path)? {
                host.log(
                    Level::Info,
                    "removed",
                    &[("path", &path.display().to_string())],
                );
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
            std::fs::create_dir_all(&dir).or_retry(&format!("cannot create {}", dir.display()))?;
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
        let wanted: HashSet<(String, String)> = desired_keys.iter().map(|k| place(k)).collect();
        let entries = std::fs::read_dir(&self.root)
            .or_retry(&format!("cannot list {}", self.root.display()))?;
        for entry in entries.flatten() {
            let folder = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            // Not following links: a link is removed, never what it points to.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir {
                // Only folders belong at the top (a file here is a stray, or
                // left over from the flat layout of files 0.1).
                if remove(&path)? {
                    host.log(Level::Info, "pruned", &[("file", &folder)]);
                }
                continue;
            }
            let files =
                std::fs::read_dir(&path).or_retry(&format!("cannot list {}", path.display()))?;
            for file in files.flatten() {
                let name = file.file_name().to_string_lossy().into_owned();
                // A folder inside a namespace folder is nothing this plugin
                // writes, nor a file: leave it.
                if file.file_type().is_ok_and(|t| t.is_dir())
                    || wanted.contains(&(folder.clone(), name.clone()))
                {
                    continue;
                }
                if remove(&file.path())? {
                    host.log(
                        Level::Info,
                        "pruned",
                        &[("file", &format!("{folder}/{name}"))],
                    );
                }
            }
            // Tidy a namespace folder left empty; one that still holds
            // something (or gains a file meanwhile) stays.
            let _ = std::fs::remove_dir(&path);
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
        let path = plugin.root.join("_default/motd");
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
        std::fs::write(plugin.root.join("_default/motd"), "edited by hand").unwrap();
        host.reconcile(&plugin, Action::Resynced, &motd).unwrap();
        assert_eq!(host.drift().len(), 1);
        assert!(
            host.drift()[0].ends_with("motd was edited"),
            "{:?}",
            host.drift()
        );
        assert_eq!(
            std::fs::read_to_string(plugin.root.join("_default/motd")).unwrap(),
            "hi"
        );
    }

    fn in_namespace(namespace: &str, name: &str, content: &str) -> Object {
        Object {
            namespace: namespace.into(),
            ..Object::new("File", name, json!({ "content": content }))
        }
    }

    #[test]
    fn files_prune_removes_only_strays() {
        let plugin = Files {
            root: temp_root("prune"),
        };
        let host = FakeHost::new();
        let keep = in_namespace("ns", "keep", "k");
        host.reconcile(&plugin, Action::Created, &keep).unwrap();
        std::fs::write(plugin.root.join("stray"), "x").unwrap();
        std::fs::write(plugin.root.join("ns/stray"), "x").unwrap();
        host.prune(&plugin).unwrap();
        assert!(plugin.root.join("ns/keep").exists());
        assert!(!plugin.root.join("stray").exists());
        assert!(!plugin.root.join("ns/stray").exists());
    }

    /// `File a.b` in the default namespace and `File b` in namespace `a` were
    /// both `/data/a.b`: deleting one removed the other's file.
    #[test]
    fn files_keeps_a_dotted_name_and_a_namespaced_name_apart() {
        let plugin = Files {
            root: temp_root("injective"),
        };
        let host = FakeHost::new();
        let dotted = in_namespace("", "a.b", "default a.b");
        let namespaced = in_namespace("a", "b", "a/b");
        let written = |o: &Object| {
            let outcome = host.reconcile(&plugin, Action::Created, o).unwrap();
            PathBuf::from(outcome.status.unwrap().path)
        };
        let dotted_path = written(&dotted);
        let namespaced_path = written(&namespaced);

        host.reconcile(&plugin, Action::Deleted, &dotted).unwrap();
        host.remove(&dotted);
        assert!(!dotted_path.exists());
        assert_eq!(
            std::fs::read_to_string(&namespaced_path).ok().as_deref(),
            Some("a/b"),
            "deleting a.b left a/b's file alone"
        );
        assert_eq!(dotted_path, plugin.root.join("_default/a.b"));
        assert_eq!(namespaced_path, plugin.root.join("a/b"));
        host.prune(&plugin).unwrap();
        assert!(namespaced_path.exists(), "prune kept a/b's file");
        assert!(
            !plugin.root.join("_default").exists(),
            "prune removed the emptied folder"
        );
    }

    #[test]
    fn files_prune_leaves_other_namespaces_files() {
        let plugin = Files {
            root: temp_root("prune-namespaces"),
        };
        let host = FakeHost::new();
        for (ns, name) in [("", "x"), ("one", "x"), ("two", "x"), ("two", "y")] {
            host.reconcile(&plugin, Action::Created, &in_namespace(ns, name, "c"))
                .unwrap();
        }
        let gone = in_namespace("two", "y", "c");
        host.remove(&gone);
        std::fs::create_dir(plugin.root.join("one/nested")).unwrap();
        host.prune(&plugin).unwrap();
        for kept in ["_default/x", "one/x", "two/x", "one/nested"] {
            assert!(plugin.root.join(kept).exists(), "{kept} was kept");
        }
        assert!(!plugin.root.join("two/y").exists());
    }

    #[test]
    fn files_escapes_what_a_name_could_use_to_leave_its_folder_or_collide() {
        assert_eq!(place("File:motd"), ("_default".into(), "motd".into()));
        assert_eq!(place("File:a/b.c-d"), ("a".into(), "b.c-d".into()));
        assert_eq!(place("File:../.."), ("%2E%2E".into(), "%2E%2E".into()));
        assert_eq!(place("File:./."), ("%2E".into(), "%2E".into()));
        assert_eq!(place("File:a/b/c"), ("a".into(), "b%2Fc".into()));
        assert_eq!(place("File:_default/x").0, "%5Fdefault");
        assert_eq!(place("File:"), ("_default".into(), "_".into()));
        assert_eq!(escape("Motd"), "%4Dotd");
        assert_eq!(escape("a\\b"), "a%5Cb");
        assert_eq!(escape("%2e"), "%252e");
        assert_eq!(escape("ü"), "%C3%BC");
        // One to one: distinct inputs, distinct segments.
        let inputs = [
            "", "_", ".", "..", "%2E", "%2E%2E", "%", "%25", "a", "A", "%41",
        ];
        let outputs: HashSet<String> = inputs.iter().map(|s| escape(s)).collect();
        assert_eq!(outputs.len(), inputs.len(), "{outputs:?}");
        for out in &outputs {
            assert!(!out.contains('/') && out != "." && out != ".." && out != "_default");
        }

        let plugin = Files {
            root: temp_root("escape"),
        };
        let host = FakeHost::new();
        let sneaky = in_namespace("..", "..", "inside");
        let outcome = host.reconcile(&plugin, Action::Created, &sneaky).unwrap();
        let path = plugin.root.join("%2E%2E/%2E%2E");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "inside");
        assert_eq!(
            outcome.status.unwrap().path,
            path.display().to_string(),
            "status names the escaped path"
        );
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
