//! IP cameras over RTSP: H.264 (and H.265 with libavcodec) decoded to YUV (the encoder makes
//! JPEGs straight from the planes), MJPEG forwarded as the camera sent it; H.265 without
//! libavcodec refused with a clear error.
//!
//! The client is `retina` (pure Rust; RTSP over TCP or UDP, depacketizes H.264, H.265 and
//! JPEG), run on a current-thread tokio runtime that this source owns, so the camera's
//! thread stays a plain blocking loop like every other source's. Video is decoded by
//! openh264 or libavcodec ([`super::decoder`]).
//!
//! Rate: `fps` below the camera's does not cost a decode and an encode per camera frame. A
//! frame is handed over only when it is due; the encoder (the costly part) sees only those.
//! Decoding must follow the reference chain, but a frame no other depends on (`nal_ref_idc`
//! 0, "disposable") is not decoded unless it is due, and with `keyframes_only` only IDR frames
//! are decoded at all (each stands alone), for boards that cannot decode the full stream.
//!
//! Liveness: no frame within `stall_timeout_ms` (a camera that reboots, a server that froze
//! with its socket open, a network that drops packets silently) is an error: the session is
//! dropped and the runner opens it again with backoff and jitter, like any camera that went
//! away. Connecting is bounded by the same timeout.
//!
//! Capture time: the camera's wall clock where it sends one — RTP timestamps mapped through
//! the last RTCP sender report (NTP time) — from the first report on (`framelink-clock:
//! camera`); before it, or with `clock = "agent"`, the agent's clock at arrival (`agent`). A
//! camera clock more than 5 s from the agent's is used, and logged once. With B-frames the
//! decoder gives pictures back in display order, a frame or two after the one fed: libavcodec
//! carries each frame's stamp to its picture; with openh264 a picture's capture time is that
//! of the frame fed when it came out.
//!
//! Credentials come from the URL, `username` with `password_file` or `password_env`; they are
//! sent to the camera only. [`RtspSource::describe`] and every error name the URL without
//! them.

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use retina::client::{Credentials, Demuxed, PlayOptions, SessionOptions, SetupOptions, TcpTransportOptions, Transport, UdpTransportOptions};
use retina::codec::{CodecItem, FrameFormat};

use super::config::{RtspClock, RtspConfig, RtspTransport};
use framelink_common::CaptureClock;
use super::{Captured, Source, SourceError};
use crate::frame::{PixelFormat, now_ns};

/// What the stream carries.
enum Codec {
    /// H.264 or H.265, decoded.
    Video(Box<super::decoder::Decoder>),
    Jpeg,
}

/// An open session.
struct Playing {
    demuxed: Pin<Box<Demuxed>>,
    codec: Codec,
    /// The last RTCP sender report: (its RTP time, extended; its wall clock, Unix ns).
    report: Option<(i64, u64)>,
}

/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// An NTP timestamp (32.32 fixed point, seconds since 1900) in ns since the Unix epoch.
fn ntp_to_unix_ns(ntp: u64) -> Option<u64> {
    let secs = (ntp >> 32).checked_sub(NTP_UNIX_OFFSET)?;
    let frac_ns = ((ntp & 0xffff_ffff) * 1_000_000_000) >> 32;
    Some(secs * 1_000_000_000 + frac_ns)
}

/// The camera's wall-clock time of an RTP timestamp, through the last sender report.
fn camera_time(report: (i64, u64), rtp: i64, clock_rate: u32) -> Option<u64> {
    let (sr_rtp, sr_ns) = report;
    let delta_ns = (rtp - sr_rtp) as i128 * 1_000_000_000 / clock_rate as i128;
    u64::try_from(sr_ns as i128 + delta_ns).ok()
}

pub struct RtspSource {
    camera: String,
    cfg: RtspConfig,
    /// The URL without credentials (for logs and errors).
    public_url: String,
    rt: tokio::runtime::Runtime,
    playing: Option<Playing>,
    /// When the next frame is due (`fps`); `None` hands over every frame.
    next_due: Option<Instant>,
    /// The camera's clock was found far off (logged once).
    warned_offset: bool,
    counts: super::StreamCounts,
}

