//! What the agent's benches share: the test photographs as 1080p frames, and the camera
//! layouts made from them (BT.601 studio-range YUYV and NV12, as cameras deliver them; the
//! synthetic pattern's full-range J420).

// Each bench uses some of these.
#![allow(dead_code)]

use std::path::PathBuf;

use bytes::Bytes;
use framelink_agent::encoder::yuv420::rgb_to_full_range;

pub const W: usize = 1920;
pub const H: usize = 1080;

/// The photographs in testdata/images, resized to W x H packed RGB.
pub fn photos() -> Vec<Bytes> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/images");
    let mut paths: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg")).collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            // The agent's image crate reads PNG only; JPEGs through libjpeg-turbo.
            let img = if p.extension().is_some_and(|e| e == "jpg") {
                let d = turbojpeg::decompress(&std::fs::read(p).unwrap(), turbojpeg::PixelFormat::RGB).unwrap();
                image::RgbImage::from_raw(d.width as u32, d.height as u32, d.pixels).unwrap()
            } else {
                image::open(p).unwrap().into_rgb8()
            };
            Bytes::from(image::imageops::resize(&img, W as u32, H as u32, image::imageops::FilterType::Triangle).into_raw())
        })
        .collect()
}

/// One BT.601 studio-range YUV pixel from RGB, as camera ISPs produce.
fn studio_yuv(p: &[u8]) -> [i32; 3] {
    let (r, g, b) = (p[0] as i32, p[1] as i32, p[2] as i32);
    [((66 * r + 129 * g + 25 * b + 128) >> 8) + 16, ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128, ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128]
}

/// Packed YUYV 4:2:2 (each pixel pair's chroma averaged), stride = width × 2.
pub fn to_yuyv(rgb: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(W * H * 2);
    for pair in rgb.chunks_exact(6) {
        let (a, b) = (studio_yuv(&pair[..3]), studio_yuv(&pair[3..]));
        out.extend_from_slice(&[a[0] as u8, ((a[1] + b[1] + 1) / 2) as u8, b[0] as u8, ((a[2] + b[2] + 1) / 2) as u8]);
    }
    Bytes::from(out)
}

/// The Y plane and each 2x2 block's (U, V), averaged, from `pixel` (RGB → Y, U, V).
fn yuv420(rgb: &[u8], pixel: impl Fn(&[u8]) -> [i32; 3]) -> (Vec<u8>, Vec<(u8, u8)>) {
    let mut y = vec![0u8; W * H];
    let mut uv = Vec::with_capacity(W * H / 4);
    for r in (0..H).step_by(2) {
        for c in (0..W).step_by(2) {
            let (mut u, mut v) = (0, 0);
            for (dr, dc) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let p = pixel(&rgb[((r + dr) * W + c + dc) * 3..][..3]);
                y[(r + dr) * W + c + dc] = p[0] as u8;
                (u, v) = (u + p[1], v + p[2]);
            }
            uv.push((((u + 2) / 4) as u8, ((v + 2) / 4) as u8));
        }
    }
    (y, uv)
}

/// NV12: the Y plane, then U,V pairs for each 2x2 block, stride = width.
pub fn to_nv12(rgb: &[u8]) -> Bytes {
    let (mut out, uv) = yuv420(rgb, studio_yuv);
    out.extend(uv.into_iter().flat_map(|(u, v)| [u, v]));
    Bytes::from(out)
}

/// J420 (full range): the Y plane, then the U plane, then the V plane.
pub fn to_j420(rgb: &[u8]) -> Bytes {
    let (mut out, uv) = yuv420(rgb, |p| rgb_to_full_range([p[0], p[1], p[2]]).map(i32::from));
    out.extend(uv.iter().map(|&(u, _)| u));
    out.extend(uv.iter().map(|&(_, v)| v));
    Bytes::from(out)
}
