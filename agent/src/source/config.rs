//! `[[cameras]]` tables: one per camera, each with an id and exactly one source kind.
//!
//! ```toml
//! [[cameras]]
//! id = "gate"
//! synthetic = { width = 1920, height = 1080, fps = 30 }
//!
//! [[cameras]]
//! id = "replay"
//! images = { path = "/srv/frames", fps = 5, loop = true }
//!
//! [[cameras]]
//! id = "usb0"
//! v4l2 = { device = "/dev/video0", width = 1280, height = 720, fps = 30, format = "MJPG" }
//! ```
//!
//! A leaf: the kinds of source import their tables from here, and this module imports none of
//! them (a table becomes a source in `from_config`).

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// Camera id, second half of the record key; unique within the device.
    pub id: String,
    /// A moving test pattern with the frame counter burned in.
    pub synthetic: Option<SyntheticConfig>,
    /// Image files from a directory.
    pub images: Option<ImagesConfig>,
    /// A V4L2 camera (Linux; USB webcams, CSI cameras with V4L2 drivers).
    pub v4l2: Option<V4l2Config>,
    /// A USB camera through nokhwa (macOS, Windows, Linux; cargo feature `nokhwa`).
    pub usb: Option<UsbConfig>,
    /// An IP camera over RTSP (H.264 or MJPEG).
    pub rtsp: Option<RtspConfig>,
    /// A video file (MP4 with H.264).
    pub video: Option<VideoConfig>,
}

/// How fast a video file is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VideoPace {
    /// At the file's frame rate: a replay of footage. Default.
    #[default]
    Realtime,
    /// As fast as the encoder and the link take it (bulk ingestion); no frame is dropped for a
    /// busy encoder.
    Fast,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoConfig {
    /// An MP4 file with an H.264 video track.
    pub path: PathBuf,
    /// `realtime` (default) or `fast`.
    #[serde(default)]
    pub pace: VideoPace,
    /// Start again after the end. Default false (the camera then finishes).
    #[serde(default, rename = "loop")]
    pub looping: bool,
    /// Pictures per second to send, below the file's (every n-th is kept); default: all.
    pub fps: Option<f64>,
    /// Decode and send only IDR (key) pictures. Default false.
    #[serde(default)]
    pub keyframes_only: bool,
    /// `auto` (default: libavcodec where built in, else openh264), `openh264` or `libav`.
    #[serde(default)]
    pub decoder: DecoderChoice,
}

/// How RTP travels from the camera.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    /// Interleaved in the RTSP connection: works through NAT and firewalls, no loss. Default.
    #[default]
    Tcp,
    /// RTP over UDP: less latency on a clean LAN, packets can be lost.
    Udp,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtspConfig {
    /// `rtsp://[user:password@]host[:port]/path`.
    pub url: String,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub transport: RtspTransport,
    /// Frames per second to send, at most the camera's; default: every frame the camera sends.
    pub fps: Option<f64>,
    /// Decode only IDR (key) frames: a fraction of the CPU, at the camera's keyframe rate at
    /// most. Default false.
    #[serde(default)]
    pub keyframes_only: bool,
    /// No frame for this long: the stream is reopened (with backoff). Also bounds connecting.
    /// Default 5000.
    #[serde(default = "default_stall_ms")]
    pub stall_timeout_ms: u64,
    /// User name, when not in the URL.
    pub username: Option<String>,
    /// A file holding the password (its first line), when not in the URL.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password, when not in the URL.
    pub password_env: Option<String>,
    /// Capture times from the `camera`'s clock (RTCP sender reports, when it sends them;
    /// default) or the `agent`'s at arrival.
    #[serde(default)]
    pub clock: RtspClock,
    /// `auto` (default: libavcodec where built in, else openh264), `openh264` or `libav`.
    #[serde(default)]
    pub decoder: DecoderChoice,
}

/// Which decoder a camera uses (`decoder` in its `rtsp` or `video` table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderChoice {
    /// libavcodec when this build has it (feature `libav`), else openh264. Default.
    #[default]
    Auto,
    /// Cisco's openh264 (H.264 only).
    Openh264,
    /// The system's libavcodec (FFmpeg); needs a build with the `libav` feature.
    Libav,
}

impl DecoderChoice {
    /// Whether this build can honour the choice.
    pub fn available(self) -> bool {
        self != DecoderChoice::Libav || cfg!(feature = "libav")
    }
}

/// Whose clock gives an RTSP frame its capture time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspClock {
    /// The camera's wall clock through its RTCP sender reports; the agent's until the first.
    #[default]
    Camera,
    /// The agent's clock when the frame arrives.
    Agent,
}

