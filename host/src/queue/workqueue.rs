//! A bounded, per-key deduplicating work queue with one lane per worker, with the
//! semantics of client-go's workqueue:
//!
//! - A key is queued at most once: adding a key that is already waiting does
//!   nothing (the add is folded into the waiting one).
//! - A key added while a worker processes it is marked dirty, and queued again
//!   when the worker calls [`WorkQueue::done`]. A key is never handed to two
//!   workers at once, and a change during processing is never lost.
//! - Each key goes to the lane its caller names (a worker, chosen by a hasher);
//!   a dirty key goes back to the lane it was added to.
//! - At most `capacity` keys wait at once. [`WorkQueue::add`] waits for room (so
//!   a full queue pushes back on its sources); [`WorkQueue::try_add`] answers
//!   [`QueueError::Full`] instead. Nothing is dropped silently.
//! - After [`WorkQueue::shutdown`], adds are refused; `get` hands out what is
//!   still queued (drain) until [`WorkQueue::hand_back`] takes it away.
//! - Keys are queued at a [`Priority`]: live changes first, then retries and
//!   requeues that are due, then sweeps (resyncs, full reconciliations). A key
//!   added again at a more urgent priority moves up; never down. Within a
//!   priority, keys go in the order they were added.
//! - No priority starves: each lane serves its keys in a fixed cycle of
//!   [`CYCLE`] turns (six live, one due, one sweep), and a turn whose priority
//!   has nothing waiting goes to the most urgent one that has. So while every
//!   priority has keys waiting, live keys get at least 6 of every 8 takes,
//!   due keys and sweeps at least 1 each; and a live key at the head of its
//!   lane is taken within 2 takes, however many sweep keys wait.
//! - Sweeps fill at most half the queue: a sweep's add waits (or `try_add`
//!   answers `Full`) while half of `capacity` keys wait, so live changes and
//!   retries always find room in the other half.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Why an add was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the work queue is full ({0} keys waiting); try again later")]
    Full(usize),
    #[error("the work queue is shut down")]
    ShutDown,
}

/// What an accepted add did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The key was queued (or marked dirty while processing).
    Queued,
    /// The key was already waiting; nothing changed.
    Folded,
}

/// How long a key waited and how long it was worked on, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub waited: Duration,
}

/// How urgent a queued key is; the most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A change to the object (create, update, delete) or an event about it.
    Live = 0,
    /// A retry or a requeue whose delay is over.
    Due = 1,
    /// A resync or full reconciliation: every object, nothing known to change.
    Sweep = 2,
}

const PRIORITIES: [Priority; 3] = [Priority::Live, Priority::Due, Priority::Sweep];

/// The priority each turn of a lane's cycle serves first (see the module doc).
pub const CYCLE: [Priority; 8] = [
    Priority::Live,
    Priority::Live,
    Priority::Live,
    Priority::Due,
    Priority::Live,
    Priority::Live,
    Priority::Live,
    Priority::Sweep,
];

/// A bounded deduplicating queue of keys with one lane per worker.
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    lanes: Vec<Notify>,
    room: Notify,
    capacity: usize,
}

struct State<K> {
    lanes: Vec<Lane<K>>,
    /// Every key the queue knows: waiting, being processed, or both (dirty).
    keys: HashMap<K, Slot>,
    /// Keys that need processing (queued, or re-added while processing).
    waiting: usize,
    /// Keys being processed.
    processing: usize,
    shutting_down: bool,
}

/// One worker's keys, one queue per priority, and where it is in its cycle.
struct Lane<K> {
    /// By priority. An entry whose key has since moved up (or was removed or
    /// taken) is stale and skipped when it comes out.
    queues: [VecDeque<K>; 3],
    turn: usize,
}

impl<K> Lane<K> {
    fn new() -> Self {
        Self {
            queues: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
            turn: 0,
        }
    }
}

