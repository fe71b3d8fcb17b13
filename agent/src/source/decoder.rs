//! The video decoder of the RTSP and video-file sources: openh264 (built from source, always
//! there; H.264 only) or, in a build with the `libav` feature, the system's libavcodec
//! (FFmpeg: H.264 about twice as fast per frame, and H.265). `decoder = "auto"` (the default
//! of both sources) takes libavcodec where it is built in.
//!
//! Both are fed Annex B access units, one per call, and give pictures back in display order,
//! possibly a few calls later (B-frames). Each picture that comes out is offered to `keep`;
//! only a kept one is copied out of the decoder into a [`PixelFormat::I420`] capture, so a
//! camera sending faster than `fps` pays for the decode but not for the copy.

use std::collections::VecDeque;

use framelink_common::CaptureClock;
pub use super::config::DecoderChoice;
use super::Captured;
use crate::frame::PixelFormat;

/// A compressed video format a camera or file can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    H264,
    H265,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::H264 => "H.264",
            Codec::H265 => "H.265",
        }
    }

    /// What `framelink-pixel-format` says for pictures decoded from it.
    fn source_format(self) -> &'static str {
        match self {
            Codec::H264 => "H264",
            Codec::H265 => "H265",
        }
    }
}

/// How a decoded picture is stamped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stamp {
    pub capture_ns: u64,
    pub clock: CaptureClock,
}

pub struct Decoder {
    inner: Inner,
    codec: Codec,
}

enum Inner {
    Openh264(Box<openh264::decoder::Decoder>),
    #[cfg(feature = "libav")]
    Libav(super::libav::LibavDecoder),
}

impl Decoder {
    /// A decoder for `codec`, as `choice` says; the error names what is missing (H.265 without
    /// libavcodec, say).
    pub fn new(codec: Codec, choice: DecoderChoice) -> Result<Decoder, String> {
        let libav = match choice {
            DecoderChoice::Auto => cfg!(feature = "libav"),
            DecoderChoice::Openh264 => false,
            DecoderChoice::Libav if !cfg!(feature = "libav") => return Err("decoder = \"libav\", but this agent was built without the `libav` feature".into()),
            DecoderChoice::Libav => true,
        };
        if libav {
            #[cfg(feature = "libav")]
            return Ok(Decoder { inner: Inner::Libav(super::libav::LibavDecoder::new(codec)?), codec });
        }
        if codec != Codec::H264 {
            let hint = if cfg!(feature = "libav") { "decoder = \"openh264\" decodes H.264 only; use \"libav\" (or \"auto\")" } else { "this agent was built without libavcodec (cargo feature `libav`), and openh264 decodes H.264 only" };
            return Err(format!("{} cannot be decoded: {hint}", codec.name()));
        }
        Ok(Decoder { inner: Inner::Openh264(Box::new(openh264_decoder().map_err(|e| format!("starting openh264: {e}"))?)), codec })
    }

