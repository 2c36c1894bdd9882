//! Retry timing and the dequeue policy.
//!
//! - [`Backoff`]: how long to wait after the n-th failure in a row. Exponential
//!   (`min * 2^(n-1)`, capped at `max`, shortened at random by up to `jitter` so
//!   keys that failed together do not retry together, never below `min`) or linear
//!   (`base * n`, capped at `max`, as in Cilium's controller package).
//! - [`DequeuePolicy`]: whether a new event for a key replaces that key's pending
//!   retry, or the retry stays and the event waits for it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::object::Action;

/// Delays between retries of one key.
#[derive(Clone, Debug, PartialEq)]
pub enum Backoff {
    Exponential {
        min: Duration,
        max: Duration,
        /// The largest fraction (0.0–1.0) taken off a delay at random.
        jitter: f64,
    },
    Linear {
        base: Duration,
        max: Duration,
    },
}

impl Backoff {
    /// Exponential back-off with 10 % jitter.
    pub fn exponential(min: Duration, max: Duration) -> Self {
        Backoff::Exponential {
            min,
            max,
            jitter: 0.1,
        }
    }

    /// The same back-off without jitter, for callers that want it exact.
    pub fn without_jitter(self) -> Self {
        match self {
            Backoff::Exponential { min, max, .. } => Backoff::Exponential {
                min,
                max,
                jitter: 0.0,
            },
            linear => linear,
        }
    }

    /// The delay after `failures` failures in a row (the first failure is 1).
    pub fn delay(&self, failures: u32) -> Duration {
        match *self {
            Backoff::Exponential { min, max, jitter } => {
                let exponent = failures.saturating_sub(1).min(31);
                let base = min.checked_mul(1 << exponent).unwrap_or(max).min(max);
                if jitter <= 0.0 {
                    return base;
                }
                let cut = base.mul_f64(jitter.min(1.0) * fastrand::f64());
                base.saturating_sub(cut).max(min)
            }
            Backoff::Linear { base, max } => {
                base.checked_mul(failures.max(1)).unwrap_or(max).min(max)
            }
        }
    }
}

/// Whether a new event for a key replaces its pending retry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DequeuePolicy {
    /// After reference 003's opinionated policy: a delete, or an event carrying a
    /// newer generation of the object, replaces the retry; any other event (a
    /// resync, a label change) keeps it.
    #[default]
    Opinionated,
    /// Every new event replaces the pending retry.
    Always,
    /// A pending retry is never replaced; new events wait for it.
    Never,
}

/// The event a pending retry was for, or a new event: its action and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRef {
    pub action: Action,
    pub generation: u64,
}

impl DequeuePolicy {
    /// True if `new` replaces the pending retry of `retry`.
    pub fn replaces(self, new: EventRef, retry: EventRef) -> bool {
        match self {
            DequeuePolicy::Always => true,
            DequeuePolicy::Never => false,
            DequeuePolicy::Opinionated => {
                new.action == Action::Deleted || new.generation > retry.generation
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_from_min_and_stops_at_max() {
        let b = Backoff::exponential(100 * MS, 1000 * MS).without_jitter();
        let delays: Vec<_> = (1..=6).map(|n| b.delay(n)).collect();
        assert_eq!(
            delays,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(b.delay(u32::MAX), 1000 * MS);
    }

    #[test]
    fn backoff_jitter_stays_between_min_and_the_exact_delay() {
        let b = Backoff::Exponential {
            min: 100 * MS,
            max: 10_000 * MS,
            jitter: 0.5,
        };
        let exact = b.clone().without_jitter();
        let mut seen_shorter = false;
        for n in 1..10 {
            for _ in 0..50 {
                let d = b.delay(n);
                let e = exact.delay(n);
                assert!(d <= e && d >= (e / 2).max(100 * MS), "{d:?} vs {e:?}");
                seen_shorter |= d < e;
            }
        }
        assert!(seen_shorter, "jitter shortens some delays");
    }

    #[test]
    fn backoff_linear_grows_by_base_and_stops_at_max() {
        let b = Backoff::Linear {
            base: MS * 500,
            max: MS * 1200,
        };
        let delays: Vec<_> = (1..=4).map(|n| b.delay(n)).collect();
        assert_eq!(delays, [500 * MS, 1000 * MS, 1200 * MS, 1200 * MS]);
    }

    fn ev(action: Action, generation: u64) -> EventRef {
        EventRef { action, generation }
    }

    #[test]
    fn dequeue_opinionated_replaces_a_retry_on_delete_or_newer_generation() {
        let p = DequeuePolicy::Opinionated;
        let retry = ev(Action::Updated, 3);
        assert!(
            p.replaces(ev(Action::Deleted, 3), retry),
            "a delete replaces"
        );
        assert!(
            p.replaces(ev(Action::Updated, 4), retry),
            "a newer generation replaces"
        );
        assert!(
            !p.replaces(ev(Action::Updated, 3), retry),
            "the same generation keeps"
        );
        assert!(
            !p.replaces(ev(Action::Resynced, 3), retry),
            "a resync keeps"
        );
        assert!(p.replaces(ev(Action::Updated, 4), ev(Action::Resynced, 3)));
    }

    #[test]
    fn dequeue_always_and_never_do_what_they_say() {
        let retry = ev(Action::Updated, 3);
        assert!(DequeuePolicy::Always.replaces(ev(Action::Resynced, 3), retry));
        assert!(!DequeuePolicy::Never.replaces(ev(Action::Deleted, 9), retry));
    }
}
