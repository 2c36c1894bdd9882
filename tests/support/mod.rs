//! Helpers for end-to-end tests: the real `setpoint` binary of this build and the
//! example plugins.

#![allow(dead_code)]

#[path = "../../host/tests/common/oci.rs"]
pub mod oci;

#[path = "../../host/tests/common/etcd.rs"]
pub mod etcd;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The folder of example plugin components.
pub fn plugin_dir() -> PathBuf {
    std::env::var_os("SETPOINT_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/plugins"))
}

/// One example plugin; fails with what to do if it was not built.
pub fn plugin(name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask plugins` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// A `setpoint` command (the binary cargo built for these tests) with its own
/// compile cache in `cache`.
pub fn setpoint(cache: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_setpoint"));
    cmd.env("XDG_CACHE_HOME", cache)
        .env("XDG_DATA_HOME", cache.join("data"))
        .env_remove("SETPOINT_SERVER")
        .env_remove("SETPOINT_TOKEN")
        .env("SETPOINT_PLUGIN_DIR", plugin_dir())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// stdout and stderr of a finished command, as text.
pub fn texts(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A running `setpoint run` whose log lines can be waited for. Its working
/// folder, compile cache and default store live under `home`.
pub struct Daemon {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub log: Vec<String>,
    /// Kept alive for daemons made by [`Daemon::start`].
    _home: Option<tempfile::TempDir>,
}

impl Daemon {
    /// `setpoint run --listen 127.0.0.1:0 ARGS` in a fresh temporary home.
    pub fn start(args: &[&str]) -> Self {
        let home = tempfile::tempdir().unwrap();
        let mut daemon = Self::start_in(home.path(), args);
        daemon._home = Some(home);
        daemon
    }

    /// `setpoint run --listen 127.0.0.1:0 ARGS` in `home`, which outlives it.
    pub fn start_in(home: &Path, args: &[&str]) -> Self {
        let mut child = setpoint(&home.join("cache"))
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(home)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            log: Vec::new(),
            _home: None,
        }
    }

    /// Wait for a log line containing `needle`, and return it. Each line is
    /// looked at once (a daemon under load logs a line per reconcile).
    pub fn wait_for(&mut self, needle: &str) -> String {
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.log.push(line);
                    if found {
                        return self.log.last().unwrap().clone();
                    }
                }
                Err(_) => panic!("no {needle:?} in the log: {:#?}", self.log),
            }
        }
    }

    /// The API's base URL, from the log.
    pub fn url(&mut self) -> String {
        let line = self.wait_for("api listening on ");
        let rest = line.split("api listening on ").nth(1).unwrap();
        rest.split_whitespace().next().unwrap().to_string()
    }

    /// SIGINT, then wait for a clean exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        let killed = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        self.wait_for("shutting down");
        self.child.wait().unwrap()
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer: status and body.
pub struct Http {
    pub status: u16,
    pub body: String,
}

impl Http {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP request with a real client; any status is returned.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Http {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut response = match body {
        Some(body) => agent.run(request.body(body.as_bytes().to_vec()).unwrap()),
        None => agent.run(request.body(()).unwrap()),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    Http {
        status: response.status().as_u16(),
        body: response.body_mut().read_to_string().unwrap(),
    }
}

/// `POST {url}/v1/apply` with a YAML body, expecting 200.
pub fn apply_ok(url: &str, yaml: &str) {
    let answer = http(
        "POST",
        &format!("{url}/v1/apply"),
        &[("Content-Type", "application/yaml")],
        Some(yaml),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// Poll `check` until it holds, failing after `limit` with `what`. For waiting
/// on a separate process, where no clock can be paused.
pub fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