    /// Which decoder this is, for logs.
    pub fn name(&self) -> &'static str {
        match self.inner {
            Inner::Openh264(_) => "openh264",
            #[cfg(feature = "libav")]
            Inner::Libav(_) => "libavcodec",
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Feeds one access unit (Annex B). Each picture that comes out is offered to `keep`; the
    /// kept ones are pushed to `out`. Returns how many pictures came out.
    pub fn decode(&mut self, au: &[u8], stamp: Stamp, keep: &mut dyn FnMut() -> bool, out: &mut VecDeque<Captured>) -> Result<u32, String> {
        let format = self.codec.source_format();
        match &mut self.inner {
            Inner::Openh264(d) => match d.decode(au) {
                Ok(Some(yuv)) => {
                    if keep() {
                        out.push_back(openh264_captured(&yuv, stamp, format));
                    }
                    Ok(1)
                }
                Ok(None) => Ok(0),
                Err(e) => Err(e.to_string()),
            },
            #[cfg(feature = "libav")]
            Inner::Libav(d) => d.decode(au, stamp, format, keep, out),
        }
    }

    /// At the end of the stream: the pictures still inside the decoder, as [`Self::decode`].
    pub fn flush(&mut self, keep: &mut dyn FnMut() -> bool, out: &mut VecDeque<Captured>) -> Result<u32, String> {
        let format = self.codec.source_format();
        match &mut self.inner {
            Inner::Openh264(d) => {
                let rest = d.flush_remaining().map_err(|e| e.to_string())?;
                for yuv in &rest {
                    if keep() {
                        out.push_back(openh264_captured(yuv, Stamp::default(), format));
                    }
                }
                Ok(rest.len() as u32)
            }
            #[cfg(feature = "libav")]
            Inner::Libav(d) => d.flush(format, keep, out),
        }
    }
}

/// An openh264 decoder without its flush after every decode (with B-frames that makes it
/// fail: "no parameter sets" on every frame after the first).
fn openh264_decoder() -> Result<openh264::decoder::Decoder, openh264::Error> {
    use openh264::decoder::{Decoder, DecoderConfig, Flush};
    Decoder::with_api_config(openh264::OpenH264API::from_source(), DecoderConfig::new().flush_after_decode(Flush::NoFlush))
}

fn openh264_captured(yuv: &openh264::decoder::DecodedYUV<'_>, stamp: Stamp, format: &'static str) -> Captured {
    use openh264::formats::YUVSource;
    let (w, h) = yuv.dimensions();
    let (sy, su, sv) = yuv.strides();
    i420(w, h, [(yuv.y(), sy), (yuv.u(), su), (yuv.v(), sv)], stamp, format)
}

/// Copies three planes (4:2:0, each with its stride) into a tight [`PixelFormat::I420`]
/// capture.
pub(super) fn i420(w: usize, h: usize, planes: [(&[u8], usize); 3], stamp: Stamp, format: &'static str) -> Captured {
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let mut out = Vec::with_capacity(w * h + 2 * cw * ch);
    for (i, (plane, stride)) in planes.into_iter().enumerate() {
        let (pw, ph) = if i == 0 { (w, h) } else { (cw, ch) };
        for r in 0..ph {
            out.extend_from_slice(&plane[r * stride..r * stride + pw]);
        }
    }
    Captured { capture_ns: stamp.capture_ns, width: w as u32, height: h as u32, stride: w, format: PixelFormat::I420, source_format: format, data: out.into(), clock: stamp.clock }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The access units of `testdata/video/audio-first-bframes.mp4` (3 B-frames) in decode
    /// order, each with its presentation time (what an RTP timestamp is) as its stamp.
    fn units() -> Vec<(Vec<u8>, u64)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/video/audio-first-bframes.mp4");
        let file = std::fs::File::open(&path).unwrap();
        let size = file.metadata().unwrap().len();
        let mut r = mp4::Mp4Reader::read_header(std::io::BufReader::new(file), size).unwrap();
        let track = r.tracks().values().find(|t| matches!(t.media_type(), Ok(mp4::MediaType::H264))).unwrap();
        let (id, n) = (track.track_id(), track.sample_count());
        let (sps, pps) = (track.sequence_parameter_set().unwrap().to_vec(), track.picture_parameter_set().unwrap().to_vec());
        (1..=n)
            .map(|i| {
                let s = r.read_sample(id, i).unwrap().unwrap();
                let ps = super::super::h264::has_idr(&s.bytes).then_some((sps.as_slice(), pps.as_slice()));
                (super::super::h264::annex_b(&s.bytes, ps).unwrap(), (s.start_time as i64 + i64::from(s.rendering_offset)) as u64)
            })
            .collect()
    }

    /// The stamps of the pictures `choice` gives back, in the order they come out.
    fn stamps(choice: DecoderChoice) -> Vec<u64> {
        let mut d = Decoder::new(Codec::H264, choice).unwrap();
        let mut out = VecDeque::new();
        for (au, t) in units() {
            d.decode(&au, Stamp { capture_ns: t, clock: CaptureClock::Camera }, &mut || true, &mut out).unwrap();
        }
        out.into_iter().map(|c| c.capture_ns).collect()
    }

    /// With B-frames, pictures come out in display order; libavcodec gives each the capture
    /// time of the unit it was coded in, so the times rise with the pictures. (openh264 stamps
    /// a picture with the unit fed when it came out: a few times out of order, documented.)
    #[cfg(feature = "libav")]
    #[test]
    fn libavcodec_gives_each_picture_its_own_capture_time() {
        let t = stamps(DecoderChoice::Libav);
        let mut want: Vec<u64> = units().into_iter().map(|u| u.1).collect();
        want.sort();
        assert!(t.len() >= 45, "the pictures before the flush: {}", t.len());
        assert_eq!(t, want[..t.len()], "picture k carries the k-th presentation time");
    }

    #[test]
    fn openh264_stamps_a_picture_with_the_unit_fed_when_it_came_out() {
        let t = stamps(DecoderChoice::Openh264);
        assert!(t.len() >= 45, "{}", t.len());
        assert!(t.windows(2).any(|w| w[0] > w[1]), "the documented limitation is gone: update docs/agent.md ({t:?})");
    }

    #[test]
    fn h265_without_libavcodec_names_the_remedy() {
        let e = Decoder::new(Codec::H265, DecoderChoice::Openh264).err().unwrap();
        assert!(e.contains("H.265") && e.contains("H.264 only"), "{e}");
    }
}
