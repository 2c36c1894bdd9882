//! Objects over HTTP: apply, create, get, list, update, delete, status, wait.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::{
    ApiError, AppState, Path, Query, QueryParams, check_kinds, durable, read_body, respond,
};
use crate::object::{Action, Object, ObjectKey, parse_all, quote, shorten};
use crate::store::{Applied, ReconcileStatus, WaitError};

/// The longest `/v1/wait` holds a request.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// `GET /v1/objects/{kind}/{name}` and its `/status`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectQuery {
    #[serde(default)]
    namespace: String,
}

impl QueryParams for ObjectQuery {
    const NAMES: &'static [&'static str] = &["namespace"];
}

/// `PUT /v1/objects/{kind}/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default, rename = "resourceVersion")]
    resource_version: Option<u64>,
}

impl QueryParams for UpdateQuery {
    const NAMES: &'static [&'static str] = &["namespace", "resourceVersion"];
}

/// `DELETE /v1/objects/{kind}/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default, rename = "resourceVersion")]
    resource_version: Option<u64>,
    /// Remove the object now, dropping whatever finalizers still hold it.
    #[serde(default)]
    force: bool,
}

impl QueryParams for DeleteQuery {
    const NAMES: &'static [&'static str] = &["namespace", "resourceVersion", "force"];
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    namespace: Option<String>,
    selector: Option<String>,
}

impl QueryParams for ListQuery {
    const NAMES: &'static [&'static str] = &["namespace", "selector"];
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    kind: Option<String>,
    name: Option<String>,
    #[serde(default)]
    namespace: String,
    timeout: Option<String>,
    /// Wait for objects that failed for good too, instead of failing at once.
    #[serde(default, rename = "keepWaiting")]
    keep_waiting: bool,
}

impl QueryParams for WaitQuery {
    const NAMES: &'static [&'static str] = &["kind", "name", "namespace", "timeout", "keepWaiting"];
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    kind: Option<String>,
}

impl QueryParams for StatusQuery {
    const NAMES: &'static [&'static str] = &["kind"];
}

/// One line of an apply's answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AppliedView {
    key: String,
    /// `created`, `updated` or `unchanged`.
    result: &'static str,
    generation: u64,
    resource_version: u64,
}

impl From<&Applied> for AppliedView {
    fn from(a: &Applied) -> Self {
        Self {
            key: a.object.key().to_string(),
            result: match a.action {
                Some(Action::Created) => "created",
                None => "unchanged",
                Some(_) => "updated",
            },
            generation: a.object.metadata.generation,
            resource_version: a.object.metadata.resource_version,
        }
    }
}

/// A key's reconcile status, as `/status` answers it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusView {
    key: String,
    #[serde(flatten)]
    status: ReconcileStatus,
}

/// The objects in a request body: a YAML stream (`---` between documents), or
/// JSON (one object or an array of them) when the body says it is JSON.
pub fn parse_objects(headers: &HeaderMap, body: &[u8]) -> Result<Vec<Object>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not UTF-8 text: {e}")))?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let objects = if json {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        let values = match value {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        };
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let object: Object = serde_json::from_value(v).map_err(|e| {
                    ApiError::bad_request(format!("object {} is not a valid object: {e}", i + 1))
                })?;
                object
                    .validate()
                    .map_err(|e| ApiError::bad_request(format!("object {}: {e}", i + 1)))?;
                Ok(object)
            })
            .collect::<Result<Vec<_>, ApiError>>()?
    } else {
        parse_all(text).map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    if objects.is_empty() {
        return Err(ApiError::bad_request(
            "the body holds no object: send a manifest with kind, metadata.name and spec",
        ));
    }
    Ok(objects)
}

