//! The HTTP admin API (axum). For now: `/metrics`, `/healthz`, `/readyz` and the
//! controllers' status models at `/v1/controllers`. Bound to loopback by default.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::controller::Manager;

/// The router over a running [`Manager`].
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route("/v1/controllers", get(controllers))
        .with_state(manager)
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
    manager: Arc<Manager>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e}; set [api] listen to a free address")
    })?;
    let bound = listener.local_addr()?;
    let app = router(manager);
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!("the API server stopped: {e}");
        }
    });
    Ok((bound, task))
}
