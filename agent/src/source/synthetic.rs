//! A synthetic test pattern: diagonal colour bars that move every frame, with the frame
//! counter and the capture time (UTC, HH:MM:SS.mmm) burned in. It needs no hardware, so the
//! agent runs anywhere, and every frame differs (JPEG sizes and motion look like a camera's).

use bytes::Bytes;

use super::{Pacer, Source, SourceError};
use crate::frame::{Captured, PixelFormat, now_ns};

/// Width of one colour bar, pixels.
const BAR: usize = 64;
const COLOURS: [[u8; 3]; 8] = [
    [235, 235, 235],
    [235, 235, 16],
    [16, 235, 235],
    [16, 235, 16],
    [235, 16, 235],
    [235, 16, 16],
    [16, 16, 235],
    [16, 16, 16],
];

pub struct Synthetic {
    width: usize,
    height: usize,
    pacer: Pacer,
    counter: u64,
    limit: Option<u64>,
    /// One long row of bar colours; row y of frame t is a window into it.
    strip: Vec<u8>,
}

impl Synthetic {
    pub fn new(width: u32, height: u32, fps: f64) -> Self {
        let (width, height) = (width as usize, height as usize);
        let period = BAR * COLOURS.len();
        let len = width + period;
        let mut strip = Vec::with_capacity(len * 3);
        for x in 0..len {
            strip.extend_from_slice(&COLOURS[(x / BAR) % COLOURS.len()]);
        }
        Self { width, height, pacer: Pacer::new(fps), counter: 0, limit: None, strip }
    }

    /// Stops (`SourceError::Exhausted`) after `count` frames.
    pub fn with_count(mut self, count: Option<u64>) -> Self {
        self.limit = count;
        self
    }

    /// Renders frame `n` captured at `capture_ns` (RGB24, stride = width × 3).
    pub fn render(&self, n: u64, capture_ns: u64) -> Vec<u8> {
        let (w, h) = (self.width, self.height);
        let period = BAR * COLOURS.len();
        let mut img = vec![0u8; w * h * 3];
        for (y, row) in img.chunks_exact_mut(w * 3).enumerate() {
            let off = (y + n as usize * 4) % period;
            row.copy_from_slice(&self.strip[off * 3..(off + w) * 3]);
        }
        let secs = capture_ns / 1_000_000_000;
        let text = format!(
            "{n:08} {:02}:{:02}:{:02}.{:03}",
            (secs / 3600) % 24,
            (secs / 60) % 60,
            secs % 60,
            (capture_ns / 1_000_000) % 1000
        );
        let scale = (h / 60).clamp(1, 12);
        draw_text(&mut img, w, h, &text, scale, scale * 2, scale * 2);
        img
    }
}

impl Source for Synthetic {
    fn open(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    fn next_frame(&mut self) -> Result<Captured, SourceError> {
        if self.limit.is_some_and(|l| self.counter >= l) {
            return Err(SourceError::Exhausted);
        }
        self.pacer.wait();
        let capture_ns = now_ns();
        let data = self.render(self.counter, capture_ns);
        self.counter += 1;
        Ok(Captured {
            capture_ns,
            width: self.width as u32,
            height: self.height as u32,
            stride: self.width * 3,
            format: PixelFormat::Rgb24,
            source_format: "RGB24",
            data: Bytes::from(data),
            clock: Default::default(),
        })
    }

    fn describe(&self) -> String {
        format!("synthetic test pattern {}x{}", self.width, self.height)
    }
}

/// 3x5 glyphs for `0-9`, `:`, `.`, space; one row per entry, bit 2 = left column.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        ':' => [0, 2, 0, 2, 0],
        '.' => [0, 0, 0, 0, 2],
        _ => [0; 5],
    }
}

/// Draws `text` in black on a white box at (x0, y0), each glyph cell `scale` pixels.
fn draw_text(img: &mut [u8], w: usize, h: usize, text: &str, scale: usize, x0: usize, y0: usize) {
    let cell_w = 4 * scale;
    let box_w = (text.chars().count() * cell_w + scale).min(w.saturating_sub(x0));
    let box_h = (7 * scale).min(h.saturating_sub(y0));
    for y in y0..y0 + box_h {
        img[(y * w + x0) * 3..(y * w + x0 + box_w) * 3].fill(255);
    }
    for (i, c) in text.chars().enumerate() {
        for (gy, bits) in glyph(c).iter().enumerate() {
            for gx in 0..3 {
                if bits & (4 >> gx) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    let y = y0 + scale + gy * scale + dy;
                    let x = x0 + scale + i * cell_w + gx * scale;
                    if y < h && x + scale <= w {
                        img[(y * w + x) * 3..(y * w + x + scale) * 3].fill(0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_move_and_carry_their_counter() {
        let s = Synthetic::new(320, 240, 30.0);
        let a = s.render(0, 0);
        let b = s.render(1, 0);
        assert_eq!(a.len(), 320 * 240 * 3);
        assert_ne!(a, b, "the pattern moves");
        // Outside the text box, the bars move 4 rows a frame.
        let row = |img: &[u8], y: usize| img[y * 960..(y + 1) * 960].to_vec();
        assert_eq!(row(&b, 200), row(&a, 204));
        assert_ne!(row(&a, 200), row(&a, 204));
        // The text box starts white and holds black glyph pixels.
        let px = |img: &[u8], x: usize, y: usize| img[(y * 320 + x) * 3..(y * 320 + x) * 3 + 3].to_vec();
        assert_eq!(px(&a, 8, 8), vec![255u8, 255, 255]);
        assert!(a.chunks(3).take(320 * 40).any(|p| p == [0, 0, 0]));
        // Different counters draw different digits.
        assert_ne!(s.render(1, 0)[..320 * 40 * 3], s.render(2, 0)[..320 * 40 * 3]);
    }

    #[test]
    fn odd_sizes_render() {
        for (w, h) in [(1, 1), (17, 9), (641, 361)] {
            assert_eq!(Synthetic::new(w, h, 5.0).render(3, 0).len(), (w * h * 3) as usize);
        }
    }
}
