//! The HTTP admin API (axum). For now: `/metrics`, `/healthz`, `/readyz` and the
//! controllers' status models at `/v1/controllers`. Bound to loopback by default;
//! anywhere else it needs a bearer token (see [`crate::config::ApiConfig`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::controller::Manager;

/// The router over a running [`Manager`]. With a `token`, every route but the
/// health probes needs `Authorization: Bearer <token>`.
pub fn router(manager: Arc<Manager>, token: Option<String>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/controllers", get(controllers))
        .with_state(manager);
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

/// Let a request through only with the right bearer token.
async fn require_token(State(token): State<Arc<String>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same(given.as_bytes(), token.as_bytes()) => next.run(request).await,
        Some(_) => (StatusCode::UNAUTHORIZED, "the bearer token is wrong\n").into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            "this API needs `Authorization: Bearer <token>` (the [api] token setting)\n",
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
async fn metrics(State(manager): State<Arc<Manager>>, headers: HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let text = manager.encode_metrics();
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

async fn controllers(State(manager): State<Arc<Manager>>) -> impl IntoResponse {
    (StatusCode::OK, Json(manager.status()))
}

/// Bind `addr` and serve until `shutdown`. Returns the bound address (useful with
/// port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    token: Option<String>,
    manager: Arc<Manager>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e}; set [api] listen to a free address")
    })?;
    let bound = listener.local_addr()?;
    let app = router(manager, token);
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
    use crate::store::Store;

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
        assert_eq!(wrong, (401, "the bearer token is wrong\n".to_string()));
        assert_eq!(right, (200, "[]".to_string()));
        assert_eq!(metrics, 401);
        assert_eq!(health, 200);
        stop.cancel();
        task.await.unwrap();
    }
}
