//! `/api/jobs`: upload, status, result, cancel.
//!
//! - `POST /api/jobs` — multipart: the image (a file field; PNG, JPEG or TIFF), `pipeline`
//!   (the worker's op syntax), optional `tile` (default `jobs.default_tile`). Answers 202 with
//!   `{job_id, width, height, tiles, pipeline, status, …}`. Refusals name the cause: 413 over
//!   `jobs.max_upload_bytes` or `jobs.max_pixels`, 415 not an image type it reads, 400 a
//!   corrupt file, a pipeline that does not parse or cannot be tiled exactly, a tile too large
//!   for `jobs.max_record_bytes`; 503 while `jobs.max_held_bytes` is used up or Kafka is out
//!   of reach.
//! - `GET /api/jobs` (newest first), `GET /api/jobs/{id}` — `{total, done, failed, status,
//!   seconds, errors, …}`.
//! - `GET /api/jobs/{id}/result` — the stitched image, PNG (lossless, default) or JPEG
//!   (`?format=jpeg` or `Accept: image/jpeg`); 409 until the job is done.
//! - `DELETE /api/jobs/{id}` — cancel: workers skip the tiles not yet processed.
//!
//! Changes (POST, DELETE) coming from a browser must come from the console's own page: a
//! request whose `Origin` is another site is refused (a page elsewhere cannot post jobs to a
//! console on localhost).

use std::sync::{Arc, Mutex};

use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use framelink_common::heartbeat::now_ms;
use framelink_common::pipeline::Pipeline;
use framelink_common::tile_wire::{JOB_RECORD_VERSION, JobRecord, JobStatus};
use framelink_common::tiling;
use serde::Deserialize;
use serde_json::json;

use super::image_io::{self, OutFormat, UploadError};
use super::kafka::JobsKafka;
use super::state::{Job, Jobs};

/// Bytes a tile record carries besides its pixels (key, headers, batch framing), at most.
const RECORD_OVERHEAD: u64 = 2048;

/// Most tiles a job may have.
pub const MAX_TILES: u64 = 65_536;
/// Most bytes a job's tiles may carry, as a multiple of the image's (their halos overlap).
pub const MAX_AMPLIFICATION: f64 = 4.0;

#[derive(Clone)]
pub struct JobsApi {
    pub jobs: Arc<Mutex<Jobs>>,
    pub kafka: Arc<JobsKafka>,
    /// One upload at a time is decoded and queued (its source image is held until its tiles
    /// are queued); others wait before their bodies are read.
    pub uploads: Arc<tokio::sync::Semaphore>,
}

impl JobsApi {
    pub fn new(jobs: Arc<Mutex<Jobs>>, kafka: Arc<JobsKafka>) -> Self {
        JobsApi { jobs, kafka, uploads: Arc::new(tokio::sync::Semaphore::new(1)) }
    }
}

fn refuse(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({"error": msg.to_string()}))).into_response()
}

impl JobsApi {
    fn restoring(&self) -> Option<Response> {
        (!self.jobs.lock().expect("jobs lock").restored).then(|| refuse(StatusCode::SERVICE_UNAVAILABLE, "the console is reading its jobs back from Kafka; try again in a moment"))
    }
}

/// A browser's cross-site request (its `Origin` is not this host) may not change anything.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    origin.split_once("://").is_some_and(|(_, rest)| rest == host)
}

fn job_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    format!("{:011x}{:08x}", now_ms(), random as u32)
}

