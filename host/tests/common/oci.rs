//! A real OCI registry for tests: Debian's `docker-registry` (distribution
//! 2.8) on a free loopback port, storing into a temporary folder, stopped on
//! drop. Shared by the host's tests and the end-to-end ones.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary Debian's `docker-registry` package installs.
const BINARY: &str = "/usr/bin/docker-registry";

/// A running registry; `host` is its `127.0.0.1:PORT`.
pub struct TestRegistry {
    pub host: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Start one and wait until `GET /v2/` answers. Fails the test, saying
    /// what to install, if `docker-registry` is missing.
    pub fn start() -> Self {
        assert!(
            std::path::Path::new(BINARY).exists(),
            "{BINARY} is missing: these tests need a real OCI registry. Run `apt-get install \
             docker-registry` (or `cargo xtask test`, which installs it)"
        );
        let mut last = String::new();
        // A port found free may be taken before the registry binds it: try again.
        for _ in 0..3 {
            match Self::try_start() {
                Ok(registry) => return registry,
                Err(why) => last = why,
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {host}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(BINARY)
            .args(["serve", config.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {BINARY}: {e}"))?;
        let mut registry = Self { host, child, dir };
        registry.wait_ready()?;
        Ok(registry)
    }

    /// Poll `GET /v2/` until it answers 200; `Err` if the process exits or
    /// it does not answer within 30 s.
    fn wait_ready(&mut self) -> Result<(), String> {
        let url = format!("http://{}/v2/", self.host);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("it exited ({status}): {}", self.log()));
            }
            if ureq::get(&url).call().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{url} did not answer in 30 s: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `oci://127.0.0.1:PORT/PATH`.
    pub fn reference(&self, path: &str) -> String {
        format!("oci://{}/{path}", self.host)
    }

    /// Where it stores its data.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
