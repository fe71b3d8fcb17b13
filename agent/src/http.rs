//! `/metrics` (Prometheus text) and `/healthz` (JSON) on a small HTTP listener.
//!
//! `/healthz` answers 200 while the agent works — also while the link is down and frames are
//! spooled, since that is normal at the edge — and says what is wrong in its body:
//! `{"status":"degraded","link":"down","link_error":"TLS handshake / certificate error: …"}`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::metrics::{LinkState, Metrics};

/// `[http]`: `listen`, the address of the metrics / health listener; empty to turn it off.
/// Default `127.0.0.1:9464`.
pub type HttpConfig = framelink_common::http::HttpConfig<9464>;

pub fn health_json(m: &Metrics) -> serde_json::Value {
    let h = m.health.lock().expect("health lock").clone();
    let cameras_ok = h.cameras.values().all(|s| s == "up" || s == "finished");
    let status = if h.link == LinkState::Up && cameras_ok && h.spool_error.is_none() { "ok" } else { "degraded" };
    serde_json::json!({
        "status": status,
        "link": h.link.as_str(),
        "link_error": h.link_error,
        "spool": {
            "records": m.spool_records.get(),
            "bytes": m.spool_bytes.get(),
            "max_bytes": h.spool_max_bytes,
            "cap_bytes": m.spool_cap_bytes.get(),
            "index_rebuilt": m.spool_index_rebuilt.get(),
            "damaged": m.spool_damaged.get(),
            "damaged_pruned": m.spool_damaged_pruned.get(),
            "error": h.spool_error,
        },
        "cameras": h.cameras,
        // Beats for framelink-console that Kafka acknowledged / did not take in time.
        "heartbeats": {"sent": m.beats.sent.get(), "failed": m.beats.failed.get()},
    })
}

/// Binds and serves on a background thread; returns the bound address.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let m = metrics.clone();
    framelink_common::http::spawn(addr, Arc::new(move || m.render()), Arc::new(move || health_json(&metrics)))
        .with_context(|| format!("binding the HTTP listener on {addr} (http.listen)"))
}