async fn body_objects(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<Object>, ApiError> {
    let bytes = read_body(body, state.max_body).await?;
    let objects = parse_objects(headers, &bytes)?;
    check_kinds(state, objects.iter().map(|o| o.kind.as_str()))?;
    state.manager.admit(&objects).await?;
    Ok(objects)
}

/// `POST /v1/apply`: create or update every object in the body, all or none.
pub async fn apply(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let objects = body_objects(&state, &headers, body).await?;
    let applied = durable(&state.store, move |s| s.apply_all(objects)).await?;
    let views: Vec<AppliedView> = applied.iter().map(AppliedView::from).collect();
    Ok(respond(&headers, StatusCode::OK, &views))
}

/// `POST /v1/objects`: create one object.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut objects = body_objects(&state, &headers, body).await?;
    if objects.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "POST /v1/objects creates one object, and the body holds {}; use POST /v1/apply \
             for several",
            objects.len()
        )));
    }
    let object = objects.remove(0);
    let created = durable(&state.store, move |s| s.create(object)).await?;
    Ok(respond(&headers, StatusCode::CREATED, &created.object))
}

/// `GET /v1/objects/{kind}`: the objects of a kind, by namespace and labels.
pub async fn list(
    State(state): State<AppState>,
    Path(kind): Path<String>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let selector = parse_selector(q.selector.as_deref().unwrap_or(""))?;
    let objects: Vec<Object> = state
        .store
        .list(&kind, &selector)
        .into_iter()
        .filter(|o| {
            q.namespace
                .as_ref()
                .is_none_or(|ns| &o.metadata.namespace == ns)
        })
        .collect();
    Ok(respond(&headers, StatusCode::OK, &objects))
}

/// `a=b,c=d` into a label selector.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut selector = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(ApiError::bad_request(format!(
                "selector part {} is not label=value; write e.g. selector=app=web,tier=db",
                quote(part)
            )));
        };
        selector.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(selector)
}

fn not_found(key: &ObjectKey) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("object {} not found", shorten(&key.to_string())),
    )
}

/// `GET /v1/objects/{kind}/{name}`.
pub async fn get(
    State(state): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<ObjectQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = ObjectKey::new(&kind, &q.namespace, &name);
    let object = state.store.get(&key).ok_or_else(|| not_found(&key))?;
    Ok(respond(&headers, StatusCode::OK, &object))
}

/// `PUT /v1/objects/{kind}/{name}`: update an existing object. A non-zero
/// `metadata.resourceVersion` (or `?resourceVersion=`) must match the stored one.
pub async fn update(
    State(state): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<UpdateQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut objects = body_objects(&state, &headers, body).await?;
    let path_key = ObjectKey::new(&kind, &q.namespace, &name);
    if objects.len() != 1 || objects[0].key() != path_key {
        let path_key = shorten(&path_key.to_string()).into_owned();
        return Err(ApiError::bad_request(format!(
            "PUT {path_key} needs exactly one object in the body, and it must be {path_key} \
             (the path's kind, name and ?namespace=)"
        )));
    }
    let mut object = objects.remove(0);
    if let Some(v) = q.resource_version {
        object.metadata.resource_version = v;
    }
    let updated = durable(&state.store, move |s| s.update(object)).await?;
    Ok(respond(&headers, StatusCode::OK, &updated.object))
}

/// `DELETE /v1/objects/{kind}/{name}`: mark it deleting (202, the object); or
/// 200 `{"removed": true}` if nothing held it and it is gone already.
///
/// With `?force=true`, remove it now, whatever finalizers still hold it (a
/// plugin that can never finish the delete, or one no longer loaded): 200
/// `{"key", "removed": true, "forced": true, "droppedFinalizers": [...]}`.
/// Counted in `setpoint_forced_deletes_total{kind}` and logged as a warning.
pub async fn delete(
    State(state): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = ObjectKey::new(&kind, &q.namespace, &name);
    if q.force {
        let removed = {
            let (key, version) = (key.clone(), q.resource_version);
            durable(&state.store, move |s| s.force_delete(&key, version)).await?
        };
        state.manager.metrics().forced_delete(&key.kind);
        return Ok(respond(
            &headers,
            StatusCode::OK,
            &serde_json::json!({
                "key": key.to_string(),
                "removed": true,
                "forced": true,
                "droppedFinalizers": removed.metadata.finalizers,
            }),
        ));
    }
    let deleted = {
        let (key, version) = (key.clone(), q.resource_version);
        durable(&state.store, move |s| s.delete(&key, version)).await?
    };
    match deleted {
        Some(object) => Ok(respond(&headers, StatusCode::ACCEPTED, &object)),
        None => Ok(respond(
            &headers,
            StatusCode::OK,
            &serde_json::json!({ "key": key.to_string(), "removed": true }),
        )),
    }
}

