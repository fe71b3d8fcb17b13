//! A camera's table to its source: the one module that knows every kind of source, so that
//! [`super::config`] stays a leaf that the kinds import their tables from.

use super::Source;
use super::config::CameraConfig;

impl CameraConfig {
    /// Builds the source; `state_dir` (the spool directory) keeps what a source remembers
    /// across restarts (a video file's position).
    pub fn build(&self, state_dir: &std::path::Path) -> Box<dyn Source> {
        if let Some(s) = &self.synthetic {
            return Box::new(super::synthetic::Synthetic::new(s.width, s.height, s.fps).with_count(s.count));
        }
        if let Some(s) = &self.images {
            return Box::new(super::images::ImageDir::new(s.path.clone(), s.fps, s.looping));
        }
        if let Some(s) = &self.video {
            return Box::new(super::video::VideoSource::new(&self.id, s.clone(), state_dir));
        }
        if let Some(s) = &self.rtsp {
            return Box::new(super::rtsp::RtspSource::new(&self.id, s.clone()));
        }
        #[cfg(all(target_os = "linux", feature = "v4l2"))]
        if let Some(s) = &self.v4l2 {
            return Box::new(super::v4l2::V4l2Source::new(s.clone()));
        }
        #[cfg(feature = "nokhwa")]
        if let Some(s) = &self.usb {
            return Box::new(super::usb::UsbSource::new(s.clone()));
        }
        unreachable!("validate() guarantees one supported source kind")
    }
}
