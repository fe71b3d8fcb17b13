//! On-disk form of a spooled frame: key and value bytes, with a checksum.
//!
//! key   = camera id, 0x00, sequence number (u64 big-endian): byte order = per-camera
//!         sequence order, so iterating a tree yields each camera's frames in order.
//! value = magic 0xF1, format version 2, CRC-32 (IEEE) of everything after it (u32 BE),
//!         then seq u64, capture_ns u64, width u32, height u32 (BE), then five length-prefixed
//!         (u16 BE) strings: device id, camera id, pixel format, content type, capture clock
//!         (`agent` / `camera`); then the payload (JPEG) to the end. Version 1 (written by
//!         agents before the capture clock) has the first four strings only and is read as
//!         `agent`, so a spool written by an older agent drains after an upgrade.
//! A value whose checksum or structure does not hold is reported as damaged, never panics.

use bytes::Bytes;
use framelink_common::{CaptureClock, FrameMeta};

use crate::frame::Frame;

const MAGIC: u8 = 0xF1;
/// The format version `encode` writes (`parse` also reads version 1).
pub const VERSION: u8 = 2;

/// A spool key: which camera, which frame.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpoolKey(pub Vec<u8>);

impl SpoolKey {
    pub fn new(camera: &str, seq: u64) -> Self {
        let mut k = Vec::with_capacity(camera.len() + 9);
        k.extend_from_slice(camera.as_bytes());
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        Self(k)
    }

    /// (camera, seq), if the key is well formed.
    pub fn parts(&self) -> Option<(&str, u64)> {
        let n = self.0.len().checked_sub(9)?;
        if self.0[n] != 0 {
            return None;
        }
        let camera = std::str::from_utf8(&self.0[..n]).ok()?;
        let seq = u64::from_be_bytes(self.0[n + 1..].try_into().ok()?);
        Some((camera, seq))
    }

    /// The camera, or `<unknown>` for a key that is not `camera \0 seq` (for metrics labels).
    pub fn camera_or_unknown(&self) -> &str {
        self.parts().map_or("<unknown>", |(c, _)| c)
    }
}

impl std::fmt::Display for SpoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.parts() {
            Some((c, s)) => write!(f, "{c}#{s}"),
            None => write!(f, "<malformed key {:02x?}>", &self.0[..self.0.len().min(16)]),
        }
    }
}

pub fn encode(frame: &Frame) -> Vec<u8> {
    let m = &frame.meta;
    let mut v = Vec::with_capacity(frame.size() + 32);
    v.extend_from_slice(&[MAGIC, VERSION, 0, 0, 0, 0]);
    v.extend_from_slice(&m.seq.to_be_bytes());
    v.extend_from_slice(&m.capture_ns.to_be_bytes());
    v.extend_from_slice(&m.width.to_be_bytes());
    v.extend_from_slice(&m.height.to_be_bytes());
    for s in [m.device_id.as_str(), m.camera_id.as_str(), m.pixel_format.as_str(), m.content_type.as_str(), m.clock.as_str()] {
        let len = u16::try_from(s.len()).expect("ids are validated to be short");
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(s.as_bytes());
    }
    v.extend_from_slice(&frame.payload);
    let crc = crc32fast::hash(&v[6..]);
    v[2..6].copy_from_slice(&crc.to_be_bytes());
    v
}

/// Decodes a spooled value stored under `key`; the error says what is wrong.
pub fn decode(key: &SpoolKey, v: &[u8]) -> Result<Frame, String> {
    check_key(key, decode_unkeyed(v)?)
}

/// [`decode`] of a value already owned as `Bytes` (a file just read): the payload is a slice
/// of it, not a copy.
pub fn decode_owned(key: &SpoolKey, v: Bytes) -> Result<Frame, String> {
    let (meta, pos) = parse(&v)?;
    check_key(key, Frame { meta, payload: v.slice(pos..) })
}

fn check_key(key: &SpoolKey, frame: Frame) -> Result<Frame, String> {
    let (camera, seq) = key.parts().ok_or("malformed key")?;
    if frame.meta.camera_id != camera || frame.meta.seq != seq {
        return Err(format!("value holds {}#{}, key says {camera}#{seq}", frame.meta.camera_id, frame.meta.seq));
    }
    Ok(frame)
}

/// Decodes a spooled value on its own (rebuilding an index from files).
pub fn decode_unkeyed(v: &[u8]) -> Result<Frame, String> {
    let (meta, pos) = parse(v)?;
    Ok(Frame { meta, payload: Bytes::copy_from_slice(&v[pos..]) })
}

