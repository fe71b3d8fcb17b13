//! Camera sources: one trait, several implementations, and the runner that keeps each camera
//! capturing on its own thread.
//!
//! A source only knows how to open a device and hand over the next frame, pacing itself to
//! its frame rate. Everything else — sequence numbers, retries with backoff when a camera
//! disappears, dropping frames when the encoder falls behind — is the runner's job, the same
//! for every kind of source.
//!
//! Imports run one way: the kinds of source import this module (the trait), [`config`] (their
//! tables) and [`crate::frame`] (what they capture); [`config`] imports no source, and
//! `from_config` (a camera's table to its source) imports all of them.

pub mod config;
pub mod decoder;
mod from_config;
pub mod h264;
pub mod images;
#[cfg(feature = "libav")]
mod libav;
mod mp4_samples;
pub mod rtsp;
pub mod synthetic;
pub mod video;
#[cfg(feature = "nokhwa")]
pub mod usb;
#[cfg(all(target_os = "linux", feature = "v4l2"))]
pub mod v4l2;

/// What a source hands over (defined with the other shapes of a frame).
pub use crate::frame::Captured;

/// Why a source could not give a frame.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The device went away or failed; the runner re-opens it with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// A finite source (a directory without `loop`) has no more frames.
    #[error("no more frames")]
    Exhausted,
}

/// A camera, a file set or a generator of frames.
pub trait Source: Send {
    /// Opens (or re-opens after an error) the device.
    fn open(&mut self) -> Result<(), SourceError>;
    /// Blocks until the next frame is due and returns it.
    fn next_frame(&mut self) -> Result<Captured, SourceError>;
    /// For logs: what this source is.
    fn describe(&self) -> String;
    /// A bulk source (a file ingested as fast as possible): the camera thread waits for a busy
    /// encoder instead of dropping the frame (`encoder_behind`), and waits for the link to
    /// Kafka while it is down or draining instead of filling the spool — a bulk source must not
    /// skip frames, and the file is its own spool. A live camera must not fall behind real time.
    fn blocks_when_behind(&self) -> bool {
        false
    }
    /// Frames the source received from the camera and decoded so far, where that differs from
    /// what it hands over (a stream camera sending faster than `fps`); `None` otherwise.
    fn stream_counts(&self) -> Option<StreamCounts> {
        None
    }
}

/// What a stream camera received and decoded, for `camera_frames_received` / `_decoded` /
/// `_undecodable`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounts {
    pub received: u64,
    pub decoded: u64,
    /// Frames the camera sent that could not be decoded (damaged by packet loss, say): never
    /// handed over, so counted here.
    pub undecodable: u64,
}

/// Paces a source to a frame rate without bursting to catch up after a stall.
#[derive(Debug)]
pub struct Pacer {
    period: std::time::Duration,
    next: Option<std::time::Instant>,
}

impl Pacer {
    pub fn new(fps: f64) -> Self {
        Self { period: std::time::Duration::from_secs_f64(1.0 / fps), next: None }
    }

    /// Sleeps until the next frame is due.
    pub fn wait(&mut self) {
        let now = std::time::Instant::now();
        let due = *self.next.get_or_insert(now);
        if due > now {
            std::thread::sleep(due - now);
            self.next = Some(due + self.period);
        } else if now - due > self.period {
            // More than a frame late: a real camera would have dropped; restart the cadence.
            self.next = Some(now + self.period);
        } else {
            self.next = Some(due + self.period);
        }
    }
}
