//! What a controller remembers about each key between reconciles.
//!
//! Guarantees: a key's memory (failures in a row, the state its plugin
//! returned, the change not yet reconciled, the retry scheduled for it) lives
//! here from its first change until it is forgotten (object gone, delete
//! reconciled, ownership or kind lost); changes that arrive before a reconcile
//! fold into one action by [`merge`], where a delete always wins and a create
//! stays a create.

use crate::object::Action;
use crate::queue::EventRef;

/// Per-key memory between attempts.
#[derive(Default)]
pub(super) struct KeyState {
    pub(super) failures: u32,
    pub(super) state: Vec<(String, String)>,
    /// The change not yet reconciled, if any.
    pub(super) pending: Option<Action>,
    /// The event a scheduled retry is for, while one is scheduled.
    pub(super) retry: Option<EventRef>,
    /// Queued by a full reconciliation and not reconciled since: drift the
    /// plugin reports on this key's next call counts as out of sync.
    pub(super) full_round: bool,
    /// Its last call failed: it is called alone, never in a round, until a
    /// call succeeds. Unlike `failures`, a change does not reset it, so a key
    /// that fails every round stays out of them.
    pub(super) alone: bool,
}

/// Fold a new change into the one not yet reconciled.
pub(super) fn merge(pending: Option<Action>, new: Action) -> Action {
    match (pending, new) {
        (_, Action::Deleted) => Action::Deleted,
        (Some(Action::Created), _) => Action::Created,
        (Some(Action::Updated), Action::Resynced) => Action::Updated,
        (_, new) => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_wins_and_a_create_stays_a_create() {
        assert_eq!(
            merge(Some(Action::Created), Action::Deleted),
            Action::Deleted
        );
        assert_eq!(
            merge(Some(Action::Created), Action::Updated),
            Action::Created
        );
        assert_eq!(
            merge(Some(Action::Updated), Action::Resynced),
            Action::Updated
        );
        assert_eq!(
            merge(Some(Action::Resynced), Action::Updated),
            Action::Updated
        );
        assert_eq!(merge(None, Action::Resynced), Action::Resynced);
    }
}
