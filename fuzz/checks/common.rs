//! Fuzz checks of framelink-common: the wire contract's header parser.
//!
//! Shared, by `#[path]`, between the cargo-fuzz target (`fuzz/fuzz_targets/wire_headers.rs`)
//! and the stable replay of the committed corpus (`common/tests/fuzz_corpus.rs`), so that the
//! byte scheme and the properties live in one place. A check never panics on any input unless
//! a property of the library is broken.

use framelink_common::wire::{FrameMeta, HeaderError, dead_letter_header, header, result_header};
use rdkafka::message::Header;

/// Byte scheme of `wire_headers`: NUL-separated fields,
///
/// ```text
/// key NUL name NUL value NUL name NUL value ...
/// ```
///
/// - `key` is the record key; empty means a record without a key;
/// - `name` is a header name (Kafka header names are text: non-UTF-8 is replaced, lossily);
/// - `value` is a header value; the single byte `FF` (never valid UTF-8 on its own) means a
///   header without a value (null), and so does a last name with no value after it.
pub fn wire_headers_input(data: &[u8]) -> (Option<&[u8]>, Vec<(String, Option<&[u8]>)>) {
    let mut fields = data.split(|&b| b == 0);
    let key = fields.next().filter(|k| !k.is_empty());
    let mut pairs = Vec::new();
    while let Some(name) = fields.next() {
        let value = fields.next().filter(|v| *v != [0xFF]);
        pairs.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    (key, pairs)
}

/// The inverse of [`wire_headers_input`] (seeds): `None` key is written as an empty key.
pub fn wire_headers_bytes(key: Option<&[u8]>, pairs: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut out = key.unwrap_or_default().to_vec();
    for (name, value) in pairs {
        out.push(0);
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.unwrap_or(&[0xFF]));
    }
    out
}

fn parse(pairs: &[(String, Option<&[u8]>)]) -> Result<FrameMeta, HeaderError> {
    FrameMeta::from_header_pairs(pairs.iter().map(|(k, v)| (k.as_str(), *v)))
}

/// `wire_headers`: [`FrameMeta::from_header_pairs`] and [`FrameMeta::check_key`] on any header
/// list. Properties:
/// - no panic, and every error displays;
/// - an error that names a header names a contract header, and `Duplicate` is only reported
///   for a header that appears more than once;
/// - what is accepted validates, has every contract header exactly once with a value, and
///   re-serialises (as pairs and as rdkafka headers) to headers that parse to the same frame;
/// - the worker's result and dead-letter headers, added to accepted headers, change nothing;
/// - `check_key` accepts exactly the key `<device>/<camera>`.
pub fn wire_headers(data: &[u8]) {
    let (key, pairs) = wire_headers_input(data);
    let parsed = parse(&pairs);
    let count = |name: &str| pairs.iter().filter(|(k, _)| k == name).count();
    let meta = match parsed {
        Err(e) => {
            let _ = e.to_string();
            match e {
                HeaderError::Missing { name } => assert!(header::ALL.contains(&name), "{e:?}"),
                HeaderError::NotUtf8 { name } | HeaderError::Invalid { name, .. } => {
                    assert!(header::ALL.contains(&name) || name == header::CLOCK, "{e:?}");
                }
                HeaderError::Duplicate { name } => assert!(count(name) > 1, "{e:?}"),
                HeaderError::UnsupportedVersion { found } => assert_ne!(found, framelink_common::wire::WIRE_VERSION),
                HeaderError::KeyMismatch { .. } => panic!("the parser reported a key mismatch: {e:?}"),
            }
            return;
        }
        Ok(meta) => meta,
    };
    meta.validate().expect("an accepted frame validates");
    for name in header::ALL {
        assert_eq!(count(name), 1, "{name} accepted {} times", count(name));
        assert!(pairs.iter().any(|(k, v)| k == name && v.is_some()), "{name} accepted without a value");
    }

    let again = meta.to_header_pairs();
    let back = FrameMeta::from_header_pairs(again.iter().map(|(k, v)| (*k, Some(v.as_bytes()))));
    assert_eq!(back.as_ref(), Ok(&meta), "re-serialised pairs");
    let kafka = meta.to_kafka_headers();
    assert_eq!(FrameMeta::from_kafka_headers(&kafka).as_ref(), Ok(&meta), "re-serialised rdkafka headers");

    // A result (frame headers + result headers) and a dead letter (original headers + the
    // dead-letter headers) parse to the same frame; their values come from the input.
    let values: Vec<&[u8]> = pairs.iter().filter_map(|(_, v)| *v).collect();
    let mut extra = kafka;
    for (i, name) in result_header::ALL.iter().chain(&dead_letter_header::ALL).enumerate() {
        let value = if values.is_empty() { None } else { Some(values[i % values.len()]) };
        extra = extra.insert(Header { key: name, value });
    }
    assert_eq!(FrameMeta::from_kafka_headers(&extra).as_ref(), Ok(&meta), "with result and dead-letter headers");
    let mut dead_letter = pairs.clone();
    dead_letter.extend(dead_letter_header::ALL.iter().map(|n| (n.to_string(), Some(&b"x"[..]))));
    assert_eq!(parse(&dead_letter).as_ref(), Ok(&meta), "a dead letter's headers");

    let expected = meta.key();
    assert!(meta.check_key(Some(expected.as_bytes())).is_ok());
    assert_eq!(meta.check_key(key).is_ok(), key == Some(expected.as_bytes()), "check_key({key:?}) against {expected:?}");
}

