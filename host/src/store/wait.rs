//! Waiting until objects are reconciled ([`Store::wait`]): the keys not
//! reconciled, kept up to date by every change, and the waits to wake.
//!
//! Guarantee: an open wait costs nothing per change. Every change to an
//! object or its status updates [`Unsettled`] under the store's lock, and a
//! wait is woken only when what it waits for may have happened (its key
//! settled, a kind it waits for has nothing left, or a key failed for good).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::{Inner, Phase, ReconcileStatus, Store, WaitError};
use crate::object::ObjectKey;

/// Where one key stands for [`Store::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settled {
    /// Done at its current generation, or gone.
    Reconciled,
    /// Not reconciled yet; it will be (a change, a retry) or may still be.
    Waiting,
    /// Not reconciled, and its last reconcile failed for good
    /// ([`ReconcileStatus::terminal`]): nothing will retry it.
    Failed,
}

/// What [`Store::wait`] selects: one key, or every key of some kinds (all
/// kinds if empty; sorted, no duplicates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Selection {
    Key(ObjectKey),
    Kinds(Vec<String>),
}

impl Selection {
    pub(super) fn new(key: Option<&ObjectKey>, kinds: &[String]) -> Self {
        match key {
            Some(key) => Selection::Key(key.clone()),
            None => {
                let mut kinds = kinds.to_vec();
                kinds.sort();
                kinds.dedup();
                Selection::Kinds(kinds)
            }
        }
    }

    pub(super) fn has_kind(&self, kind: &str) -> bool {
        match self {
            Selection::Key(key) => key.kind == kind,
            Selection::Kinds(kinds) => kinds.is_empty() || kinds.iter().any(|k| k == kind),
        }
    }
}

/// One open [`Store::wait`].
pub(super) struct Waiter {
    id: u64,
    selection: Selection,
    wake: Arc<tokio::sync::Notify>,
}

/// The keys that are not reconciled, kept by every change to an object or its
/// status (see [`Inner::refresh`]), so that an open [`Store::wait`] costs
/// nothing per change: waiters are woken only when what they wait for may have
/// happened (their key settled, a kind has nothing left to reconcile, or a key
/// failed for good), and then check a few counters. The list of what is not
/// reconciled is built only when a wait gives up.
#[derive(Default)]
pub(super) struct Unsettled {
    /// Keys not reconciled, by kind; a kind with none is not in the map.
    waiting: HashMap<String, HashSet<ObjectKey>>,
    /// The keys of `waiting` that failed for good, by kind; likewise.
    failed: HashMap<String, HashSet<ObjectKey>>,
    waiting_total: usize,
    failed_total: usize,
    /// Open waits.
    waiters: Vec<Waiter>,
    /// The keys open waits wait for one by one, with how many wait for each.
    watched: HashMap<ObjectKey, usize>,
    next_waiter: u64,
}

/// What a wait found on a check.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Check {
    Reconciled,
    Waiting,
    Failed,
}

impl Unsettled {
    pub(super) fn get(&self, key: &ObjectKey) -> Settled {
        let in_set = |map: &HashMap<String, HashSet<ObjectKey>>| {
            map.get(&key.kind).is_some_and(|keys| keys.contains(key))
        };
        if !in_set(&self.waiting) {
            Settled::Reconciled
        } else if in_set(&self.failed) {
            Settled::Failed
        } else {
            Settled::Waiting
        }
    }

    /// Record that `key` now stands at `now`, and wake the waits that may be over.
    pub(super) fn set(&mut self, key: &ObjectKey, now: Settled) {
        let was = self.get(key);
        if was == now {
            return;
        }
        if was == Settled::Failed {
            remove_key(&mut self.failed, key);
            self.failed_total -= 1;
        }
        match (was, now) {
            (Settled::Reconciled, _) => {
                add_key(&mut self.waiting, key);
                self.waiting_total += 1;
            }
            (_, Settled::Reconciled) => {
                remove_key(&mut self.waiting, key);
                self.waiting_total -= 1;
            }
            _ => {}
        }
        if now == Settled::Failed {
            add_key(&mut self.failed, key);
            self.failed_total += 1;
        }
        self.wake(key, now);
    }

    /// Wake the waits `key` settling at `now` may have ended. Getting more
    /// unreconciled ends no wait, and nothing is woken while keys of a kind are
    /// still waiting, unless one of them is watched alone or failed for good.
    pub(super) fn wake(&self, key: &ObjectKey, now: Settled) {
        if self.waiters.is_empty() || now == Settled::Waiting {
            return;
        }
        let failed = now == Settled::Failed;
        let kind_clear = !self.waiting.contains_key(&key.kind);
        let watched = self.watched.contains_key(key);
        if !(failed || kind_clear || watched) {
            return;
        }
        for w in &self.waiters {
            let hit = match &w.selection {
                Selection::Key(k) => k == key,
                kinds => (failed || kind_clear) && kinds.has_kind(&key.kind),
            };
            if hit {
                w.wake.notify_one();
            }
        }
    }