pub async fn create(State(api): State<JobsApi>, headers: HeaderMap, mut form: Multipart) -> Response {
    if !same_origin(&headers) {
        return refuse(StatusCode::FORBIDDEN, "a request from another site's page; upload from the console's own page or an API client");
    }
    if let Some(r) = api.restoring() {
        return r;
    }
    let Ok(permit) = api.uploads.clone().acquire_owned().await else { return refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down") };
    let cfg = api.kafka.cfg.clone();
    let (mut file, mut name, mut spec, mut tile) = (None::<Bytes>, None::<String>, None::<String>, None::<String>);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return upload_error(e, cfg.max_upload_bytes),
        };
        let field_name = field.name().unwrap_or("").to_owned();
        if field.file_name().is_some() || field_name == "image" {
            name = field.file_name().map(|n| n.chars().filter(|c| !c.is_control()).take(200).collect());
            match field.bytes().await {
                Ok(b) if b.len() as u64 > cfg.max_upload_bytes => return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload is {} bytes, larger than jobs.max_upload_bytes = {}", b.len(), cfg.max_upload_bytes)),
                Ok(b) => file = Some(b),
                Err(e) => return upload_error(e, cfg.max_upload_bytes),
            }
        } else {
            let text = match field.text().await {
                Ok(t) => t,
                Err(e) => return upload_error(e, cfg.max_upload_bytes),
            };
            match field_name.as_str() {
                "pipeline" => spec = Some(text),
                "tile" => tile = Some(text),
                other => return refuse(StatusCode::BAD_REQUEST, format!("unknown form field {other:?} (image, pipeline, tile)")),
            }
        }
    }
    let Some(file) = file else { return refuse(StatusCode::BAD_REQUEST, "no image: send it as a file field (multipart/form-data), e.g. curl -F image=@photo.png -F pipeline=blur:2") };
    let Some(spec) = spec else { return refuse(StatusCode::BAD_REQUEST, "no pipeline field (the worker's op syntax, e.g. blur:1.5,sobel)") };
    let pipeline = match Pipeline::parse(&spec) {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("pipeline: {e}")),
    };
    let tile = match tile.as_deref().map(str::trim) {
        None | Some("") => cfg.default_tile,
        Some(t) => match t.parse::<u32>() {
            Ok(t) if (16..=8192).contains(&t) => t,
            _ => return refuse(StatusCode::BAD_REQUEST, format!("tile {t:?} is not a number from 16 to 8192")),
        },
    };
    // Cheap checks first: an op that cannot be tiled is refused before the image is decoded.
    if let Err(e @ (tiling::TilingError::NotTileable { .. } | tiling::TilingError::ModelOp { .. })) = tiling::check(&pipeline, u32::MAX, u32::MAX) {
        return refuse(StatusCode::BAD_REQUEST, format!("pipeline: {e}"));
    }
    // Small tiles under a wide halo would carry the image many times over.
    let halo: u64 = pipeline.0.iter().filter_map(|op| op.radius()).map(u64::from).sum();
    let amplification = ((tile as u64 + 2 * halo) as f64 / tile as f64).powi(2);
    if amplification > MAX_AMPLIFICATION {
        let smallest = (2 * halo) as f64 / (MAX_AMPLIFICATION.sqrt() - 1.0);
        return refuse(StatusCode::BAD_REQUEST, format!("tile {tile} with this pipeline's halo of {halo} px would carry {amplification:.1}x the image's pixels (at most {MAX_AMPLIFICATION}x): use tile ≥ {}", smallest.ceil()));
    }
    // The result's size from the file's header, before decoding: tiles and memory.
    let (w, h) = match image_io::dimensions(&file) {
        Ok(d) => d,
        Err(e) => return upload_refused(e),
    };
    if w as u64 * h as u64 <= cfg.max_pixels {
        let (ow, oh) = pipeline.output_size(w, h);
        let tiles = ow.div_ceil(tile) as u64 * oh.div_ceil(tile) as u64;
        if tiles > MAX_TILES {
            return refuse(StatusCode::BAD_REQUEST, format!("tile {tile} makes {tiles} tiles of a {ow}x{oh} result, more than {MAX_TILES}: use a larger tile"));
        }
        let need = ow as u64 * oh as u64 * 3;
        let held = api.jobs.lock().expect("jobs lock").held_bytes();
        if held + need > cfg.max_held_bytes {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("this result needs up to {need} bytes; the jobs held use {held} of jobs.max_held_bytes = {}: wait for jobs to expire, or cancel some", cfg.max_held_bytes));
        }
    }
    let max_pixels = cfg.max_pixels;
    let decoded = match tokio::task::spawn_blocking(move || image_io::decode(&file, max_pixels)).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return upload_refused(e),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("decoding failed: {e}")),
    };
    let (p2, (dw, dh, dc)) = (pipeline.clone(), (decoded.width, decoded.height, decoded.channels));
    let plan = match tokio::task::spawn_blocking(move || tiling::plan(&p2, dw, dh, dc, tile)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return refuse(StatusCode::BAD_REQUEST, format!("pipeline: {e}")),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("planning failed: {e}")),
    };
    let record_bytes = plan.max_region_pixels() * decoded.channels as u64 + RECORD_OVERHEAD;
    if record_bytes > cfg.max_record_bytes {
        let halo = plan.max_halo() as u64;
        let fits = (((cfg.max_record_bytes - RECORD_OVERHEAD) / decoded.channels as u64) as f64).sqrt() as u64;
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("tile {tile} with this pipeline's halo of {halo} px makes tile records of {record_bytes} bytes, above jobs.max_record_bytes = {}; use tile ≤ {}", cfg.max_record_bytes, fits.saturating_sub(2 * halo)),
        );
    }
    let api2 = api.clone();
    let results_from = match tokio::task::spawn_blocking(move || api2.kafka.results_ends()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("cannot reach the tile-results topic: {e}")),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let now = now_ms();
    let record = JobRecord {
        v: JOB_RECORD_VERSION,
        id: job_id(),
        status: JobStatus::Queuing,
        created_ms: now,
        finished_ms: None,
        width: plan.width,
        height: plan.height,
        channels: decoded.channels,
        pipeline: pipeline.to_string(),
        tile,
        tiles: plan.tiles.len() as u32,
        out_width: plan.out_width,
        out_height: plan.out_height,
        out_channels: plan.out_channels,
        results_from,
        reason: None,
        name,
    };
    let id = record.id.clone();
    {
        let mut jobs = api.jobs.lock().expect("jobs lock");
        let need = plan.out_width as u64 * plan.out_height as u64 * plan.out_channels as u64;
        let held = jobs.held_bytes();
        if held + need > cfg.max_held_bytes {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("this result needs {need} bytes; the jobs held use {held} of jobs.max_held_bytes = {}: wait for jobs to finish and expire, or cancel some", cfg.max_held_bytes));
        }
        jobs.insert(Job::new(record.clone()));
    }
    tracing::info!(job = id, width = plan.width, height = plan.height, tiles = plan.tiles.len(), pipeline = %pipeline, halo = plan.max_halo(), "Job created; queuing its tiles.");
    let body = json!({
        "job_id": id, "width": plan.width, "height": plan.height, "tiles": plan.tiles.len(), "tile": tile,
        "pipeline": pipeline.to_string(), "status": "queuing", "out_width": plan.out_width, "out_height": plan.out_height,
        "status_url": format!("/api/jobs/{id}"), "result_url": format!("/api/jobs/{id}/result"),
    });
    // The job's record, its tiles and its `running` record are written by a task of its own:
    // a client that goes away after this answer (or before it) cannot leave a job half-made.
    let task = api.clone();
    tokio::spawn(async move {
        let _permit = permit; // the next upload is decoded once these tiles are queued
        if let Err(e) = task.kafka.write_current(&task.jobs, &id).await {
            tracing::error!(job = id, error = e, "Cannot record the job; it failed.");
            task.jobs.lock().expect("jobs lock").end(&id, JobStatus::Failed, format!("could not record the job: {e}"), now_ms());
            return;
        }
        let queued = task.kafka.queue_tiles(&id, &decoded, &plan, &task.jobs).await;
        drop(decoded);
        let now = now_ms();
        let changed = match queued {
            Ok(()) => task.jobs.lock().expect("jobs lock").running(&id, now).is_some(),
            Err(why) => {
                tracing::error!(job = id, why, "A tile could not be queued; the job failed.");
                task.jobs.lock().expect("jobs lock").end(&id, JobStatus::Failed, format!("could not queue every tile: {why}"), now).is_some()
            }
        };
        if changed {
            write_logged(&task.kafka, &task.jobs, &id).await;
        }
    });
    (StatusCode::ACCEPTED, axum::Json(body)).into_response()
}

