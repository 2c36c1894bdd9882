//! `legacy`: a plugin built straight from `wit/reconciler.wit` as it was at
//! 0.1.1 (a frozen copy in `plugins/legacy/wit/`), with no SDK. It exports
//! neither `pruner` nor `admission` (0.1.2), and imports the 0.1.1 host
//! interfaces, so a host at a newer 0.1.x must still load it, admit every
//! object of its kind `Legacy`, and reconcile them. Do not update its WIT.
//!
//! It writes `{"seen": <generation>}` as the status of each object.

wit_bindgen::generate!({
    path: "wit",
    world: "plugin",
});

use exports::setpoint::reconciler::reconciler::Guest;
use setpoint::reconciler::types::{Failure, Info, Outcome, Request};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> Info {
        Info {
            name: "legacy".into(),
            version: "0.1.1".into(),
            kinds: vec!["Legacy".into()],
            resync_interval: None,
        }
    }

    fn reconcile(request: Request) -> Result<Outcome, Failure> {
        Ok(Outcome {
            requeue_after: None,
            state: Vec::new(),
            status: Some(format!("{{\"seen\": {}}}", request.object.generation)),
        })
    }
}

export!(Legacy);
