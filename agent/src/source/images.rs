//! A directory of images as a camera: frames fetched from storage (the seeds' "images from a
//! bucket" case), replayed at a frame rate, optionally looping.
//!
//! JPEG files are forwarded as they are (no decode / re-encode, unless the encoder must
//! downscale); PNG files are decoded to RGB and encoded like camera frames. Files are listed
//! once per pass, sorted by name; a file that cannot be read is skipped and logged.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{Pacer, Source, SourceError};
use crate::frame::{Captured, PixelFormat, now_ns};

pub struct ImageDir {
    dir: PathBuf,
    looping: bool,
    pacer: Pacer,
    files: Vec<PathBuf>,
    next: usize,
}

impl ImageDir {
    pub fn new(dir: PathBuf, fps: f64, looping: bool) -> Self {
        Self { dir, looping, pacer: Pacer::new(fps), files: Vec::new(), next: 0 }
    }

    fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| kind(p).is_some())
            .collect();
        files.sort();
        Ok(files)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Jpeg,
    Png,
}

fn kind(p: &Path) -> Option<Kind> {
    match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" => Some(Kind::Jpeg),
        "png" => Some(Kind::Png),
        _ => None,
    }
}

/// Reads one image file into a captured frame.
pub fn load(path: &Path) -> Result<Captured, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match kind(path) {
        Some(Kind::Jpeg) => {
            let h = turbojpeg::read_header(&bytes).map_err(|e| format!("{}: not a JPEG: {e}", path.display()))?;
            Ok(Captured {
                capture_ns: now_ns(),
                width: h.width as u32,
                height: h.height as u32,
                stride: 0,
                format: PixelFormat::Jpeg,
                source_format: "JPEG",
                data: Bytes::from(bytes),
                clock: Default::default(),
            })
        }
        Some(Kind::Png) => {
            let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
                .map_err(|e| format!("{}: not a PNG: {e}", path.display()))?
                .into_rgb8();
            let (w, h) = img.dimensions();
            Ok(Captured {
                capture_ns: now_ns(),
                width: w,
                height: h,
                stride: w as usize * 3,
                format: PixelFormat::Rgb24,
                source_format: "PNG",
                data: Bytes::from(img.into_raw()),
                clock: Default::default(),
            })
        }
        None => Err(format!("{}: not a .jpg/.jpeg/.png file", path.display())),
    }
}

impl Source for ImageDir {
    fn open(&mut self) -> Result<(), SourceError> {
        self.files = Self::list(&self.dir)
            .map_err(|e| SourceError::Unavailable(format!("{}: {e}", self.dir.display())))?;
        if self.files.is_empty() {
            return Err(SourceError::Unavailable(format!("{}: no .jpg/.jpeg/.png files", self.dir.display())));
        }
        Ok(())
    }

    fn next_frame(&mut self) -> Result<Captured, SourceError> {
        loop {
            if self.next >= self.files.len() {
                if !self.looping {
                    return Err(SourceError::Exhausted);
                }
                self.open()?;
                self.next = 0;
            }
            let path = self.files[self.next].clone();
            self.next += 1;
            self.pacer.wait();
            match load(&path) {
                Ok(mut c) => {
                    c.capture_ns = now_ns();
                    return Ok(c);
                }
                Err(e) => tracing::warn!(error = %e, "Image skipped."),
            }
        }
    }

    fn describe(&self) -> String {
        format!("images in {}{}", self.dir.display(), if self.looping { " (looping)" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/images")
    }

    #[test]
    fn replays_real_photos_in_name_order_and_stops_without_loop() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["rocket.jpg", "coffee.png"] {
            std::fs::copy(testdata().join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let mut s = ImageDir::new(dir.path().to_path_buf(), 1000.0, false);
        s.open().unwrap();
        let png = s.next_frame().unwrap();
        assert_eq!((png.format, png.source_format), (PixelFormat::Rgb24, "PNG"));
        assert_eq!(png.data.len(), png.stride * png.height as usize);
        let jpg = s.next_frame().unwrap();
        assert_eq!(jpg.format, PixelFormat::Jpeg);
        let original = std::fs::read(dir.path().join("rocket.jpg")).unwrap();
        assert_eq!(jpg.data.as_ref(), original.as_slice(), "JPEG passes through untouched");
        let h = turbojpeg::read_header(&original).unwrap();
        assert_eq!((jpg.width, jpg.height), (h.width as u32, h.height as u32));
        assert!(matches!(s.next_frame(), Err(SourceError::Exhausted)));
    }

    #[test]
    fn loops_and_skips_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(testdata().join("rocket.jpg"), dir.path().join("a.jpg")).unwrap();
        std::fs::write(dir.path().join("b.jpg"), b"truncated").unwrap();
        let mut s = ImageDir::new(dir.path().to_path_buf(), 1000.0, true);
        s.open().unwrap();
        for _ in 0..3 {
            assert_eq!(s.next_frame().unwrap().format, PixelFormat::Jpeg);
        }
    }

    #[test]
    fn empty_directory_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ImageDir::new(dir.path().to_path_buf(), 1.0, true);
        assert!(matches!(s.open(), Err(SourceError::Unavailable(m)) if m.contains("no .jpg")));
    }
}
