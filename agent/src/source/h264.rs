//! H.264 decoding shared by the RTSP and video-file sources: openh264 (Cisco's decoder, built
//! from source by the `openh264` crate: no system library) to tight I420 planes, which the
//! encoder turns into a JPEG without an RGB round trip.

use crate::frame::PixelFormat;
use framelink_common::CaptureClock;

use super::Captured;

/// A decoder without openh264's flush after every decode (with B-frames that makes it fail:
/// "no parameter sets" on every frame after the first).
pub fn decoder() -> Result<openh264::decoder::Decoder, openh264::Error> {
    use openh264::decoder::{Decoder, DecoderConfig, Flush};
    Decoder::with_api_config(openh264::OpenH264API::from_source(), DecoderConfig::new().flush_after_decode(Flush::NoFlush))
}

/// Copies a decoded picture into a [`PixelFormat::I420`] capture.
pub fn captured(yuv: &openh264::decoder::DecodedYUV<'_>, capture_ns: u64, clock: CaptureClock) -> Captured {
    use openh264::formats::YUVSource;
    let (w, h) = yuv.dimensions();
    let (sy, su, sv) = yuv.strides();
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let mut out = Vec::with_capacity(w * h + 2 * cw * ch);
    for r in 0..h {
        out.extend_from_slice(&yuv.y()[r * sy..r * sy + w]);
    }
    for r in 0..ch {
        out.extend_from_slice(&yuv.u()[r * su..r * su + cw]);
    }
    for r in 0..ch {
        out.extend_from_slice(&yuv.v()[r * sv..r * sv + cw]);
    }
    Captured { capture_ns, width: w as u32, height: h as u32, stride: w, format: PixelFormat::I420, source_format: "H264", data: out.into(), clock }
}

/// AVCC samples (4-byte big-endian NAL lengths, as MP4 stores them) to Annex B (start codes),
/// with the parameter sets in front of a sync sample so the decoder can start there.
pub fn annex_b(sample: &[u8], parameter_sets: Option<(&[u8], &[u8])>) -> Result<Vec<u8>, String> {
    const START: [u8; 4] = [0, 0, 0, 1];
    let mut out = Vec::with_capacity(sample.len() + 64);
    if let Some((sps, pps)) = parameter_sets {
        for ps in [sps, pps] {
            out.extend_from_slice(&START);
            out.extend_from_slice(ps);
        }
    }
    let mut rest = sample;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else { return Err(format!("{} trailing bytes are no NAL length", rest.len())) };
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(format!("a NAL of {len} bytes in {} remaining", tail.len()));
        }
        out.extend_from_slice(&START);
        out.extend_from_slice(&tail[..len]);
        rest = &tail[len..];
    }
    Ok(out)
}

/// Whether an AVCC sample holds an IDR slice (NAL type 5): a picture the decoder can start
/// at. Read from the bitstream, not the container: the `mp4` crate guesses the sync samples of
/// a fragmented MP4 (wrongly for ffmpeg's), and some muxers leave the sync table out.
pub fn has_idr(sample: &[u8]) -> bool {
    let mut rest = sample;
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        if len == 0 || len > tail.len() {
            return false;
        }
        if tail[0] & 0x1F == 5 {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idr_slice_is_found_after_other_nal_units() {
        assert!(has_idr(&[0, 0, 0, 2, 0x09, 0x10, 0, 0, 0, 2, 0x65, 0x88]), "AUD, then IDR");
        assert!(!has_idr(&[0, 0, 0, 2, 0x41, 0x9A]), "a non-IDR slice");
        assert!(!has_idr(&[0, 0, 0, 9, 0x65]), "truncated");
        assert!(!has_idr(&[]));
    }

    #[test]
    fn avcc_becomes_annex_b_with_parameter_sets_in_front() {
        let sample = [0, 0, 0, 2, 0x65, 0xAA, 0, 0, 0, 1, 0x41];
        let out = annex_b(&sample, Some((&[0x67, 1], &[0x68, 2]))).unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0x67, 1, 0, 0, 0, 1, 0x68, 2, 0, 0, 0, 1, 0x65, 0xAA, 0, 0, 0, 1, 0x41]);
        assert!(annex_b(&[0, 0, 0, 9, 1], None).unwrap_err().contains("9 bytes"));
        assert!(annex_b(&[0, 0], None).unwrap_err().contains("trailing"));
    }
}
