//! The HTTP admin API (axum): objects, their status, waiting, the watch feed,
//! CloudEvents, controllers, plugins, `/metrics` and the health probes.
//!
//! Bound to loopback by default; anywhere else it needs a bearer token (see
//! [`crate::config::ApiConfig`]). Requests and answers are JSON, or YAML for
//! clients that send `Content-Type`/`Accept: application/yaml`.
//!
//! Every refusal is a 4xx with a JSON body `{"error": "..."}` that says what was
//! wrong and what to do; a refused write stores nothing. Bodies larger than
//! `api.max-body-bytes` get 413. Query strings go through [`Query`], which
//! refuses unknown parameters (listing the route's), parameters given twice and
//! values that do not parse; path segments through [`Path`]. Errors quote at
//! most [`QUOTE_MAX`](crate::object::QUOTE_MAX) characters of any input.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /v1/apply` | create or update objects (one or many, YAML stream or JSON), atomically |
//! | `POST /v1/objects` | create one object; 409 if it exists |
//! | `GET /v1/objects/{kind}?namespace=&selector=a=b,c=d` | list objects of a kind |
//! | `GET/PUT/DELETE /v1/objects/{kind}/{name}?namespace=` | one object; PUT and DELETE honour `resourceVersion`; DELETE `force=true` removes it now, dropping its finalizers |
//! | `GET /v1/objects/{kind}/{name}/status?namespace=` | its reconcile status |
//! | `GET /v1/status?kind=` | every object's reconcile status |
//! | `GET /v1/wait?kind=&name=&namespace=&timeout=30s&keepWaiting=` | wait until reconciled; 504 names what is not; 409 at once names what failed for good, unless `keepWaiting=true` |
//! | `GET /v1/watch?kind=` | server-sent events: applied, status, removed |
//! | `POST /v1/events` | CloudEvents, binary or structured mode (see [`events`]) |
//! | `GET /v1/controllers` | each controller's status model |
//! | `GET /v1/cluster` | replicas on etcd: this replica, the members, and who holds each shard (or leads); 404 for a single process |
//! | `POST /v1/controllers/{name}/full-reconcile` | prune, then reconcile everything |
//! | `GET /v1/plugins` | the loaded plugins |

pub mod events;
mod objects;
mod plugins;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::controller::{AdmissionError, KnownKinds, Manager};
use crate::object::{quote, shorten};
use crate::registry::Registry;
use crate::store::{Store, StoreError};

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    /// The plugin registry, where the server can load and swap plugins.
    pub registry: Option<Arc<Registry>>,
    pub store: Store,
    pub max_body: usize,
    /// Cancelled when the server stops: long-lived answers (watch) end then.
    pub stopping: CancellationToken,
}

/// The router over a running [`Manager`]. With a `token`, every route but the
/// health probes needs `Authorization: Bearer <token>`.
pub fn router(
    manager: Arc<Manager>,
    registry: Option<Arc<Registry>>,
    token: Option<String>,
    max_body: usize,
    stopping: CancellationToken,
) -> Router {
    let ready_manager = manager.clone();
    let state = AppState {
        store: manager.store().clone(),
        manager,
        registry,
        max_body,
        stopping,
    };
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/controllers", get(controllers))
        .route("/v1/cluster", get(cluster))
        .route(
            "/v1/controllers/{name}/full-reconcile",
            post(full_reconcile),
        )
        .route("/v1/plugins", get(plugins::list).post(plugins::load))
        .route(
            "/v1/plugins/{name}",
            get(plugins::get).delete(plugins::unload),
        )
        .route("/v1/plugins/{name}/swap", post(plugins::swap))
        .route("/v1/plugins/{name}/rollback", post(plugins::rollback))
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
        .method_not_allowed_fallback(method_not_allowed)
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
        .route("/readyz", get(readyz).with_state(ready_manager))
        .merge(protected)
}

