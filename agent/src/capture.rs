//! Capture and encoding threads: each camera runs on its own thread and hands raw frames to
//! the encoder thread it is pinned to, through a queue of two frames. When the encoder falls
//! behind, the camera drops the frame at the source and counts it (`encoder_behind`): capture
//! stays real-time and memory stays bounded. A camera that fails or disappears is re-opened
//! with exponential backoff (0.5 s to 30 s, ±25 % jitter) while the other cameras go on.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use crossbeam_channel::{Sender, TrySendError};
use framelink_common::FrameMeta;
use framelink_common::shutdown::Shutdown;
use rand::RngExt;

use crate::drop_reason::DropReason;
use crate::encoder::{Encoder, EncoderConfig};
use crate::frame::{Frame, RawFrame};
use crate::metrics::{LinkState, Metrics};
use crate::sequence::SequenceStore;
use crate::source::config::CameraConfig;
use crate::source::{Source, SourceError};

/// Frames waiting for each encoder thread.
pub(crate) const ENCODER_QUEUE: usize = 2;

/// Starts encoder threads and one capture thread per camera. Frames come out of `out` in
/// per-camera order; `out` closes once `shutdown` is set and every thread has finished.
pub fn start(
    device_id: &str,
    cameras: &[CameraConfig],
    state_dir: &std::path::Path,
    encoder: &EncoderConfig,
    seqs: Arc<SequenceStore>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    out: Sender<Frame>,
) -> Result<Vec<JoinHandle<()>>> {
    let sources = cameras.iter().map(|c| (c.id.clone(), c.build(state_dir))).collect();
    start_with_sources(device_id, sources, encoder, seqs, metrics, shutdown, out)
}

/// [`start`] with sources built by the caller (benchmarks, tests).
pub fn start_with_sources(
    device_id: &str,
    sources: Vec<(String, Box<dyn Source>)>,
    encoder: &EncoderConfig,
    seqs: Arc<SequenceStore>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    out: Sender<Frame>,
) -> Result<Vec<JoinHandle<()>>> {
    let n = encoder.thread_count().min(sources.len()).max(1);
    let mut handles = Vec::new();
    let mut inputs = Vec::new();
    for i in 0..n {
        let (tx, rx) = crossbeam_channel::bounded::<RawFrame>(ENCODER_QUEUE);
        inputs.push(tx);
        let mut enc = Encoder::new(encoder.clone())?;
        let (out, metrics, device) = (out.clone(), metrics.clone(), device_id.to_owned());
        handles.push(std::thread::Builder::new().name(format!("encoder-{i}")).spawn(move || {
            for raw in rx {
                let started = Instant::now();
                match enc.encode(&raw.image) {
                    Ok(e) => {
                        metrics.observe(&metrics.encode_seconds, &raw.camera, started.elapsed().as_secs_f64());
                        metrics.inc(&metrics.encoded, &raw.camera);
                        let frame = Frame {
                            meta: FrameMeta {
                                device_id: device.clone(),
                                camera_id: raw.camera.clone(),
                                seq: raw.seq,
                                capture_ns: raw.image.capture_ns,
                                width: e.width,
                                height: e.height,
                                pixel_format: raw.image.source_format.to_owned(),
                                content_type: framelink_common::wire::CONTENT_TYPE_JPEG.to_owned(),
                                clock: raw.image.clock,
                            },
                            payload: e.jpeg,
                        };
                        if out.send(frame).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(camera = raw.camera, seq = raw.seq, error = %err, "Frame could not be encoded: dropped.");
                        metrics.count_drop(&raw.camera, DropReason::EncodeError, 1);
                    }
                }
            }
        })?);
    }
    for (i, (id, source)) in sources.into_iter().enumerate() {
        let tx = inputs[i % n].clone();
        let (seqs, metrics, shutdown) = (seqs.clone(), metrics.clone(), shutdown.clone());
        handles.push(std::thread::Builder::new().name(format!("camera-{id}")).spawn(move || {
            run_camera(&id, source, &seqs, &metrics, &tx, &shutdown);
        })?);
    }
    Ok(handles)
}

/// Runs a source call, turning a panic inside it into an error: the camera is then re-opened
/// like any camera that failed, its state says why, and the other cameras are not affected
/// (without this its thread would end and its `/healthz` state stay at its last value).
fn guarded<T>(call: impl FnOnce() -> Result<T, SourceError>) -> Result<T, SourceError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|p| {
        let why = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown".into());
        Err(SourceError::Unavailable(format!("the source panicked: {why}")))
    })
}

/// A bulk source hands over a frame only while fewer than this many wait for Kafka's
/// acknowledgement: it goes as fast as the link takes frames, and what a link that goes quiet
/// holds in memory before it is judged stalled stays this small (plus the queues to the
/// forwarder), however fast the file reads.
pub const BULK_IN_FLIGHT: i64 = 32;
/// The longest a waiting bulk source sleeps between looks (it starts at 1 ms and doubles).
const LINK_CHECK: Duration = Duration::from_millis(200);
/// A bulk source waiting this long for acknowledgements says so in its camera state.
const SHOW_WAIT_AFTER: Duration = Duration::from_secs(1);

