//! A real etcd for tests: Debian's `etcd-server` (3.4) on free loopback ports,
//! with its data in a temporary folder, killed on drop. It can be stopped and
//! started again on the same ports and data (an outage), and compacted.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary Debian's `etcd-server` package installs.
const BINARY: &str = "/usr/bin/etcd";

/// A running etcd; `endpoint` is its `http://127.0.0.1:PORT`.
pub struct TestEtcd {
    pub endpoint: String,
    peer: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

impl TestEtcd {
    /// Start one and wait until it serves. Fails the test, saying what to
    /// install, if `etcd` is missing.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with more command-line flags (`--cert-file`
    /// makes it serve TLS: `endpoint` is then `https://127.0.0.1:PORT`).
    pub fn start_with(extra: &[&str]) -> Self {
        assert!(
            std::path::Path::new(BINARY).exists(),
            "{BINARY} is missing: these tests need a real etcd. Run `apt-get install \
             etcd-server protobuf-compiler` (or `cargo xtask test`, which installs them)"
        );
        let mut last = String::new();
        // A port found free may be taken before etcd binds it: try again.
        for _ in 0..3 {
            let scheme = if extra.iter().any(|e| e.starts_with("--cert-file")) {
                "https"
            } else {
                "http"
            };
            let mut etcd = Self {
                endpoint: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                child: None,
                dir: tempfile::tempdir().unwrap(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            match etcd.resume() {
                Ok(()) => return etcd,
                Err(why) => last = why,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// Start (again) on the same ports and data.
    pub fn resume(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new(BINARY)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &self.peer])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &format!("t={}", self.peer)])
            .args(["--initial-cluster-state", "new"])
            .args(&self.extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {BINARY}: {e}"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Kill it (the data stays, for [`resume`](Self::resume)).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Poll `/health` until it says healthy; `Err` if the process exits or it
    /// does not within 30 s.
    fn wait_ready(&mut self) -> Result<(), String> {
        if let Some(address) = self.endpoint.strip_prefix("https://") {
            // No client here trusts its certificate: wait for the log line
            // saying it serves.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !self.log().contains("serving client requests on") {
                if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                    return Err(format!("it exited ({status}): {}", self.log()));
                }
                let _ = address;
                if Instant::now() > deadline {
                    return Err(format!(
                        "{} did not serve in 30 s: {}",
                        self.endpoint,
                        self.log()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            return Ok(());
        }
        let url = format!("{}/health", self.endpoint);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("it exited ({status}): {}", self.log()));
            }
            if let Ok(mut answer) = ureq::get(&url).call()
                && answer
                    .body_mut()
                    .read_to_string()
                    .is_ok_and(|b| b.contains("\"true\""))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{url} did not answer in 30 s: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its log so far (the end of it).
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        log[log.floor_char_boundary(start)..].to_string()
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}