impl From<AdmissionError> for ApiError {
    fn from(e: AdmissionError) -> Self {
        let status = match e {
            AdmissionError::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AdmissionError::Failed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Ready while every controller can make progress; otherwise 503 naming each
/// controller that cannot (its workers are gone, or it leads and its queue is
/// not draining). `/healthz` stays a liveness probe: the process answers.
async fn readyz(State(manager): State<Arc<Manager>>) -> Response {
    let problems = manager.health();
    if problems.is_empty() {
        return "ok\n".into_response();
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}", problems.join("; ")),
    )
    .into_response()
}

/// Run a durable write of `store` off the async workers. It blocks until its
/// commit is durable and may lead a group commit for other requests (see
/// `store::apply`); on a worker thread it would stall every request served by
/// that thread, and cap a group at the number of workers.
pub(crate) async fn durable<T: Send + 'static>(
    store: &Store,
    write: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || write(&store))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "a store write panicked");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the write failed unexpectedly (see the daemon's log); it may or may not be \
                 stored: read it back, and send it again if it is not",
            )
        })?
        .map_err(ApiError::from)
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
            StoreError::Stale(_) | StoreError::Fenced(_) => StatusCode::CONFLICT,
            StoreError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
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
            shorten(request.uri().path())
        ),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} {} is not a route: that path takes other methods; see the API table in the \
             README",
            request.method(),
            shorten(request.uri().path())
        ),
    )
}

/// The query parameters one route takes.
pub trait QueryParams: DeserializeOwned {
    /// Every parameter's name, as refusals list them.
    const NAMES: &'static [&'static str];
}

/// The query string as `T`, like axum's `Query`, except that every refusal is a
/// JSON 400 that names the parameter: one the route does not take (with the
/// list of those it does), one given twice, or one whose value does not parse.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: QueryParams> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse_query(&parts.uri).map(Query)
    }
}

/// Parse `uri`'s query string as `T`; see [`Query`].
pub fn parse_query<T: QueryParams>(uri: &Uri) -> Result<T, ApiError> {
    let raw = uri.query().unwrap_or("");
    let takes = || {
        if T::NAMES.is_empty() {
            "this route takes no query parameters".to_string()
        } else {
            format!("this route takes: {}", T::NAMES.join(", "))
        }
    };
    // One query string per parameter, so that a bad value can be pinned on it.
    let mut parts: Vec<(&str, String, String)> = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = decode_pair(part)?;
        if !T::NAMES.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {}; {}",
                quote(&name),
                takes()
            )));
        }
        if parts.iter().any(|(_, n, _)| *n == name) {
            return Err(ApiError::bad_request(format!(
                "query parameter {name} is given more than once; give it once"
            )));
        }
        parts.push((part, name, value));
    }
    deserialize_query::<T>(raw).map_err(|whole| {
        let culprit = parts.iter().find_map(|(part, name, value)| {
            Some((name, value, deserialize_query::<T>(part).err()?))
        });
        match culprit {
            Some((name, value, why)) => ApiError::bad_request(format!(
                "query parameter {name}={} is not valid: {why}",
                quote(value)
            )),
            None => ApiError::bad_request(format!("the query string is not valid: {whole}")),
        }
    })
}

/// One `name=value` of a query string, percent-decoded.
fn decode_pair(part: &str) -> Result<(String, String), ApiError> {
    let not_valid = || ApiError::bad_request(format!("query part {} is not valid", quote(part)));
    let uri: Uri = format!("/?{part}").parse().map_err(|_| not_valid())?;
    let axum::extract::Query(mut pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
            .map_err(|_| not_valid())?;
    pairs.pop().ok_or_else(not_valid)
}

/// `raw` (a query string) as `T`, or serde's reason why not.
fn deserialize_query<T: DeserializeOwned>(raw: &str) -> Result<T, String> {
    let uri: Uri = format!("/?{raw}").parse().map_err(|e| format!("{e}"))?;
    axum::extract::Query::<T>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| {
            let text = e.body_text();
            text.strip_prefix("Failed to deserialize query string: ")
                .unwrap_or(&text)
                .to_string()
        })
}

/// Path segments as `T`, like axum's `Path`, except that a refusal (a segment
/// that is not UTF-8, say) is a JSON 400.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(e) => Err(ApiError::new(
                e.status(),
                format!("the request path is not valid: {}", shorten(&e.body_text())),
            )),
        }
    }
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

