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

/// A bounded deduplicating queue of keys with one lane per worker.
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    lanes: Vec<Notify>,
    room: Notify,
    capacity: usize,
}

struct State<K> {
    lanes: Vec<VecDeque<K>>,
    /// Every key the queue knows: waiting, being processed, or both (dirty).
    keys: HashMap<K, Slot>,
    /// Keys that need processing (queued, or re-added while processing).
    waiting: usize,
    /// Keys being processed.
    processing: usize,
    shutting_down: bool,
}

/// One key's place in the queue.
struct Slot {
    /// The lane it goes to.
    lane: usize,
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
                lanes: (0..lanes).map(|_| VecDeque::new()).collect(),
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

    /// Queue `key` on `lane`, waiting while the queue is full.
    pub async fn add(&self, key: K, lane: usize) -> Result<Added, QueueError> {
        loop {
            let room = self.room.notified();
            match self.try_add(key.clone(), lane) {
                Err(QueueError::Full(_)) => room.await,
                other => return other,
            }
        }
    }

    /// Queue `key` on `lane`, or say why not at once.
    pub fn try_add(&self, key: K, lane: usize) -> Result<Added, QueueError> {
        let lane = lane % self.lanes.len();
        let mut guard = self.lock();
        let s = &mut *guard;
        if s.shutting_down {
            return Err(QueueError::ShutDown);
        }
        let full = s.waiting >= self.capacity;
        match s.keys.get_mut(&key) {
            Some(slot) if slot.added.is_some() => return Ok(Added::Folded),
            _ if full => return Err(QueueError::Full(s.waiting)),
            Some(slot) => {
                // Being processed: mark it dirty; `done` queues it on this lane.
                slot.added = Some(Instant::now());
                slot.lane = lane;
                s.waiting += 1;
                return Ok(Added::Queued);
            }
            None => {}
        }
        s.keys.insert(
            key.clone(),
            Slot {
                lane,
                added: Some(Instant::now()),
                started: None,
            },
        );
        s.waiting += 1;
        s.lanes[lane].push_back(key);
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
        let key = s.lanes[lane].pop_front()?;
        let now = Instant::now();
        let slot = s.keys.get_mut(&key).expect("a queued key has a slot");
        let added = slot.added.take().unwrap_or(now);
        slot.started = Some(now);
        s.waiting -= 1;
        s.processing += 1;
        let more = !s.lanes[lane].is_empty();
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
    pub fn done(&self, key: &K) -> Duration {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(mut slot) = s.keys.remove(key) else {
            return Duration::ZERO;
        };
        let worked = slot
            .started
            .take()
            .map_or(Duration::ZERO, |at| at.elapsed());
        s.processing -= 1;
        if slot.added.is_none() {
            return worked;
        }
        let lane = slot.lane;
        s.keys.insert(key.clone(), slot);
        s.lanes[lane].push_back(key.clone());
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
            let lane = slot.lane;
            s.keys.remove(key);
            s.lanes[lane].retain(|k| k != key);
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
        for lane in &mut s.lanes {
            for key in lane.drain(..) {
                s.keys.remove(&key);
                handed.push(key);
            }
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
}
