//! Admission: asking a controller's plugin whether an object may be stored.
//!
//! Guarantees: an object of a kind whose plugin exports `admission` is checked
//! by that plugin (every controller of the kind) before the API stores it; a
//! refusal or a failed check stores nothing. Checks run on the controllers'
//! runtime, in the sandbox under the plugin's usual limits, one at a time per
//! controller on an instance kept for them (apart from the workers').

use tracing::Instrument;

use super::Controller;
use crate::object::Object;
use crate::plugin::object_to_wit;

/// Why an object was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The plugin looked at the object and refused it.
    #[error(
        "{key} was refused by plugin {plugin}: {message}. Nothing was stored; fix the object \
         and apply it again"
    )]
    Refused {
        key: String,
        plugin: String,
        message: String,
    },
    /// The plugin could not check the object (a trap, a timeout ...).
    #[error(
        "plugin {plugin} could not check {key}: {error}. Nothing was stored; try again, and \
         if it keeps failing, look at the plugin's log lines"
    )]
    Failed {
        key: String,
        plugin: String,
        error: String,
    },
}

/// What a plugin's message may add to an error, at most.
const MAX_MESSAGE: usize = 1000;

fn bounded(message: String) -> String {
    match message.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message,
    }
}

impl Controller {
    /// Ask the plugin whether `object` may be stored. Admits everything if the
    /// plugin does not export `admission`.
    pub async fn admit(&self, object: &Object) -> Result<(), AdmissionError> {
        let active = self.active();
        if !active.reconciler.can_validate() {
            return Ok(());
        }
        let key = object.key().to_string();
        let span = tracing::info_span!("admission", controller = %self.name(), key = %key);
        let request = object_to_wit(object);
        let mut held = self.admission.lock().await;
        // A slot of an older version (before a swap) is dropped.
        if held.as_ref().is_none_or(|(g, _)| *g != active.generation) {
            *held = Some((active.generation, active.reconciler.slot()));
        }
        let (_, slot) = held.as_mut().expect("just set");
        let result = slot.validate(&request).instrument(span).await;
        let plugin = self.name().to_string();
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(AdmissionError::Refused {
                key,
                plugin,
                message: bounded(message),
            }),
            Err(e) => Err(AdmissionError::Failed {
                key,
                plugin,
                error: bounded(e.to_string()),
            }),
        }
    }
}
