//! Video files (MP4 with H.264): archived footage replayed in real time, or ingested as fast
//! as the pipeline takes it, resuming where it stopped after a restart.
//!
//! The `mp4` crate reads the container (samples in decode order and the track's SPS/PPS;
//! a fragmented file's sample table is built in [`super::mp4_samples`]; IDR samples are found
//! in the bitstream); each sample becomes Annex B for openh264 ([`super::h264`]), and the
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

use std::collections::VecDeque;
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
    /// Where the track's samples are read from (plain or fragmented MP4).
    source: super::mp4_samples::Samples,
    track: u32,
    samples: u32,
    sps: Vec<u8>,
    pps: Vec<u8>,
    decoder: super::decoder::Decoder,
    /// Next sample to read (1-based, as the `mp4` crate numbers them).
    next_sample: u32,
    /// Pictures decoded so far in this pass (0-based number of the next one).
    next_picture: u64,
    period: Duration,
    /// Keep every `step`-th picture (`fps` below the file's).
    step: u64,
    /// Pictures decoded and kept (past the resume point, every `step`-th), not yet handed
    /// over, and their numbers.
    kept: VecDeque<Captured>,
    numbers: VecDeque<u64>,
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

    /// Reads and decodes until a picture to hand over comes out (past the resume point, every
    /// `step`-th; the others are not copied out of the decoder): its number and picture, `None`
    /// at the end of the file.
    fn decode_next(&mut self) -> Result<Option<(u64, Captured)>, SourceError> {
        let path = self.cfg.path.display().to_string();
        let resume_at = self.resume_at;
        let o = self.open.as_mut().expect("open");
        loop {
            if let (Some(n), Some(c)) = (o.numbers.pop_front(), o.kept.pop_front()) {
                return Ok(Some((n, c)));
            }
            let Open { decoder, next_picture, numbers, kept, step, .. } = o;
            let mut keep = || {
                let n = *next_picture;
                *next_picture += 1;
                let wanted = n >= resume_at && n.is_multiple_of(*step);
                if wanted {
                    numbers.push_back(n);
                }
                wanted
            };
            if o.next_sample > o.samples {
                if o.flushed {
                    return Ok(None);
                }
                o.flushed = true;
                decoder.flush(&mut keep, kept).map_err(|e| SourceError::Unavailable(format!("{path}: decoder: {e}")))?;
                continue;
            }
            let id = o.next_sample;
            o.next_sample += 1;
            let sample = match o.source.read(&mut o.reader, o.track, id) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => return Err(SourceError::Unavailable(format!("{path}: sample {id}: {e}"))),
            };
            let idr = super::h264::has_idr(&sample);
            if self.cfg.keyframes_only && !idr {
                continue;
            }
            self.counts.received += 1;
            let ps = idr.then_some((o.sps.as_slice(), o.pps.as_slice()));
            let nal = super::h264::annex_b(&sample, ps).map_err(|e| SourceError::Unavailable(format!("{path}: sample {id}: {e}")))?;
            self.counts.decoded += 1;
            if let Err(e) = decoder.decode(&nal, Default::default(), &mut keep, kept) {
                self.counts.undecodable += 1;
                tracing::warn!(camera = self.camera, sample = id, error = %e, "Video sample not decoded (counted in camera_frames_undecodable).");
            }
        }
    }
}

