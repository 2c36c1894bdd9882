//! Writes of desired state from clients: apply, create and update, committed
//! in groups.
//!
//! Each request is checked against what is stored plus the requests before it
//! in its group ([`group`](super::group)), then the group's objects are
//! committed in one durable transaction, together with whatever was written
//! behind.
//!
//! Guarantees:
//! - A request is all or nothing: one refused object refuses the request, and
//!   nothing of it is staged for the group's commit. A refused request does
//!   not affect the others of its group.
//! - A request is acknowledged only after the transaction holding it is
//!   durable. If that commit fails, every request of the group is answered
//!   with the failure and nothing of the group is applied.
//! - A request sees the requests committed before it: those of earlier groups
//!   are stored, and those earlier in its own group are staged (a second
//!   create of one name in a group is refused as existing; a stale
//!   `resourceVersion` is a conflict).
//! - Backends that would make one request's refusal fail a whole group (etcd's
//!   optimistic compares, see [`Backend::groups_writes`]) commit one request
//!   per transaction, in the same order.

use std::collections::HashMap;

use super::{Applied, Batch, FINALIZER_PREFIX, Inner, Store, StoreError, pending};
use crate::object::{Action, Object, ObjectKey};

/// Requests one commit takes at most (each may hold many objects).
pub(super) const MAX_GROUP: usize = 1024;

/// What a write needs to find stored under each object's key.
#[derive(Clone, Copy, Debug)]
pub(super) enum Expect {
    /// Anything: create or update (apply).
    Any,
    /// Nothing (create).
    Absent,
    /// An object (update).
    Present,
}

/// One client's write, waiting for its group.
pub(super) struct Request {
    objects: Vec<Object>,
    expect: Expect,
}

pub(super) type Answer = Result<Vec<Applied>, StoreError>;

/// The objects a group will commit, and the counters after them.
struct Staged {
    next_uid: u64,
    next_version: u64,
    objects: HashMap<ObjectKey, Object>,
    /// Keys in the order they were first staged.
    order: Vec<ObjectKey>,
}

impl Store {
    /// Create or update one object from a manifest.
    pub fn apply(&self, object: Object) -> Result<Applied, StoreError> {
        Ok(self
            .apply_all(vec![object])?
            .pop()
            .expect("one object in, one out"))
    }

    /// Create or update several objects in one transaction: if any of them is
    /// refused (a conflict, a deleting object), none is stored.
    ///
    /// Host-owned metadata in a manifest (uid, generation, deletionTimestamp,
    /// status) is ignored; a non-zero `resourceVersion` is a precondition.
    ///
    /// It blocks until the commit is durable, possibly committing other
    /// threads' writes with its own: call it from a blocking context.
    pub fn apply_all(&self, objects: Vec<Object>) -> Result<Vec<Applied>, StoreError> {
        self.write(objects, Expect::Any)
    }

    /// Create an object that must not exist yet.
    pub fn create(&self, object: Object) -> Result<Applied, StoreError> {
        let mut out = self.write(vec![object], Expect::Absent)?;
        Ok(out.pop().expect("one object in, one out"))
    }

    /// Update an object that must exist.
    pub fn update(&self, object: Object) -> Result<Applied, StoreError> {
        let mut out = self.write(vec![object], Expect::Present)?;
        Ok(out.pop().expect("one object in, one out"))
    }

    fn write(&self, objects: Vec<Object>, expect: Expect) -> Answer {
        let limit = if self.shared.backend.groups_writes() {
            MAX_GROUP
        } else {
            1
        };
        self.shared.writes.run(
            Request { objects, expect },
            limit,
            |requests| self.write_group(requests),
            &|| {
                Err(StoreError::Storage(
                    "the commit holding this write failed unexpectedly (see the log); it may \
                     or may not be stored: read it back, and apply it again if it is not"
                        .into(),
                ))
            },
        )
    }

    /// Check and stage each request, commit the staged ones together, answer
    /// each in order.
    fn write_group(&self, requests: Vec<Request>) -> Vec<Answer> {
        let mut inner = self.lock();
        let mut staged = Staged {
            next_uid: inner.next_uid,
            next_version: inner.next_version,
            objects: HashMap::new(),
            order: Vec::new(),
        };
        let mut answers: Vec<Answer> = requests
            .into_iter()
            .map(|request| stage(&inner, &mut staged, request))
            .collect();
        if staged.order.is_empty() {
            return answers;
        }
        let mut batch = Batch::default();
        for key in staged.order {
            let object = staged.objects.remove(&key).expect("staged with its key");
            batch
                .status
                .push((key.clone(), Some(pending(object.metadata.generation))));
            batch.objects.push((key, Some(object)));
        }
        let (saved_uid, saved_version) = (inner.next_uid, inner.next_version);
        inner.next_uid = staged.next_uid;
        inner.next_version = staged.next_version;
        if let Err(e) = self.commit(&mut inner, &batch) {
            inner.next_uid = saved_uid;
            inner.next_version = saved_version;
            for answer in &mut answers {
                if answer.is_ok() {
                    *answer = Err(e.clone());
                }
            }
            return answers;
        }
        for (key, object) in batch.objects {
            inner.objects.insert(key, object.expect("staged above"));
        }
        for (key, status) in batch.status {
            inner
                .status
                .insert(key.clone(), status.expect("staged above"));
            inner.refresh(&key);
        }
        for applied in answers.iter().flatten().flatten() {
            if let Some(action) = applied.action {
                self.announce_applied(&mut inner, &applied.object, action);
            }
        }
        answers
    }
}