fn default_stall_ms() -> u64 {
    5000
}

impl RtspConfig {
    /// The URL with any user and password removed: what logs, errors and `/healthz` show.
    pub fn public_url(&self) -> String {
        match self.url_without_credentials() {
            Ok(u) => u.to_string(),
            Err(_) => "<unparsable rtsp url>".into(),
        }
    }

    pub fn url_without_credentials(&self) -> Result<url::Url, url::ParseError> {
        let mut u = url::Url::parse(&self.url)?;
        let _ = u.set_username("");
        let _ = u.set_password(None);
        Ok(u)
    }

    /// User and password from the URL, or `username` with `password_file` / `password_env`.
    pub fn credentials(&self) -> Result<Option<retina::client::Credentials>> {
        let u = url::Url::parse(&self.url)?;
        let decode = |s: &str| percent_decode(s);
        let username = match (u.username(), &self.username) {
            ("", None) => return Ok(None),
            ("", Some(n)) => n.clone(),
            (n, _) => decode(n),
        };
        let password = if let Some(p) = u.password() {
            decode(p)
        } else if let Some(f) = &self.password_file {
            let text = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("password_file {}: {e}", f.display()))?;
            text.lines().next().unwrap_or("").to_owned()
        } else if let Some(v) = &self.password_env {
            std::env::var(v).map_err(|_| anyhow::anyhow!("password_env: the environment variable {v} is not set"))?
        } else {
            String::new()
        };
        Ok(Some(retina::client::Credentials { username, password }))
    }
}

/// `%XX` escapes of a URL's user or password decoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbConfig {
    /// Camera index as the platform numbers them. Default 0.
    #[serde(default)]
    pub index: u32,
    #[serde(default = "default_width")]
    pub width: u32,
    #[serde(default = "default_height")]
    pub height: u32,
    /// Requested frame rate (the closest the camera offers is used). Default 10.
    #[serde(default = "default_usb_fps")]
    pub fps: u32,
    /// `MJPG` (default; passed through) or `YUYV`.
    #[serde(default = "default_fourcc")]
    pub format: String,
}