    pub(super) fn check(&self, selection: &Selection, keep_waiting: bool) -> Check {
        let (failed, waiting) = match selection {
            Selection::Key(key) => match self.get(key) {
                Settled::Reconciled => (false, false),
                Settled::Waiting => (false, true),
                Settled::Failed => (true, true),
            },
            Selection::Kinds(kinds) if kinds.is_empty() => {
                (self.failed_total > 0, self.waiting_total > 0)
            }
            Selection::Kinds(kinds) => (
                kinds.iter().any(|k| self.failed.contains_key(k)),
                kinds.iter().any(|k| self.waiting.contains_key(k)),
            ),
        };
        if failed && !keep_waiting {
            Check::Failed
        } else if waiting {
            Check::Waiting
        } else {
            Check::Reconciled
        }
    }

    /// The keys of `map` that `selection` selects, in order.
    pub(super) fn selected(
        map: &HashMap<String, HashSet<ObjectKey>>,
        selection: &Selection,
    ) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = match selection {
            Selection::Key(key) => map
                .get(&key.kind)
                .filter(|keys| keys.contains(key))
                .map(|_| key.clone())
                .into_iter()
                .collect(),
            Selection::Kinds(_) => map
                .iter()
                .filter(|(kind, _)| selection.has_kind(kind))
                .flat_map(|(_, keys)| keys.iter().cloned())
                .collect(),
        };
        keys.sort();
        keys
    }

    pub(super) fn register(&mut self, selection: Selection, wake: Arc<tokio::sync::Notify>) -> u64 {
        self.next_waiter += 1;
        let id = self.next_waiter;
        if let Selection::Key(key) = &selection {
            *self.watched.entry(key.clone()).or_default() += 1;
        }
        self.waiters.push(Waiter {
            id,
            selection,
            wake,
        });
        id
    }

    pub(super) fn unregister(&mut self, id: u64) {
        let Some(at) = self.waiters.iter().position(|w| w.id == id) else {
            return;
        };
        let waiter = self.waiters.swap_remove(at);
        if let Selection::Key(key) = waiter.selection
            && let Some(n) = self.watched.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                self.watched.remove(&key);
            }
        }
    }
}

pub(super) fn add_key(map: &mut HashMap<String, HashSet<ObjectKey>>, key: &ObjectKey) {
    map.entry(key.kind.clone()).or_default().insert(key.clone());
}

pub(super) fn remove_key(map: &mut HashMap<String, HashSet<ObjectKey>>, key: &ObjectKey) {
    if let Some(keys) = map.get_mut(&key.kind) {
        keys.remove(key);
        if keys.is_empty() {
            map.remove(&key.kind);
        }
    }
}

impl Store {
    /// Wait until every object selected is reconciled (see
    /// [`is_reconciled`](Self::is_reconciled)): one object (`key`), or every object
    /// of `kinds` (all kinds if empty). Objects in error that will be retried
    /// are waited for; one that failed for good ([`mark_failed`](Self::mark_failed))
    /// ends the wait at once with [`WaitError::Failed`], naming every selected
    /// object in that state. On timeout, [`WaitError::TimedOut`] names the
    /// objects still not reconciled, with their status.
    pub async fn wait(
        &self,
        key: Option<&ObjectKey>,
        kinds: &[String],
        timeout: Duration,
    ) -> Result<(), WaitError> {
        self.wait_with(key, kinds, timeout, false).await
    }

