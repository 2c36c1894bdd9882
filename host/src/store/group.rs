//! Group commit: concurrent writers share one durable transaction.
//!
//! Each writer hands its request to a [`Group`]. If no other writer is
//! committing, it becomes the leader: it takes every request waiting (its own
//! first among them, at most `limit`), runs them in one commit and hands each
//! writer its own answer. Writers that arrive meanwhile wait; when the leader
//! is done, one of them leads the next group with everything that arrived
//! during the previous commit. So one fsync serves every writer that queued
//! behind it, and a writer waits for at most the commit in flight plus its own.
//!
//! Guarantees:
//! - Every request gets exactly one answer, its own, and returns only once
//!   that answer exists (for a write: after its commit, or its refusal).
//! - Requests are committed in the order they arrived.
//! - A leader that panics does not strand the others: the requests it took
//!   are answered with `lost()`, and the next waiter leads.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Requests `R` waiting for a commit, and the answers `T` not yet collected.
pub(super) struct Group<R, T> {
    state: Mutex<State<R, T>>,
    turn: Condvar,
}

struct State<R, T> {
    waiting: Vec<(u64, R)>,
    answers: HashMap<u64, T>,
    leading: bool,
    next_id: u64,
}

impl<R, T> Default for Group<R, T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                waiting: Vec::new(),
                answers: HashMap::new(),
                leading: false,
                next_id: 0,
            }),
            turn: Condvar::new(),
        }
    }
}

/// Clears the leader's mark however the commit ends, answering with `lost`
/// whatever the commit did not answer (it panicked).
struct Leading<'a, R, T> {
    group: &'a Group<R, T>,
    ids: Vec<u64>,
    /// The leader's own request: after a panic nobody collects its answer.
    own: u64,
    lost: &'a dyn Fn() -> T,
}

impl<R, T> Drop for Leading<'_, R, T> {
    fn drop(&mut self) {
        let mut state = self.group.lock();
        for id in self.ids.drain(..).filter(|id| *id != self.own) {
            state.answers.entry(id).or_insert_with(self.lost);
        }
        state.leading = false;
        drop(state);
        self.group.turn.notify_all();
    }
}

impl<R, T> Group<R, T> {
    fn lock(&self) -> MutexGuard<'_, State<R, T>> {
        // The state is consistent at every unlock; a panic cannot tear it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests waiting for a leader to take them.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Commit `request` together with whatever else is waiting: `commit`
    /// gets up to `limit` requests in arrival order and answers each, in the
    /// same order. This thread may run `commit` for others, or wait while
    /// another thread runs it for this request.
    pub(super) fn run(
        &self,
        request: R,
        limit: usize,
        mut commit: impl FnMut(Vec<R>) -> Vec<T>,
        lost: &dyn Fn() -> T,
    ) -> T {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.waiting.push((id, request));
        loop {
            if let Some(answer) = state.answers.remove(&id) {
                return answer;
            }
            if state.leading {
                state = self.turn.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            state.leading = true;
            let take = state.waiting.len().min(limit.max(1));
            let (ids, requests): (Vec<u64>, Vec<R>) = state.waiting.drain(..take).unzip();
            drop(state);
            let mut leading = Leading {
                group: self,
                ids,
                own: id,
                lost,
            };
            let answers = commit(requests);
            {
                let mut state = self.lock();
                let mut answers = answers.into_iter();
                for id in leading.ids.drain(..) {
                    // A commit that answers too few: the rest are lost, not stranded.
                    let answer = answers.next().unwrap_or_else(lost);
                    state.answers.insert(id, answer);
                }
            }
            drop(leading);
            state = self.lock();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use super::*;

    #[test]
    fn a_lone_request_is_committed_by_its_own_thread() {
        let group: Group<u32, u32> = Group::default();
        let mut commits = 0;
        let answer = group.run(
            7,
            10,
            |rs| {
                commits += 1;
                rs.iter().map(|r| r * 2).collect()
            },
            &|| 0,
        );
        assert_eq!((answer, commits), (14, 1));
    }

    #[test]
    fn writers_that_arrive_during_a_commit_share_the_next_one_and_each_gets_its_own_answer() {
        let group: Arc<Group<usize, usize>> = Arc::new(Group::default());
        let commits = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        // The first commit blocks until every other writer has queued.
        let queued = Arc::new(Barrier::new(2));
        let writers = 8;
        // Every writer's commit: counts, records the group's size, answers
        // r + 100; the first one (the lone request 0) waits until the others queued.
        let writer = |i: usize| {
            let (group, commits, sizes, queued) = (
                group.clone(),
                commits.clone(),
                sizes.clone(),
                queued.clone(),
            );
            std::thread::spawn(move || {
                group.run(
                    i,
                    100,
                    |rs| {
                        commits.fetch_add(1, Ordering::SeqCst);
                        sizes.lock().unwrap().push(rs.len());
                        if rs == [0] {
                            queued.wait();
                        }
                        rs.iter().map(|r| r + 100).collect()
                    },
                    &|| usize::MAX,
                )
            })
        };
        let first = writer(0);
        // Wait until the first writer leads, then queue the others behind it.
        while !group.lock().leading {
            std::thread::yield_now();
        }
        let others: Vec<_> = (1..=writers).map(writer).collect();
        while group.lock().waiting.len() < writers {
            std::thread::yield_now();
        }
        queued.wait();
        assert_eq!(first.join().unwrap(), 100);
        for (i, t) in others.into_iter().enumerate() {
            assert_eq!(
                t.join().unwrap(),
                i + 1 + 100,
                "each writer gets its own answer"
            );
        }
        assert_eq!(
            commits.load(Ordering::SeqCst),
            2,
            "one commit for the 8 that waited"
        );
        assert_eq!(*sizes.lock().unwrap(), vec![1, writers]);
    }

    #[test]
    fn a_group_takes_at_most_limit_requests_in_arrival_order() {
        let group: Group<u32, u32> = Group::default();
        {
            let mut state = group.lock();
            // Two requests of other writers already waiting (as if their
            // threads were parked); this thread's own arrives third.
            state.waiting.push((100, 1));
            state.waiting.push((101, 2));
            state.next_id = 102;
        }
        let mut seen = Vec::new();
        let answer = group.run(
            3,
            2,
            |rs| {
                seen.push(rs.clone());
                rs
            },
            &|| 0,
        );
        assert_eq!(answer, 3);
        assert_eq!(seen, vec![vec![1, 2], vec![3]]);
        let state = group.lock();
        assert_eq!(
            (state.answers.get(&100), state.answers.get(&101)),
            (Some(&1), Some(&2)),
            "the others' answers wait for them"
        );
    }

    #[test]
    fn a_leader_that_panics_answers_its_group_as_lost_and_the_next_writer_leads() {
        let group: Group<u32, u32> = Group::default();
        group.lock().waiting.push((100, 1));
        group.lock().next_id = 101;
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            group.run(2, 10, |_| panic!("the disk caught fire"), &|| 0)
        }));
        assert!(panicked.is_err());
        {
            let state = group.lock();
            assert!(!state.leading, "the leader's mark is cleared");
            assert_eq!(
                state.answers.get(&100),
                Some(&0),
                "the other writer is answered"
            );
            assert_eq!(
                state.answers.len(),
                1,
                "no answer is kept for the panicked leader"
            );
        }
        assert_eq!(group.run(5, 10, |rs| rs, &|| 0), 5, "the next writer leads");
    }
}
