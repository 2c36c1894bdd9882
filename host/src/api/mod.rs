//! The HTTP admin API (axum): objects, their status, waiting, the watch feed,
//! CloudEvents, controllers, plugins, `/metrics` and the health probes.
//!
//! Bound to loopback by default; anywhere else it needs a bearer token (see
//! [`crate::config::ApiConfig`]). Requests and answers are JSON, or YAML for
//! clients that send `Content-Type`/`Accept: application/yaml`.
//!
//! Every refusal is a 4xx with a JSON body `{"error": "..."}` that says what was
//! wrong and what to do; a refused write stores nothing. Bodies larger than
//! `api.max-body-bytes` get 413.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /v1/apply` | create or update objects (one or many, YAML stream or JSON), atomically |
//! | `POST /v1/objects` | create one object; 409 if it exists |
//! | `GET /v1/objects/{kind}?namespace=&selector=a=b,c=d` | list objects of a kind |
//! | `GET/PUT/DELETE /v1/objects/{kind}/{name}?namespace=` | one object; PUT and DELETE honour `resourceVersion` |
//! | `GET /v1/objects/{kind}/{name}/status?namespace=` | its reconcile status |
//! | `GET /v1/status?kind=` | every object's reconcile status |
//! | `GET /v1/wait?kind=&name=&namespace=&timeout=30s` | wait until reconciled; 504 names what is not |
//! | `GET /v1/watch?kind=` | server-sent events: applied, status, removed |
//! | `POST /v1/events` | CloudEvents, binary or structured mode (see [`events`]) |
//! | `GET /v1/controllers` | each controller's status model |
//! | `POST /v1/controllers/{name}/full-reconcile` | prune, then reconcile everything |
//! | `GET /v1/plugins` | the loaded plugins |

pub mod events;
mod objects;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::controller::Manager;
use crate::store::{Store, StoreError};

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    pub store: Store,
    pub max_body: usize,
    /// Cancelled when the server stops: long-lived answers (watch) end then.
    pub stopping: CancellationToken,
}

/// The router over a running [`Manager`]. With a `token`, every route but the
/// health probes needs `Authorization: Bearer <token>`.
pub fn router(
    manager: Arc<Manager>,
    token: Option<String>,
    max_body: usize,
    stopping: CancellationToken,
) -> Router {
    let state = AppState {
        store: manager.store().clone(),
        manager,
        max_body,
        stopping,
    };
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/controllers", get(controllers))
        .route(
            "/v1/controllers/{name}/full-reconcile",
            post(full_reconcile),
        )
        .route("/v1/plugins", get(plugins))
        .route("/v1/apply", post(objects::apply))
        .route("/v1/objects", post(objects::create))
        .route("/v1/objects/{kind}", get(objects::list))
        .route(
            "/v1/objects/{kind}/{name}",
            get(objects::get)
                .put(objects::update)
                .delete(objects::delete),
        )
        .route("/v1/objects/{kind}/{name}/status", get(objects::status))
        .route("/v1/status", get(objects::statuses))
        .route("/v1/wait", get(objects::wait))
        .route("/v1/watch", get(watch::watch))
        .route("/v1/events", post(events::ingest))
        .fallback(not_found)
        .with_state(state);
    let protected = match token {
        Some(token) => protected.layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        )),
        None => protected,
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .merge(protected)
}

/// A refusal: a status code and a message that says what to do.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::AlreadyExists(_)
            | StoreError::Conflict { .. }
            | StoreError::Deleting(_) => StatusCode::CONFLICT,
            StoreError::InvalidStatus { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {}; see the API table in the README",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Read a request body, refusing one larger than `max` with 413.
pub async fn read_body(body: Body, max: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, max).await.map_err(|e| {
        // axum wraps http-body's LengthLimitError; its text is the stable part.
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        let mut too_long = false;
        while let Some(s) = source {
            too_long |= s.to_string().contains("length limit");
            source = s.source();
        }
        if too_long {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than {max} bytes (api.max-body-bytes); send \
                     fewer objects per request or raise the limit"
                ),
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}

/// True if the client asked for YAML.
fn wants_yaml(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("yaml"))
}

/// Answer `value` as JSON, or YAML if the client asked for it.
pub fn respond<T: Serialize>(headers: &HeaderMap, status: StatusCode, value: &T) -> Response {
    if wants_yaml(headers) {
        match serde_yaml_ng::to_string(value) {
            Ok(text) => (
                status,
                [(header::CONTENT_TYPE, "application/yaml; charset=utf-8")],
                text,
            )
                .into_response(),
            Err(e) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
            }
        }
    } else {
        (status, Json(value)).into_response()
    }
}

