//! The HTTP side of `streamscore run`: the `/v1` API ([`api`]), `/metrics`
//! (Prometheus text format), `/healthz` (200 while the pipeline is
//! consuming, 503 otherwise) and `/readyz` (also 503 while a partition's
//! windows or sessions are rebuilt from the log). Every request is counted
//! and timed by route template.

pub mod api;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::routing::{get, post};
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
    } else if s.health.warming.load(Ordering::Relaxed)
        || s.health.sessions_warming.load(Ordering::Relaxed)
        || s.health.merchants_warming.load(Ordering::Relaxed)
    {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "rebuilding windows from the log\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// JSON 404 for paths no route matches.
async fn not_found() -> api::ApiError {
    api::ApiError::not_found("no such route; see docs/openapi.yaml")
}

/// JSON 405 for a known path with another method.
async fn method_not_allowed() -> api::ApiError {
    api::ApiError::method_not_allowed()
}

/// Counts and times every request by route template (bounded labels:
/// unknown paths are `other`).
async fn observe(
    State(metrics): State<Metrics>,
    req: Request,
    next: Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics
        .http_request_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// The router, separate from binding so tests can serve it anywhere.
/// Without `api` only the operational routes exist.
pub fn router(metrics: Metrics, health: Arc<Health>, api: Option<Arc<api::Api>>) -> Router {
    let ops = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .with_state(AppState {
            metrics: metrics.clone(),
            health,
        });
    let app = match api {
        Some(api) => {
            let limit = api.cfg.serving.max_body_bytes;
            let v1 = Router::new()
                .route("/v1/recommendations/{user_id}", get(api::recommendations))
                .route("/v1/score", post(api::score))
                .route("/v1/features/users/{id}", get(api::user_features))
                .route("/v1/features/merchants/{id}", get(api::merchant_features))
                .layer(DefaultBodyLimit::max(limit))
                .with_state(api);
            ops.merge(v1)
        }
        None => ops,
    };
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(metrics, observe))
}

/// Lowers the calling thread's CPU priority by `nice`; failure only costs
/// the priority, so it is logged.
fn lower_priority(nice: i32) {
    if !crate::priority::lower_thread_priority(nice) {
        tracing::warn!(nice, "could not lower the HTTP threads' priority");
    }
}

/// Binds `addr` (failing start-up with the address named) and serves until
/// `shutdown` is cancelled, on a runtime of its own with `threads` workers
/// running `nice` lower than the stream:
/// a flood of requests then competes with the stream for CPU through the
/// OS scheduler, and cannot fill the stream's task queues (seen: on one
/// shared runtime, 28,000 score requests/s took the stream from 5,000 to
/// 13 events/s).
pub fn serve(
    addr: SocketAddr,
    threads: usize,
    nice: i32,
    metrics: Metrics,
    health: Arc<Health>,
    api: Option<Arc<api::Api>>,
    shutdown: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| anyhow::anyhow!("http.bind: cannot listen on {addr}: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("streamscore-http")
        .on_thread_start(move || lower_priority(nice))
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the HTTP runtime: {e}"))?;
    tracing::info!(%addr, threads, "serving the /v1 API, /metrics, /healthz and /readyz");
    let app = router(metrics, health, api);
    std::thread::Builder::new()
        .name("streamscore-http-main".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "HTTP listener");
                        return;
                    }
                };
                let r = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { shutdown.cancelled().await })
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            });
            // Requests still running get a moment, then the runtime goes.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        })
        .map_err(|e| anyhow::anyhow!("starting the HTTP thread: {e}"))
}
