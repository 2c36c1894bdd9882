//! The delay scheduler: keys due at a point in time, for requeue-after and retry
//! back-off.
//!
//! - Deadlines are rounded up to the scheduler's resolution, so a key never fires
//!   early, and keys due within one resolution step fire together.
//! - For one key the earliest deadline wins: scheduling a later one keeps the
//!   earlier, scheduling an earlier one moves the key forward.
//! - At most `capacity` keys are pending; past that, scheduling answers
//!   [`SchedulerFull`] and the caller decides (nothing is dropped silently).
//!
//! It is built for a million pending timers. Each timer costs one hash-map entry
//! (the key and its tick) and one slot in its tick's bucket. Moving or cancelling
//! a key leaves its old slot behind, to be skipped when that tick comes, so every
//! operation is a hash-map update plus an ordered-map lookup, with no search.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Scheduling was refused: the scheduler holds its capacity of timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the delay scheduler is full ({0} timers pending); raise `delay-capacity`")]
pub struct SchedulerFull(pub usize);

/// What a call to [`DelayScheduler::schedule`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// The key had no timer; now it has.
    New,
    /// The key's timer moved to the earlier deadline.
    Earlier,
    /// The key already had an earlier (or equal) deadline; it is kept.
    Kept,
}

impl Scheduled {
    fn changed(self) -> bool {
        self != Scheduled::Kept
    }
}

/// Pending timers keyed by `K`. Not synchronized: see [`Timers`] for the shared,
/// async form.
pub struct DelayScheduler<K> {
    resolution: Duration,
    capacity: usize,
    origin: Instant,
    buckets: BTreeMap<u64, Vec<K>>,
    deadlines: HashMap<K, u64>,
}

impl<K: Clone + Eq + Hash> DelayScheduler<K> {
    /// A scheduler with ticks of `resolution` (at least 1 µs) holding at most
    /// `capacity` timers.
    pub fn new(resolution: Duration, capacity: usize) -> Self {
        Self {
            resolution: resolution.max(Duration::from_micros(1)),
            capacity,
            origin: Instant::now(),
            buckets: BTreeMap::new(),
            deadlines: HashMap::new(),
        }
    }

    fn resolution_nanos(&self) -> u64 {
        u64::try_from(self.resolution.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The tick at or after `at` (nanoseconds fit in a u64 for 584 years).
    fn tick_of(&self, at: Instant) -> u64 {
        let since =
            u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX);
        since.div_ceil(self.resolution_nanos())
    }

    fn instant_of(&self, tick: u64) -> Instant {
        self.origin + Duration::from_nanos(self.resolution_nanos().saturating_mul(tick))
    }

    /// Fire `key` at `at` (rounded up to the resolution), unless it is due earlier.
    pub fn schedule(&mut self, key: K, at: Instant) -> Result<Scheduled, SchedulerFull> {
        let tick = self.tick_of(at);
        let outcome = match self.deadlines.get(&key) {
            Some(&current) if current <= tick => return Ok(Scheduled::Kept),
            Some(_) => Scheduled::Earlier,
            None if self.deadlines.len() >= self.capacity => {
                return Err(SchedulerFull(self.deadlines.len()));
            }
            None => Scheduled::New,
        };
        self.deadlines.insert(key.clone(), tick);
        self.buckets.entry(tick).or_default().push(key);
        Ok(outcome)
    }

    /// Drop `key`'s timer. Returns true if it had one.
    pub fn cancel(&mut self, key: &K) -> bool {
        self.deadlines.remove(key).is_some()
    }

    /// When `key` fires, if it is pending.
    pub fn deadline(&self, key: &K) -> Option<Instant> {
        self.deadlines.get(key).map(|&t| self.instant_of(t))
    }

    /// Pending timers.
    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }

    /// When the earliest bucket is due. It may hold only moved or cancelled
    /// timers, in which case popping it yields nothing.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.buckets
            .first_key_value()
            .map(|(&t, _)| self.instant_of(t))
    }

    /// Remove and return every key due at `now`, earliest first.
    pub fn pop_expired(&mut self, now: Instant, out: &mut Vec<K>) {
        while let Some((&tick, _)) = self.buckets.first_key_value() {
            if self.instant_of(tick) > now {
                break;
            }
            let keys = self.buckets.remove(&tick).unwrap_or_default();
            for key in keys {
                // Skip the slots of keys moved earlier, cancelled, or already fired.
                if self.deadlines.get(&key) == Some(&tick) {
                    self.deadlines.remove(&key);
                    out.push(key);
                }
            }
        }
    }
}

/// A shared [`DelayScheduler`] that a task can wait on.
pub struct Timers<K> {
    inner: Mutex<DelayScheduler<K>>,
    changed: Notify,
}

