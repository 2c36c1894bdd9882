//! Exponential back-off: `min * 2^(failures-1)`, capped at `max`, then shortened by
//! up to `jitter` (a fraction) at random so keys that failed together do not all
//! retry together. The jitter never takes a delay below `min`.

use std::time::Duration;

use crate::config::RetryConfig;

/// Delays between retries of one key.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    /// The largest fraction (0.0–1.0) taken off a delay at random.
    pub jitter: f64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            jitter: 0.1,
        }
    }

    /// The back-off without jitter, for tests and for callers that want it exact.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = 0.0;
        self
    }

    /// The delay after `failures` failures in a row (the first failure is 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(63);
        let factor = 1u64 << exponent;
        let base = self
            .min
            .checked_mul(u32::try_from(factor).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        if self.jitter <= 0.0 {
            return base;
        }
        let cut = base.mul_f64(self.jitter.min(1.0) * fastrand::f64());
        base.saturating_sub(cut).max(self.min)
    }
}

impl From<&RetryConfig> for Backoff {
    fn from(c: &RetryConfig) -> Self {
        Self::new(c.min_backoff, c.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_from_min_and_stops_at_max() {
        let b = Backoff::new(100 * MS, 1000 * MS).without_jitter();
        let delays: Vec<_> = (1..=6).map(|n| b.delay(n)).collect();
        assert_eq!(
            delays,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(b.delay(u32::MAX), 1000 * MS);
    }

    #[test]
    fn backoff_jitter_stays_between_min_and_the_exact_delay() {
        let b = Backoff {
            jitter: 0.5,
            ..Backoff::new(100 * MS, 10_000 * MS)
        };
        for n in 1..10 {
            let exact = b.clone().without_jitter().delay(n);
            for _ in 0..50 {
                let d = b.delay(n);
                assert!(
                    d <= exact && d >= (exact / 2).max(100 * MS),
                    "{d:?} vs {exact:?}"
                );
            }
        }
    }
}
