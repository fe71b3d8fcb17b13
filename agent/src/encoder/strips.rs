//! A frame's JPEG written one strip of YUV planes at a time (csrc/strips.c, libjpeg's raw-data
//! API on the libjpeg-turbo that turbojpeg-sys builds). The caller fills each strip — one iMCU
//! row: 16 luma and 8 chroma rows at 4:2:0 — straight from the camera's buffer into small
//! buffers that stay in the CPU cache, and libjpeg transforms them at once. TurboJPEG's API
//! takes whole-frame planes only: written to memory by the conversion and read back by the
//! encoder, 3 MB per 1080p frame each way, and 3 MB more resident per encoder. The result is
//! TurboJPEG's JPEG from the same planes, byte for byte (same settings; tested).

use std::ffi::{CStr, c_char, c_int, c_uchar, c_uint, c_ulong};

#[repr(C)]
struct FlStrips {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn fl_strips_start(width: c_uint, height: c_uint, quality: c_int, h_samp: c_int, v_samp: c_int, out: *mut c_uchar, cap: c_ulong, msg: *mut c_char, msg_len: usize) -> *mut FlStrips;
    fn fl_strips_write(s: *mut FlStrips, planes: *const *mut c_uchar, strides: *const usize, msg: *mut c_char, msg_len: usize) -> c_int;
    fn fl_strips_finish(s: *mut FlStrips, jpeg: *mut *const c_uchar, len: *mut c_ulong, msg: *mut c_char, msg_len: usize) -> c_int;
    fn fl_strips_abort(s: *mut FlStrips);
    fn fl_strips_layout(s: *const FlStrips, k: c_int, rows: *mut c_uint, width: *mut c_uint);
}

/// One JPEG being written; freed when dropped, finished or not.
struct Job(*mut FlStrips);

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: the pointer came from fl_strips_start and is freed once.
        unsafe { fl_strips_abort(self.0) }
    }
}

/// One strip to fill: each plane's rows (`rows[k]` of them, `widths[k]` samples each, one
/// after another in `planes[k]`), for the frame's luma rows from `first_row` on (rows past the
/// frame's last repeat it; samples past a row's end repeat its last one).
pub struct Strip<'a> {
    pub first_row: usize,
    pub planes: &'a mut [Vec<u8>; 3],
    pub widths: [usize; 3],
    pub rows: [usize; 3],
}

/// Reusable buffers for strip-wise encoding (one per encoder thread).
#[derive(Default)]
pub struct StripEncoder {
    out: Vec<u8>,
    strips: [Vec<u8>; 3],
}

impl StripEncoder {
    /// A `width`×`height` JPEG at `quality`, luma sampled `samp` = (2, 2) (4:2:0) or (2, 1)
    /// (4:2:2) times the chroma, from the planes `fill` writes strip by strip (top to bottom).
    pub fn encode(&mut self, width: u32, height: u32, quality: u8, samp: (u8, u8), mut fill: impl FnMut(Strip<'_>)) -> Result<Vec<u8>, String> {
        let subsamp = match samp {
            (2, 2) => turbojpeg_sys::TJSAMP_TJSAMP_420,
            (2, 1) => turbojpeg_sys::TJSAMP_TJSAMP_422,
            other => return Err(format!("sampling {other:?} is not strip-encoded")),
        };
        // SAFETY: a pure function of its arguments.
        let cap = unsafe { turbojpeg_sys::tj3JPEGBufSize(width as c_int, height as c_int, subsamp as c_int) } as usize;
        if cap == 0 || cap == usize::MAX {
            return Err(format!("{width}x{height} is too large to encode"));
        }
        if self.out.len() < cap {
            // Fresh zeroed memory: the pages the JPEG never reaches are never touched.
            self.out = vec![0u8; cap];
        }
        let mut msg = [0 as c_char; 200];
        // SAFETY: the C side NUL-terminates `msg` (snprintf) before returning an error.
        let text = |m: &[c_char]| unsafe { CStr::from_ptr(m.as_ptr()) }.to_string_lossy().into_owned();
        // SAFETY: `out` is valid for `cap` bytes for as long as the job lives (it is not
        // touched until the job is dropped); `msg` is NUL-terminated within its length.
        let job = Job(unsafe { fl_strips_start(width, height, quality.clamp(1, 100) as c_int, samp.0 as c_int, samp.1 as c_int, self.out.as_mut_ptr(), cap as c_ulong, msg.as_mut_ptr(), msg.len()) });
        if job.0.is_null() {
            return Err(text(&msg));
        }
        let (mut rows, mut widths) = ([0usize; 3], [0usize; 3]);
        for k in 0..3 {
            let (mut r, mut w) = (0, 0);
            // SAFETY: a live job; k < 3 components.
            unsafe { fl_strips_layout(job.0, k as c_int, &mut r, &mut w) };
            (rows[k], widths[k]) = (r as usize, w as usize);
            self.strips[k].resize(rows[k] * widths[k], 0);
        }
        let luma_rows = rows[0];
        for first_row in (0..height as usize).step_by(luma_rows) {
            fill(Strip { first_row, planes: &mut self.strips, widths, rows });
            let ptrs = [self.strips[0].as_mut_ptr(), self.strips[1].as_mut_ptr(), self.strips[2].as_mut_ptr()];
            // SAFETY: each plane holds rows[k] rows of widths[k] samples (resized above, and
            // `fill` gets the Vecs by reference only to write into them: a resize there would
            // be caught by the length check below before libjpeg reads).
            assert!((0..3).all(|k| self.strips[k].len() >= rows[k] * widths[k]), "a strip's planes shrank");
            if unsafe { fl_strips_write(job.0, ptrs.as_ptr(), widths.as_ptr(), msg.as_mut_ptr(), msg.len()) } != 0 {
                return Err(text(&msg));
            }
        }
        let (mut jpeg, mut len) = (std::ptr::null(), 0 as c_ulong);
        // SAFETY: a live job with every row written; on success `jpeg` points at `len` bytes
        // (in `out`, or a buffer libjpeg grew, which the job frees when dropped).
        if unsafe { fl_strips_finish(job.0, &mut jpeg, &mut len, msg.as_mut_ptr(), msg.len()) } != 0 {
            return Err(text(&msg));
        }
        // SAFETY: as above — `len` bytes at `jpeg`, alive until the job is dropped below.
        let bytes = unsafe { std::slice::from_raw_parts(jpeg, len as usize) }.to_vec();
        drop(job);
        Ok(bytes)
    }
}
