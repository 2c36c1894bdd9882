//! `POST /v1/events`: CloudEvents in, over the HTTP protocol binding, in binary
//! mode (`ce-*` headers, the data as the body) or structured mode
//! (`Content-Type: application/cloudevents+json`). Parsing is the
//! `cloudevents-sdk` crate's.
//!
//! The mapping, by the event's `type`:
//!
//! | `type` | what happens |
//! |---|---|
//! | `dev.setpoint.object.apply` | the data is an object manifest (JSON, or YAML text): it is created or updated |
//! | `dev.setpoint.object.delete` | the object named by `subject` (`Kind:namespace/name`, or `Kind:name`) is deleted; without a subject, the one the data's manifest names |
//! | `dev.setpoint.reconcile` | the object named by `subject` is queued for a reconcile (action `resynced`) with every controller of its kind; a full queue answers 503 |
//!
//! Any other type is refused with 400 and the list above. The answer is 202
//! with `{"id", "type", "key", "result"}`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use cloudevents::AttributesReader;
use cloudevents::event::Data;

use super::objects::parse_objects;
use super::{ApiError, AppState, check_kinds, durable, read_body, respond};
use crate::controller::TriggerError;
use crate::object::{Object, ObjectKey};
use crate::queue::QueueError;

pub const APPLY: &str = "dev.setpoint.object.apply";
pub const DELETE: &str = "dev.setpoint.object.delete";
pub const RECONCILE: &str = "dev.setpoint.reconcile";

pub async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.max_body).await?;
    let mut event =
        cloudevents::binding::http::to_event(&headers, bytes.to_vec()).map_err(|e| {
            ApiError::bad_request(format!(
                "the request is not a CloudEvent: {e}. Send binary mode (headers ce-specversion, \
             ce-id, ce-source, ce-type; the data as the body) or structured mode \
             (Content-Type: application/cloudevents+json)"
            ))
        })?;
    let ty = event.ty().to_string();
    let id = event.id().to_string();
    let subject = event.subject().map(str::to_string);
    let (content_type, _, data) = event.take_data();
    let (key, result) = match ty.as_str() {
        APPLY => {
            let object = data_object(content_type.as_deref(), data)?;
            check_kinds(&state, [object.kind.as_str()])?;
            state.manager.admit(std::slice::from_ref(&object)).await?;
            let applied = durable(&state.store, move |s| s.apply(object)).await?;
            let result = if applied.action.is_some() {
                "applied"
            } else {
                "unchanged"
            };
            (applied.object.key(), result)
        }
        DELETE => {
            let key = match subject {
                Some(s) => subject_key(&s)?,
                None => data_object(content_type.as_deref(), data)?.key(),
            };
            let deleted = {
                let key = key.clone();
                durable(&state.store, move |s| s.delete(&key, None)).await?
            };
            let result = match deleted {
                Some(_) => "deleting",
                None => "removed",
            };
            (key, result)
        }
        RECONCILE => {
            let subject = subject.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "a {RECONCILE} event needs a subject: the object key, e.g. Greeting:world"
                ))
            })?;
            let key = subject_key(&subject)?;
            check_kinds(&state, [key.kind.as_str()])?;
            if state.store.get(&key).is_none() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "object {} not found; apply it first",
                        crate::object::shorten(&key.to_string())
                    ),
                ));
            }
            for controller in state.manager.controllers_of(&key.kind) {
                controller.trigger(key.clone()).map_err(|e| match e {
                    TriggerError::Queue(QueueError::Full(_)) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("controller {}: {e}", controller.name()),
                    ),
                    TriggerError::NotOwned { .. } => ApiError::new(
                        StatusCode::MISDIRECTED_REQUEST,
                        format!("controller {}: {e}", controller.name()),
                    ),
                    TriggerError::Queue(QueueError::ShutDown) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the host is shutting down; send the event again after it restarts",
                    ),
                })?;
            }
            (key, "queued")
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown CloudEvent type {}; this host accepts {APPLY} (data: an \
                 object manifest), {DELETE} (subject: Kind:namespace/name) and {RECONCILE} \
                 (subject: Kind:namespace/name)",
                crate::object::quote(other)
            )));
        }
    };
    Ok(respond(
        &headers,
        StatusCode::ACCEPTED,
        &serde_json::json!({ "id": id, "type": ty, "key": key.to_string(), "result": result }),
    ))
}

fn subject_key(subject: &str) -> Result<ObjectKey, ApiError> {
    subject.parse().map_err(|e: String| {
        ApiError::bad_request(format!("the event's subject: {e}, e.g. Greeting:world"))
    })
}

/// The object manifest an event carries as its data.
fn data_object(content_type: Option<&str>, data: Option<Data>) -> Result<Object, ApiError> {
    let missing = || {
        ApiError::bad_request(
            "the event has no data: a dev.setpoint.object.* event carries an object manifest",
        )
    };
    let mut objects = match data.ok_or_else(missing)? {
        Data::Json(value) => {
            let object: Object = serde_json::from_value(value).map_err(|e| {
                ApiError::bad_request(format!("the event's data is not a valid object: {e}"))
            })?;
            object
                .validate()
                .map_err(|e| ApiError::bad_request(format!("the event's data: {e}")))?;
            vec![object]
        }
        Data::String(text) => parse_as(content_type, text.as_bytes())?,
        Data::Binary(bytes) => parse_as(content_type, &bytes)?,
    };
    if objects.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "an event carries one object, and this one carries {}",
            objects.len()
        )));
    }
    Ok(objects.remove(0))
}

fn parse_as(content_type: Option<&str>, bytes: &[u8]) -> Result<Vec<Object>, ApiError> {
    let mut headers = HeaderMap::new();
    if let Some(ct) = content_type.and_then(|c| c.parse().ok()) {
        headers.insert(axum::http::header::CONTENT_TYPE, ct);
    }
    parse_objects(&headers, bytes)
}