/// Let a request through only with the right bearer token. The scheme is
/// case-insensitive (RFC 7235: `bearer` is `Bearer`); a 401 carries
/// `WWW-Authenticate: Bearer` (RFC 6750).
async fn require_token(State(token): State<Arc<String>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let (challenge, message) = match given {
        Some(given) if same(given.as_bytes(), token.as_bytes()) => {
            return next.run(request).await;
        }
        Some(_) => (
            r#"Bearer error="invalid_token""#,
            "the bearer token is wrong",
        ),
        None => (
            "Bearer",
            "this API needs `Authorization: Bearer <token>` (the [api] token setting; the CLI \
             reads it from --token or SETPOINT_TOKEN)",
        ),
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// The token of an `Authorization: Bearer <token>` value; the scheme in any case.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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

async fn cluster(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let cluster = state.manager.cluster().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this process runs alone (no [store] backend = \"etcd\"): it owns every key",
        )
    })?;
    Ok(respond(&headers, StatusCode::OK, &cluster.status()))
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
                "no controller named {}; running: {}",
                quote(&name),
                names(&state.manager)
            ),
        )
    })?;
    let report = controller.full_reconcile().await;
    Ok(respond(&headers, StatusCode::OK, &report))
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

/// Refuse a kind no plugin stands for (none reconciles it, and none that
/// failed to load declares it): it would stay pending for ever. The known
/// kinds are read once for all of `kinds`.
pub fn check_kinds<'a>(
    state: &AppState,
    kinds: impl IntoIterator<Item = &'a str>,
) -> Result<(), ApiError> {
    let known = match &state.registry {
        Some(registry) => registry.kinds(),
        None => KnownKinds::kinds(state.manager.as_ref()),
    };
    match kinds.into_iter().find(|k| !known.contains_key(*k)) {
        None => Ok(()),
        Some(kind) => Err(unknown_kind(&known, kind)),
    }
}

fn unknown_kind(kinds: &std::collections::BTreeMap<String, Vec<String>>, kind: &str) -> ApiError {
    let known: Vec<&str> = kinds.keys().map(String::as_str).collect();
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!(
            "no plugin reconciles kind {}, so nothing would act on it; this host's \
             plugins reconcile: {}. Load a plugin for it, or fix the kind",
            quote(kind),
            if known.is_empty() {
                "nothing".to_string()
            } else {
                known.join(", ")
            }
        ),
    )
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
    serve_with(addr, token, max_body, manager, None, shutdown).await
}