/// Writes a job's current record (its tombstone once it is gone); a failure is logged and
/// counted (the job's state in memory is right; a restart would see the previous record).
pub async fn write_logged(kafka: &JobsKafka, jobs: &Mutex<Jobs>, id: &str) {
    if let Err(e) = kafka.write_current(jobs, id).await {
        tracing::error!(job = id, error = e, "Cannot write the job's record (counted in job_record_writes_failed).");
        jobs.lock().expect("jobs lock").counters.record_writes_failed.inc();
    }
}

fn upload_refused(e: UploadError) -> Response {
    let status = match e {
        UploadError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        UploadError::TooManyPixels { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        UploadError::Corrupt { .. } => StatusCode::BAD_REQUEST,
    };
    refuse(status, e)
}

fn upload_error(e: axum::extract::multipart::MultipartError, limit: u64) -> Response {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return refuse(status, format!("the upload is larger than jobs.max_upload_bytes = {limit}"));
    }
    refuse(status, format!("the upload could not be read: {}", e.body_text()))
}

pub async fn list(State(api): State<JobsApi>) -> Response {
    if let Some(r) = api.restoring() {
        return r;
    }
    axum::Json(api.jobs.lock().expect("jobs lock").list_json(now_ms())).into_response()
}

pub async fn get_one(State(api): State<JobsApi>, Path(id): Path<String>) -> Response {
    if let Some(r) = api.restoring() {
        return r;
    }
    match api.jobs.lock().expect("jobs lock").get(&id) {
        Some(j) => axum::Json(j.json(now_ms())).into_response(),
        None => refuse(StatusCode::NOT_FOUND, format!("no job {id:?} (it may have expired)")),
    }
}

