//! The HTTP side of `streamscore run`: `/metrics` (Prometheus text format),
//! `/healthz` (200 while the pipeline is consuming, 503 otherwise) and
//! `/readyz` (also 503 while a partition's windows are rebuilt from the log).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::Health;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz_handler(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.running.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not consuming\n")
    }
}

async fn readyz_handler(State(s): State<AppState>) -> impl IntoResponse {
    if !s.health.running.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "not consuming\n")
    } else if s.health.warming.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "rebuilding windows from the log\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// The router, separate from binding so tests can serve it anywhere.
pub fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .with_state(AppState { metrics, health })
}

/// Binds `addr` (failing start-up with the address named) and serves until
/// `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("http.bind: cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    let app = router(metrics, health);
    Ok(tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    }))
}