/// A bulk source ([`Source::blocks_when_behind`]) waits here while the link is not up (Kafka
/// unreachable, or the spool draining: its frames would only go into the spool, and at its cap
/// the full policy would evict them) or [`BULK_IN_FLIGHT`] frames wait for acknowledgement.
/// Its camera state says why when it waits for long. False when the agent stops.
fn wait_for_the_link(id: &str, metrics: &Metrics, shutdown: &Shutdown) -> bool {
    let (started, mut sleep) = (Instant::now(), Duration::from_millis(1));
    // The link state the camera's `paused: …` state was last written for (`Up`: waiting for
    // acknowledgements).
    let mut shown: Option<LinkState> = None;
    loop {
        let (link, in_flight) = (metrics.link(), metrics.frames_in_flight.get());
        if link == LinkState::Up && in_flight < BULK_IN_FLIGHT {
            if shown.is_some() {
                tracing::info!(camera = id, "Bulk source resumed: the link takes frames again.");
                metrics.set_camera(id, true, "up");
            }
            return true;
        }
        if shown != Some(link) && (link != LinkState::Up || started.elapsed() >= SHOW_WAIT_AFTER) {
            shown = Some(link);
            let why = if link == LinkState::Up { format!("{in_flight} frames wait for Kafka's acknowledgement") } else { format!("the link to Kafka is {}", link.as_str()) };
            tracing::info!(camera = id, reason = why, "Bulk source paused until the link takes frames again.");
            metrics.set_camera(id, true, &format!("paused: {why}"));
        }
        if shutdown.wait_timeout(sleep) {
            return false;
        }
        sleep = (sleep * 2).min(LINK_CHECK);
    }
}

