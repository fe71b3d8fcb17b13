//! V4L2 cameras (Linux): USB webcams, CSI cameras with V4L2 drivers, capture cards.
//!
//! The requested format (`YUYV`, `NV12` or `MJPG`), size and frame rate are negotiated with
//! the driver; what it grants is logged (drivers pick the nearest size they support) and used.
//! Frames come through four memory-mapped buffers and are copied out once. MJPEG frames are
//! forwarded exactly as the camera produced them; YUYV and NV12 frames keep the driver's row
//! stride, which the encoder honours.

use bytes::Bytes;
use v4l::buffer::Type;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::video::capture::Parameters;
use v4l::{Device, FourCC, Format};

use super::config::V4l2Config;
use super::{Source, SourceError};
use crate::frame::{Captured, PixelFormat, now_ns};

pub struct V4l2Source {
    cfg: V4l2Config,
    stream: Option<Stream<'static>>,
    format: Option<Format>,
    /// Keeps the device open while the stream uses it.
    device: Option<Device>,
}

impl V4l2Source {
    pub fn new(cfg: V4l2Config) -> Self {
        Self { cfg, stream: None, format: None, device: None }
    }
}

fn unavailable(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> SourceError {
    SourceError::Unavailable(format!("{}: {what}: {e}", path.display()))
}

/// Turns one dequeued buffer into a frame: MJPEG keeps only the bytes used, YUYV needs
/// `stride × height` bytes, NV12 `stride × (height + ⌈height / 2⌉)` (its UV plane follows the
/// Y plane with the same stride).
pub fn captured_from_buffer(format: &Format, buf: &[u8], bytes_used: usize) -> Result<Captured, String> {
    let (kind, name) = match &format.fourcc.repr {
        b"MJPG" => (PixelFormat::Jpeg, "MJPG"),
        b"YUYV" => (PixelFormat::Yuyv, "YUYV"),
        b"NV12" => (PixelFormat::Nv12, "NV12"),
        other => return Err(format!("unsupported pixel format {}", String::from_utf8_lossy(other))),
    };
    let used = if bytes_used == 0 { buf.len() } else { bytes_used.min(buf.len()) };
    let data = match kind {
        PixelFormat::Jpeg => {
            if used < 4 || buf[0] != 0xFF || buf[1] != 0xD8 {
                return Err(format!("MJPEG buffer of {used} bytes does not start with a JPEG marker"));
            }
            &buf[..used]
        }
        _ => {
            let rows = format.height as usize + if kind == PixelFormat::Nv12 { (format.height as usize).div_ceil(2) } else { 0 };
            let need = format.stride as usize * rows;
            if used < need {
                return Err(format!("{name} buffer has {used} bytes, {}x{} with stride {} needs {need}", format.width, format.height, format.stride));
            }
            &buf[..need]
        }
    };
    Ok(Captured {
        capture_ns: now_ns(),
        width: format.width,
        height: format.height,
        stride: format.stride as usize,
        format: kind,
        source_format: name,
        data: Bytes::copy_from_slice(data),
        clock: Default::default(),
    })
}

impl Source for V4l2Source {
    fn open(&mut self) -> Result<(), SourceError> {
        self.stream = None;
        self.device = None;
        let path = &self.cfg.device;
        let dev = Device::with_path(path).map_err(|e| unavailable("open", path, e))?;
        let fourcc = FourCC::new(match self.cfg.format.as_str() {
            "YUYV" => b"YUYV",
            "NV12" => b"NV12",
            _ => b"MJPG",
        });
        let granted = dev
            .set_format(&Format::new(self.cfg.width, self.cfg.height, fourcc))
            .map_err(|e| unavailable("set format", path, e))?;
        if granted.fourcc != fourcc {
            let offered: Vec<String> = dev.enum_formats().unwrap_or_default().iter().map(|f| f.fourcc.to_string()).collect();
            return Err(SourceError::Unavailable(format!(
                "{}: does not deliver {} (offers {})",
                path.display(),
                self.cfg.format,
                offered.join(", ")
            )));
        }
        let params = dev.set_params(&Parameters::with_fps(self.cfg.fps.round().max(1.0) as u32));
        let fps = params.map(|p| p.interval.denominator as f64 / p.interval.numerator.max(1) as f64).unwrap_or(0.0);
        if (granted.width, granted.height) != (self.cfg.width, self.cfg.height) {
            tracing::warn!(device = %path.display(), requested = %format!("{}x{}", self.cfg.width, self.cfg.height), granted = %format!("{}x{}", granted.width, granted.height), "Camera chose another size.");
        }
        tracing::info!(device = %path.display(), format = %granted.fourcc, width = granted.width, height = granted.height, stride = granted.stride, fps, "V4L2 camera open.");
        let stream = Stream::with_buffers(&dev, Type::VideoCapture, 4).map_err(|e| unavailable("start streaming", path, e))?;
        self.stream = Some(stream);
        self.format = Some(granted);
        self.device = Some(dev);
        Ok(())
    }

    fn next_frame(&mut self) -> Result<Captured, SourceError> {
        let (stream, format) = match (&mut self.stream, &self.format) {
            (Some(s), Some(f)) => (s, f),
            _ => return Err(SourceError::Unavailable("not open".into())),
        };
        let (buf, meta) = stream.next().map_err(|e| unavailable("capture", &self.cfg.device, e))?;
        captured_from_buffer(format, buf, meta.bytesused as usize).map_err(|e| SourceError::Unavailable(format!("{}: {e}", self.cfg.device.display())))
    }

    fn describe(&self) -> String {
        format!("V4L2 {} {} {}x{} @ {} fps", self.cfg.device.display(), self.cfg.format, self.cfg.width, self.cfg.height, self.cfg.fps)
    }
}

/// `framelink-agent list-cameras`: every V4L2 device with its formats and sizes.
pub fn list_cameras() -> String {
    let mut out = String::new();
    let nodes = v4l::context::enum_devices();
    if nodes.is_empty() {
        out.push_str("no V4L2 devices found (/dev/video*)\n");
    }
    for node in nodes {
        let path = node.path().display().to_string();
        let name = node.name().unwrap_or_else(|| "?".into());
        out.push_str(&format!("{path}: {name}\n"));
        let dev = match Device::with_path(node.path()) {
            Ok(d) => d,
            Err(e) => {
                out.push_str(&format!("  cannot open: {e}\n"));
                continue;
            }
        };
        for f in dev.enum_formats().unwrap_or_default() {
            let sizes: Vec<String> = dev
                .enum_framesizes(f.fourcc)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|s| match s.size {
                    v4l::framesize::FrameSizeEnum::Discrete(d) => vec![format!("{}x{}", d.width, d.height)],
                    v4l::framesize::FrameSizeEnum::Stepwise(s) => {
                        vec![format!("{}x{}..{}x{}", s.min_width, s.min_height, s.max_width, s.max_height)]
                    }
                })
                .collect();
            let usable = matches!(&f.fourcc.repr, b"YUYV" | b"NV12" | b"MJPG");
            out.push_str(&format!(
                "  {} ({}){}: {}\n",
                f.fourcc,
                f.description,
                if usable { "" } else { " [not supported by framelink]" },
                sizes.join(" ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(fourcc: &[u8; 4], w: u32, h: u32, stride: u32) -> Format {
        let mut f = Format::new(w, h, FourCC::new(fourcc));
        f.stride = stride;
        f
    }

    #[test]
    fn mjpeg_keeps_only_the_bytes_used() {
        let jpeg = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/rocket.jpg")).unwrap();
        let mut buf = jpeg.clone();
        buf.resize(jpeg.len() + 4096, 0); // drivers hand out a larger buffer
        let c = captured_from_buffer(&fmt(b"MJPG", 640, 480, 0), &buf, jpeg.len()).unwrap();
        assert_eq!(c.format, PixelFormat::Jpeg);
        assert_eq!(c.data.as_ref(), jpeg.as_slice());
        assert!(captured_from_buffer(&fmt(b"MJPG", 640, 480, 0), &[0u8; 100], 100).unwrap_err().contains("JPEG marker"));
    }

    #[test]
    fn yuyv_keeps_the_driver_stride() {
        let (w, h, stride) = (6u32, 4u32, 16u32);
        let buf: Vec<u8> = (0..stride * h + 32).map(|i| i as u8).collect();
        let c = captured_from_buffer(&fmt(b"YUYV", w, h, stride), &buf, 0).unwrap();
        assert_eq!((c.stride, c.data.len()), (16, 64));
        assert_eq!(c.format, PixelFormat::Yuyv);
        let short = captured_from_buffer(&fmt(b"YUYV", w, h, stride), &buf[..40], 40).unwrap_err();
        assert!(short.contains("needs 64"), "{short}");
        assert!(captured_from_buffer(&fmt(b"RGB3", w, h, w * 3), &buf, 0).unwrap_err().contains("unsupported pixel format RGB3"));
    }

    #[test]
    fn nv12_takes_its_uv_rows_after_the_y_rows_with_the_same_stride() {
        // 6x5: 5 luma rows and 3 chroma rows of 16 bytes.
        let (w, h, stride) = (6u32, 5u32, 16u32);
        let buf: Vec<u8> = (0..stride * 8 + 32).map(|i| i as u8).collect();
        let c = captured_from_buffer(&fmt(b"NV12", w, h, stride), &buf, 0).unwrap();
        assert_eq!((c.format, c.source_format, c.stride, c.data.len()), (PixelFormat::Nv12, "NV12", 16, 128));
        let short = captured_from_buffer(&fmt(b"NV12", w, h, stride), &buf[..120], 120).unwrap_err();
        assert!(short.contains("NV12 buffer has 120 bytes") && short.contains("needs 128"), "{short}");
        // And the encoder takes it as it comes.
        let mut e = crate::encoder::Encoder::new(crate::encoder::EncoderConfig::default()).unwrap();
        assert_eq!(e.encode(&c).unwrap().width, 6);
    }
}