/// Check `request` against what is stored and what its group staged before
/// it; if every object passes, stage them all.
fn stage(inner: &Inner, group: &mut Staged, request: Request) -> Answer {
    let mut next_uid = group.next_uid;
    let mut next_version = group.next_version;
    let mut applied = Vec::with_capacity(request.objects.len());
    // Later objects in one request see the earlier ones.
    let mut mine: HashMap<ObjectKey, Object> = HashMap::new();
    for mut object in request.objects {
        let key = object.key();
        let old = mine
            .get(&key)
            .or_else(|| group.objects.get(&key))
            .or_else(|| inner.objects.get(&key));
        match (request.expect, old) {
            (Expect::Absent, Some(_)) => return Err(StoreError::AlreadyExists(key)),
            (Expect::Present, None) => return Err(StoreError::NotFound(key)),
            _ => {}
        }
        let given = object.metadata.resource_version;
        let stored = old.map_or(0, |o| o.metadata.resource_version);
        if given != 0 && given != stored {
            return Err(StoreError::Conflict { key, given, stored });
        }
        object.status = None;
        object.metadata.deletion_timestamp = None;
        // The host's finalizers are the host's; the rest are the manifest's.
        object
            .metadata
            .finalizers
            .retain(|f| !f.starts_with(FINALIZER_PREFIX));
        let action = match old {
            None => {
                next_uid += 1;
                object.metadata.uid = format!("{next_uid:016x}");
                object.metadata.generation = 1;
                if let Some(host) = inner.finalizers.get(&key.kind) {
                    object.metadata.finalizers.extend(host.iter().cloned());
                }
                Action::Created
            }
            Some(old) if old.is_deleting() => return Err(StoreError::Deleting(key)),
            Some(old) => {
                let spec_changed = old.spec != object.spec;
                let host: Vec<String> = old
                    .metadata
                    .finalizers
                    .iter()
                    .filter(|f| f.starts_with(FINALIZER_PREFIX))
                    .cloned()
                    .collect();
                object.metadata.finalizers.extend(host);
                object.metadata.uid = old.metadata.uid.clone();
                object.metadata.generation = old.metadata.generation + u64::from(spec_changed);
                object.status = old.status.clone();
                object.metadata.resource_version = old.metadata.resource_version;
                if !spec_changed
                    && old.metadata.labels == object.metadata.labels
                    && old.metadata.finalizers == object.metadata.finalizers
                    && old.api_version == object.api_version
                {
                    applied.push(Applied {
                        object: old.clone(),
                        action: None,
                    });
                    continue;
                }
                Action::Updated
            }
        };
        next_version += 1;
        object.metadata.resource_version = next_version;
        mine.insert(key, object.clone());
        applied.push(Applied {
            object,
            action: Some(action),
        });
    }
    group.next_uid = next_uid;
    group.next_version = next_version;
    for (key, object) in mine {
        if !group.objects.contains_key(&key) {
            group.order.push(key.clone());
        }
        group.objects.insert(key, object);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier, Mutex};

    use super::*;
    use crate::store::{Backend, Commit, Loaded};

    /// A backend that holds its first commit until the test has queued the
    /// writes it wants behind it, records each commit's object rows, and
    /// fails every commit from attempt `fail_from` on.
    #[derive(Clone)]
    struct Gate {
        attempts: Arc<AtomicUsize>,
        rows: Arc<Mutex<Vec<usize>>>,
        hold: Arc<Barrier>,
        fail_from: usize,
    }

    impl Gate {
        fn new(fail_from: usize) -> Self {
            Self {
                attempts: Arc::default(),
                rows: Arc::default(),
                hold: Arc::new(Barrier::new(2)),
                fail_from,
            }
        }
    }

    impl Backend for Gate {
        fn load(&self) -> Result<Loaded, StoreError> {
            Ok(Loaded::default())
        }

        fn commit(&self, commit: &Commit<'_>) -> Result<(), StoreError> {
            let attempt = self.attempts.fetch_add(1, Ordering::SeqCst);
            if attempt == 0 {
                self.hold.wait(); // the test sees this commit in flight
                self.hold.wait(); // the test has queued the others
            }
            if attempt >= self.fail_from {
                return Err(StoreError::Storage("the disk is full".into()));
            }
            self.rows.lock().unwrap().push(commit.objects.len());
            Ok(())
        }
    }

    fn thing(name: &str) -> Object {
        Object::new("Thing", "", name, serde_json::json!({"n": name}))
    }

    type Write = Box<dyn FnOnce(&Store) -> Answer + Send>;

    /// Apply "first" with its commit held, queue `writes` behind it in this
    /// order, release it; the answers of the queued writes, in order.
    fn queued_behind_a_commit(gate: &Gate, store: &Store, writes: Vec<Write>) -> Vec<Answer> {
        let first = {
            let store = store.clone();
            std::thread::spawn(move || store.apply(thing("first")))
        };
        gate.hold.wait();
        let threads: Vec<_> = writes
            .into_iter()
            .enumerate()
            .map(|(i, write)| {
                let s = store.clone();
                let t = std::thread::spawn(move || write(&s));
                // One at a time, so that they queue in this order.
                while store.shared.writes.waiting() < i + 1 {
                    std::thread::yield_now();
                }
                t
            })
            .collect();
        gate.hold.wait();
        first.join().unwrap().unwrap();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    fn one(answer: Result<Applied, StoreError>) -> Answer {
        answer.map(|a| vec![a])
    }

    #[test]
    fn concurrent_writes_share_one_commit_and_each_is_answered_on_its_own() {
        let gate = Gate::new(usize::MAX);
        let store = Store::with_backend(gate.clone()).unwrap();
        let writes: Vec<Write> = vec![
            Box::new(|s| s.apply_all(vec![thing("a")])),
            Box::new(|s| one(s.create(thing("b")))),
            // Refused: "b" is staged by the write before it in the group.
            Box::new(|s| one(s.create(thing("b")))),
            Box::new(|s| s.apply_all(vec![thing("c"), thing("d")])),
            // Refused as a whole: "e" is new, but "x" names a version
            // that is not stored.
            Box::new(|s| {
                let mut x = thing("x");
                x.metadata.resource_version = 99;
                s.apply_all(vec![thing("e"), x])
            }),
        ];
        let answers = queued_behind_a_commit(&gate, &store, writes);
        assert_eq!(
            *gate.rows.lock().unwrap(),
            vec![1, 4],
            "first; then a, b, c and d in one commit"
        );
        assert!(answers[0].is_ok() && answers[1].is_ok() && answers[3].is_ok());
        assert!(matches!(answers[2], Err(StoreError::AlreadyExists(_))));
        assert!(matches!(
            answers[4],
            Err(StoreError::Conflict { given: 99, .. })
        ));
        assert!(
            store.get(&thing("e").key()).is_none(),
            "nothing of a refused write"
        );
        let stored = ["first", "a", "b", "c", "d"];
        let uids: std::collections::HashSet<String> = stored
            .iter()
            .map(|n| store.get(&thing(n).key()).unwrap().metadata.uid)
            .collect();
        assert_eq!(uids.len(), stored.len(), "every create got its own uid");
        let versions: std::collections::HashSet<u64> = stored
            .iter()
            .map(|n| {
                store
                    .get(&thing(n).key())
                    .unwrap()
                    .metadata
                    .resource_version
            })
            .collect();
        assert_eq!(versions.len(), stored.len(), "and its own resource version");
    }

    #[test]
    fn a_write_sees_an_earlier_write_of_its_group_for_resource_versions() {
        let gate = Gate::new(usize::MAX);
        let store = Store::with_backend(gate.clone()).unwrap();
        let update = |n: u64| -> Write {
            Box::new(move |s| {
                let mut o = thing("first");
                o.spec = serde_json::json!({ "n": n });
                // The version "first" was created at.
                o.metadata.resource_version = 1;
                one(s.update(o))
            })
        };
        let answers = queued_behind_a_commit(&gate, &store, vec![update(2), update(3)]);
        assert!(answers[0].is_ok());
        assert!(
            matches!(
                answers[1],
                Err(StoreError::Conflict {
                    given: 1,
                    stored: 2,
                    ..
                })
            ),
            "{:?}",
            answers[1]
        );
        let first = store.get(&thing("first").key()).unwrap();
        assert_eq!(first.spec["n"], 2);
        assert_eq!(first.metadata.generation, 2);
    }

    #[test]
    fn a_failed_group_commit_fails_every_write_in_it_and_applies_nothing() {
        let gate = Gate::new(1);
        let store = Store::with_backend(gate.clone()).unwrap();
        let mut feed = store.feed();
        let writes: Vec<Write> = vec![
            Box::new(|s| s.apply_all(vec![thing("a")])),
            Box::new(|s| s.apply_all(vec![thing("b"), thing("c")])),
        ];
        let answers = queued_behind_a_commit(&gate, &store, writes);
        for answer in &answers {
            assert!(
                matches!(answer, Err(StoreError::Storage(why)) if why == "the disk is full"),
                "{answer:?}"
            );
        }
        assert_eq!(
            gate.attempts.load(Ordering::SeqCst),
            2,
            "one commit for both"
        );
        for name in ["a", "b", "c"] {
            assert!(
                store.get(&thing(name).key()).is_none(),
                "{name} is not applied"
            );
        }
        // Only "first" was announced.
        let mut announced = Vec::new();
        while let Ok(event) = feed.try_recv() {
            announced.push(event);
        }
        assert_eq!(announced.len(), 1, "{announced:?}");
    }
}