impl RtspSource {
    pub fn new(camera: &str, cfg: RtspConfig) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread tokio runtime");
        let public_url = cfg.public_url();
        Self { camera: camera.to_owned(), cfg, public_url, rt, playing: None, next_due: None, warned_offset: false, counts: Default::default() }
    }

    /// Drops the session inside the runtime: retina spawns its TEARDOWN there (outside it
    /// the drop panics).
    fn close(&mut self) {
        let _in_runtime = self.rt.enter();
        self.playing = None;
    }

    fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.stall_timeout_ms)
    }

    async fn connect(cfg: &RtspConfig, camera: &str, public: &str, creds: Option<Credentials>) -> Result<Playing, SourceError> {
        // retina's errors carry connection details on further lines: the first says it.
        let unavailable = |what: &str, e: &dyn std::fmt::Display| SourceError::Unavailable(format!("{public}: {what}: {}", first_line(e)));
        let url = cfg.url_without_credentials().map_err(|e| unavailable("bad url", &e))?;
        let options = SessionOptions::default().creds(creds).user_agent(format!("framelink-agent/{}", env!("CARGO_PKG_VERSION")));
        let mut session = retina::client::Session::describe(url, options).await.map_err(|e| unavailable("DESCRIBE", &e))?;
        let Some(i) = session.streams().iter().position(|s| s.media() == "video") else {
            return Err(SourceError::Unavailable(format!("{public}: the camera offers no video stream")));
        };
        let encoding = session.streams()[i].encoding_name().to_ascii_lowercase();
        let video = |codec| {
            super::decoder::Decoder::new(codec, cfg.decoder).map(|d| Codec::Video(Box::new(d))).map_err(|e| match codec {
                super::decoder::Codec::H265 => SourceError::Unavailable(format!("{public}: camera `{camera}` sends H.265: {e}; configure the camera's H.264 sub-stream (most IP cameras offer one) or MJPEG")),
                _ => unavailable("starting the decoder", &e),
            })
        };
        let codec = match encoding.as_str() {
            "h264" => video(super::decoder::Codec::H264)?,
            "h265" => video(super::decoder::Codec::H265)?,
            "jpeg" => Codec::Jpeg,
            other => return Err(SourceError::Unavailable(format!("{public}: camera `{camera}` sends `{other}` video; the agent reads H.264, H.265 (with libavcodec) and MJPEG"))),
        };
        if let Codec::Video(d) = &codec {
            tracing::info!(camera, codec = d.codec().name(), decoder = d.name(), "RTSP stream decoded.");
        }
        let transport = match cfg.transport {
            RtspTransport::Tcp => Transport::Tcp(TcpTransportOptions::default()),
            RtspTransport::Udp => Transport::Udp(UdpTransportOptions::default()),
        };
        session.setup(i, SetupOptions::default().transport(transport).frame_format(FrameFormat::SIMPLE)).await.map_err(|e| unavailable("SETUP", &e))?;
        let playing = session.play(PlayOptions::default()).await.map_err(|e| unavailable("PLAY", &e))?;
        let demuxed = playing.demuxed().map_err(|e| unavailable("demuxing", &e))?;
        Ok(Playing { demuxed: Box::pin(demuxed), codec, report: None })
    }

    /// A frame the camera sent that cannot be decoded: counted (`camera_frames_undecodable`),
    /// the first logged as a warning, the rest at debug level.
    fn undecodable(&mut self, why: &str) {
        self.counts.undecodable += 1;
        if self.counts.undecodable == 1 {
            tracing::warn!(camera = self.camera, reason = why, "A frame from the camera could not be decoded; such frames are counted in camera_frames_undecodable.");
        } else {
            tracing::debug!(camera = self.camera, reason = why, "Frame not decoded.");
        }
    }

    /// Whether a frame arriving now is due under `fps` (always without `fps`).
    fn is_due(&self, now: Instant) -> bool {
        due(self.cfg.fps, self.next_due, now)
    }

    /// A frame was handed over at `now`: schedules the next under `fps`. From the due time, not
    /// from now: the average rate is `fps` even though frames arrive on the camera's own grid;
    /// more than a period late restarts the cadence.
    fn handed_over(&mut self, now: Instant) {
        let Some(fps) = self.cfg.fps else { return };
        let period = Duration::from_secs_f64(1.0 / fps);
        self.next_due = Some(match self.next_due {
            Some(at) if now - at < period => at + period,
            _ => now + period,
        });
    }
}

