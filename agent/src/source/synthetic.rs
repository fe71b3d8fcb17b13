//! A synthetic test pattern: diagonal colour bars that move every frame, with the frame
//! counter and the capture time (UTC, HH:MM:SS.mmm) burned in. It needs no hardware, so the
//! agent runs anywhere, and every frame differs (JPEG sizes and motion look like a camera's).
//!
//! It draws straight into JPEG's full-range 4:2:0 planes ([`PixelFormat::J420`]): half the
//! bytes of RGB, and the encoder compresses them with no conversion. Each row is one copy out
//! of a precomputed strip of bar colours. The frame buffers are recycled: once the encoder has
//! dropped a frame, its buffer draws a later one, so the agent does not allocate and free a
//! frame-sized block 30 times a second (which left glibc's arenas holding tens of MiB).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::{Pacer, Source, SourceError};
use crate::encoder::yuv420::rgb_to_full_range;
use crate::frame::{Captured, PixelFormat, now_ns};

/// Width of one colour bar, pixels (even: a chroma sample never straddles two bars' starts).
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
/// Buffers tracked for reuse: the encoder's queue, the frame being encoded, and the frame just
/// handed out (dropped at the source when the encoder is behind, then reused).
const POOL: usize = crate::capture::ENCODER_QUEUE + 2;
/// Calls in a row with a spare free buffer before the spares are released: a camera whose
/// frames in flight swing between one and two keeps its second buffer instead of allocating
/// and freeing 3 MB at every swing.
const SPARE_GRACE: u32 = 30;

pub struct Synthetic {
    width: usize,
    height: usize,
    pacer: Pacer,
    counter: u64,
    limit: Option<u64>,
    /// One long row of bar luma; row y of frame t is a window into it.
    strip_y: Vec<u8>,
    /// The bars' chroma at half resolution (sample k = the colour at luma column 2k).
    strip_u: Vec<u8>,
    strip_v: Vec<u8>,
    /// Frames handed out, oldest first; a buffer is reused once only this handle is left.
    recycled: VecDeque<Bytes>,
    /// Consecutive [`Self::buffer`] calls that found more than one free buffer.
    spare_calls: u32,
}

impl Synthetic {
    pub fn new(width: u32, height: u32, fps: f64) -> Self {
        let (width, height) = (width as usize, height as usize);
        let period = BAR * COLOURS.len();
        let ycc = COLOURS.map(rgb_to_full_range);
        let bar = |x: usize| ycc[(x / BAR) % COLOURS.len()];
        let strip_y = (0..width + period).map(|x| bar(x)[0]).collect();
        let chroma_len = width.div_ceil(2) + period / 2;
        let strip_u = (0..chroma_len).map(|k| bar(2 * k)[1]).collect();
        let strip_v = (0..chroma_len).map(|k| bar(2 * k)[2]).collect();
        Self { width, height, pacer: Pacer::new(fps), counter: 0, limit: None, strip_y, strip_u, strip_v, recycled: VecDeque::new(), spare_calls: 0 }
    }

    /// Stops (`SourceError::Exhausted`) after `count` frames.
    pub fn with_count(mut self, count: Option<u64>) -> Self {
        self.limit = count;
        self
    }

    /// Bytes of one frame: the Y plane, then U and V at half width and height (rounded up).
    pub fn frame_len(&self) -> usize {
        let (w, h) = (self.width, self.height);
        w * h + 2 * w.div_ceil(2) * h.div_ceil(2)
    }

    /// Renders frame `n` captured at `capture_ns` into a new buffer (J420, see [`Self::draw`]).
    pub fn render(&self, n: u64, capture_ns: u64) -> Vec<u8> {
        let mut img = vec![0u8; self.frame_len()];
        self.draw(n, capture_ns, &mut img);
        img
    }

