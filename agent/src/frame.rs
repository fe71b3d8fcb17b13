//! The shapes a frame takes inside the agent: an image as a source captured it, the same with
//! its camera and sequence number, and an encoded frame ready for Kafka (JPEG bytes plus the
//! wire contract's metadata).
//!
//! A leaf of the agent: the sources, the encoder and the spool import these types, and this
//! module imports none of theirs.

use bytes::Bytes;
use framelink_common::{CaptureClock, FrameMeta};

/// Pixel layouts the sources deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelFormat {
    /// Packed 8-bit RGB, 3 bytes a pixel.
    Rgb24,
    /// Packed YUV 4:2:2, `Y0 U Y1 V`, 2 bytes a pixel (most USB/V4L2 cameras).
    Yuyv,
    /// Already a JPEG (MJPEG cameras, JPEG files): forwarded without decode or re-encode.
    Jpeg,
    /// Planar YUV 4:2:0, studio range (what H.264 decoders give): the Y plane (`stride` =
    /// width), then U and V, each `width.div_ceil(2)` × `height.div_ceil(2)`, no padding.
    I420,
    /// [`Self::I420`]'s layout in JPEG's own full-range YCbCr (BT.601, 0–255; FFmpeg's
    /// `yuvj420p`): at 4:2:0 with even sizes the encoder compresses these planes as they are,
    /// with no conversion and no copy (the synthetic test pattern draws this).
    J420,
    /// Semi-planar YUV 4:2:0, studio range (V4L2 `NV12`: Jetson and many MIPI/USB cameras,
    /// hardware decoders): `height` rows of Y, then `height.div_ceil(2)` rows of interleaved
    /// U, V pairs, both planes with rows `stride` bytes apart (≥ width rounded up to even).
    Nv12,
}

impl PixelFormat {
    /// The name sent in the `framelink-pixel-format` header.
    pub fn wire_name(self) -> &'static str {
        match self {
            Self::Rgb24 => "RGB24",
            Self::Yuyv => "YUYV",
            Self::Jpeg => "MJPG",
            Self::I420 => "I420",
            Self::J420 => "J420",
            Self::Nv12 => "NV12",
        }
    }
}

/// One captured image, as the device gave it.
#[derive(Clone, Debug)]
pub struct Captured {
    /// Capture time, ns since the Unix epoch.
    pub capture_ns: u64,
    pub width: u32,
    pub height: u32,
    /// Bytes from one row to the next (≥ width × bytes per pixel; cameras pad rows).
    pub stride: usize,
    pub format: PixelFormat,
    /// The name to report as the camera's pixel format (e.g. `PNG` for an image file).
    pub source_format: &'static str,
    pub data: Bytes,
    /// Which clock `capture_ns` was read from (the agent's, unless the camera sends its own).
    pub clock: CaptureClock,
}

/// A captured frame, before encoding: the image plus who and which frame it is.
#[derive(Clone, Debug)]
pub struct RawFrame {
    pub camera: String,
    /// Per-camera sequence number, assigned at capture (so frames dropped later leave gaps
    /// that the drop counters explain).
    pub seq: u64,
    pub image: Captured,
}

/// An encoded frame: what goes to Kafka or into the spool.
#[derive(Clone, PartialEq)]
pub struct Frame {
    pub meta: FrameMeta,
    pub payload: Bytes,
}

impl std::fmt::Debug for Frame {
    // Never print image bytes: logs and test failures would drown in them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame").field("meta", &self.meta).field("payload_len", &self.payload.len()).finish()
    }
}

impl Frame {
    /// Bytes this frame takes in memory or on disk, roughly (payload plus metadata).
    pub fn size(&self) -> usize {
        self.payload.len() + 64 + self.meta.device_id.len() + self.meta.camera_id.len()
    }
}

/// Nanoseconds since the Unix epoch, the clock of `capture_ns`.
pub use framelink_common::clock::now_ns;
