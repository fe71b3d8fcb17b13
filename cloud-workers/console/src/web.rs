//! The console's HTTP side (axum): the dashboard page (static assets compiled into the
//! binary, no JavaScript build step), the JSON API, the live stream (server-sent events),
//! thumbnails, `/healthz` and `/metrics`.
//!
//! Routes:
//! - `GET /` the dashboard; `GET /assets/app.js`, `/assets/app.css`;
//! - `GET /api/fleet` everything at once; `/api/devices`, `/api/cameras`, `/api/workers`,
//!   `/api/lag`, `/api/dead-letters`, `/api/events` the parts;
//! - `GET /api/stream` server-sent events: `snapshot` (everything) first, then `delta` (what
//!   changed since) every `push_interval_ms` while something changes;
//! - `GET /thumbs/{device}/{camera}?seq=N` the latest result as a small JPEG;
//! - `GET /healthz` (never behind the token: probes need it; it names no device, camera or
//!   worker, only counts and the Kafka diagnosis),
//!   `GET /metrics`;
//! - `GET|POST /login` a form that puts the bearer token in an HttpOnly cookie, for browsers
//!   (they cannot send an `Authorization` header on a page load or an EventSource).
//!
//! With a token configured every route but `/healthz`, `/login` and `/assets/…` needs
//! `Authorization: Bearer <token>` or the cookie. Without one (the console then binds loopback
//! only) requests must name a loopback host (`Host: localhost`, `127.0.0.1`, `[::1]`), so a web
//! page a browser on that machine visits cannot read the API through DNS rebinding. Nothing
//! here exposes secrets: the config's passwords and the token never appear in any answer.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use framelink_common::heartbeat::now_ms;
use framelink_common::link::LinkStatus;
use futures_util::stream::Stream;
use serde::Deserialize;
use serde_json::json;

use crate::metrics::ConsoleMetrics;
use crate::state::Fleet;
use crate::thumbs;

const INDEX: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const LOGIN: &str = include_str!("../assets/login.html");
const COOKIE: &str = "framelink_console_token";

#[derive(Clone)]
pub struct App {
    pub fleet: Arc<Mutex<Fleet>>,
    pub thumbs: Arc<thumbs::Cache>,
    pub metrics: Arc<ConsoleMetrics>,
    pub token: Option<Arc<str>>,
    pub link: Arc<LinkStatus>,
    pub push_interval: Duration,
    pub thumbnail_width: u32,
    pub started: Instant,
    pub tls: bool,
    /// Ends the live streams at shutdown (a graceful stop waits for every connection).
    pub shutdown: framelink_common::shutdown::Shutdown,
    /// Large-image jobs; `None` with `jobs.enabled = false`.
    pub jobs: Option<crate::jobs::api::JobsApi>,
}

/// `/api/jobs…` (see [`crate::jobs::api`]).
fn jobs_router(api: crate::jobs::api::JobsApi) -> Router<App> {
    use crate::jobs::api;
    use axum::routing::post;
    let upload_limit = api.kafka.cfg.max_upload_bytes.saturating_add(1 << 20).min(usize::MAX as u64) as usize;
    Router::new()
        .route("/api/jobs", get(api::list).post(api::create).layer(axum::extract::DefaultBodyLimit::max(upload_limit)))
        .route("/api/jobs/{id}", get(api::get_one).delete(api::cancel))
        .route("/api/jobs/{id}/result", get(api::result))
        .route("/api/jobs/{id}/cancel", post(api::cancel))
        .with_state(api)
}