/// Checks a value and reads its metadata; returns where the payload starts.
fn parse(v: &[u8]) -> Result<(FrameMeta, usize), String> {
    if v.len() < 34 {
        return Err(format!("value of {} bytes is too short", v.len()));
    }
    if v[0] != MAGIC || !(1..=VERSION).contains(&v[1]) {
        return Err(format!("unknown format {:#04x} v{}", v[0], v[1]));
    }
    let fields = if v[1] == 1 { 4 } else { 5 };
    let stored = u32::from_be_bytes(v[2..6].try_into().unwrap());
    let actual = crc32fast::hash(&v[6..]);
    if stored != actual {
        return Err(format!("checksum mismatch (stored {stored:08x}, computed {actual:08x})"));
    }
    let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().unwrap());
    let mut pos = 30;
    let mut strings = Vec::with_capacity(fields);
    for _ in 0..fields {
        let len = u16::from_be_bytes(v.get(pos..pos + 2).ok_or("truncated")?.try_into().unwrap()) as usize;
        let s = v.get(pos + 2..pos + 2 + len).ok_or("truncated")?;
        strings.push(String::from_utf8(s.to_vec()).map_err(|_| "text field is not UTF-8")?);
        pos += 2 + len;
    }
    let clock = match strings.get(4) {
        None => CaptureClock::Agent,
        Some(c) => CaptureClock::parse(c).ok_or_else(|| format!("unknown capture clock {c:?}"))?,
    };
    strings.truncate(4);
    let [device_id, camera_id, pixel_format, content_type]: [String; 4] = strings.try_into().unwrap();
    let meta = FrameMeta {
        device_id,
        camera_id,
        seq: u64_at(6),
        capture_ns: u64_at(14),
        width: u32_at(22),
        height: u32_at(26),
        pixel_format,
        content_type,
        clock,
    };
    meta.validate().map_err(|e| e.to_string())?;
    Ok((meta, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn frame(camera: &str, seq: u64, payload: &[u8]) -> Frame {
        Frame {
            meta: FrameMeta {
                device_id: "dev".into(),
                camera_id: camera.into(),
                seq,
                capture_ns: 123_456_789,
                width: 640,
                height: 480,
                pixel_format: "YUYV".into(),
                content_type: "image/jpeg".into(),
                clock: Default::default(),
            },
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn round_trip_and_key_order() {
        let f = frame("cam1", 77, b"\xff\xd8jpeg\xff\xd9");
        let k = SpoolKey::new("cam1", 77);
        assert_eq!(k.parts(), Some(("cam1", 77)));
        assert_eq!(decode(&k, &encode(&f)).unwrap(), f);
        assert!(SpoolKey::new("cam1", 255) < SpoolKey::new("cam1", 256), "numeric order");
        assert!(SpoolKey::new("cam1", u64::MAX) < SpoolKey::new("cam10", 0), "camera-major");
        assert_eq!(k.to_string(), "cam1#77");
    }

    #[test]
    fn the_capture_clock_round_trips_and_version_1_records_read_as_the_agents_clock() {
        let mut f = frame("cam1", 5, b"\xff\xd8x\xff\xd9");
        f.meta.clock = CaptureClock::Camera;
        let k = SpoolKey::new("cam1", 5);
        assert_eq!(decode(&k, &encode(&f)).unwrap().meta.clock, CaptureClock::Camera);
        // Version 1, as an older agent wrote it: no fifth string.
        let mut v1 = vec![MAGIC, 1, 0, 0, 0, 0];
        v1.extend_from_slice(&5u64.to_be_bytes());
        v1.extend_from_slice(&9u64.to_be_bytes());
        v1.extend_from_slice(&640u32.to_be_bytes());
        v1.extend_from_slice(&480u32.to_be_bytes());
        for s in ["dev", "cam1", "YUYV", "image/jpeg"] {
            v1.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v1.extend_from_slice(s.as_bytes());
        }
        v1.extend_from_slice(b"\xff\xd8x\xff\xd9");
        let crc = crc32fast::hash(&v1[6..]);
        v1[2..6].copy_from_slice(&crc.to_be_bytes());
        let old = decode(&k, &v1).unwrap();
        assert_eq!((old.meta.seq, old.meta.capture_ns, old.meta.clock), (5, 9, CaptureClock::Agent));
        assert_eq!(&old.payload[..], b"\xff\xd8x\xff\xd9");
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let f = frame("c", 1, &[7u8; 300]);
        let k = SpoolKey::new("c", 1);
        let good = encode(&f);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(decode(&k, &bad).is_err(), "flip at byte {i} went unnoticed");
        }
        assert!(decode(&k, &good[..good.len() / 2]).is_err());
        assert!(decode(&k, &[]).is_err());
        assert!(decode(&SpoolKey::new("other", 1), &good).unwrap_err().contains("key says"));
        assert!(decode(&SpoolKey::new("c", 2), &good).is_err());
    }
}
