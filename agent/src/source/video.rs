//! Video files (MP4 with H.264): archived footage replayed in real time, or ingested as fast
//! as the pipeline takes it, resuming where it stopped after a restart.
//!
//! The `mp4` crate reads the container (samples in decode order, with their sync flags and
//! the track's SPS/PPS); each sample becomes Annex B for openh264 ([`super::h264`]), and the
//! decoded pictures go to the encoder as I420 — the same path as an RTSP camera.
//!
//! Pace: `realtime` hands a frame over at the file's frame rate (a replay: what a camera
//! would have sent); `fast` as soon as the encoder's queue takes it — the camera thread
//! blocks instead of dropping (a bulk ingestion must not skip frames because the encoder is
//! busy). `fps` (below the file's) keeps every n-th picture.
//!
//! Position: every second the number of the picture handed over 2 s earlier (what is surely
//! past the encoder and on its way) is written to `<spool.dir>/position/<camera>` (fsync +
//! rename), and the last picture when the source stops or the file ends; a restart resumes at
//! the IDR before it and skips the pictures already handed over. After a SIGKILL the last
//! 2–3 s of pictures are sent again (with new sequence numbers: at-least-once); pictures that
//! were older and still only in librdkafka's memory (an outage not yet judged a stall) are
//! lost like a live camera's (see docs/agent.md). With `loop` the file
//! starts again after its end, else the camera finishes (position kept: a restart does not
//! send the file again; delete the position file for that).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::{VideoConfig, VideoPace};
use super::{Captured, Source, SourceError};
use crate::frame::now_ns;

/// How often the position is written.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// What is written is the position of this long ago: pictures handed over since may still be
/// in the encoder's queue or on their way to Kafka, and a SIGKILL would take them with it.
const SAVE_LAG: Duration = Duration::from_secs(2);

struct Open {
    reader: mp4::Mp4Reader<BufReader<File>>,
    track: u32,
    samples: u32,
    sps: Vec<u8>,
    pps: Vec<u8>,
    decoder: openh264::decoder::Decoder,
    /// Next sample to read (1-based, as the `mp4` crate numbers them).
    next_sample: u32,
    /// Pictures decoded so far in this pass (0-based number of the next one).
    next_picture: u64,
    period: Duration,
    /// Keep every `step`-th picture (`fps` below the file's).
    step: u64,
    /// Pictures out of the decoder at the end of the file, not yet handed over.
    tail: std::collections::VecDeque<Captured>,
    flushed: bool,
}

pub struct VideoSource {
    camera: String,
    cfg: VideoConfig,
    position_file: PathBuf,
    open: Option<Open>,
    /// Pictures handed over before this one are not handed over again (resume).
    resume_at: u64,
    /// Number of the last picture handed over, +1.
    handed: u64,
    /// Recent (when, `handed`) pairs, oldest first, for [`SAVE_LAG`].
    recent: std::collections::VecDeque<(Instant, u64)>,
    saved: Instant,
    next_due: Option<Instant>,
    counts: super::StreamCounts,
}