pub fn run_camera(
    id: &str,
    mut source: Box<dyn Source>,
    seqs: &SequenceStore,
    metrics: &Metrics,
    tx: &Sender<RawFrame>,
    shutdown: &Shutdown,
) {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);
    let mut backoff = MIN;
    let mut reservation_error: Option<String> = None;
    tracing::info!(camera = id, source = source.describe(), "Camera starting.");
    'reopen: while !shutdown.is_set() {
        if let Err(e) = guarded(|| source.open()) {
            metrics.set_camera(id, false, &format!("error: {e}"));
            let wait = backoff.mul_f64(rand::rng().random_range(0.75..1.25));
            tracing::warn!(camera = id, error = %e, retry_in = ?wait, "Camera unavailable.");
            backoff = (backoff * 2).min(MAX);
            if shutdown.wait_timeout(wait) {
                break;
            }
            continue;
        }
        metrics.set_camera(id, true, "up");
        backoff = MIN;
        while !shutdown.is_set() {
            if source.blocks_when_behind() && !wait_for_the_link(id, metrics, shutdown) {
                break;
            }
            match guarded(|| source.next_frame()) {
                Ok(c) => {
                    // A disk that refuses the reservation does not stop the camera: numbers left
                    // in the reserved block are used; past it, frames are dropped (counted) until
                    // the disk takes the write again.
                    let seq = match seqs.next_checked(id) {
                        Ok(n) => {
                            match (&n.unreserved, &reservation_error) {
                                (Some(e), None) => {
                                    tracing::error!(camera = id, error = %e, "Cannot reserve sequence numbers; using the numbers reserved before.");
                                    reservation_error = Some(e.to_string());
                                }
                                (None, Some(_)) => {
                                    tracing::info!(camera = id, "Sequence numbers reserved again.");
                                    reservation_error = None;
                                    metrics.set_camera(id, true, "up");
                                }
                                _ => {}
                            }
                            n.seq
                        }
                        Err(e) => {
                            if reservation_error.is_none() {
                                tracing::error!(camera = id, error = %e, "Cannot reserve sequence numbers: frames are dropped (sequence_io_error) until the disk takes the write.");
                            }
                            reservation_error = Some(e.to_string());
                            metrics.set_camera(id, false, &format!("dropping frames: cannot reserve sequence numbers: {e}"));
                            metrics.inc(&metrics.captured, id);
                            metrics.count_drop(id, DropReason::SequenceIoError, 1);
                            continue;
                        }
                    };
                    metrics.inc(&metrics.captured, id);
                    metrics.last_frame(id, seq, c.capture_ns);
                    if let Some(counts) = source.stream_counts() {
                        metrics.stream_counts(id, counts);
                    }
                    let raw = RawFrame { camera: id.to_owned(), seq, image: c };
                    if source.blocks_when_behind() {
                        if tx.send(raw).is_err() {
                            return;
                        }
                        continue;
                    }
                    match tx.try_send(raw) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => metrics.count_drop(id, DropReason::EncoderBehind, 1),
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
                Err(SourceError::Exhausted) => {
                    tracing::info!(camera = id, "Camera source finished.");
                    metrics.set_camera(id, false, "finished");
                    return;
                }
                Err(e) => {
                    tracing::warn!(camera = id, error = %e, "Camera failed; re-opening.");
                    metrics.set_camera(id, false, &format!("reconnecting: {e}"));
                    metrics.inc(&metrics.camera_reconnects, id);
                    continue 'reopen;
                }
            }
        }
    }
    metrics.set_camera(id, false, "stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Captured, PixelFormat};

    /// A one-byte "JPEG": what the fake sources hand over.
    fn tiny() -> Captured {
        Captured { capture_ns: 1, width: 1, height: 1, stride: 0, format: PixelFormat::Jpeg, source_format: "MJPG", data: bytes::Bytes::from_static(b"x"), clock: Default::default() }
    }

    /// Panics on its first frame, then gives two frames and ends.
    struct PanicsOnce {
        calls: u32,
    }

    impl Source for PanicsOnce {
        fn open(&mut self) -> Result<(), SourceError> {
            Ok(())
        }

        fn next_frame(&mut self) -> Result<Captured, SourceError> {
            self.calls += 1;
            match self.calls {
                1 => panic!("decoder blew up"),
                2 | 3 => Ok(tiny()),
                _ => Err(SourceError::Exhausted),
            }
        }

        fn describe(&self) -> String {
            "panics once".into()
        }
    }

    #[test]
    fn a_source_that_panics_is_reopened_counted_and_its_camera_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = SequenceStore::open(dir.path()).unwrap();
        let metrics = Metrics::new(1 << 30);
        let (tx, rx) = crossbeam_channel::bounded(8);
        run_camera("cam", Box::new(PanicsOnce { calls: 0 }), &seqs, &metrics, &tx, &Shutdown::new());
        assert_eq!(rx.try_iter().count(), 2, "the frames after the panic");
        assert_eq!(metrics.total("camera_reconnects"), 1);
        assert_eq!(metrics.health.lock().unwrap().cameras["cam"], "finished");
    }

    /// A bulk source of `left` frames (a file at `pace = "fast"`).
    struct Bulk {
        left: u32,
    }

    impl Source for Bulk {
        fn open(&mut self) -> Result<(), SourceError> {
            Ok(())
        }

        fn next_frame(&mut self) -> Result<Captured, SourceError> {
            if self.left == 0 {
                return Err(SourceError::Exhausted);
            }
            self.left -= 1;
            Ok(tiny())
        }

        fn describe(&self) -> String {
            "bulk".into()
        }

        fn blocks_when_behind(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_bulk_source_waits_while_the_link_is_down_or_draining_and_goes_on_when_it_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = SequenceStore::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new(1 << 30));
        let (tx, rx) = crossbeam_channel::bounded(64);
        let shutdown = Shutdown::new();
        metrics.set_link(LinkState::Down, Some("unreachable".into()));
        let camera = {
            let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
            std::thread::spawn(move || run_camera("file", Box::new(Bulk { left: 5 }), &seqs, &metrics, &tx, &shutdown))
        };
        let paused = |m: &Metrics| m.camera_state("file").unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !paused(&metrics).starts_with("paused") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(paused(&metrics), "paused: the link to Kafka is down");
        metrics.set_link(LinkState::Draining, None);
        std::thread::sleep(LINK_CHECK * 3);
        assert_eq!(rx.try_iter().count(), 0, "nothing handed over while down or draining");
        metrics.set_link(LinkState::Up, None);
        camera.join().unwrap();
        assert_eq!(rx.try_iter().count(), 5, "every frame once the link is up");
        assert_eq!(paused(&metrics), "finished");
        assert_eq!(metrics.total("frames_dropped"), 0);
    }

    #[test]
    fn a_bulk_source_waits_while_too_many_frames_wait_for_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = SequenceStore::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new(1 << 30));
        let (tx, rx) = crossbeam_channel::bounded(64);
        let shutdown = Shutdown::new();
        metrics.frames_in_flight.set(BULK_IN_FLIGHT);
        let camera = {
            let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
            std::thread::spawn(move || run_camera("file", Box::new(Bulk { left: 3 }), &seqs, &metrics, &tx, &shutdown))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !metrics.camera_state("file").unwrap_or_default().starts_with("paused") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(metrics.camera_state("file").unwrap(), format!("paused: {BULK_IN_FLIGHT} frames wait for Kafka's acknowledgement"));
        assert_eq!(rx.try_iter().count(), 0);
        metrics.frames_in_flight.set(BULK_IN_FLIGHT - 1);
        camera.join().unwrap();
        assert_eq!(rx.try_iter().count(), 3);
    }

    #[test]
    fn a_live_source_does_not_wait_for_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = SequenceStore::open(dir.path()).unwrap();
        let metrics = Metrics::new(1 << 30);
        metrics.set_link(LinkState::Down, None);
        let (tx, rx) = crossbeam_channel::bounded(8);
        run_camera("cam", Box::new(PanicsOnce { calls: 1 }), &seqs, &metrics, &tx, &Shutdown::new());
        assert_eq!(rx.try_iter().count(), 2, "its frames go on (to the spool)");
    }
}