/// Let a request through only with the right bearer token.
async fn require_token(State(token): State<Arc<String>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same(given.as_bytes(), token.as_bytes()) => next.run(request).await,
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "the bearer token is wrong").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this API needs `Authorization: Bearer <token>` (the [api] token setting; the CLI \
             reads it from --token or SETPOINT_TOKEN)",
        )
        .into_response(),
    }
}

/// Compare secrets without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// OpenMetrics for clients that ask for it (Prometheus does), else the classic
/// Prometheus text format.
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let text = state.manager.encode_metrics();
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::to_prometheus_text(&text),
        )
    }
}

async fn controllers(State(state): State<AppState>, headers: HeaderMap) -> Response {
    respond(&headers, StatusCode::OK, &state.manager.status())
}

async fn full_reconcile(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let controller = state.manager.controller(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no controller named {name:?}; running: {}",
                names(&state.manager)
            ),
        )
    })?;
    let report = controller.full_reconcile().await;
    Ok(respond(&headers, StatusCode::OK, &report))
}

/// What `/v1/plugins` says about one loaded plugin.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct PluginView {
    name: String,
    version: String,
    kinds: Vec<String>,
    path: String,
    sha256: String,
    cache: crate::plugin::CacheOutcome,
    load_ms: u64,
    prune: bool,
    workers: usize,
    instances: crate::config::InstanceMode,
}

async fn plugins(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let views: Vec<PluginView> = state
        .manager
        .controllers()
        .iter()
        .map(|c| {
            let p = c.plugin();
            let report = p.report();
            PluginView {
                name: p.info().name.clone(),
                version: p.info().version.clone(),
                kinds: p.info().kinds.clone(),
                path: report.path.display().to_string(),
                sha256: report.sha256.clone(),
                cache: report.cache,
                load_ms: report.took.as_millis() as u64,
                prune: p.can_prune(),
                workers: p.settings().workers,
                instances: p.settings().instances,
            }
        })
        .collect();
    respond(&headers, StatusCode::OK, &views)
}

/// The running controllers' names, for messages.
fn names(manager: &Manager) -> String {
    let names: Vec<String> = manager
        .controllers()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Refuse a kind no controller reconciles: it would stay pending for ever.
pub fn check_kind(manager: &Manager, kind: &str) -> Result<(), ApiError> {
    let kinds = manager.kinds();
    if kinds.contains_key(kind) {
        return Ok(());
    }
    let known: Vec<&str> = kinds.keys().map(String::as_str).collect();
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!(
            "no plugin reconciles kind {kind:?}, so nothing would act on it; this host's \
             plugins reconcile: {}. Load a plugin for it, or fix the kind",
            if known.is_empty() {
                "nothing".to_string()
            } else {
                known.join(", ")
            }
        ),
    ))
}

/// Bind `addr` and serve until `shutdown`. Returns the bound address (useful with
/// port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    token: Option<String>,
    max_body: usize,
    manager: Arc<Manager>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e}; set [api] listen to a free address")
    })?;
    let bound = listener.local_addr()?;
    let app = router(manager, token, max_body, shutdown.clone());
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!("the API server stopped: {e}");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::AlwaysLeader;
    use crate::metrics::Metrics;

    fn status(url: &str, token: Option<&str>) -> (u16, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut request = agent.get(url);
        if let Some(token) = token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call().unwrap();
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_with_a_token_refuses_requests_without_it_but_not_health_probes() {
        let manager = Arc::new(Manager::new(
            Store::new(),
            Arc::new(AlwaysLeader::default()),
            Arc::new(Metrics::new()),
        ));
        let stop = CancellationToken::new();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            Some("s3cret".into()),
            1024,
            manager,
            stop.clone(),
        )
        .await
        .unwrap();
        let base = format!("http://{addr}");
        let checks = tokio::task::spawn_blocking(move || {
            (
                status(&format!("{base}/v1/controllers"), None),
                status(&format!("{base}/v1/controllers"), Some("guess")),
                status(&format!("{base}/v1/controllers"), Some("s3cret")),
                status(&format!("{base}/metrics"), None).0,
                status(&format!("{base}/healthz"), None).0,
            )
        })
        .await
        .unwrap();
        let (missing, wrong, right, metrics, health) = checks;
        assert_eq!(missing.0, 401);
        assert!(missing.1.contains("Authorization: Bearer"), "{}", missing.1);
        assert_eq!(wrong.0, 401);
        assert!(wrong.1.contains("the bearer token is wrong"), "{}", wrong.1);
        assert_eq!(right, (200, "[]".to_string()));
        assert_eq!(metrics, 401);
        assert_eq!(health, 200);
        stop.cancel();
        task.await.unwrap();
    }
}