/// `GET /v1/objects/{kind}/{name}/status`.
pub async fn status(
    State(state): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<ObjectQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = ObjectKey::new(&kind, &q.namespace, &name);
    let status = state.store.status(&key).ok_or_else(|| not_found(&key))?;
    Ok(respond(
        &headers,
        StatusCode::OK,
        &StatusView {
            key: key.to_string(),
            status,
        },
    ))
}

/// `GET /v1/status?kind=`: every object's reconcile status.
pub async fn statuses(
    State(state): State<AppState>,
    Query(q): Query<StatusQuery>,
    headers: HeaderMap,
) -> Response {
    let kinds: Vec<String> = q.kind.into_iter().collect();
    let views: Vec<StatusView> = state
        .store
        .statuses(&kinds)
        .into_iter()
        .map(|(key, status)| StatusView {
            key: key.to_string(),
            status,
        })
        .collect();
    respond(&headers, StatusCode::OK, &views)
}

/// `GET /v1/wait`: hold the request until the selected objects are reconciled
/// (one object with `kind` and `name`, a kind, or everything). 200 when they
/// are; 504 with the objects still waiting and their last errors on timeout;
/// 409 at once, naming them with their errors, when selected objects failed
/// for good (fatal, or given up), unless `keepWaiting=true`.
pub async fn wait(
    State(state): State<AppState>,
    Query(q): Query<WaitQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let timeout = match q.timeout.as_deref() {
        None => Duration::from_secs(30),
        Some(t) => humantime::parse_duration(t).map_err(|e| {
            ApiError::bad_request(format!(
                "timeout {} is not a duration like 30s: {e}",
                quote(t)
            ))
        })?,
    }
    .min(MAX_WAIT);
    let key = match (&q.kind, &q.name) {
        (Some(kind), Some(name)) => Some(ObjectKey::new(kind, &q.namespace, name)),
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "name needs a kind: /v1/wait?kind=K&name=N",
            ));
        }
        _ => None,
    };
    let kinds: Vec<String> = q.kind.iter().cloned().collect();
    let waited = state
        .store
        .wait_with(key.as_ref(), &kinds, timeout, q.keep_waiting)
        .await;
    match waited {
        Ok(()) => Ok(respond(
            &headers,
            StatusCode::OK,
            &serde_json::json!({ "reconciled": true }),
        )),
        Err(WaitError::Failed(failed)) => {
            let names: Vec<String> = failed.iter().map(|(k, _)| k.to_string()).collect();
            let failed: Vec<serde_json::Value> = failed
                .into_iter()
                .map(
                    |(key, status)| serde_json::json!({ "key": key.to_string(), "status": status }),
                )
                .collect();
            Ok(respond(
                &headers,
                StatusCode::CONFLICT,
                &serde_json::json!({
                    "reconciled": false,
                    "error": format!(
                        "{} object(s) failed and will not be retried: {}; fix them \
                         (each status's lastError says why), or wait with keepWaiting=true",
                        names.len(),
                        shorten(&names.join(", "))
                    ),
                    "failed": failed,
                }),
            ))
        }
        Err(WaitError::TimedOut(waiting)) => {
            let waiting: Vec<serde_json::Value> = waiting
                .into_iter()
                .map(
                    |(key, status)| serde_json::json!({ "key": key.to_string(), "status": status }),
                )
                .collect();
            Ok(respond(
                &headers,
                StatusCode::GATEWAY_TIMEOUT,
                &serde_json::json!({
                    "reconciled": false,
                    "error": format!(
                        "{} object(s) not reconciled after {}",
                        waiting.len(),
                        humantime::format_duration(timeout)
                    ),
                    "waiting": waiting,
                }),
            ))
        }
    }
}