#[derive(Deserialize)]
pub struct ResultQuery {
    format: Option<String>,
}

pub async fn result(State(api): State<JobsApi>, Path(id): Path<String>, Query(q): Query<ResultQuery>, headers: HeaderMap) -> Response {
    if let Some(r) = api.restoring() {
        return r;
    }
    let format = match OutFormat::choose(q.format.as_deref(), headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())) {
        Ok(f) => f,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    let (pixels, w, h, ch, cached) = {
        let jobs = api.jobs.lock().expect("jobs lock");
        let Some(j) = jobs.get(&id) else { return refuse(StatusCode::NOT_FOUND, format!("no job {id:?} (it may have expired)")) };
        if j.record.status != JobStatus::Done {
            return (StatusCode::CONFLICT, axum::Json(json!({"error": format!("job {id} is {}, not done", j.record.status.as_str()), "job": j.json(now_ms())}))).into_response();
        }
        (j.output().clone(), j.record.out_width, j.record.out_height, j.record.out_channels, j.encoded.get(format.ext()).cloned())
    };
    let body = match cached {
        Some(b) => b,
        None => match tokio::task::spawn_blocking(move || image_io::encode(w, h, ch, &pixels, format)).await {
            Ok(Ok(b)) => {
                let b = Bytes::from(b);
                if let Some(j) = api.jobs.lock().expect("jobs lock").get_mut(&id) {
                    j.encoded.insert(format.ext(), b.clone());
                }
                b
            }
            Ok(Err(e)) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the result: {e}")),
            Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
    };
    let disposition = format!("inline; filename=\"{id}.{}\"", format.ext());
    ([(header::CONTENT_TYPE, format.content_type().to_owned()), (header::CONTENT_DISPOSITION, disposition), (header::CACHE_CONTROL, "private, max-age=3600".to_owned())], body).into_response()
}

pub async fn cancel(State(api): State<JobsApi>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return refuse(StatusCode::FORBIDDEN, "a request from another site's page");
    }
    if let Some(r) = api.restoring() {
        return r;
    }
    {
        let mut jobs = api.jobs.lock().expect("jobs lock");
        let Some(j) = jobs.get(&id) else { return refuse(StatusCode::NOT_FOUND, format!("no job {id:?} (it may have expired)")) };
        let status = j.record.status;
        if jobs.end(&id, JobStatus::Cancelled, "cancelled by DELETE /api/jobs".into(), now_ms()).is_none() {
            return refuse(StatusCode::CONFLICT, format!("job {id} is {} already", status.as_str()));
        }
    }
    write_logged(&api.kafka, &api.jobs, &id).await;
    tracing::info!(job = id, "Job cancelled.");
    let body = api.jobs.lock().expect("jobs lock").get(&id).map(|j| j.json(now_ms()));
    axum::Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_consoles_own_pages_may_change_jobs() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "localhost:9470".parse().unwrap());
        assert!(same_origin(&h), "API clients send no Origin");
        h.insert(header::ORIGIN, "http://localhost:9470".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        assert_eq!(job_id().len(), 19);
        assert_ne!(job_id(), job_id());
    }
}