/// Seeds: header sets as the agent writes them (every camera of the repository's configs),
/// a result's and a dead letter's headers as the worker writes them, a plain JPEG record
/// without contract headers, and the classic malformed ones.
pub fn wire_headers_seeds() -> Vec<(String, Vec<u8>)> {
    fn as_bytes<'a>(p: &'a [(&'a str, String)]) -> Vec<(&'a str, Option<&'a [u8]>)> {
        p.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect()
    }
    let frame = |device: &str, camera: &str, seq: u64, w: u32, h: u32, fmt: &str| FrameMeta {
        device_id: device.into(),
        camera_id: camera.into(),
        seq,
        capture_ns: 1_763_776_929_123_456_789,
        width: w,
        height: h,
        pixel_format: fmt.into(),
        content_type: framelink_common::wire::CONTENT_TYPE_JPEG.into(),
        clock: Default::default(),
    };
    let metas = [
        frame("demo-device", "cam0", 0, 1280, 720, "RGB24"),
        frame("site7-gate", "gate-east", 184_467, 1920, 1080, "YUYV"),
        frame("drone-17", "nadir", u64::MAX, 4056, 3040, "MJPG"),
    ];
    let mut seeds = Vec::new();
    for (i, m) in metas.iter().enumerate() {
        let key = m.key();
        let pairs: Vec<(&str, String)> = m.to_header_pairs();
        seeds.push((format!("frame-{i}"), wire_headers_bytes(Some(key.as_bytes()), &as_bytes(&pairs))));
        // A result: the worker's headers after the frame's (the frame headers describe the result).
        let mut result = pairs.clone();
        for (k, v) in [
            (result_header::SOURCE_WIDTH, m.width.to_string()),
            (result_header::SOURCE_HEIGHT, m.height.to_string()),
            (result_header::PIPELINE, "resize:640x360,sobel".to_owned()),
            (result_header::WORKER, "demo-worker".to_owned()),
            (result_header::PROCESSING_US, "5321".to_owned()),
            (result_header::LATENCY_MS, "41".to_owned()),
        ] {
            result.push((k, v));
        }
        seeds.push((format!("result-{i}"), wire_headers_bytes(Some(key.as_bytes()), &as_bytes(&result))));
        // A dead letter: foreign headers first, then the frame's, then the dead-letter headers.
        let mut dead = vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned())];
        dead.extend(pairs.iter().cloned());
        for (k, v) in [
            (dead_letter_header::ERROR, "corrupt_jpeg".to_owned()),
            (dead_letter_header::ERROR_DETAIL, "corrupt or truncated JPEG: Premature end of JPEG file".to_owned()),
            (dead_letter_header::SOURCE, "frames/3/1842".to_owned()),
            (dead_letter_header::WORKER, "worker-a".to_owned()),
        ] {
            dead.push((k, v));
        }
        seeds.push((format!("dead-letter-{i}"), wire_headers_bytes(Some(b"other/key"), &as_bytes(&dead))));
    }
    let m = &metas[0];
    let pairs = m.to_header_pairs();
    let mut dup: Vec<(&str, Option<&[u8]>)> = pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect();
    dup.push((header::SEQ, Some(b"43")));
    seeds.push(("duplicate-seq".into(), wire_headers_bytes(Some(m.key().as_bytes()), &dup)));
    let mut null: Vec<(&str, Option<&[u8]>)> = pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect();
    null[3].1 = None;
    null[7].1 = Some(&[0xc3, 0x28]);
    seeds.push(("null-and-not-utf8".into(), wire_headers_bytes(None, &null)));
    seeds.push(("plain-jpeg-record".into(), wire_headers_bytes(Some(b"cam-7"), &[("content-type", Some(b"image/jpeg"))])));
    seeds
}
