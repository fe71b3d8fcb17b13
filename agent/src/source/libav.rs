//! libavcodec (the system's FFmpeg, through `ffmpeg-next`) as the video decoder: H.264 and
//! H.265 from Annex B access units to 4:2:0 pictures. Built with the cargo feature `libav`
//! (Debian: `libavcodec-dev libavformat-dev libavutil-dev`, and `libavcodec59` at run time).
//!
//! One decoding thread per camera: the agent runs several cameras on few cores, and frame
//! threads would add a picture of latency per thread without lowering the CPU per frame.
//!
//! Capture times: each access unit goes in with a number as its `pts`, which libavcodec
//! carries through its reordering; a picture that comes out gets the stamp (capture time and
//! clock) of the access unit it was coded in — with B-frames, its own, not that of the unit
//! fed when it came out.

use std::collections::VecDeque;
use std::sync::Once;

use ffmpeg_next as ff;

use super::Captured;
use super::decoder::{Codec, Stamp, i420};

pub struct LibavDecoder {
    decoder: ff::decoder::Video,
    picture: ff::frame::Video,
    /// The stamps of the access units fed recently, by the `pts` each went in with.
    stamps: VecDeque<(i64, Stamp)>,
    next_pts: i64,
}

/// Access units whose stamps are kept: more than any decoder holds back for reordering.
const STAMPS_KEPT: usize = 64;

// SAFETY: the decoder is used by one thread at a time (the camera's); libavcodec contexts may
// move between threads, they must only not be used from two at once.
unsafe impl Send for LibavDecoder {}

static INIT: Once = Once::new();

impl LibavDecoder {
    pub fn new(codec: Codec) -> Result<LibavDecoder, String> {
        INIT.call_once(|| {
            let _ = ff::init();
            ff::util::log::set_level(ff::util::log::Level::Fatal);
        });
        let id = match codec {
            Codec::H264 => ff::codec::Id::H264,
            Codec::H265 => ff::codec::Id::HEVC,
        };
        let found = ff::decoder::find(id).ok_or_else(|| format!("this libavcodec has no {} decoder", codec.name()))?;
        let mut context = ff::codec::Context::new_with_codec(found);
        context.set_threading(ff::threading::Config { kind: ff::threading::Type::Slice, count: 1, ..Default::default() });
        let decoder = context.decoder().video().map_err(|e| format!("opening libavcodec's {} decoder: {e}", codec.name()))?;
        Ok(LibavDecoder { decoder, picture: ff::frame::Video::empty(), stamps: VecDeque::with_capacity(STAMPS_KEPT), next_pts: 0 })
    }

    pub fn decode(&mut self, au: &[u8], stamp: Stamp, format: &'static str, keep: &mut dyn FnMut() -> bool, out: &mut VecDeque<Captured>) -> Result<u32, String> {
        let mut packet = ff::Packet::copy(au);
        packet.set_pts(Some(self.next_pts));
        if self.stamps.len() == STAMPS_KEPT {
            self.stamps.pop_front();
        }
        self.stamps.push_back((self.next_pts, stamp));
        self.next_pts += 1;
        if let Err(e) = self.decoder.send_packet(&packet) {
            // A damaged access unit is refused; the pictures already decoded still come out.
            let n = self.receive(stamp, format, keep, out)?;
            return if n > 0 { Ok(n) } else { Err(e.to_string()) };
        }
        self.receive(stamp, format, keep, out)
    }

    pub fn flush(&mut self, format: &'static str, keep: &mut dyn FnMut() -> bool, out: &mut VecDeque<Captured>) -> Result<u32, String> {
        self.decoder.send_eof().map_err(|e| e.to_string())?;
        self.receive(Stamp::default(), format, keep, out)
    }

    fn receive(&mut self, stamp: Stamp, format: &'static str, keep: &mut dyn FnMut() -> bool, out: &mut VecDeque<Captured>) -> Result<u32, String> {
        let mut n = 0;
        while self.decoder.receive_frame(&mut self.picture).is_ok() {
            n += 1;
            if !keep() {
                continue;
            }
            let p = &self.picture;
            let stamp = p.pts().and_then(|pts| self.stamps.iter().find(|(n, _)| *n == pts)).map_or(stamp, |(_, s)| *s);
            match p.format() {
                ff::format::Pixel::YUV420P | ff::format::Pixel::YUVJ420P => {}
                other => return Err(format!("decoded pictures are {other:?}; the agent encodes 8-bit 4:2:0 (set the camera to an 8-bit 4:2:0 profile)")),
            }
            let (w, h) = (p.width() as usize, p.height() as usize);
            out.push_back(i420(w, h, [(p.data(0), p.stride(0)), (p.data(1), p.stride(1)), (p.data(2), p.stride(2))], stamp, format));
        }
        Ok(n)
    }
}
