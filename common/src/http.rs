//! The small HTTP listener both binaries run: `/metrics` (Prometheus / OpenMetrics text) and
//! `/healthz` (JSON), on a single-threaded runtime of its own so it never competes with the
//! frame path.
//!
//! Its `[http]` table is defined here too, once for both: the binaries differ only in the
//! default port (one agent and one worker can share a host), a const parameter of
//! [`HttpConfig`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use serde::Deserialize;

/// `[http]`; `DEFAULT_PORT` is the binary's port on 127.0.0.1.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig<const DEFAULT_PORT: u16> {
    /// Address of `/metrics` and `/healthz`; empty turns the listener off. Default
    /// `127.0.0.1:<DEFAULT_PORT>`.
    #[serde(default = "default_listen::<DEFAULT_PORT>")]
    pub listen: String,
}

fn default_listen<const DEFAULT_PORT: u16>() -> String {
    format!("127.0.0.1:{DEFAULT_PORT}")
}

impl<const DEFAULT_PORT: u16> Default for HttpConfig<DEFAULT_PORT> {
    fn default() -> Self {
        Self { listen: default_listen::<DEFAULT_PORT>() }
    }
}

/// `http.listen` is not an address.
#[derive(Debug, thiserror::Error)]
#[error("config key `http.listen`: {listen:?} is not an address like {example}")]
pub struct ListenError {
    pub listen: String,
    pub example: String,
    #[source]
    pub source: std::net::AddrParseError,
}

impl<const DEFAULT_PORT: u16> HttpConfig<DEFAULT_PORT> {
    /// The listener's address; `None` when `listen` is empty (no listener).
    pub fn addr(&self) -> Result<Option<SocketAddr>, ListenError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|source| ListenError { listen: self.listen.clone(), example: default_listen::<DEFAULT_PORT>(), source })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    type Config = HttpConfig<9464>;

    #[test]
    fn default_empty_and_bad_listen() {
        assert_eq!(Config::default().listen, "127.0.0.1:9464");
        let parsed: Config = crate::config_file::from_toml_str("").unwrap();
        assert_eq!(parsed.listen, "127.0.0.1:9464");
        assert_eq!(Config::default().addr().unwrap(), Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(Config { listen: String::new() }.addr().unwrap(), None);
        let e = Config { listen: "localhost".into() }.addr().unwrap_err();
        assert_eq!(e.to_string(), "config key `http.listen`: \"localhost\" is not an address like 127.0.0.1:9464");
        let e = crate::config_file::from_toml_str::<Config>("lsten = \"x\"").unwrap_err();
        assert!(e.to_string().starts_with("config key `lsten`: unknown field"), "{e}");
    }
}