pub fn router(app: App) -> Router {
    let jobs = app.jobs.clone().map(jobs_router).unwrap_or_default();
    let protected = Router::new()
        .route("/", get(index))
        .route("/api/fleet", get(fleet))
        .route("/api/devices", get(|State(a): State<App>| async move { json_of(&a, |f, now| f.devices_json(now)) }))
        .route("/api/cameras", get(|State(a): State<App>| async move { json_of(&a, |f, now| f.cameras_json(now)) }))
        .route("/api/workers", get(|State(a): State<App>| async move { json_of(&a, |f, now| f.workers_json(now)) }))
        .route("/api/lag", get(|State(a): State<App>| async move { json_of(&a, |f, _| f.lag_json()) }))
        .route("/api/dead-letters", get(|State(a): State<App>| async move { json_of(&a, |f, _| f.dead_letters_json()) }))
        .route("/api/events", get(|State(a): State<App>| async move { json_of(&a, |f, _| f.events_json()) }))
        .route("/api/stream", get(stream))
        .route("/thumbs/{device}/{camera}", get(thumbnail))
        .route("/metrics", get(metrics))
        .merge(jobs)
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), authorize));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/login", get(|| async { page(LOGIN) }).post(login))
        // The page's code and style hold nothing secret; the login form needs the style.
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .merge(protected)
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}

/// Every answer: no sniffing, no framing, scripts and styles from this origin only.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    res
}

/// Compares in time independent of where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return Some(t.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')).map(str::to_owned))
}

/// The host part of a `Host` header (`[::1]:9470` → `[::1]`).
fn host_name(h: &str) -> &str {
    if h.starts_with('[') {
        return h.split_once(']').map(|(a, _)| &h[..a.len() + 1]).unwrap_or(h);
    }
    h.rsplit_once(':').map(|(a, _)| a).unwrap_or(h)
}

