//! A camera's table to its source: the one module that knows every kind of source, so that
//! [`super::config`] stays a leaf that the kinds import their tables from.

use super::Source;
use super::config::CameraConfig;

impl CameraConfig {
    /// Builds the source.
    pub fn build(&self) -> Box<dyn Source> {
        if let Some(s) = &self.synthetic {
            return Box::new(super::synthetic::Synthetic::new(s.width, s.height, s.fps).with_count(s.count));
        }
        if let Some(s) = &self.images {
            return Box::new(super::images::ImageDir::new(s.path.clone(), s.fps, s.looping));
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