    /// [`wait`](Self::wait); with `keep_waiting`, objects that failed for good
    /// are waited for like any other (until the timeout, or until a change
    /// reconciles them).
    ///
    /// An open wait costs nothing per change: the store keeps the set of keys
    /// not reconciled as it changes, and wakes a wait only when its key
    /// settles, a kind it waits for has nothing left, or a key failed for good.
    pub async fn wait_with(
        &self,
        key: Option<&ObjectKey>,
        kinds: &[String],
        timeout: Duration,
        keep_waiting: bool,
    ) -> Result<(), WaitError> {
        /// Unregisters the wait however it ends (a dropped HTTP request too).
        struct Registered<'a> {
            store: &'a Store,
            id: u64,
        }
        impl Drop for Registered<'_> {
            fn drop(&mut self) {
                self.store.lock().unsettled.unregister(self.id);
            }
        }

        let deadline = tokio::time::Instant::now() + timeout;
        let selection = Selection::new(key, kinds);
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut registered = None;
        loop {
            {
                let mut inner = self.lock();
                match inner.unsettled.check(&selection, keep_waiting) {
                    Check::Reconciled => return Ok(()),
                    Check::Failed => return Err(WaitError::Failed(inner.failed(&selection))),
                    Check::Waiting => {}
                }
                if registered.is_none() {
                    // Under the same lock as the check: no change slips between.
                    let id = inner.unsettled.register(selection.clone(), wake.clone());
                    registered = Some(Registered { store: self, id });
                }
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let inner = self.lock();
        match inner.unsettled.check(&selection, keep_waiting) {
            Check::Reconciled => Ok(()),
            Check::Failed => Err(WaitError::Failed(inner.failed(&selection))),
            Check::Waiting => Err(WaitError::TimedOut(inner.waiting(&selection))),
        }
    }
}

impl Inner {
    pub(super) fn reconciled(&self, key: &ObjectKey) -> bool {
        match (self.objects.get(key), self.status.get(key)) {
            (None, _) => true,
            (Some(o), _) if o.is_deleting() => false,
            (Some(o), Some(s)) => {
                s.phase == Phase::Done && s.observed_generation >= o.metadata.generation
            }
            (Some(_), None) => false,
        }
    }

    /// Where `key` stands now, from the objects and statuses themselves.
    pub(super) fn settled(&self, key: &ObjectKey) -> Settled {
        if self.reconciled(key) {
            Settled::Reconciled
        } else if self
            .status
            .get(key)
            .is_some_and(|s| s.phase == Phase::Error && s.terminal)
        {
            Settled::Failed
        } else {
            Settled::Waiting
        }
    }

    /// Bring [`Unsettled`] up to date after `key`'s object or status changed.
    /// Every change to either calls this under the store's lock.
    pub(super) fn refresh(&mut self, key: &ObjectKey) {
        let now = self.settled(key);
        self.unsettled.set(key, now);
    }

    /// The selected keys that failed for good, with their status, in order.
    pub(super) fn failed(&self, selection: &Selection) -> Vec<(ObjectKey, ReconcileStatus)> {
        Unsettled::selected(&self.unsettled.failed, selection)
            .into_iter()
            .filter_map(|k| {
                let status = self.status.get(&k).cloned()?;
                Some((k, status))
            })
            .collect()
    }