    /// Draws frame `n` into `img` ([`Self::frame_len`] bytes, J420: full-range Y, U, V planes).
    pub fn draw(&self, n: u64, capture_ns: u64, img: &mut [u8]) {
        let (w, h) = (self.width, self.height);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let period = BAR * COLOURS.len();
        let (y_plane, chroma) = img.split_at_mut(w * h);
        let (u_plane, v_plane) = chroma.split_at_mut(cw * ch);
        let shift = (n as usize % period) * 4;
        for (y, row) in y_plane.chunks_exact_mut(w).enumerate() {
            let off = (y + shift) % period;
            row.copy_from_slice(&self.strip_y[off..off + w]);
        }
        // Chroma row r covers luma rows 2r and 2r + 1 and takes the upper one's colours; its
        // offset is even (period and shift are), so it is a window into the half-width strips.
        for (r, (u, v)) in u_plane.chunks_exact_mut(cw).zip(v_plane.chunks_exact_mut(cw)).enumerate() {
            let off = ((2 * r + shift) % period) / 2;
            u.copy_from_slice(&self.strip_u[off..off + cw]);
            v.copy_from_slice(&self.strip_v[off..off + cw]);
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
        let (x0, y0) = (scale * 2, scale * 2);
        let (box_w, box_h) = draw_text(y_plane, w, h, &text, scale, x0, y0);
        // The text box is white and black: neutral chroma under it (a box is drawn only inside
        // the frame, so its chroma rows and columns are too).
        if box_w > 0 && box_h > 0 {
            for r in y0 / 2..(y0 + box_h).div_ceil(2).min(ch) {
                let cols = x0 / 2..(x0 + box_w).div_ceil(2).min(cw);
                u_plane[r * cw..][cols.clone()].fill(128);
                v_plane[r * cw..][cols].fill(128);
            }
        }
    }

    /// A buffer for the next frame: a recycled one whose frame the encoder has dropped, or a
    /// new one. Spare free buffers that stay unused for [`SPARE_GRACE`] frames are released,
    /// so the pool shrinks back to the frames in flight after a burst (every buffer kept would
    /// be drawn in turn and stay resident).
    fn buffer(&mut self) -> BytesMut {
        let mut found = None;
        let mut spares = Vec::new();
        for _ in 0..self.recycled.len() {
            let oldest = self.recycled.pop_front().expect("counted");
            if !oldest.is_unique() {
                self.recycled.push_back(oldest);
            } else if found.is_none() {
                found = Some(oldest);
            } else {
                spares.push(oldest);
            }
        }
        self.spare_calls = if spares.is_empty() { 0 } else { self.spare_calls + 1 };
        if self.spare_calls <= SPARE_GRACE {
            self.recycled.extend(spares);
        } else {
            self.spare_calls = 0; // dropped: released
        }
        match found.map(Bytes::try_into_mut) {
            Some(Ok(free)) => free,
            _ => BytesMut::zeroed(self.frame_len()),
        }
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
        let mut buf = self.buffer();
        self.draw(self.counter, capture_ns, &mut buf);
        let data = buf.freeze();
        if self.recycled.len() < POOL {
            self.recycled.push_back(data.clone());
        }
        self.counter += 1;
        Ok(Captured {
            capture_ns,
            width: self.width as u32,
            height: self.height as u32,
            stride: self.width,
            format: PixelFormat::J420,
            source_format: "J420",
            data,
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

/// Draws `text` in black on a white box at (x0, y0) of a luma plane `w` wide, each glyph cell
/// `scale` pixels; returns the box's width and height.
fn draw_text(luma: &mut [u8], w: usize, h: usize, text: &str, scale: usize, x0: usize, y0: usize) -> (usize, usize) {
    let cell_w = 4 * scale;
    let box_w = (text.chars().count() * cell_w + scale).min(w.saturating_sub(x0));
    let box_h = (7 * scale).min(h.saturating_sub(y0));
    if box_w == 0 || box_h == 0 {
        return (0, 0); // a frame too small for any of the box
    }
    for y in y0..y0 + box_h {
        luma[y * w + x0..y * w + x0 + box_w].fill(255);
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
                        luma[y * w + x..y * w + x + scale].fill(0);
                    }
                }
            }
        }
    }
    (box_w, box_h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{Encoder, EncoderConfig};

    #[test]
    fn frames_move_and_carry_their_counter() {
        let s = Synthetic::new(320, 240, 30.0);
        let a = s.render(0, 0);
        let b = s.render(1, 0);
        assert_eq!(a.len(), 320 * 240 + 2 * 160 * 120);
        assert_ne!(a, b, "the pattern moves");
        // Outside the text box, the bars move 4 rows a frame, in luma and chroma.
        let row = |img: &[u8], y: usize| img[y * 320..(y + 1) * 320].to_vec();
        assert_eq!(row(&b, 200), row(&a, 204));
        assert_ne!(row(&a, 200), row(&a, 204));
        let u_row = |img: &[u8], r: usize| img[320 * 240 + r * 160..][..160].to_vec();
        assert_eq!(u_row(&b, 100), u_row(&a, 102));
        // The text box is white with neutral chroma and holds black glyph pixels.
        assert_eq!(a[8 * 320 + 8], 255);
        assert_eq!((a[320 * 240 + 4 * 160 + 4], a[320 * 240 + 160 * 120 + 4 * 160 + 4]), (128, 128));
        assert!(a[..320 * 40].contains(&0));
        // Different counters draw different digits.
        assert_ne!(s.render(1, 0)[..320 * 40], s.render(2, 0)[..320 * 40]);
    }

    #[test]
    fn the_bars_encode_to_their_colours() {
        let s = Synthetic::new(640, 360, 30.0);
        let (w, h) = (640, 360);
        let f = Captured { capture_ns: 0, width: w, height: h, stride: w as usize, format: PixelFormat::J420, source_format: "J420", data: Bytes::from(s.render(0, 0)), clock: Default::default() };
        let jpeg = Encoder::new(EncoderConfig::default()).unwrap().encode(&f).unwrap().jpeg;
        let rgb = turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::RGB).unwrap();
        // Row y of frame 0 starts at strip position y; sample the middle of bars, clear of edges.
        for (x, y) in [(88usize, 200usize), (152, 200), (216, 250), (620, 300), (30, 330)] {
            let colour = COLOURS[((x + y) / BAR) % COLOURS.len()];
            let got = &rgb.pixels[(y * w as usize + x) * 3..][..3];
            for c in 0..3 {
                assert!((got[c] as i32 - colour[c] as i32).abs() <= 8, "({x}, {y}): {got:?}, drawn {colour:?}");
            }
        }
    }

    #[test]
    fn odd_sizes_render() {
        for (w, h) in [(1, 1), (1, 5), (2, 120), (16, 1080), (17, 9), (641, 361)] {
            let s = Synthetic::new(w, h, 5.0);
            let (cw, ch) = ((w as usize).div_ceil(2), (h as usize).div_ceil(2));
            assert_eq!(s.render(3, 0).len(), (w * h) as usize + 2 * cw * ch);
            // And encode (odd sizes take the padded-copy path).
            let f = Captured { capture_ns: 0, width: w, height: h, stride: w as usize, format: PixelFormat::J420, source_format: "J420", data: Bytes::from(s.render(3, 0)), clock: Default::default() };
            assert!(Encoder::new(EncoderConfig::default()).unwrap().encode(&f).is_ok(), "{w}x{h}");
        }
    }

    #[test]
    fn buffers_are_reused_once_the_encoder_drops_its_frame() {
        let mut s = Synthetic::new(64, 48, 10_000.0);
        let a = s.next_frame().unwrap();
        let b = s.next_frame().unwrap();
        assert_ne!(a.data.as_ptr(), b.data.as_ptr(), "a frame still held is not drawn over");
        let (pa, a_bytes) = (a.data.as_ptr(), a.data.to_vec());
        drop(a);
        let c = s.next_frame().unwrap();
        assert_eq!(c.data.as_ptr(), pa, "the dropped frame's buffer draws the next one");
        assert_ne!(c.data.to_vec(), a_bytes, "with the next frame's content");
        assert_eq!(b.data.len(), s.frame_len());
        // Frames held past the pool's size are new buffers, not tracked; nothing is drawn twice.
        let held: Vec<_> = (0..2 * POOL).map(|_| s.next_frame().unwrap()).collect();
        let mut ptrs: Vec<_> = held.iter().chain([&b, &c]).map(|f| f.data.as_ptr()).collect();
        ptrs.sort();
        ptrs.dedup();
        assert_eq!(ptrs.len(), 2 * POOL + 2);
        // Once all are dropped, one buffer is reused; the spares are kept for SPARE_GRACE
        // frames, then let go.
        drop((held, b, c));
        for i in 0..SPARE_GRACE {
            s.next_frame().unwrap();
            assert_eq!(s.recycled.len(), POOL, "frame {i}: spares kept within the grace");
        }
        s.next_frame().unwrap();
        assert_eq!(s.recycled.len(), 1, "only the frame just handed out is kept");
    }

    #[test]
    fn the_pool_outlasts_an_encoder_that_is_behind() {
        // The encoder's queue full and one frame being encoded: the frame handed out next is
        // dropped at the source; its buffer must be reused, not a new one allocated each time.
        let mut s = Synthetic::new(64, 48, 10_000.0);
        let in_flight: Vec<_> = (0..crate::capture::ENCODER_QUEUE + 1).map(|_| s.next_frame().unwrap()).collect();
        let dropped = s.next_frame().unwrap();
        let p = dropped.data.as_ptr();
        drop(dropped);
        for _ in 0..5 {
            let f = s.next_frame().unwrap();
            assert_eq!(f.data.as_ptr(), p, "the dropped frame's buffer is reused");
        }
        drop(in_flight);
    }
}