impl VideoSource {
    pub fn new(camera: &str, cfg: VideoConfig, state_dir: &Path) -> Self {
        let position_file = state_dir.join("position").join(camera);
        let resume_at = std::fs::read_to_string(&position_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        if resume_at > 0 {
            tracing::info!(camera, picture = resume_at, file = %position_file.display(), "Video resumes after the pictures already sent.");
        }
        Self { camera: camera.to_owned(), cfg, position_file, open: None, resume_at, handed: resume_at, recent: Default::default(), saved: Instant::now(), next_due: None, counts: Default::default() }
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> SourceError {
        SourceError::Unavailable(format!("{}: {what}", self.cfg.path.display()))
    }

    /// Writes the position: `handed`, or with `lagging` the one [`SAVE_LAG`] ago.
    fn save_position(&mut self, lagging: bool) {
        self.saved = Instant::now();
        let mut position = self.handed;
        if lagging {
            position = self.resume_at.min(self.handed);
            while let Some(&(at, n)) = self.recent.front() {
                if at.elapsed() < SAVE_LAG {
                    break;
                }
                position = n;
                self.recent.pop_front();
            }
            // Keep the newest old enough entry for the next save.
            if let Some(old_enough) = Instant::now().checked_sub(SAVE_LAG) {
                self.recent.push_front((old_enough, position));
            }
        }
        if let Err(e) = write_atomically(&self.position_file, &position.to_string()) {
            tracing::warn!(camera = self.camera, file = %self.position_file.display(), error = %e, "Cannot save the video position (a restart may send pictures again).");
        }
    }

    /// Reads and decodes until a picture comes out; `None` at the end of the file.
    fn decode_next(&mut self) -> Result<Option<Captured>, SourceError> {
        let path = self.cfg.path.display().to_string();
        let o = self.open.as_mut().expect("open");
        loop {
            if let Some(c) = o.tail.pop_front() {
                return Ok(Some(c));
            }
            if o.next_sample > o.samples {
                if o.flushed {
                    return Ok(None);
                }
                o.flushed = true;
                let rest = o.decoder.flush_remaining().map_err(|e| SourceError::Unavailable(format!("{path}: H.264 decoder: {e}")))?;
                for yuv in rest {
                    o.tail.push_back(super::h264::captured(&yuv, 0, Default::default()));
                }
                continue;
            }
            let id = o.next_sample;
            o.next_sample += 1;
            let sample = match o.reader.read_sample(o.track, id) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => return Err(SourceError::Unavailable(format!("{path}: sample {id}: {e}"))),
            };
            if self.cfg.keyframes_only && !sample.is_sync {
                continue;
            }
            self.counts.received += 1;
            let ps = sample.is_sync.then_some((o.sps.as_slice(), o.pps.as_slice()));
            let nal = super::h264::annex_b(&sample.bytes, ps).map_err(|e| SourceError::Unavailable(format!("{path}: sample {id}: {e}")))?;
            self.counts.decoded += 1;
            match o.decoder.decode(&nal) {
                Ok(Some(yuv)) => return Ok(Some(super::h264::captured(&yuv, 0, Default::default()))),
                Ok(None) => {}
                Err(e) => {
                    self.counts.undecodable += 1;
                    tracing::warn!(camera = self.camera, sample = id, error = %e, "H.264 sample not decoded (counted in camera_frames_undecodable).");
                }
            }
        }
    }
}

/// Writes `text` to `path` through a temporary file, fsync and rename.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

impl Source for VideoSource {
    fn open(&mut self) -> Result<(), SourceError> {
        let file = File::open(&self.cfg.path).map_err(|e| self.unavailable(e))?;
        let size = file.metadata().map_err(|e| self.unavailable(e))?.len();
        let reader = mp4::Mp4Reader::read_header(BufReader::new(file), size).map_err(|e| self.unavailable(format!("not a readable MP4: {e}")))?;
        let video = reader.tracks().values().find(|t| matches!(t.media_type(), Ok(mp4::MediaType::H264)));
        let Some(track) = video else {
            let kinds: Vec<String> = reader.tracks().values().map(|t| t.media_type().map_or("unknown".into(), |m| m.to_string())).collect();
            return Err(self.unavailable(format!("no H.264 video track (tracks: {}); the agent reads H.264 in MP4", kinds.join(", "))));
        };
        let (id, samples, fps) = (track.track_id(), track.sample_count(), track.frame_rate());
        let sps = track.sequence_parameter_set().map_err(|e| self.unavailable(format!("no SPS: {e}")))?.to_vec();
        let pps = track.picture_parameter_set().map_err(|e| self.unavailable(format!("no PPS: {e}")))?.to_vec();
        let fps = if fps > 0.0 && fps.is_finite() { fps } else { 25.0 };
        let step = self.cfg.fps.map_or(1, |want| (fps / want).round().max(1.0) as u64);
        // Resume at the last IDR at or before the position: an IDR's picture number is its
        // sample's (nothing before it is shown after it), so skipping starts there.
        let syncs: Vec<u32> = track.trak.mdia.minf.stbl.stss.as_ref().map_or_else(|| (1..=samples).collect(), |b| b.entries.clone());
        let start = syncs.iter().copied().filter(|&s| u64::from(s - 1) <= self.resume_at).max().unwrap_or(1);
        let decoder = super::h264::decoder().map_err(|e| self.unavailable(format!("H.264 decoder: {e}")))?;
        tracing::info!(camera = self.camera, samples, fps, from_sample = start, "Video file opened.");
        self.open = Some(Open {
            reader,
            track: id,
            samples,
            sps,
            pps,
            decoder,
            next_sample: start,
            next_picture: u64::from(start - 1),
            period: Duration::from_secs_f64(step as f64 / fps),
            step,
            tail: Default::default(),
            flushed: false,
        });
        self.next_due = None;
        Ok(())
    }

    fn next_frame(&mut self) -> Result<Captured, SourceError> {
        loop {
            if self.open.is_none() {
                return Err(self.unavailable("not open"));
            }
            let mut picture = match self.decode_next()? {
                Some(p) => p,
                None if self.cfg.looping => {
                    // Again from the start: a new pass, every picture new.
                    self.resume_at = 0;
                    self.handed = 0;
                    self.open()?;
                    continue;
                }
                None => {
                    self.save_position(false);
                    return Err(SourceError::Exhausted);
                }
            };
            let o = self.open.as_mut().expect("open");
            let number = o.next_picture;
            o.next_picture += 1;
            let (period, step) = (o.period, o.step);
            if number < self.resume_at || !number.is_multiple_of(step) {
                continue; // handed over before the restart, or not kept at `fps`
            }
            if self.cfg.pace == VideoPace::Realtime {
                let now = Instant::now();
                let due = *self.next_due.get_or_insert(now);
                if due > now {
                    std::thread::sleep(due - now);
                }
                self.next_due = Some(due.max(now - period) + period);
            }
            picture.capture_ns = now_ns();
            self.handed = number + 1;
            if self.recent.back().is_none_or(|(at, _)| at.elapsed() >= Duration::from_millis(100)) {
                self.recent.push_back((Instant::now(), self.handed));
            }
            if self.saved.elapsed() >= SAVE_EVERY {
                self.save_position(true);
            }
            return Ok(picture);
        }
    }

    fn describe(&self) -> String {
        format!("video {} ({:?}{}{})", self.cfg.path.display(), self.cfg.pace, if self.cfg.looping { ", loop" } else { "" }, if self.cfg.keyframes_only { ", keyframes only" } else { "" })
    }

    fn blocks_when_behind(&self) -> bool {
        self.cfg.pace == VideoPace::Fast
    }

    fn stream_counts(&self) -> Option<super::StreamCounts> {
        Some(self.counts)
    }
}

impl Drop for VideoSource {
    /// The camera stops (shutdown): what it handed over is encoded and delivered or spooled
    /// during the agent's shutdown grace, so the position is the last picture.
    fn drop(&mut self) {
        if self.handed > 0 {
            self.save_position(false);
        }
    }
}
