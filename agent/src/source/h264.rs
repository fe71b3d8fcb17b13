//! H.264 bitstream helpers of the video-file source: MP4's length-prefixed NAL units to the
//! Annex B the decoders ([`super::decoder`]) take, and finding IDR pictures.

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
