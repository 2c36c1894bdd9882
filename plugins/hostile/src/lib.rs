//! `hostile`: a plugin that misbehaves on request, to show that the host contains
//! it. `Hostile` objects pick a `mode`:
//!
//! - `ok`: behave.
//! - `loop`: never return (the host's time limit must stop it).
//! - `oom`: allocate far past any sane memory limit.
//! - `trap`: panic, which aborts the instance.
//! - `snoop`: try to read the environment and files it was never granted, and
//!   report what it found in its status.
//! - `fail`: return a retryable error, counting attempts in its state.
//! - `requeue`: succeed and ask to be called again in `delay-ms`.
//! - `retry-after`: fail and ask to be retried in `delay-ms`.
//! - `slow`: busy-wait `delay-ms` by the host's clock, then succeed.
//! - `flaky`: fail every first attempt; succeed on the retry and ask to be called
//!   again in `delay-ms` (which then fails again, and so on).

use serde::{Deserialize, Serialize};
use setpoint_sdk::{Error, Host, Info, Outcome, Reconciler, Request};

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Spec {
    pub mode: String,
    #[serde(default)]
    pub delay_ms: u64,
}

#[derive(Serialize, Debug, Default, PartialEq)]
pub struct Status {
    pub mode: String,
    /// Environment variables seen (snoop).
    pub env: Vec<String>,
    /// Paths that could be read or listed (snoop).
    pub read: Vec<String>,
    /// The attempt this status was written on.
    pub attempt: u32,
}

#[derive(Default)]
pub struct Hostile;

fn snoop() -> Status {
    let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    let mut read = Vec::new();
    for path in [
        "/etc/passwd",
        "/etc/hostname",
        "/proc/self/environ",
        "./Cargo.toml",
        "/data",
    ] {
        if std::fs::read(path).is_ok() {
            read.push(path.to_string());
        }
    }
    for dir in ["/", ".", "/tmp", "/etc"] {
        if std::fs::read_dir(dir).is_ok() {
            read.push(format!("{dir} (listed)"));
        }
    }
    Status {
        mode: "snoop".into(),
        env,
        read,
        attempt: 0,
    }
}

impl Reconciler for Hostile {
    type Spec = Spec;
    type Status = Status;

    fn describe(&self) -> Info {
        // For the host's refusal of a version whose describe() fails.
        if std::env::var("HOSTILE_DESCRIBE").as_deref() == Ok("trap") {
            panic!("describe() trapped on purpose (HOSTILE_DESCRIBE=trap)");
        }
        Info::new("hostile", env!("CARGO_PKG_VERSION"), ["Hostile"])
    }

    fn reconcile(&self, host: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
        let status = |mode: &str| Status {
            mode: mode.into(),
            attempt: req.attempt,
            ..Status::default()
        };
        match req.spec.mode.as_str() {
            "ok" => Ok(Outcome::done().with_status(status("ok"))),
            "loop" => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("asked to trap"),
            "snoop" => Ok(Outcome::done().with_status(Status {
                attempt: req.attempt,
                ..snoop()
            })),
            "fail" => {
                let failures: u32 = req
                    .state
                    .get("failures")
                    .and_then(|f| f.parse().ok())
                    .unwrap_or(0);
                Err(Error::retry(format!(
                    "failing on purpose (attempt {}, {failures} failures in state)",
                    req.attempt
                ))
                .with_state("failures", (failures + 1).to_string()))
            }
            "retry-after" => Err(Error::retry_after(
                std::time::Duration::from_millis(req.spec.delay_ms),
                format!(
                    "retry me in {} ms (attempt {})",
                    req.spec.delay_ms, req.attempt
                ),
            )),
            "flaky" if req.attempt == 0 => Err(Error::retry("flaky: first attempts fail")),
            "flaky" => Ok(Outcome::done()
                .with_status(status("flaky"))
                .requeue_after(std::time::Duration::from_millis(req.spec.delay_ms))),
            "slow" => {
                let until = host.now_ms() + req.spec.delay_ms;
                while host.now_ms() < until {
                    std::hint::spin_loop();
                }
                Ok(Outcome::done().with_status(status("slow")))
            }
            "requeue" => Ok(Outcome::done()
                .with_status(status("requeue"))
                .requeue_after(std::time::Duration::from_millis(req.spec.delay_ms))),
            other => Err(Error::fatal(format!(
                "unknown mode {other:?}: use ok, loop, oom, trap, snoop, fail, requeue, retry-after, slow or flaky"
            ))),
        }
    }
}

setpoint_sdk::export!(Hostile);
