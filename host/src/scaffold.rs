//! `setpoint new`: a plugin project that builds and passes its own test as it is.
//!
//! A project is self-contained: it carries the WIT contract and the SDK for its
//! language (vendored from this build of Setpoint), a `hello`-style reconciler
//! for a kind named after the project, a unit test against the SDK's fake host,
//! an example object, and a README with the build command. Nothing is written
//! if the folder exists already.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The languages `setpoint new` scaffolds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

const WIT: &str = include_str!("../../wit/reconciler.wit");
const RUST_SDK_LIB: &str = include_str!("../../sdk/rust/src/lib.rs");
const RUST_SDK_TESTING: &str = include_str!("../../sdk/rust/src/testing.rs");
const RUST_SDK_HTTP: &str = include_str!("../../sdk/rust/src/http.rs");
const PY_SDK: &[(&str, &str)] = &[
    (
        "setpoint_sdk/__init__.py",
        include_str!("../../sdk/python/setpoint_sdk/__init__.py"),
    ),
    (
        "setpoint_sdk/wasm.py",
        include_str!("../../sdk/python/setpoint_sdk/wasm.py"),
    ),
    (
        "setpoint_sdk/testing.py",
        include_str!("../../sdk/python/setpoint_sdk/testing.py"),
    ),
    (
        "setpoint_sdk/http.py",
        include_str!("../../sdk/python/setpoint_sdk/http.py"),
    ),
    (
        "setpoint_sdk/wasi_http.py",
        include_str!("../../sdk/python/setpoint_sdk/wasi_http.py"),
    ),
];
const JS_SDK: &[(&str, &str)] = &[
    (
        "setpoint-sdk/index.js",
        include_str!("../../sdk/js/index.js"),
    ),
    (
        "setpoint-sdk/index.d.ts",
        include_str!("../../sdk/js/index.d.ts"),
    ),
    ("setpoint-sdk/host.js", include_str!("../../sdk/js/host.js")),
    (
        "setpoint-sdk/testing.js",
        include_str!("../../sdk/js/testing.js"),
    ),
    (
        "setpoint-sdk/build.mjs",
        include_str!("../../sdk/js/build.mjs"),
    ),
];

/// Write a new project for `name` under `parent`. Returns its folder.
pub fn create(parent: &Path, name: &str, lang: Lang) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let dir = parent.join(name);
    if dir.exists() {
        bail!(
            "{} exists already; pick another name or remove it",
            dir.display()
        );
    }
    let kind = kind_for(name);
    let mut files: Vec<(String, String)> = vec![
        ("wit/reconciler.wit".into(), WIT.into()),
        (
            "example.yaml".into(),
            format!("kind: {kind}\nmetadata:\n  name: example\nspec:\n  who: world\n"),
        ),
    ];
    let fill = |t: &str| t.replace("{{name}}", name).replace("{{kind}}", &kind);
    match lang {
        Lang::Rust => {
            files.push(("Cargo.toml".into(), fill(RUST_CARGO)));
            files.push(("src/lib.rs".into(), fill(RUST_LIB)));
            files.push(("setpoint-sdk/Cargo.toml".into(), RUST_SDK_CARGO.into()));
            // The SDK finds the WIT beside it, not two folders up as in Setpoint's tree.
            files.push((
                "setpoint-sdk/src/lib.rs".into(),
                RUST_SDK_LIB.replace("path: \"../../wit\"", "path: \"../wit\""),
            ));
            files.push((
                "setpoint-sdk/src/testing.rs".into(),
                RUST_SDK_TESTING.into(),
            ));
            files.push(("setpoint-sdk/src/http.rs".into(), RUST_SDK_HTTP.into()));
            files.push(("README.md".into(), fill(RUST_README)));
            files.push((".gitignore".into(), "target/\n".into()));
        }
        Lang::Python => {
            files.push(("app.py".into(), fill(PY_APP)));
            files.push(("test_app.py".into(), fill(PY_TEST)));
            files.extend(PY_SDK.iter().map(|(p, t)| (p.to_string(), t.to_string())));
            files.push(("README.md".into(), fill(PY_README)));
            files.push((".gitignore".into(), "__pycache__/\n*.wasm\n".into()));
        }
        Lang::Js => {
            files.push(("plugin.js".into(), fill(JS_PLUGIN)));
            files.push(("app.js".into(), JS_APP.into()));
            files.push(("plugin.test.mjs".into(), fill(JS_TEST)));
            files.push(("package.json".into(), fill(JS_PACKAGE)));
            files.extend(JS_SDK.iter().map(|(p, t)| (p.to_string(), t.to_string())));
            files.push(("README.md".into(), fill(JS_README)));
            files.push((".gitignore".into(), "node_modules/\n*.wasm\n".into()));
        }
    }
    for (path, text) in &files {
        let path = dir.join(path);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// A project name: lower-case letters, digits and '-', starting with a letter
/// (it becomes a crate, a folder and a plugin name).
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "{name:?} is not a plugin name: use lower-case letters, digits and '-', starting \
             with a letter (e.g. `my-plugin`)"
        );
    }
    Ok(())
}