/// [`serve`] with a plugin registry behind `/v1/plugins`.
pub async fn serve_with(
    addr: SocketAddr,
    token: Option<String>,
    max_body: usize,
    manager: Arc<Manager>,
    registry: Option<Arc<Registry>>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e}; set [api] listen to a free address")
    })?;
    let bound = listener.local_addr()?;
    let app = router(manager, registry, token, max_body, shutdown.clone());
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
    use crate::metrics::Metrics;
    use crate::ownership::Ownership;

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
    async fn readyz_names_a_controller_that_cannot_make_progress() {
        use crate::controller::{Engine, FnReconciler};
        let store = Store::new();
        let manager = Arc::new(Manager::new(
            store.clone(),
            Ownership::default(),
            Arc::new(Metrics::new()),
        ));
        // A reconcile that never returns, and a stall threshold of zero.
        let stuck = FnReconciler::new("stuck", &["Thing"], |_| std::future::pending());
        let engine = Engine {
            workers: 1,
            stall_after: std::time::Duration::ZERO,
            ..Engine::default()
        };
        let stop = CancellationToken::new();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            None,
            1024,
            manager.clone(),
            stop.clone(),
        )
        .await
        .unwrap();
        let ready = format!("http://{addr}/readyz");
        let get = |url: String| async move {
            tokio::task::spawn_blocking(move || status(&url, None))
                .await
                .unwrap()
        };
        assert_eq!(get(ready.clone()).await, (200, "ok\n".to_string()));
        manager.add_reconciler(stuck, engine).unwrap();
        store
            .apply(crate::object::Object::new(
                "Thing",
                "",
                "a",
                serde_json::json!({}),
            ))
            .unwrap();
        let mut answer = get(ready.clone()).await;
        for _ in 0..100 {
            if answer.0 != 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            answer = get(ready.clone()).await;
        }
        assert_eq!(answer.0, 503, "{}", answer.1);
        assert!(
            answer.1.contains("not ready: controller stuck"),
            "{}",
            answer.1
        );
        assert!(answer.1.starts_with("{\"error\""), "JSON: {}", answer.1);
        let health = format!("http://{addr}/healthz");
        assert_eq!(get(health).await.0, 200, "liveness stays");
        stop.cancel();
        let _ = task.await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_with_a_token_refuses_requests_without_it_but_not_health_probes() {
        let manager = Arc::new(Manager::new(
            Store::new(),
            Ownership::default(),
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
                status(&format!("{base}/v1/cluster"), Some("s3cret")),
            )
        })
        .await
        .unwrap();
        let (missing, wrong, right, metrics, health, cluster) = checks;
        assert_eq!(cluster.0, 404, "a single process is no cluster");
        assert!(cluster.1.contains("runs alone"), "{}", cluster.1);
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

    /// An answer: status, `WWW-Authenticate` and `Content-Type`, body.
    struct Answer {
        status: u16,
        challenge: Option<String>,
        content_type: String,
        body: String,
    }

    impl Answer {
        /// The `error` of a JSON refusal; fails if the answer is not one.
        fn error(&self) -> String {
            assert!(
                self.content_type.starts_with("application/json"),
                "{} answered {:?}: {}",
                self.status,
                self.content_type,
                self.body
            );
            let value: serde_json::Value = serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body));
            value["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error: {}", self.body))
                .to_string()
        }
    }

    fn call(method: &str, url: &str, authorization: Option<&str>) -> Answer {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let mut response = agent.run(request.body(()).unwrap()).unwrap();
        let header = |name: header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Answer {
            status: response.status().as_u16(),
            challenge: header(header::WWW_AUTHENTICATE),
            content_type: header(header::CONTENT_TYPE).unwrap_or_default(),
            body: response.body_mut().read_to_string().unwrap(),
        }
    }

    /// Serve an API over an empty manager; run `checks` on its base URL.
    async fn with_api<T: Send + 'static>(
        token: Option<&str>,
        checks: impl FnOnce(String) -> T + Send + 'static,
    ) -> T {
        let manager = Arc::new(Manager::new(
            Store::new(),
            Ownership::default(),
            Arc::new(Metrics::new()),
        ));
        let stop = CancellationToken::new();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            token.map(str::to_string),
            1024,
            manager,
            stop.clone(),
        )
        .await
        .unwrap();
        let base = format!("http://{addr}");
        let out = tokio::task::spawn_blocking(move || checks(base))
            .await
            .unwrap();
        stop.cancel();
        task.await.unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_401_challenges_with_bearer_and_the_scheme_is_case_insensitive() {
        let answers = with_api(Some("s3cret"), |base| {
            let url = format!("{base}/v1/controllers");
            [
                call("GET", &url, None),
                call("GET", &url, Some("Basic czNjcmV0")),
                call("GET", &url, Some("Bearer guess")),
                call("GET", &url, Some("Bearer s3cret")),
                call("GET", &url, Some("bearer s3cret")),
                call("GET", &url, Some("BEARER  s3cret")),
            ]
        })
        .await;
        let [missing, basic, wrong, right, lower, upper] = answers;
        for refused in [&missing, &basic, &wrong] {
            assert_eq!(refused.status, 401, "{}", refused.body);
            let challenge = refused.challenge.as_deref().unwrap_or("");
            assert!(challenge.starts_with("Bearer"), "{challenge:?}");
            refused.error();
        }
        assert_eq!(
            wrong.challenge.as_deref(),
            Some(r#"Bearer error="invalid_token""#)
        );
        for accepted in [&right, &lower, &upper] {
            assert_eq!((accepted.status, accepted.body.as_str()), (200, "[]"));
        }
    }

    #[test]
    fn bearer_tokens_are_read_whatever_the_schemes_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bEaReR abc"), Some("abc"));
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Basic abc"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_query_string_refusal_is_json_and_names_the_parameter() {
        let cases: Vec<(&str, &str, &str, &[&str])> = vec![
            // A value that does not parse.
            (
                "PUT",
                "/v1/objects/File/a?resourceVersion=abc",
                "",
                &["resourceVersion", "\"abc\""],
            ),
            (
                "DELETE",
                "/v1/objects/File/a?resourceVersion=abc",
                "",
                &["resourceVersion", "\"abc\""],
            ),
            (
                "DELETE",
                "/v1/objects/File/a?force=yes",
                "",
                &["force", "\"yes\""],
            ),
            ("GET", "/v1/wait?timeout=soon", "", &["timeout", "\"soon\""]),
            // Given twice.
            (
                "GET",
                "/v1/objects/File/a?namespace=x&namespace=y",
                "",
                &["namespace", "more than once"],
            ),
            (
                "GET",
                "/v1/objects/File?selector=a=b&selector=c=d",
                "",
                &["selector", "more than once"],
            ),
            (
                "GET",
                "/v1/wait?kind=File&kind=Greeting",
                "",
                &["kind", "more than once"],
            ),
            // Unknown, with the route's list.
            (
                "GET",
                "/v1/objects/File?resourceVersion=1",
                "namespace, selector",
                &[],
            ),
            ("GET", "/v1/objects/File/a?force=true", "namespace", &[]),
            (
                "PUT",
                "/v1/objects/File/a?force=true",
                "namespace, resourceVersion",
                &[],
            ),
            (
                "DELETE",
                "/v1/objects/File/a?nmespace=x",
                "namespace, resourceVersion, force",
                &[],
            ),
            (
                "GET",
                "/v1/objects/File/a/status?resourceVersion=1",
                "namespace",
                &[],
            ),
            ("GET", "/v1/status?kinds=File", "kind", &[]),
            (
                "GET",
                "/v1/wait?tmeout=1s",
                "kind, name, namespace, timeout",
                &[],
            ),
            ("GET", "/v1/watch?knd=File", "kind", &[]),
        ];
        let answers = with_api(None, move |base| {
            cases
                .into_iter()
                .map(|(method, path, takes, names)| {
                    let answer = call(method, &format!("{base}{path}"), None);
                    (method, path, takes, names, answer)
                })
                .collect::<Vec<_>>()
        })
        .await;
        for (method, path, takes, names, answer) in answers {
            assert_eq!(answer.status, 400, "{method} {path}: {}", answer.body);
            let error = answer.error();
            if !takes.is_empty() {
                assert!(error.contains("unknown query parameter"), "{path}: {error}");
                assert!(
                    error.contains(&format!("this route takes: {takes}")),
                    "{path}: {error}"
                );
            }
            for name in names {
                assert!(error.contains(name), "{path}: {name:?} in {error}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_methods_and_paths_are_refused_in_json_too() {
        let (method, path) = with_api(None, |base| {
            (
                call("PATCH", &format!("{base}/v1/objects/File/a"), None),
                call("GET", &format!("{base}/v1/objects/%FF/a"), None),
            )
        })
        .await;
        assert_eq!(method.status, 405);
        assert!(method.error().contains("PATCH /v1/objects/File/a"));
        assert_eq!(path.status, 400);
        assert!(path.error().contains("path"), "{}", path.body);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_quote_no_more_than_a_hundred_characters_of_the_input() {
        let huge = "x".repeat(10_000);
        let answers = with_api(None, move |base| {
            [
                format!("/v1/objects/File/{huge}"),
                format!("/v1/objects/File/{huge}/status"),
                format!("/v1/{huge}"),
                format!("/v1/wait?timeout={huge}"),
                format!("/v1/status?{huge}=1"),
                format!("/v1/objects/File?selector={huge}"),
                format!("/v1/controllers/{huge}/full-reconcile"),
            ]
            .map(|path| {
                let method = if path.ends_with("full-reconcile") {
                    "POST"
                } else if path.contains("/v1/objects/File/") && !path.ends_with("status") {
                    "DELETE"
                } else {
                    "GET"
                };
                (path.clone(), call(method, &format!("{base}{path}"), None))
            })
        })
        .await;
        for (path, answer) in answers {
            let error = answer.error();
            assert!(
                (400..500).contains(&answer.status),
                "{}: {}",
                &path[..20],
                answer.status
            );
            assert!(error.len() < 400, "{} characters: {error}", error.len());
            assert!(error.contains("x…"), "cut with an ellipsis: {error}");
            assert!(!error.contains(&"x".repeat(101)), "{error}");
        }
    }
}