    /// The selected keys not reconciled, with their status, in order.
    pub(super) fn waiting(
        &self,
        selection: &Selection,
    ) -> Vec<(ObjectKey, Option<ReconcileStatus>)> {
        Unsettled::selected(&self.unsettled.waiting, selection)
            .into_iter()
            .map(|k| {
                let status = self.status.get(&k).cloned();
                (k, status)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::file;
    use super::*;
    use crate::object::Object;
    use serde_json::json;

    #[tokio::test(start_paused = true)]
    async fn wait_returns_once_every_object_is_reconciled_or_names_the_rest() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap().object;
        let b = store.apply(file("b", "1")).unwrap().object;
        store.mark_done(&a.key(), 1).unwrap();
        store.mark_error(&b.key(), "disk full").unwrap();
        let Err(WaitError::TimedOut(waiting)) = store.wait(None, &[], Duration::from_secs(1)).await
        else {
            panic!("b is in error, to be retried: waited for until the timeout");
        };
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].0, b.key());
        assert_eq!(
            waiting[0].1.as_ref().unwrap().last_error.as_deref(),
            Some("disk full")
        );
        assert_eq!(
            store.wait(Some(&a.key()), &[], Duration::ZERO).await,
            Ok(())
        );
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait(None, &[], Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        store.mark_done(&b.key(), 1).unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_stops_at_once_on_an_object_that_failed_for_good_unless_told_to_keep_waiting() {
        let store = Store::new();
        let [a, b, c] = ["a", "b", "c"].map(|n| store.apply(file(n, "1")).unwrap().object.key());
        let other = store
            .apply(Object::new("Other", "", "d", json!({})))
            .unwrap()
            .object
            .key();
        store.mark_error(&a, "try again").unwrap();
        store.mark_failed(&b, "spec.content: invalid type").unwrap();
        store.mark_done(&c, 1).unwrap();
        let status = store.status(&b).unwrap();
        assert!(status.terminal && status.phase == Phase::Error);
        assert!(!store.status(&a).unwrap().terminal);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["terminal"], true, "{json}");

        let started = tokio::time::Instant::now();
        let failed = store.wait(None, &[], Duration::from_secs(60)).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "at once, not after the timeout"
        );
        let Err(WaitError::Failed(failed)) = failed else {
            panic!("{failed:?}")
        };
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, b);
        assert_eq!(
            failed[0].1.last_error.as_deref(),
            Some("spec.content: invalid type")
        );
        let of_kind = store
            .wait(None, &["File".into()], Duration::from_secs(60))
            .await;
        assert!(
            matches!(of_kind, Err(WaitError::Failed(ref f)) if f.len() == 1),
            "{of_kind:?}"
        );
        let one = store.wait(Some(&b), &[], Duration::from_secs(60)).await;
        assert!(matches!(one, Err(WaitError::Failed(_))), "{one:?}");
        // An error to be retried is waited for; so is a failure elsewhere.
        assert_eq!(
            store.wait(Some(&a), &[], Duration::from_secs(1)).await,
            Err(WaitError::TimedOut(vec![(a.clone(), store.status(&a))]))
        );
        assert_eq!(
            store
                .wait(None, &["Other".into()], Duration::from_secs(1))
                .await,
            Err(WaitError::TimedOut(vec![(
                other.clone(),
                store.status(&other)
            )]))
        );
        // Told to keep waiting: the failed object is one more to wait for.
        let Err(WaitError::TimedOut(waiting)) = store
            .wait_with(None, &[], Duration::from_secs(1), true)
            .await
        else {
            panic!("keeps waiting until the timeout")
        };
        let keys: Vec<_> = waiting.into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![a.clone(), b.clone(), other.clone()]);

        // An open wait stops when a key fails for good while it waits...
        let waiter = {
            let (store, a) = (store.clone(), a.clone());
            tokio::spawn(async move { store.wait(Some(&a), &[], Duration::from_secs(600)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        store
            .mark_failed(&a, "gave up after 11 attempts: no")
            .unwrap();
        let Err(WaitError::Failed(failed)) = waiter.await.unwrap() else {
            panic!("a failed for good")
        };
        assert_eq!(
            failed[0].1.last_error.as_deref(),
            Some("gave up after 11 attempts: no")
        );
        // ...and one kept waiting ends when the failed objects are changed and done.
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .wait_with(None, &["File".into()], Duration::from_secs(600), true)
                    .await
            })
        };
        tokio::task::yield_now().await;
        store.apply(file("b", "2")).unwrap();
        assert!(!store.status(&b).unwrap().terminal, "a change clears it");
        store.mark_done(&b, 2).unwrap();
        store.mark_done(&a, 1).unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(
            store.lock().unsettled.waiters.is_empty(),
            "every wait unregistered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_wait_is_woken_only_when_it_may_be_over_and_unregisters_when_dropped() {
        let store = Store::new();
        let files: Vec<_> = (0..3)
            .map(|i| {
                store
                    .apply(file(&format!("f{i}"), "1"))
                    .unwrap()
                    .object
                    .key()
            })
            .collect();
        let other = store
            .apply(Object::new("Other", "", "o", json!({})))
            .unwrap()
            .object
            .key();
        let spawn = |key: Option<ObjectKey>, kinds: Vec<String>| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .wait(key.as_ref(), &kinds, Duration::from_secs(600))
                    .await
            })
        };
        let all = spawn(None, vec![]);
        let of_files = spawn(None, vec!["File".into()]);
        let first = spawn(Some(files[0].clone()), vec![]);
        tokio::task::yield_now().await;
        assert_eq!(store.lock().unsettled.waiters.len(), 3);
        store.mark_done(&files[0], 1).unwrap();
        assert_eq!(first.await.unwrap(), Ok(()));
        store.mark_done(&files[1], 1).unwrap();
        store.mark_done(&other, 1).unwrap();
        tokio::task::yield_now().await;
        assert!(!all.is_finished() && !of_files.is_finished());
        store.mark_done(&files[2], 1).unwrap();
        assert_eq!(of_files.await.unwrap(), Ok(()));
        assert_eq!(all.await.unwrap(), Ok(()));
        // A wait dropped half way (an HTTP client gone) leaves nothing behind.
        store.apply(file("f0", "2")).unwrap();
        let dropped = spawn(Some(files[0].clone()), vec![]);
        tokio::task::yield_now().await;
        assert_eq!(store.lock().unsettled.waiters.len(), 1);
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        let inner = store.lock();
        assert!(inner.unsettled.waiters.is_empty() && inner.unsettled.watched.is_empty());
    }

    /// What `wait` computed before the bookkeeping: a scan of every object.
    fn full_scan(
        inner: &Inner,
        key: Option<&ObjectKey>,
        kinds: &[String],
    ) -> Vec<(ObjectKey, Option<ReconcileStatus>)> {
        let mut out: Vec<_> = match key {
            Some(key) => (!inner.reconciled(key))
                .then(|| (key.clone(), inner.status.get(key).cloned()))
                .into_iter()
                .collect(),
            None => inner
                .objects
                .keys()
                .filter(|k| kinds.is_empty() || kinds.contains(&k.kind))
                .filter(|k| !inner.reconciled(k))
                .map(|k| (k.clone(), inner.status.get(k).cloned()))
                .collect(),
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The bookkeeping agrees with a full scan, for every selection a wait can make.
    fn assert_bookkeeping_matches_a_full_scan(store: &Store, universe: &[ObjectKey], what: &str) {
        let inner = store.lock();
        let u = &inner.unsettled;
        let sizes = |m: &HashMap<String, HashSet<ObjectKey>>| {
            assert!(
                m.values().all(|keys| !keys.is_empty()),
                "{what}: empty sets are removed"
            );
            m.values().map(HashSet::len).sum::<usize>()
        };
        assert_eq!(u.waiting_total, sizes(&u.waiting), "{what}");
        assert_eq!(u.failed_total, sizes(&u.failed), "{what}");
        let kinds = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut selections: Vec<(Option<&ObjectKey>, Vec<String>)> = vec![
            (None, vec![]),
            (None, kinds(&["File"])),
            (None, kinds(&["Other"])),
            (None, kinds(&["Other", "File", "Other"])),
            (None, kinds(&["Nothing"])),
        ];
        selections.extend(universe.iter().map(|k| (Some(k), vec![])));
        for (key, kinds) in selections {
            let selection = Selection::new(key, &kinds);
            let scan = full_scan(&inner, key, &kinds);
            assert_eq!(inner.waiting(&selection), scan, "{what}: {selection:?}");
            let failed: Vec<_> = scan
                .iter()
                .filter_map(|(k, s)| {
                    s.clone()
                        .filter(|s| s.phase == Phase::Error && s.terminal)
                        .map(|s| (k.clone(), s))
                })
                .collect();
            assert_eq!(inner.failed(&selection), failed, "{what}: {selection:?}");
            let expected = if !failed.is_empty() {
                Check::Failed
            } else if scan.is_empty() {
                Check::Reconciled
            } else {
                Check::Waiting
            };
            assert_eq!(
                u.check(&selection, false),
                expected,
                "{what}: {selection:?}"
            );
            let kept = if scan.is_empty() {
                Check::Reconciled
            } else {
                Check::Waiting
            };
            assert_eq!(u.check(&selection, true), kept, "{what}: {selection:?}");
        }
    }

    #[test]
    fn the_unreconciled_bookkeeping_equals_a_full_scan_after_any_sequence_of_changes() {
        let universe: Vec<ObjectKey> = ["File", "Other"]
            .iter()
            .flat_map(|kind| {
                ["", "team"].iter().flat_map(move |ns| {
                    ["a", "b", "c"]
                        .iter()
                        .map(move |n| ObjectKey::new(kind, ns, n))
                })
            })
            .collect();
        for seed in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store.redb");
            let store = Store::open(&path).unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            if rng.bool() {
                store.register_finalizer("File", "files").unwrap();
            }
            for step in 0..250 {
                let key = &universe[rng.usize(..universe.len())];
                let op = rng.u8(..12);
                let generation = rng.u64(0..4);
                let spec = json!({ "content": rng.u8(..3) });
                let object = || Object::new(&key.kind, &key.namespace, &key.name, spec.clone());
                // Refusals (a deleting or missing object) are part of the game.
                let _ = match op {
                    0..=2 => store.apply(object()).map(drop),
                    3 => store.delete(key, None).map(drop),
                    4 => store.finalize(key, "setpoint.dev/files").map(drop),
                    5 => store.force_delete(key, None).map(drop),
                    6 => store.register_finalizer(&key.kind, "other").map(drop),
                    7 | 8 => store.mark_done(key, generation),
                    9 => store.mark_error(key, "retry"),
                    10 => store.mark_failed(key, "for good"),
                    _ => store.set_status(key, r#"{"x":1}"#),
                };
                let what = format!("seed {seed}, step {step}, op {op} on {key}");
                assert_bookkeeping_matches_a_full_scan(&store, &universe, &what);
            }
            // Rebuilt from the file at open, it agrees too.
            store.flush().unwrap();
            drop(store);
            let store = Store::open(&path).unwrap();
            assert_bookkeeping_matches_a_full_scan(
                &store,
                &universe,
                &format!("seed {seed}, reopened"),
            );
        }
    }
}