async fn authorize(State(app): State<App>, req: Request, next: Next) -> Response {
    let Some(token) = &app.token else {
        let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(host_name);
        if matches!(host, Some("localhost" | "127.0.0.1" | "[::1]")) {
            return next.run(req).await;
        }
        return (StatusCode::FORBIDDEN, "without a token the console answers only requests for localhost; configure console.token_file to serve other names\n").into_response();
    };
    if presented(req.headers()).is_some_and(|t| same(&t, token)) {
        return next.run(req).await;
    }
    // A browser loading the page goes to the login form; API clients get 401.
    if req.uri().path() == "/" {
        return Redirect::to("/login").into_response();
    }
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer realm=\"framelink-console\"")], "a bearer token is required (Authorization: Bearer …)\n").into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(app): State<App>, Form(f): Form<LoginForm>) -> Response {
    match &app.token {
        Some(t) if same(f.token.trim(), t) => {
            let secure = if app.tls { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/{secure}", f.token.trim());
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Some(_) => (StatusCode::UNAUTHORIZED, "wrong token\n").into_response(),
        None => Redirect::to("/").into_response(),
    }
}

fn page(html: &'static str) -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(html)).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn index() -> Response {
    page(INDEX)
}

fn json_of(app: &App, f: impl FnOnce(&Fleet, u64) -> serde_json::Value) -> Response {
    let fleet = app.fleet.lock().expect("fleet lock");
    axum::Json(f(&fleet, now_ms())).into_response()
}

async fn fleet(State(app): State<App>) -> Response {
    json_of(&app, |f, now| {
        json!({
            "now_ms": now,
            "devices": f.devices_json(now),
            "cameras": f.cameras_json(now),
            "workers": f.workers_json(now),
            "lag": f.lag_json(),
            "dead_letters": f.dead_letters_json(),
            "events": f.events_json(),
        })
    })
}

/// Counts a connected page for as long as its stream lives.
struct Connected(Arc<ConsoleMetrics>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.sse_clients.dec();
    }
}

async fn stream(State(app): State<App>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    app.metrics.sse_clients.inc();
    let guard = Connected(app.metrics.clone());
    let mut interval = tokio::time::interval(app.push_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `since`: the version the page has; `None` until the snapshot went out.
    let state = (app, None::<u64>, interval, guard);
    let s = futures_util::stream::unfold(state, |(app, since, mut interval, guard)| async move {
        loop {
            if since.is_some() {
                interval.tick().await;
            }
            if app.shutdown.is_set() {
                return None;
            }
            let (data, version) = {
                let fleet = app.fleet.lock().expect("fleet lock");
                if since == Some(fleet.version()) {
                    continue;
                }
                (fleet.delta(since.unwrap_or(0), now_ms()), fleet.version())
            };
            let kind = if since.is_none() { "snapshot" } else { "delta" };
            let event = Event::default().event(kind).data(data.to_string());
            return Some((Ok(event), (app, Some(version), interval, guard)));
        }
    });
    Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[derive(Deserialize)]
struct ThumbQuery {
    seq: Option<u64>,
}

async fn thumbnail(State(app): State<App>, Path((device, camera)): Path<(String, String)>, Query(q): Query<ThumbQuery>) -> Response {
    let latest = app.fleet.lock().expect("fleet lock").latest(&device, &camera);
    let Some(latest) = latest else {
        return (StatusCode::NOT_FOUND, format!("no result of camera {device}/{camera} yet\n")).into_response();
    };
    let cache_control = if q.seq == Some(latest.seq) { "private, max-age=86400, immutable" } else { "no-cache" };
    if let Some(t) = app.thumbs.get(&device, &camera, latest.seq) {
        return ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, cache_control)], t).into_response();
    }
    let width = app.thumbnail_width;
    let jpeg = latest.jpeg.clone();
    match tokio::task::spawn_blocking(move || thumbs::make(&jpeg, width, 75)).await {
        Ok(Ok(t)) => {
            app.thumbs.put(&device, &camera, latest.seq, t.clone());
            ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, cache_control)], t).into_response()
        }
        Ok(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("camera {device}/{camera}, result {}: {e}\n", latest.seq)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("making the thumbnail failed: {e}\n")).into_response(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    if let Some(j) = &app.jobs {
        app.metrics.set_jobs(&j.jobs.lock().expect("jobs lock"));
    }
    let text = {
        let fleet = app.fleet.lock().expect("fleet lock");
        app.metrics.render(&fleet, now_ms())
    };
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

/// `ok` while the console reads Kafka, `degraded` (with the diagnosis) while it cannot.
async fn healthz(State(app): State<App>) -> Response {
    let diagnosis = app.link.diagnosis().map(|d| d.to_string());
    let fleet = app.fleet.lock().expect("fleet lock");
    let now = now_ms();
    let c = fleet.status_counts(now);
    let body = json!({
        "status": if diagnosis.is_none() { "ok" } else { "degraded" },
        "link_error": diagnosis,
        "uptime_s": app.started.elapsed().as_secs(),
        "devices": {"live": c[0][0], "stale": c[0][1], "offline": c[0][2]},
        "workers": {"live": c[1][0], "stale": c[1][1], "offline": c[1][2]},
        "cameras": {"live": c[2][0], "stale": c[2][1], "offline": c[2][2]},
        "read": fleet.counts,
        "sse_clients": app.metrics.sse_clients.get(),
        "jobs": app.jobs.as_ref().map(|j| {
            let jobs = j.jobs.lock().expect("jobs lock");
            let c = &jobs.counters;
            json!({
                "restored": jobs.restored,
                "by_status": jobs.status_counts(),
                "held_bytes": jobs.held_bytes(),
                "tiles_stitched": c.stitched.get(),
                "tiles_failed": c.failed.get(),
                "duplicates": c.duplicates.get(),
                "record_writes_failed": c.record_writes_failed.get(),
                "records_ignored": c.records_ignored.get(),
                "ignored": ignored_counts(c),
            })
        }),
    });
    axum::Json(body).into_response()
}

fn ignored_counts(c: &crate::jobs::state::JobCounters) -> serde_json::Map<String, serde_json::Value> {
    ["unknown_job", "job_over", "bad_result"].iter().map(|r| (r.to_string(), json!(c.ignored.get_or_create(&vec![("reason", r.to_string())]).get()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), None);
        h.insert(header::COOKIE, HeaderValue::from_static("a=b; framelink_console_token=secret-1; c=d"));
        assert_eq!(presented(&h).as_deref(), Some("secret-1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer secret-2"));
        assert_eq!(presented(&h).as_deref(), Some("secret-2"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "abcd"));
        assert_eq!(host_name("localhost:9470"), "localhost");
        assert_eq!(host_name("[::1]:9470"), "[::1]");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("evil.example:9470"), "evil.example");
    }
}