/// Pictures per second from the track's time-to-sample table (`(sample_count, sample_delta)`) (exact: 29.97, not the `mp4`
/// crate's whole number); `None` for a fragmented file, whose table is empty.
fn table_frame_rate(stts: impl Iterator<Item = (u32, u32)>, timescale: u32) -> Option<f64> {
    let (n, ticks) = stts.fold((0u64, 0u64), |(n, t), (count, delta)| (n + u64::from(count), t + u64::from(count) * u64::from(delta)));
    (n > 0 && ticks > 0 && timescale > 0).then(|| f64::from(timescale) * n as f64 / ticks as f64)
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
            if reader.tracks().values().any(|t| matches!(t.media_type(), Ok(mp4::MediaType::H265))) {
                return Err(self.unavailable("H.265 video, which the agent does not decode (no H.265 decoder builds here); convert the file to H.264, e.g. `ffmpeg -i in.mp4 -c:v libx264 -c:a copy out.mp4`"));
            }
            let other_video = reader.tracks().values().any(|t| t.media_type().is_err() && t.trak.mdia.hdlr.handler_type.value == *b"vide");
            if other_video {
                return Err(self.unavailable("a video track in a codec the agent does not read (H.265 tagged hvc1, AV1, …); convert the file to H.264, e.g. `ffmpeg -i in.mp4 -c:v libx264 -c:a copy out.mp4`"));
            }
            let kinds: Vec<String> = reader.tracks().values().map(|t| t.media_type().map_or("unknown".into(), |m| m.to_string())).collect();
            return Err(self.unavailable(format!("no H.264 video track (tracks: {}); the agent reads H.264 in MP4", kinds.join(", "))));
        };
        let (id, samples, timescale) = (track.track_id(), track.sample_count(), track.trak.mdia.mdhd.timescale);
        let table_fps = table_frame_rate(track.trak.mdia.minf.stbl.stts.entries.iter().map(|e| (e.sample_count, e.sample_delta)), timescale);
        if let Some(avcc) = track.trak.mdia.minf.stbl.stsd.avc1.as_ref().map(|a| &a.avcc)
            && avcc.length_size_minus_one != 3
        {
            return Err(self.unavailable(format!("H.264 with {}-byte NAL lengths; the agent reads 4-byte ones (remux with `ffmpeg -i in.mp4 -c copy out.mp4`)", avcc.length_size_minus_one + 1)));
        }
        let sps = track.sequence_parameter_set().map_err(|e| self.unavailable(format!("no SPS: {e}")))?.to_vec();
        let pps = track.picture_parameter_set().map_err(|e| self.unavailable(format!("no PPS: {e}")))?.to_vec();
        let mut reader = reader;
        let mut source = super::mp4_samples::Samples::for_track(&reader, id, &self.cfg.path).map_err(|e| self.unavailable(e))?;
        let samples = source.count().unwrap_or(samples);
        // A fragmented file's timing is in its fragments: the first sample's duration.
        let fps = table_fps
            .or_else(|| source.first_duration().filter(|d| *d > 0).map(|d| f64::from(timescale) / f64::from(d)))
            .filter(|f| *f > 0.0 && f.is_finite())
            .unwrap_or_else(|| {
                tracing::warn!(camera = self.camera, "The file gives no frame rate; 25 fps assumed.");
                25.0
            });
        let step = self.cfg.fps.map_or(1, |want| (fps / want).round().max(1.0) as u64);
        // Resume at the last IDR at or before the position: an IDR's picture number is its
        // sample's (nothing before it is shown after it), so skipping starts there. Found by
        // reading samples backwards from the position (a GOP at most), not from the sync table,
        // which fragmented files lack.
        let mut start = u32::try_from(self.resume_at + 1).unwrap_or(u32::MAX).min(samples.max(1));
        while start > 1 && !source.read(&mut reader, id, start).ok().flatten().is_some_and(|s| super::h264::has_idr(&s)) {
            start -= 1;
        }
        let decoder = super::decoder::Decoder::new(super::decoder::Codec::H264, self.cfg.decoder).map_err(|e| self.unavailable(e))?;
        tracing::info!(camera = self.camera, samples, fps, from_sample = start, decoder = decoder.name(), "Video file opened.");
        self.open = Some(Open {
            reader,
            source,
            track: id,
            samples,
            sps,
            pps,
            decoder,
            next_sample: start,
            next_picture: u64::from(start - 1),
            period: Duration::from_secs_f64(step as f64 / fps),
            step,
            kept: Default::default(),
            numbers: Default::default(),
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
            let (number, mut picture) = match self.decode_next()? {
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
            let period = self.open.as_ref().expect("open").period;
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

/// Files made by ffmpeg (`testdata/video/README.md` says how), not by the GStreamer pipeline
/// the end-to-end test uses: an audio track before the video one and B-frames, a fragmented
/// MP4 (`moof` boxes, as cameras and streaming recorders write), a 29.97 fps file, and
/// H.265. Decoded here, without Kafka.
#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/video").join(name)
    }

    fn source(name: &str, fps: Option<f64>, keyframes_only: bool, state: &Path) -> VideoSource {
        with_decoder(name, fps, keyframes_only, state, Default::default())
    }

    fn with_decoder(name: &str, fps: Option<f64>, keyframes_only: bool, state: &Path, decoder: super::super::decoder::DecoderChoice) -> VideoSource {
        let cfg = VideoConfig { path: fixture(name), pace: VideoPace::Fast, looping: false, fps, keyframes_only, decoder };
        VideoSource::new("cam", cfg, state)
    }

    #[cfg(feature = "libav")]
    /// Every picture's planes.
    fn pictures(mut s: VideoSource) -> Vec<bytes::Bytes> {
        s.open().unwrap();
        std::iter::from_fn(|| s.next_frame().ok().map(|c| c.data)).collect()
    }

    #[cfg(feature = "libav")]
    /// Peak signal-to-noise ratio of `b` against `a`, dB (infinite when equal).
    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a.iter().zip(b).map(|(p, q)| (f64::from(*p) - f64::from(*q)).powi(2)).sum::<f64>() / a.len() as f64;
        10.0 * (255.0 * 255.0 / mse).log10()
    }

    #[cfg(feature = "libav")]
    /// The pictures x264 reconstructed while encoding `x264-bframes.mp4` (`--dump-yuv`: what
    /// every conforming decoder must output), as a CRC-32 per picture.
    fn reconstruction() -> Vec<u32> {
        let text = std::fs::read_to_string(fixture("x264-bframes.recon-crc32")).unwrap();
        text.lines().map(|l| u32::from_str_radix(l, 16).unwrap()).collect()
    }

    /// libavcodec's pictures are the encoder's own reconstruction, bit for bit (High profile,
    /// 3 B-frames with pyramid and weighted prediction). openh264's are not bit-exact: a few
    /// pixels of some B-pictures off by 1–2 levels, drifting to 4 along the references (71 dB
    /// PSNR at worst); checked here at 60 dB or better — far below JPEG's own error (≈ 40 dB).
    #[cfg(feature = "libav")]
    #[test]
    fn libavcodec_decodes_exactly_what_the_encoder_reconstructed_and_openh264_within_60_db() {
        use super::super::decoder::DecoderChoice;
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let libav = pictures(with_decoder("x264-bframes.mp4", None, false, a.path(), DecoderChoice::Libav));
        let crcs: Vec<u32> = libav.iter().map(|p| crc32fast::hash(p)).collect();
        assert_eq!(crcs, reconstruction(), "libavcodec = x264's reconstruction");
        let openh264 = pictures(with_decoder("x264-bframes.mp4", None, false, b.path(), DecoderChoice::Openh264));
        assert_eq!(openh264.len(), libav.len());
        let mut inexact = 0;
        for (i, (x, y)) in libav.iter().zip(&openh264).enumerate() {
            let db = psnr(x, y);
            assert!(db >= 60.0, "openh264 picture {i}: {db:.1} dB");
            inexact += usize::from(x != y);
        }
        println!("openh264: {inexact} of {} pictures not bit-exact", libav.len());
    }

    /// The same for every other test file, the decoders against each other (plain and
    /// fragmented, `fps`, the flush at the end): the same pictures in the same order, 60 dB
    /// or closer.
    #[cfg(feature = "libav")]
    #[test]
    fn libavcodec_and_openh264_give_the_same_pictures_in_the_same_order() {
        use super::super::decoder::DecoderChoice;
        for (name, fps) in [("audio-first-bframes.mp4", None), ("fragmented.mp4", Some(5.0)), ("ntsc-30000-1001.mp4", None)] {
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let libav = pictures(with_decoder(name, fps, false, a.path(), DecoderChoice::Libav));
            let openh264 = pictures(with_decoder(name, fps, false, b.path(), DecoderChoice::Openh264));
            assert!(!libav.is_empty());
            assert_eq!(libav.len(), openh264.len(), "{name}");
            for (i, (x, y)) in libav.iter().zip(&openh264).enumerate() {
                let db = psnr(x, y);
                assert!(db >= 60.0, "{name}: picture {i}: {db:.1} dB");
            }
        }
    }

    #[cfg(not(feature = "libav"))]
    #[test]
    fn asking_for_libav_without_it_is_a_clear_error() {
        let state = tempfile::tempdir().unwrap();
        let mut s = with_decoder("fragmented.mp4", None, false, state.path(), super::super::decoder::DecoderChoice::Libav);
        let e = s.open().unwrap_err().to_string();
        assert!(e.contains("built without the `libav` feature"), "{e}");
    }

    /// Every picture until the end: (count, width, height) of the pictures handed over.
    fn drain(mut s: VideoSource) -> (u32, Vec<(u32, u32)>, super::super::StreamCounts) {
        s.open().unwrap();
        let (mut n, mut sizes) = (0, Vec::new());
        loop {
            match s.next_frame() {
                Ok(c) => {
                    n += 1;
                    assert_eq!(c.format, crate::frame::PixelFormat::I420);
                    if !sizes.contains(&(c.width, c.height)) {
                        sizes.push((c.width, c.height));
                    }
                }
                Err(SourceError::Exhausted) => return (n, sizes, s.counts),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn an_ffmpeg_file_with_audio_first_and_b_frames_gives_every_picture() {
        let state = tempfile::tempdir().unwrap();
        let (n, sizes, counts) = drain(source("audio-first-bframes.mp4", None, false, state.path()));
        assert_eq!((n, sizes), (50, vec![(320, 240)]), "2 s at 25 fps");
        assert_eq!((counts.received, counts.decoded, counts.undecodable), (50, 50, 0));
        let position = std::fs::read_to_string(state.path().join("position/cam")).unwrap();
        assert_eq!(position, "50", "the end is kept: a restart does not send the file again");
        let (again, _, _) = drain(source("audio-first-bframes.mp4", None, false, state.path()));
        assert_eq!(again, 0, "resumed at the end");
    }

    #[test]
    fn fps_keeps_every_nth_picture_and_keyframes_only_decodes_idr_pictures_alone() {
        let state = tempfile::tempdir().unwrap();
        assert_eq!(drain(source("audio-first-bframes.mp4", Some(5.0), false, state.path())).0, 10, "every 5th of 25 fps");
        let state = tempfile::tempdir().unwrap();
        let (n, _, counts) = drain(source("audio-first-bframes.mp4", None, true, state.path()));
        assert_eq!((n, counts.decoded), (2, 2), "an IDR every 25 pictures, 50 pictures");
        // 29.97 fps: fps = 10 keeps every 3rd (the nearest whole step), an IDR every 15.
        let state = tempfile::tempdir().unwrap();
        let (n, _, _) = drain(source("ntsc-30000-1001.mp4", None, false, state.path()));
        assert_eq!(n, 60);
        let state = tempfile::tempdir().unwrap();
        assert_eq!(drain(source("ntsc-30000-1001.mp4", Some(10.0), false, state.path())).0, 20);
        // The pace of a real-time replay: 29.97, not the mp4 crate's 29; a fragmented file's
        // from its fragments.
        for (name, fps) in [("ntsc-30000-1001.mp4", 30000.0 / 1001.0), ("fragmented.mp4", 25.0), ("audio-first-bframes.mp4", 25.0)] {
            let mut s = source(name, None, false, state.path());
            s.open().unwrap();
            let period = s.open.as_ref().unwrap().period.as_secs_f64();
            assert!((1.0 / period - fps).abs() < 0.01, "{name}: {} fps", 1.0 / period);
        }
        let state = tempfile::tempdir().unwrap();
        assert_eq!(drain(source("ntsc-30000-1001.mp4", None, true, state.path())).0, 4);
    }

    #[test]
    fn a_fragmented_mp4_gives_every_picture() {
        let state = tempfile::tempdir().unwrap();
        let (n, sizes, counts) = drain(source("fragmented.mp4", None, false, state.path()));
        assert_eq!((n, sizes), (50, vec![(320, 240)]));
        assert_eq!((counts.decoded, counts.undecodable), (50, 0), "every sample read from its place");
    }

    /// A restart at picture 30 decodes from the IDR before it (sample 26) and hands over
    /// pictures 30–49 — in a plain and in a fragmented file (IDRs found in the bitstream).
    #[test]
    fn a_restart_resumes_mid_file_from_the_idr_before_the_position() {
        for name in ["audio-first-bframes.mp4", "fragmented.mp4"] {
            let state = tempfile::tempdir().unwrap();
            write_atomically(&state.path().join("position/cam"), "30").unwrap();
            let (n, _, counts) = drain(source(name, None, false, state.path()));
            assert_eq!(n, 20, "{name}: pictures 30-49");
            assert_eq!(counts.decoded, 25, "{name}: decoded from sample 26");
        }
    }

    #[test]
    fn an_h265_file_is_refused_with_the_reason_and_the_remedy() {
        for name in ["hevc.mp4", "hevc-hvc1.mp4"] {
            let state = tempfile::tempdir().unwrap();
            let mut s = source(name, None, false, state.path());
            let e = s.open().unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("H.265") && e.contains("convert the file to H.264"), "{e}");
        }
    }
}