/// One key's place in the queue.
struct Slot {
    /// The lane it goes to.
    lane: usize,
    /// The most urgent priority it was added at since it was last taken.
    priority: Priority,
    /// When it was added, while it needs processing.
    added: Option<Instant>,
    /// When a worker took it, while it is being processed.
    started: Option<Instant>,
}

impl<K: Clone + Eq + Hash> WorkQueue<K> {
    /// A queue with `lanes` lanes (at least one) holding at most `capacity` waiting keys.
    pub fn new(lanes: usize, capacity: usize) -> Self {
        let lanes = lanes.max(1);
        Self {
            state: Mutex::new(State {
                lanes: (0..lanes).map(|_| Lane::new()).collect(),
                keys: HashMap::new(),
                waiting: 0,
                processing: 0,
                shutting_down: false,
            }),
            lanes: (0..lanes).map(|_| Notify::new()).collect(),
            room: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // Every critical section leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of lanes.
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Queue `key` on `lane` as a live change, waiting while the queue is full.
    pub async fn add(&self, key: K, lane: usize) -> Result<Added, QueueError> {
        self.add_at(key, lane, Priority::Live).await
    }

    /// Queue `key` on `lane` at `priority`, waiting while the queue is full
    /// (for a sweep: while half of it is).
    pub async fn add_at(
        &self,
        key: K,
        lane: usize,
        priority: Priority,
    ) -> Result<Added, QueueError> {
        loop {
            let room = self.room.notified();
            match self.try_add_at(key.clone(), lane, priority) {
                Err(QueueError::Full(_)) => room.await,
                other => return other,
            }
        }
    }

    /// Queue `key` on `lane` as a live change, or say why not at once.
    pub fn try_add(&self, key: K, lane: usize) -> Result<Added, QueueError> {
        self.try_add_at(key, lane, Priority::Live)
    }

    /// Queue `key` on `lane` at `priority`, or say why not at once.
    pub fn try_add_at(&self, key: K, lane: usize, priority: Priority) -> Result<Added, QueueError> {
        let lane = lane % self.lanes.len();
        let mut guard = self.lock();
        let s = &mut *guard;
        if s.shutting_down {
            return Err(QueueError::ShutDown);
        }
        let room = match priority {
            Priority::Sweep => (self.capacity / 2).max(1),
            _ => self.capacity,
        };
        let full = s.waiting >= room;
        match s.keys.get_mut(&key) {
            Some(slot) if slot.added.is_some() => {
                if priority < slot.priority {
                    // Already waiting, less urgently: it moves up. (Being
                    // processed, it is queued at this priority by `done`.)
                    slot.priority = priority;
                    if slot.started.is_none() {
                        let lane = slot.lane;
                        s.lanes[lane].queues[priority as usize].push_back(key);
                        drop(guard);
                        self.lanes[lane].notify_one();
                    }
                }
                return Ok(Added::Folded);
            }
            _ if full => return Err(QueueError::Full(s.waiting)),
            Some(slot) => {
                // Being processed: mark it dirty; `done` queues it on this lane.
                slot.added = Some(Instant::now());
                slot.lane = lane;
                slot.priority = priority;
                s.waiting += 1;
                return Ok(Added::Queued);
            }
            None => {}
        }
        s.keys.insert(
            key.clone(),
            Slot {
                lane,
                priority,
                added: Some(Instant::now()),
                started: None,
            },
        );
        s.waiting += 1;
        s.lanes[lane].queues[priority as usize].push_back(key);
        drop(guard);
        self.lanes[lane].notify_one();
        Ok(Added::Queued)
    }

    /// The next key of `lane`; waits for one. `None` once shut down and drained.
    /// The caller must call [`WorkQueue::done`] with the key when finished.
    pub async fn get(&self, lane: usize) -> Option<(K, Timings)> {
        let lane = lane % self.lanes.len();
        loop {
            let notified = self.lanes[lane].notified();
            if let Some(got) = self.try_get(lane) {
                return Some(got);
            }
            if self.lock().shutting_down {
                return None;
            }
            notified.await;
        }
    }

    /// The next key of `lane`, if one is waiting.
    pub fn try_get(&self, lane: usize) -> Option<(K, Timings)> {
        let lane = lane % self.lanes.len();
        let mut guard = self.lock();
        let s = &mut *guard;
        let key = s.pop(lane)?;
        let now = Instant::now();
        let slot = s.keys.get_mut(&key).expect("a taken key has a slot");
        let added = slot.added.take().unwrap_or(now);
        slot.started = Some(now);
        s.waiting -= 1;
        s.processing += 1;
        let more = s.lanes[lane].queues.iter().any(|q| !q.is_empty());
        drop(guard);
        self.room.notify_one();
        if more {
            // Pass the wake-up on: the lane may have several waiters.
            self.lanes[lane].notify_one();
        }
        Some((
            key,
            Timings {
                waited: now - added,
            },
        ))
    }

    /// Mark `key` finished; returns how long it was processed. If it was added
    /// again meanwhile, it is queued now, on the lane it was last added to.
    /// A key that is not being processed (already done, or waiting) is left
    /// as it is, so calling this twice is harmless.
    pub fn done(&self, key: &K) -> Duration {
        let mut guard = self.lock();
        let s = &mut *guard;
        if s.keys.get(key).is_none_or(|slot| slot.started.is_none()) {
            return Duration::ZERO;
        }
        let mut slot = s.keys.remove(key).expect("checked above");
        let worked = slot
            .started
            .take()
            .map_or(Duration::ZERO, |at| at.elapsed());
        s.processing -= 1;
        if slot.added.is_none() {
            return worked;
        }
        let (lane, priority) = (slot.lane, slot.priority);
        s.keys.insert(key.clone(), slot);
        s.lanes[lane].queues[priority as usize].push_back(key.clone());
        drop(guard);
        self.lanes[lane].notify_one();
        worked
    }

    /// Forget `key`'s pending add (a waiting key, or a re-add of a key being
    /// processed). Returns true if it had one.
    pub fn remove(&self, key: &K) -> bool {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(slot) = s.keys.get_mut(key) else {
            return false;
        };
        if slot.added.take().is_none() {
            return false;
        }
        s.waiting -= 1;
        if slot.started.is_none() {
            // Its entry in the lane is now stale, and skipped.
            s.keys.remove(key);
        }
        drop(guard);
        self.room.notify_one();
        true
    }

    /// Refuse new keys and wake every waiter; `get` drains what is queued.
    pub fn shutdown(&self) {
        self.lock().shutting_down = true;
        for lane in &self.lanes {
            lane.notify_waiters();
        }
        self.room.notify_waiters();
    }

    /// Take every waiting key out of the queue (after or instead of draining), so
    /// the caller can hand them to whoever runs next.
    pub fn hand_back(&self) -> Vec<K> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let mut handed: Vec<K> = Vec::with_capacity(s.waiting);
        for lane in 0..s.lanes.len() {
            while let Some(key) = s.pop(lane) {
                s.keys.remove(&key);
                handed.push(key);
            }
            s.lanes[lane].queues.iter_mut().for_each(VecDeque::clear);
        }
        // A key re-added while being processed is not in a lane: hand it back too.
        for (key, slot) in &mut s.keys {
            if slot.added.take().is_some() {
                handed.push(key.clone());
            }
        }
        s.waiting = 0;
        handed
    }

    /// True once [`WorkQueue::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// Keys waiting to be processed.
    pub fn len(&self) -> usize {
        self.lock().waiting
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys being processed right now.
    pub fn in_flight(&self) -> usize {
        self.lock().processing
    }

    /// How long the keys in flight have been processed, in total and the longest.
    pub fn unfinished(&self) -> (Duration, Duration) {
        let s = self.lock();
        let now = Instant::now();
        s.keys
            .values()
            .filter_map(|slot| slot.started.map(|at| now - at))
            .fold((Duration::ZERO, Duration::ZERO), |(sum, max), d| {
                (sum + d, max.max(d))
            })
    }
}

impl<K: Clone + Eq + Hash> State<K> {
    /// The next key `lane` serves: its cycle's priority for this turn if one
    /// waits, else the most urgent that has one. Stale entries are dropped.
    fn pop(&mut self, lane: usize) -> Option<K> {
        let l = &mut self.lanes[lane];
        let first = CYCLE[l.turn % CYCLE.len()];
        let order = std::iter::once(first).chain(PRIORITIES.into_iter().filter(|p| *p != first));
        for priority in order {
            while let Some(key) = l.queues[priority as usize].pop_front() {
                let current = self.keys.get(&key).is_some_and(|slot| {
                    slot.added.is_some()
                        && slot.started.is_none()
                        && slot.lane == lane
                        && slot.priority == priority
                });
                if current {
                    l.turn = l.turn.wrapping_add(1);
                    return Some(key);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn queue(capacity: usize) -> WorkQueue<&'static str> {
        WorkQueue::new(1, capacity)
    }

    #[tokio::test]
    async fn queue_dedupes_many_adds_of_one_key() {
        let q = queue(10);
        assert_eq!(q.try_add("a", 0), Ok(Added::Queued));
        for _ in 0..10 {
            assert_eq!(q.try_add("a", 0), Ok(Added::Folded));
        }
        q.try_add("b", 0).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q.get(0).await.unwrap().0, "a");
        assert_eq!(q.get(0).await.unwrap().0, "b");
        assert_eq!(q.try_get(0), None);
    }

    #[tokio::test]
    async fn queue_requeues_a_key_added_while_processing_only_after_done() {
        let q = queue(10);
        q.try_add("a", 0).unwrap();
        let (key, _) = q.get(0).await.unwrap();
        q.try_add("a", 0).unwrap();
        q.try_add("a", 0).unwrap();
        assert_eq!(
            q.try_get(0),
            None,
            "a key being processed is not handed out again"
        );
        q.done(&key);
        assert_eq!(
            q.try_get(0).map(|(k, _)| k),
            Some("a"),
            "the re-add is queued once, after done"
        );
        q.done(&"a");
        assert!(q.is_empty());
        assert_eq!(q.try_get(0), None);
    }

    #[tokio::test]
    async fn queue_never_hands_one_key_to_two_lanes_at_once() {
        let q = WorkQueue::new(2, 10);
        q.try_add("a", 0).unwrap();
        let (key, _) = q.try_get(0).unwrap();
        // Added again for the other lane while lane 0 holds it: it waits for done,
        // and then goes where the new add asked.
        q.try_add("a", 1).unwrap();
        assert_eq!(q.try_get(1), None);
        q.done(&key);
        assert_eq!(q.try_get(1).map(|(k, _)| k), Some("a"));
    }

    #[tokio::test]
    async fn queue_full_refuses_try_add_with_a_clear_error() {
        let q = queue(2);
        q.try_add("a", 0).unwrap();
        q.try_add("b", 0).unwrap();
        let err = q.try_add("c", 0).unwrap_err();
        assert_eq!(err, QueueError::Full(2));
        assert!(err.to_string().contains("full"));
        assert_eq!(
            q.try_add("a", 0),
            Ok(Added::Folded),
            "a waiting key still folds"
        );
    }

    #[tokio::test]
    async fn queue_full_pushes_back_on_add_until_a_key_is_taken() {
        let q = Arc::new(queue(1));
        q.try_add("a", 0).unwrap();
        let adder = tokio::spawn({
            let q = q.clone();
            async move { q.add("b", 0).await }
        });
        tokio::task::yield_now().await;
        assert!(!adder.is_finished(), "add waits while the queue is full");
        assert_eq!(q.try_get(0).map(|(k, _)| k), Some("a"));
        assert_eq!(adder.await.unwrap(), Ok(Added::Queued));
        assert_eq!(q.try_get(0).map(|(k, _)| k), Some("b"));
    }

    #[tokio::test]
    async fn queue_shutdown_drains_then_ends_and_refuses_adds() {
        let q = queue(10);
        q.try_add("a", 0).unwrap();
        q.try_add("b", 0).unwrap();
        q.shutdown();
        assert_eq!(q.try_add("c", 0), Err(QueueError::ShutDown));
        assert_eq!(q.get(0).await.unwrap().0, "a");
        assert_eq!(q.get(0).await.unwrap().0, "b");
        assert_eq!(q.get(0).await, None);
    }

    #[tokio::test]
    async fn queue_shutdown_with_items_in_flight_hands_back_the_rest() {
        let q = queue(10);
        for k in ["a", "b", "c"] {
            q.try_add(k, 0).unwrap();
        }
        let (a, _) = q.try_get(0).unwrap();
        q.try_add("a", 0).unwrap(); // dirty while in flight
        q.shutdown();
        let mut handed = q.hand_back();
        handed.sort();
        assert_eq!(handed, ["a", "b", "c"]);
        assert_eq!(q.get(0).await, None, "nothing left to drain");
        q.done(&a);
        assert_eq!(q.try_get(0), None, "a handed-back key is not requeued");
        assert_eq!(q.in_flight(), 0);
    }

    #[tokio::test]
    async fn queue_shutdown_wakes_waiting_workers_and_adders() {
        let q = Arc::new(queue(1));
        let worker = tokio::spawn({
            let q = q.clone();
            async move { q.get(0).await }
        });
        tokio::task::yield_now().await;
        q.shutdown();
        assert_eq!(worker.await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_measures_wait_and_work_on_the_tokio_clock() {
        let q = queue(10);
        q.try_add("a", 0).unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        let (key, timings) = q.try_get(0).unwrap();
        assert_eq!(timings.waited, Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            q.unfinished(),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
        assert_eq!(q.done(&key), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn queue_remove_forgets_a_re_add_of_a_key_in_flight() {
        let q = queue(10);
        q.try_add("a", 0).unwrap();
        let (a, _) = q.try_get(0).unwrap();
        q.try_add("a", 0).unwrap();
        assert!(q.remove(&"a"));
        q.done(&a);
        assert_eq!(q.try_get(0), None);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn queue_remove_forgets_a_waiting_key_and_frees_room() {
        let q = queue(1);
        q.try_add("a", 0).unwrap();
        assert!(q.remove(&"a"));
        assert!(!q.remove(&"a"));
        q.try_add("b", 0).unwrap();
        assert_eq!(q.try_get(0).map(|(k, _)| k), Some("b"));
    }

    /// Take `n` keys from lane 0, finishing each.
    fn take(q: &WorkQueue<String>, n: usize) -> Vec<String> {
        (0..n)
            .map_while(|_| {
                let (key, _) = q.try_get(0)?;
                q.done(&key);
                Some(key)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_live_key_is_taken_within_two_takes_however_many_sweep_keys_wait() {
        // At every point of the cycle, a live key arriving behind 100k sweep
        // keys is among the next two taken.
        for turn in 0..CYCLE.len() {
            let q = WorkQueue::<String>::new(1, 300_000);
            for i in 0..100_000 {
                q.try_add_at(format!("sweep-{i}"), 0, Priority::Sweep)
                    .unwrap();
            }
            take(&q, turn);
            let live = "live".to_string();
            q.try_add(live.clone(), 0).unwrap();
            let next = take(&q, 2);
            assert!(next.contains(&live), "turn {turn}: {next:?}");
        }
    }

    #[tokio::test]
    async fn sweeps_and_due_keys_progress_while_live_keys_keep_coming() {
        let q = WorkQueue::<String>::new(1, 100_000);
        for i in 0..1000 {
            q.try_add_at(format!("sweep-{i}"), 0, Priority::Sweep)
                .unwrap();
            q.try_add_at(format!("due-{i}"), 0, Priority::Due).unwrap();
        }
        // A new live key before every take: the live queue is never empty.
        let mut taken = Vec::new();
        for i in 0..8000 {
            q.try_add(format!("live-{i}"), 0).unwrap();
            taken.extend(take(&q, 1));
        }
        let count = |prefix: &str| taken.iter().filter(|k| k.starts_with(prefix)).count();
        assert_eq!(count("sweep-"), 1000, "one take in eight is a sweep's");
        assert_eq!(count("due-"), 1000, "one take in eight is a due key's");
        assert_eq!(count("live-"), 6000);
        // In the order they were added, within each priority.
        let sweeps: Vec<_> = taken.iter().filter(|k| k.starts_with("sweep-")).collect();
        assert_eq!(sweeps[0], "sweep-0");
        assert_eq!(sweeps[999], "sweep-999");
    }

    #[tokio::test]
    async fn a_key_added_again_more_urgently_moves_up_and_never_down() {
        let q = WorkQueue::<String>::new(1, 100);
        for k in ["a", "b", "c"] {
            q.try_add_at(k.to_string(), 0, Priority::Sweep).unwrap();
        }
        q.try_add("d".to_string(), 0).unwrap();
        // `c` moves up to live, behind `d`; `d` does not move down.
        assert_eq!(q.try_add("c".to_string(), 0), Ok(Added::Folded));
        assert_eq!(
            q.try_add_at("d".to_string(), 0, Priority::Sweep),
            Ok(Added::Folded)
        );
        assert_eq!(q.len(), 4);
        assert_eq!(take(&q, 4), ["d", "c", "a", "b"]);
        assert_eq!(q.len(), 0);
        // A key re-added while in flight comes back at its most urgent priority.
        q.try_add_at("e".to_string(), 0, Priority::Sweep).unwrap();
        q.try_add_at("f".to_string(), 0, Priority::Sweep).unwrap();
        let (e, _) = q.try_get(0).unwrap();
        q.try_add_at(e.clone(), 0, Priority::Sweep).unwrap();
        q.try_add(e.clone(), 0).unwrap();
        q.done(&e);
        assert_eq!(take(&q, 2), ["e", "f"]);
    }

    #[tokio::test]
    async fn sweeps_fill_at_most_half_the_queue() {
        let q = WorkQueue::<String>::new(1, 10);
        for i in 0..5 {
            q.try_add_at(format!("s{i}"), 0, Priority::Sweep).unwrap();
        }
        assert_eq!(
            q.try_add_at("s5".to_string(), 0, Priority::Sweep),
            Err(QueueError::Full(5))
        );
        for i in 0..5 {
            q.try_add(format!("l{i}"), 0).unwrap();
        }
        assert_eq!(q.try_add("l5".to_string(), 0), Err(QueueError::Full(10)));
        assert_eq!(q.len(), 10);
        // A sweep key that is already queued is folded, full or not.
        assert_eq!(
            q.try_add_at("s0".to_string(), 0, Priority::Sweep),
            Ok(Added::Folded)
        );
    }

    #[tokio::test]
    async fn done_for_a_key_not_in_flight_changes_nothing() {
        let q = WorkQueue::<String>::new(1, 100);
        q.try_add("a".to_string(), 0).unwrap();
        let (a, _) = q.try_get(0).unwrap();
        q.done(&a);
        q.try_add(a.clone(), 0).unwrap();
        // A second `done` (e.g. after a panic) must not finish the waiting add.
        q.done(&a);
        assert_eq!((q.len(), q.in_flight()), (1, 0));
        assert_eq!(take(&q, 1), ["a"]);
        q.done(&a);
        assert_eq!((q.len(), q.in_flight()), (0, 0));
    }

    #[tokio::test]
    async fn hand_back_returns_each_waiting_key_once_whatever_its_priority() {
        let q = WorkQueue::<String>::new(1, 100);
        for k in ["a", "b"] {
            q.try_add_at(k.to_string(), 0, Priority::Sweep).unwrap();
        }
        q.try_add("a".to_string(), 0).unwrap();
        q.try_add_at("c".to_string(), 0, Priority::Due).unwrap();
        q.shutdown();
        let mut back = q.hand_back();
        back.sort();
        assert_eq!(back, ["a", "b", "c"]);
        assert_eq!(q.try_get(0), None);
    }
}