/// `my-plugin` reconciles `MyPlugin` objects.
fn kind_for(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// What to do next, printed after a project is written.
pub fn next_steps(dir: &Path, lang: Lang) -> String {
    let build = match lang {
        Lang::Rust => "cargo test && cargo build --release --target wasm32-wasip2",
        Lang::Python => {
            "python3 -m unittest && componentize-py -d wit -w plugin-with-admission componentize app -p . -o plugin.wasm"
        }
        Lang::Js => "npm install && npm test && npm run build",
    };
    format!(
        "created {}\nnext:\n  cd {}\n  {build}\n  setpoint reconcile <the .wasm> --object example.yaml\n(see its README.md)",
        dir.display(),
        dir.display()
    )
}

const RUST_CARGO: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
setpoint-sdk = { path = "setpoint-sdk" }
serde = { version = "1", features = ["derive"] }
serde_json = "1"

# A project of its own, not part of an enclosing workspace.
[workspace]

[profile.release]
opt-level = "s"
lto = true
strip = true
"#;

const RUST_SDK_CARGO: &str = r#"[package]
name = "setpoint-sdk"
description = "Write Setpoint reconcilers in Rust (vendored by `setpoint new`)"
version = "0.1.0"
edition = "2024"

[dependencies]
wit-bindgen = "0.61"
serde = { version = "1", features = ["derive"] }
serde_json = "1"
serde_path_to_error = "0.1"

[target.'cfg(target_arch = "wasm32")'.dependencies]
wasip2 = { version = "1", default-features = false }
"#;

const RUST_LIB: &str = r#"//! `{{name}}`: reconciles `{{kind}}` objects by writing a greeting into their status.

use serde::{Deserialize, Serialize};
use setpoint_sdk::{Error, Host, Info, Level, Outcome, Reconciler, Request};

#[derive(Deserialize)]
pub struct Spec {
    pub who: String,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Status {
    pub greeting: String,
}

#[derive(Default)]
pub struct Plugin;

impl Reconciler for Plugin {
    type Spec = Spec;
    type Status = Status;

    fn describe(&self) -> Info {
        Info::new("{{name}}", env!("CARGO_PKG_VERSION"), ["{{kind}}"])
    }

    fn reconcile(&self, host: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
        if req.object.deleting {
            return Ok(Outcome::done());
        }
        let greeting = format!("Hello, {}!", req.spec.who);
        host.log(Level::Info, &greeting, &[]);
        Ok(Outcome::done().with_status(Status { greeting }))
    }
}

setpoint_sdk::export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use setpoint_sdk::testing::FakeHost;
    use setpoint_sdk::{Action, Object};

    #[test]
    fn it_greets() {
        let host = FakeHost::new();
        let object = Object::new("{{kind}}", "example", json!({"who": "world"}));
        let outcome = host.reconcile(&Plugin, Action::Created, &object).unwrap();
        assert_eq!(outcome.status.unwrap().greeting, "Hello, world!");
    }
}
"#;

const RUST_README: &str = r#"# {{name}}

A Setpoint plugin in Rust: it reconciles `{{kind}}` objects.

```sh
cargo test                                          # unit tests, no Wasm
cargo build --release --target wasm32-wasip2        # target/wasm32-wasip2/release/{{name}}.wasm
setpoint reconcile target/wasm32-wasip2/release/*.wasm --object example.yaml
```

`rustup target add wasm32-wasip2` installs the target. `setpoint-sdk/` and `wit/`
are vendored from the Setpoint that made this project.
"#;

const PY_APP: &str = r#""""{{name}}: reconciles `{{kind}}` objects by writing a greeting into their status."""

from dataclasses import dataclass

from setpoint_sdk import Info, Level, Outcome, Plugin, export_all


@dataclass
class Spec:
    who: str


class Greeter(Plugin):
    Spec = Spec

    def describe(self) -> Info:
        return Info("{{name}}", "0.1.0", ["{{kind}}"])

    def reconcile(self, host, req) -> Outcome:
        if req.object.deleting:
            return Outcome.done()
        greeting = f"Hello, {req.spec.who}!"
        host.log(Level.INFO, greeting)
        return Outcome.done().with_status({"greeting": greeting})


try:
    # the classes componentize-py exports
    Reconciler, Pruner, Admission = export_all(Greeter)
except ImportError:  # plain CPython (unit tests): nothing to export to
    pass
"#;

const PY_TEST: &str = r#"import unittest

from app import Greeter
from setpoint_sdk import Action, Object
from setpoint_sdk.testing import FakeHost


class GreeterTest(unittest.TestCase):
    def test_it_greets(self):
        outcome = FakeHost().reconcile(
            Greeter(), Action.CREATED, Object("{{kind}}", "example", spec={"who": "world"}))
        self.assertEqual(outcome.status, {"greeting": "Hello, world!"})


if __name__ == "__main__":
    unittest.main()
"#;

const PY_README: &str = r#"# {{name}}

A Setpoint plugin in Python: it reconciles `{{kind}}` objects.

```sh
python3 -m unittest                                  # unit tests, no Wasm
python3 -m venv .venv && .venv/bin/pip install componentize-py==0.25.1
.venv/bin/componentize-py -d wit -w plugin-with-admission componentize app -p . -o {{name}}.wasm
setpoint reconcile {{name}}.wasm --object example.yaml
```

`setpoint_sdk/` and `wit/` are vendored from the Setpoint that made this project.
"#;

const JS_PLUGIN: &str = r#"// {{name}}: reconciles `{{kind}}` objects by writing a greeting into their status.
import { Fatal, Outcome } from './setpoint-sdk/index.js';

export const plugin = {
  describe() {
    return { name: '{{name}}', version: '0.1.0', kinds: ['{{kind}}'] };
  },
  checkSpec(spec) {
    if (typeof spec?.who !== 'string') throw new Fatal('the spec needs `who`, a string');
  },
  reconcile(host, req) {
    if (req.object.deleting) return Outcome.done();
    const greeting = `Hello, ${req.spec.who}!`;
    host.log('info', greeting);
    return Outcome.done().withStatus({ greeting });
  },
};
"#;

const JS_APP: &str = r#"// The component's entry: the plugin over the real host imports.
import { definePlugin } from './setpoint-sdk/index.js';
import { host } from './setpoint-sdk/host.js';
import { plugin } from './plugin.js';

export const { reconciler, pruner, admission } = definePlugin(plugin, host);
"#;

const JS_TEST: &str = r#"import test from 'node:test';
import assert from 'node:assert/strict';
import { FakeHost } from './setpoint-sdk/testing.js';
import { plugin } from './plugin.js';

test('it greets', () => {
  const outcome = new FakeHost().reconcile(plugin, 'created', { kind: '{{kind}}', name: 'example', spec: { who: 'world' } });
  assert.deepEqual(outcome.status, { greeting: 'Hello, world!' });
});
"#;

const JS_PACKAGE: &str = r#"{
  "name": "{{name}}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "scripts": {
    "test": "node --test",
    "build": "node setpoint-sdk/build.mjs app.js {{name}}.wasm"
  },
  "devDependencies": {
    "@bytecodealliance/componentize-js": "0.23.0"
  }
}
"#;

const JS_README: &str = r#"# {{name}}

A Setpoint plugin in JavaScript: it reconciles `{{kind}}` objects.

```sh
npm install
npm test                                             # unit tests, no Wasm
npm run build                                        # {{name}}.wasm
setpoint reconcile {{name}}.wasm --object example.yaml
```

`setpoint-sdk/` (with TypeScript declarations) and `wit/` are vendored from the
Setpoint that made this project.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_kinds_and_bad_names_are_refused() {
        assert_eq!(kind_for("my-plugin"), "MyPlugin");
        assert_eq!(kind_for("dns2"), "Dns2");
        for bad in ["", "My", "a_b", "-a", "a-", "1a"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_project_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), "p", Lang::Python).unwrap();
        let err = create(dir.path(), "p", Lang::Js).unwrap_err().to_string();
        assert!(err.contains("exists already"), "{err}");
    }
}