fn default_usb_fps() -> u32 {
    10
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Default 1280.
    #[serde(default = "default_width")]
    pub width: u32,
    /// Default 720.
    #[serde(default = "default_height")]
    pub height: u32,
    /// Frames per second, default 10.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// Stop after this many frames (tests, benchmarks). Default: never.
    pub count: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    /// Directory of .jpg / .jpeg / .png files, replayed in name order.
    pub path: PathBuf,
    /// Frames per second, default 10.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// Start again at the first file after the last. Default false (the camera then stops).
    #[serde(default, rename = "loop")]
    pub looping: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V4l2Config {
    /// Device node. Default `/dev/video0`.
    #[serde(default = "default_device")]
    pub device: PathBuf,
    /// Requested size; the driver may pick the nearest it supports (logged). Default 1280x720.
    #[serde(default = "default_width")]
    pub width: u32,
    #[serde(default = "default_height")]
    pub height: u32,
    /// Requested frame rate. Default 10.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// `YUYV` or `NV12` (encoded straight from YUV) or `MJPG` (forwarded as the camera gives
    /// it). Default `MJPG`.
    #[serde(default = "default_fourcc")]
    pub format: String,
}

fn default_width() -> u32 {
    1280
}
fn default_height() -> u32 {
    720
}
fn default_fps() -> f64 {
    10.0
}
fn default_device() -> PathBuf {
    PathBuf::from("/dev/video0")
}
fn default_fourcc() -> String {
    "MJPG".into()
}

/// The camera used when none is configured: a 1280x720 synthetic pattern at 10 fps.
pub fn default_cameras() -> Vec<CameraConfig> {
    vec![CameraConfig {
        id: "synthetic0".into(),
        synthetic: Some(SyntheticConfig { width: default_width(), height: default_height(), fps: default_fps(), count: None }),
        images: None,
        v4l2: None,
        usb: None,
        rtsp: None,
        video: None,
    }]
}

fn check_fps(key: &str, fps: f64) -> Result<()> {
    if !(fps > 0.0 && fps <= 1000.0) {
        bail!("config key `{key}`: {fps} is not a frame rate from 0 to 1000");
    }
    Ok(())
}

fn check_size(key: &str, w: u32, h: u32) -> Result<()> {
    if w == 0 || h == 0 || w > 16384 || h > 16384 {
        bail!("config key `{key}`: {w}x{h} is not a size from 1x1 to 16384x16384");
    }
    Ok(())
}

fn check_decoder(key: &str, choice: DecoderChoice) -> Result<()> {
    if !choice.available() {
        bail!("config key `{key}`: \"libav\" needs an agent built with the `libav` feature (libavcodec); this one has openh264 only (\"auto\" or \"openh264\")");
    }
    Ok(())
}

impl CameraConfig {
    /// Checks this camera's table; `i` is its index in `cameras`, for error messages.
    pub fn validate(&self, i: usize) -> Result<()> {
        let key = format!("cameras[{i}]");
        framelink_common::wire::check_id(framelink_common::wire::header::CAMERA, &self.id)
            .map_err(|e| anyhow::anyhow!("config key `{key}.id`: {e}"))?;
        let kinds = [self.synthetic.is_some(), self.images.is_some(), self.v4l2.is_some(), self.usb.is_some(), self.rtsp.is_some(), self.video.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            bail!("config key `{key}`: give exactly one of `synthetic`, `images`, `v4l2`, `usb`, `rtsp`, `video`");
        }
        if let Some(s) = &self.video {
            if !s.path.is_file() {
                bail!("config key `{key}.video.path`: {} is not a file", s.path.display());
            }
            if let Some(fps) = s.fps {
                check_fps(&format!("{key}.video.fps"), fps)?;
            }
            check_decoder(&format!("{key}.video.decoder"), s.decoder)?;
        }
        if let Some(s) = &self.rtsp {
            let u = url::Url::parse(&s.url).map_err(|e| anyhow::anyhow!("config key `{key}.rtsp.url`: {e} (`{}`)", s.public_url()))?;
            if u.scheme() != "rtsp" && u.scheme() != "rtsps" {
                bail!("config key `{key}.rtsp.url`: the scheme is `{}`, not `rtsp`", u.scheme());
            }
            if let Some(fps) = s.fps {
                check_fps(&format!("{key}.rtsp.fps"), fps)?;
            }
            check_decoder(&format!("{key}.rtsp.decoder"), s.decoder)?;
            if !(100..=600_000).contains(&s.stall_timeout_ms) {
                bail!("config key `{key}.rtsp.stall_timeout_ms`: {} is not from 100 to 600000", s.stall_timeout_ms);
            }
            if s.password_file.is_some() && s.password_env.is_some() {
                bail!("config key `{key}.rtsp`: give `password_file` or `password_env`, not both");
            }
            s.credentials().map_err(|e| anyhow::anyhow!("config key `{key}.rtsp`: {e}"))?;
        }
        if let Some(s) = &self.usb {
            check_size(&format!("{key}.usb"), s.width, s.height)?;
            check_fps(&format!("{key}.usb.fps"), s.fps as f64)?;
            if !matches!(s.format.as_str(), "YUYV" | "MJPG") {
                bail!("config key `{key}.usb.format`: {:?} is not `YUYV` or `MJPG`", s.format);
            }
            if !cfg!(feature = "nokhwa") {
                bail!("config key `{key}.usb`: this build has no nokhwa support (build with `--features nokhwa`)");
            }
        }
        if let Some(s) = &self.synthetic {
            check_size(&format!("{key}.synthetic"), s.width, s.height)?;
            check_fps(&format!("{key}.synthetic.fps"), s.fps)?;
        }
        if let Some(s) = &self.images {
            check_fps(&format!("{key}.images.fps"), s.fps)?;
            if !s.path.is_dir() {
                bail!("config key `{key}.images.path`: {} is not a directory", s.path.display());
            }
        }
        if let Some(s) = &self.v4l2 {
            check_size(&format!("{key}.v4l2"), s.width, s.height)?;
            check_fps(&format!("{key}.v4l2.fps"), s.fps)?;
            if !matches!(s.format.as_str(), "YUYV" | "NV12" | "MJPG") {
                bail!("config key `{key}.v4l2.format`: {:?} is not `YUYV`, `NV12` or `MJPG`", s.format);
            }
            if !cfg!(all(target_os = "linux", feature = "v4l2")) {
                bail!("config key `{key}.v4l2`: this build has no V4L2 support (cargo feature `v4l2`, Linux only)");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", feature = "v4l2"))]
    fn v4l2_formats_are_checked_by_name() {
        for (format, ok) in [("NV12", true), ("YUYV", true), ("MJPG", true), ("RGB3", false), ("nv12", false)] {
            let cam: CameraConfig = serde_json::from_value(serde_json::json!({"id": "c", "v4l2": {"format": format}})).unwrap();
            match cam.validate(0) {
                Ok(()) => assert!(ok, "{format} accepted"),
                Err(e) => {
                    assert!(!ok, "{format} refused: {e}");
                    assert!(e.to_string().contains("cameras[0].v4l2.format") && e.to_string().contains("`NV12`"), "{e}");
                }
            }
        }
    }
}
