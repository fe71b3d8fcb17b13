//! The small HTTP listener both binaries run: `/metrics` (Prometheus / OpenMetrics text) and
//! `/healthz` (JSON), on a single-threaded runtime of its own so it never competes with the
//! frame path.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;

pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;
pub type HealthFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Binds `addr` and serves on a background thread; returns the bound address (port 0 picks one).
pub fn spawn(addr: SocketAddr, metrics: MetricsFn, health: HealthFn) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m()) }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let h = health.clone();
                async move { axum::Json(h()) }
            }),
        );
    std::thread::Builder::new().name("http".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "HTTP listener stopped.");
            }
        });
    })?;
    Ok(bound)
}