/// See [`RtspSource::is_due`]; on the fields, for where `self` is partly borrowed.
fn due(fps: Option<f64>, next_due: Option<Instant>, now: Instant) -> bool {
    fps.is_none() || next_due.is_none_or(|at| now >= at)
}

fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

impl Drop for RtspSource {
    fn drop(&mut self) {
        self.close();
    }
}

impl Source for RtspSource {
    fn open(&mut self) -> Result<(), SourceError> {
        self.close();
        let creds = self.cfg.credentials().map_err(|e| SourceError::Unavailable(format!("{}: {e}", self.public_url)))?;
        let (cfg, camera, public, timeout) = (&self.cfg, &self.camera, &self.public_url, self.stall_timeout());
        let playing = self.rt.block_on(async {
            match tokio::time::timeout(timeout, Self::connect(cfg, camera, public, creds)).await {
                Ok(r) => r,
                Err(_) => Err(SourceError::Unavailable(format!("{public}: no answer within stall_timeout_ms ({} ms)", timeout.as_millis()))),
            }
        })?;
        self.playing = Some(playing);
        self.next_due = None;
        Ok(())
    }

    fn next_frame(&mut self) -> Result<Captured, SourceError> {
        let timeout = self.stall_timeout();
        let mut deadline = Instant::now() + timeout;
        loop {
            let Some(playing) = self.playing.as_mut() else {
                return Err(SourceError::Unavailable(format!("{}: not open", self.public_url)));
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let item = self.rt.block_on(async { tokio::time::timeout(left, playing.demuxed.next()).await });
            let frame = match item {
                Err(_) => {
                    self.close();
                    return Err(SourceError::Unavailable(format!("{}: no frame for {} ms (stall_timeout_ms): reconnecting", self.public_url, timeout.as_millis())));
                }
                Ok(None) => {
                    self.close();
                    return Err(SourceError::Unavailable(format!("{}: the camera ended the stream", self.public_url)));
                }
                Ok(Some(Err(e))) => {
                    self.close();
                    return Err(SourceError::Unavailable(format!("{}: {}", self.public_url, first_line(&e))));
                }
                Ok(Some(Ok(CodecItem::VideoFrame(f)))) => f,
                Ok(Some(Ok(CodecItem::Rtcp(rtcp)))) => {
                    let report = rtcp.pkts().next().and_then(|p| p.as_sender_report().ok().flatten()).map(|sr| sr.ntp_timestamp());
                    if let (Some(rtp), Some(ntp)) = (rtcp.rtp_timestamp(), report)
                        && let Some(ns) = ntp_to_unix_ns(ntp.0)
                    {
                        playing.report = Some((rtp.timestamp(), ns));
                    }
                    continue;
                }
                Ok(Some(Ok(_))) => continue, // audio, metadata
            };
            let now = Instant::now();
            // Any frame from the camera proves the stream alive.
            deadline = now + timeout;
            self.counts.received += 1;
            let arrival_ns = now_ns();
            let camera_ns = match (self.cfg.clock, playing.report) {
                (RtspClock::Camera, Some(report)) => camera_time(report, frame.timestamp().timestamp(), frame.timestamp().clock_rate().get()),
                _ => None,
            };
            let (capture_ns, clock) = match camera_ns {
                Some(ns) => {
                    let off = ns as i128 - arrival_ns as i128;
                    if off.abs() > 5_000_000_000 && !self.warned_offset {
                        self.warned_offset = true;
                        tracing::warn!(camera = self.camera, offset_s = off as f64 / 1e9, "The camera's clock is far from the agent's; capture times follow the camera (set rtsp.clock = \"agent\" to use the agent's).");
                    }
                    (ns, CaptureClock::Camera)
                }
                None => (arrival_ns, CaptureClock::Agent),
            };
            match &mut playing.codec {
                Codec::Jpeg => {
                    if !self.is_due(now) {
                        continue;
                    }
                    let data = Bytes::from(frame.into_data());
                    let header = match turbojpeg::read_header(&data) {
                        Ok(h) => h,
                        Err(e) => {
                            self.undecodable(&format!("a JPEG frame the camera sent is unreadable: {e}"));
                            continue;
                        }
                    };
                    self.handed_over(now);
                    return Ok(Captured {
                        capture_ns,
                        width: header.width as u32,
                        height: header.height as u32,
                        stride: 0,
                        format: PixelFormat::Jpeg,
                        source_format: "MJPG",
                        data,
                        clock,
                    });
                }
                Codec::Video(decoder) => {
                    let key = frame.is_random_access_point();
                    if self.cfg.keyframes_only && !key {
                        continue;
                    }
                    // A frame nothing refers to is decoded only when it is due.
                    let due_now = due(self.cfg.fps, self.next_due, now);
                    if frame.is_disposable() && !due_now {
                        continue;
                    }
                    self.counts.decoded += 1;
                    // Copied out of the decoder only when it is sent (one picture at most).
                    let mut wanted = due_now;
                    let mut keep = || std::mem::take(&mut wanted);
                    let mut out = std::collections::VecDeque::with_capacity(1);
                    let stamp = super::decoder::Stamp { capture_ns, clock };
                    if let Err(e) = decoder.decode(frame.data(), stamp, &mut keep, &mut out) {
                        // A damaged frame (packet loss): later frames are fine again from the next IDR.
                        let why = format!("{} frame not decoded ({} packets lost before it): {e}", decoder.codec().name(), frame.loss());
                        self.undecodable(&why);
                        continue;
                    }
                    // Not due, or the decoder waits for more (reordering).
                    let Some(decoded) = out.pop_front() else { continue };
                    self.handed_over(now);
                    return Ok(decoded);
                }
            }
        }
    }

    fn stream_counts(&self) -> Option<super::StreamCounts> {
        Some(self.counts)
    }

    fn describe(&self) -> String {
        let mode = if self.cfg.keyframes_only { ", keyframes only" } else { "" };
        match self.cfg.fps {
            Some(fps) => format!("RTSP {} over {:?} at {fps} fps{mode}", self.public_url, self.cfg.transport),
            None => format!("RTSP {} over {:?} at the camera's rate{mode}", self.public_url, self.cfg.transport),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_times_map_through_the_sender_report() {
        // 2026-12-02T00:00:00.5Z as NTP: seconds since 1900, half a second of fraction.
        let unix_s = 1_795_996_800u64;
        let ntp = ((unix_s + NTP_UNIX_OFFSET) << 32) | 0x8000_0000;
        let sr_ns = ntp_to_unix_ns(ntp).unwrap();
        assert_eq!(sr_ns, unix_s * 1_000_000_000 + 500_000_000);
        assert_eq!(ntp_to_unix_ns(5 << 32), None, "before 1970");
        // 90 kHz video clock: 9000 ticks after the report are 100 ms later, 4500 before 50 ms earlier.
        assert_eq!(camera_time((1_000_000, sr_ns), 1_009_000, 90_000), Some(sr_ns + 100_000_000));
        assert_eq!(camera_time((1_000_000, sr_ns), 995_500, 90_000), Some(sr_ns - 50_000_000));
    }
}