impl<K: Clone + Eq + Hash> Timers<K> {
    pub fn new(resolution: Duration, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(DelayScheduler::new(resolution, capacity)),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DelayScheduler<K>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fire `key` after `delay`; the earliest deadline wins.
    pub fn schedule_after(&self, key: K, delay: Duration) -> Result<Scheduled, SchedulerFull> {
        self.schedule_at(key, Instant::now() + delay)
    }

    /// Fire `key` at `at`; the earliest deadline wins.
    pub fn schedule_at(&self, key: K, at: Instant) -> Result<Scheduled, SchedulerFull> {
        let (outcome, earliest) = {
            let mut inner = self.lock();
            let before = inner.next_deadline();
            let outcome = inner.schedule(key, at)?;
            (outcome, before != inner.next_deadline())
        };
        if outcome.changed() && earliest {
            // The waiter sleeps until the old earliest deadline: wake it to look again.
            self.changed.notify_one();
        }
        Ok(outcome)
    }

    /// Drop `key`'s timer. Returns true if it had one.
    pub fn cancel(&self, key: &K) -> bool {
        self.lock().cancel(key)
    }

    /// When `key` fires, if it is pending.
    pub fn deadline(&self, key: &K) -> Option<Instant> {
        self.lock().deadline(key)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Wait until at least one key is due and return every key that is.
    pub async fn expired(&self) -> Vec<K> {
        let mut due = Vec::new();
        loop {
            let changed = self.changed.notified();
            let next = {
                let mut inner = self.lock();
                inner.pop_expired(Instant::now(), &mut due);
                inner.next_deadline()
            };
            if !due.is_empty() {
                return due;
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {},
                        _ = changed => {},
                    }
                }
                None => changed.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn scheduler_fires_at_the_deadline_not_before() {
        let timers = Timers::new(MS, 100);
        timers.schedule_after("a", 500 * MS).unwrap();
        let start = Instant::now();
        assert_eq!(timers.expired().await, ["a"]);
        assert_eq!(start.elapsed(), 500 * MS);
        assert!(timers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_dedupe_should_keep_earlier_item() {
        let timers = Timers::new(MS, 100);
        timers.schedule_after("a", 100 * MS).unwrap();
        assert_eq!(timers.schedule_after("a", 900 * MS), Ok(Scheduled::Kept));
        let start = Instant::now();
        assert_eq!(timers.expired().await, ["a"]);
        assert_eq!(start.elapsed(), 100 * MS);
        assert_eq!(
            timers.len(),
            0,
            "the later deadline was not kept as a second timer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_dedupe_should_move_to_an_earlier_deadline() {
        let timers = Timers::new(MS, 100);
        timers.schedule_after("a", 900 * MS).unwrap();
        assert_eq!(timers.schedule_after("a", 100 * MS), Ok(Scheduled::Earlier));
        let start = Instant::now();
        assert_eq!(timers.expired().await, ["a"]);
        assert_eq!(start.elapsed(), 100 * MS);
        // The slot left at 900 ms is skipped: nothing fires again.
        let again = tokio::time::timeout(Duration::from_secs(5), timers.expired()).await;
        assert!(again.is_err(), "a moved key fires once");
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_wakes_for_a_key_earlier_than_the_one_it_waits_for() {
        let timers = Arc::new(Timers::new(MS, 100));
        timers.schedule_after("late", 10_000 * MS).unwrap();
        let waiter = tokio::spawn({
            let timers = timers.clone();
            async move { (timers.expired().await, Instant::now()) }
        });
        tokio::task::yield_now().await;
        let start = Instant::now();
        timers.schedule_after("soon", 20 * MS).unwrap();
        let (due, at) = waiter.await.unwrap();
        assert_eq!(due, ["soon"]);
        assert_eq!(at - start, 20 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_rounds_up_to_its_resolution_and_batches_a_step() {
        let timers = Timers::new(100 * MS, 100);
        timers.schedule_after("a", 10 * MS).unwrap();
        timers.schedule_after("b", 90 * MS).unwrap();
        timers.schedule_after("c", 110 * MS).unwrap();
        let start = Instant::now();
        let mut first = timers.expired().await;
        first.sort();
        assert_eq!(first, ["a", "b"]);
        assert_eq!(
            start.elapsed(),
            100 * MS,
            "never early, at most one step late"
        );
        assert_eq!(timers.expired().await, ["c"]);
        assert_eq!(start.elapsed(), 200 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_keeps_long_delays_at_fine_resolution() {
        let timers = Timers::new(Duration::from_micros(1), 10);
        let day = Duration::from_secs(86_400);
        timers.schedule_after("a", day).unwrap();
        let start = Instant::now();
        assert_eq!(timers.expired().await, ["a"]);
        assert_eq!(start.elapsed(), day);
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_cancel_drops_a_timer() {
        let timers = Timers::new(MS, 100);
        timers.schedule_after("a", 10 * MS).unwrap();
        timers.schedule_after("b", 20 * MS).unwrap();
        assert!(timers.cancel(&"a"));
        assert!(!timers.cancel(&"a"));
        assert_eq!(timers.expired().await, ["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_cancel_then_reschedule_at_the_same_tick_fires_once() {
        let timers = Timers::new(MS, 100);
        timers.schedule_after("a", 10 * MS).unwrap();
        timers.cancel(&"a");
        timers.schedule_after("a", 10 * MS).unwrap();
        assert_eq!(timers.expired().await, ["a"]);
        let again = tokio::time::timeout(Duration::from_secs(1), timers.expired()).await;
        assert!(again.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_full_refuses_new_keys_but_moves_pending_ones() {
        let timers = Timers::new(MS, 2);
        timers.schedule_after("a", 50 * MS).unwrap();
        timers.schedule_after("b", 50 * MS).unwrap();
        let err = timers.schedule_after("c", 10 * MS).unwrap_err();
        assert_eq!(err, SchedulerFull(2));
        assert!(err.to_string().contains("delay-capacity"));
        assert_eq!(timers.schedule_after("a", 10 * MS), Ok(Scheduled::Earlier));
    }
}
