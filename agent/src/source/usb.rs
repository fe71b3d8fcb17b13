//! USB cameras through nokhwa (cargo feature `nokhwa`): its native backend is V4L2 on Linux,
//! AVFoundation on macOS, Media Foundation on Windows — the way to reach cameras where the
//! `v4l2` source does not run.
//!
//! nokhwa's camera handle is not `Send`, so it lives on a thread of its own that hands frames
//! over through a channel of one. MJPEG frames pass through untouched, YUYV is encoded from
//! YUV, packed RGB as RGB; other formats (NV12, GRAY, BGR) are refused with a clear error
//! (they need nokhwa's `decoding` feature, which builds a second libjpeg).

use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Receiver;
use nokhwa::Camera;
use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution};

use super::config::UsbConfig;
use super::{Source, SourceError};
use crate::frame::{Captured, PixelFormat, now_ns};

pub struct UsbSource {
    cfg: UsbConfig,
    frames: Option<Receiver<Result<Captured, String>>>,
}

impl UsbSource {
    pub fn new(cfg: UsbConfig) -> Self {
        Self { cfg, frames: None }
    }
}

fn to_captured(format: FrameFormat, res: Resolution, buf: &[u8]) -> Result<Captured, String> {
    let (w, h) = (res.width(), res.height());
    let (kind, name, stride) = match format {
        FrameFormat::MJPEG => (PixelFormat::Jpeg, "MJPG", 0),
        FrameFormat::YUYV => (PixelFormat::Yuyv, "YUYV", w as usize * 2),
        FrameFormat::RAWRGB => (PixelFormat::Rgb24, "RGB24", w as usize * 3),
        other => return Err(format!("camera delivers {other}, which framelink cannot encode without decoding support")),
    };
    Ok(Captured { capture_ns: now_ns(), width: w, height: h, stride, format: kind, source_format: name, data: Bytes::copy_from_slice(buf), clock: Default::default() })
}

impl Source for UsbSource {
    fn open(&mut self) -> Result<(), SourceError> {
        let cfg = self.cfg.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name(format!("usb-camera-{}", cfg.index))
            .spawn(move || {
                let frame_format = if cfg.format == "YUYV" { FrameFormat::YUYV } else { FrameFormat::MJPEG };
                let wanted = CameraFormat::new(Resolution::new(cfg.width, cfg.height), frame_format, cfg.fps);
                let requested = RequestedFormat::new::<RgbFormat>(RequestedFormatType::Closest(wanted));
                let mut camera = match Camera::new(CameraIndex::Index(cfg.index), requested).and_then(|mut c| c.open_stream().map(|_| c)) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("USB camera {}: {e}", cfg.index)));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(camera.camera_format().to_string()));
                loop {
                    let item = camera.frame().map_err(|e| e.to_string()).and_then(|b| to_captured(b.source_frame_format(), b.resolution(), b.buffer()));
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        let _ = camera.stop_stream();
                        return;
                    }
                }
            })
            .map_err(|e| SourceError::Unavailable(e.to_string()))?;
        match ready_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(format)) => {
                tracing::info!(index = self.cfg.index, format, "USB camera open.");
                self.frames = Some(rx);
                Ok(())
            }
            Ok(Err(e)) => Err(SourceError::Unavailable(e)),
            Err(_) => Err(SourceError::Unavailable(format!("USB camera {}: no answer within 15 s", self.cfg.index))),
        }
    }

    fn next_frame(&mut self) -> Result<Captured, SourceError> {
        let rx = self.frames.as_ref().ok_or_else(|| SourceError::Unavailable("not open".into()))?;
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(SourceError::Unavailable(format!("USB camera {}: {e}", self.cfg.index))),
            Err(_) => Err(SourceError::Unavailable(format!("USB camera {}: no frame for 10 s", self.cfg.index))),
        }
    }

    fn describe(&self) -> String {
        format!("USB camera #{} (nokhwa) {} {}x{} @ {} fps", self.cfg.index, self.cfg.format, self.cfg.width, self.cfg.height, self.cfg.fps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_formats_map_to_pixel_formats() {
        let res = Resolution::new(4, 2);
        let c = to_captured(FrameFormat::YUYV, res, &[0u8; 16]).unwrap();
        assert_eq!((c.format, c.stride, c.source_format), (PixelFormat::Yuyv, 8, "YUYV"));
        assert_eq!(to_captured(FrameFormat::MJPEG, res, b"\xff\xd8").unwrap().format, PixelFormat::Jpeg);
        assert!(to_captured(FrameFormat::NV12, res, &[0u8; 12]).unwrap_err().contains("NV12"));
    }
}
