//! Fuzz checks of framelink-agent: the spool record decoder and the config loader.
//!
//! Shared, by `#[path]`, between the cargo-fuzz targets (`fuzz/fuzz_targets/spool_record.rs`,
//! `agent_config.rs`) and the stable replay of the committed corpora
//! (`agent/tests/fuzz_corpus.rs`), so that the byte schemes and the properties live in one
//! place. A check never panics on any input unless a property of the library is broken.

use std::path::Path;

use bytes::Bytes;
use framelink_agent::config::AgentConfig;
use framelink_agent::frame::Frame;
use framelink_agent::spool::record::{self, SpoolKey};
use framelink_common::FrameMeta;
use framelink_common::config_file;

#[path = "kafka_files.rs"]
mod kafka_files;
#[path = "seed_files.rs"]
mod seed_files;
use seed_files::{Failure, LOAD_ERRORS_ARE_DETERMINISTIC, config_files};

/// Byte scheme of `spool_record`:
///
/// ```text
/// flags:u8  key_len:u8  key[key_len]  value...
/// ```
///
/// Missing bytes read as zero or empty. Flag bit 0 ("fix the checksum"): before decoding, the
/// value's CRC-32 field (bytes 2..6) is set to the CRC of bytes 6.. (when it has 6 bytes), so
/// that mutated values reach the structure behind the checksum; without it the decoder sees
/// the value as stored.
pub fn spool_record_input(data: &[u8]) -> (SpoolKey, Vec<u8>) {
    let flags = data.first().copied().unwrap_or(0);
    let key_len = data.get(1).copied().unwrap_or(0) as usize;
    let rest = data.get(2..).unwrap_or_default();
    let (key, value) = rest.split_at(key_len.min(rest.len()));
    let mut value = value.to_vec();
    if flags & 1 == 1 && value.len() >= 6 {
        let crc = crc32(&value[6..]);
        value[2..6].copy_from_slice(&crc.to_be_bytes());
    }
    (SpoolKey(key.to_vec()), value)
}

/// The inverse of [`spool_record_input`] (seeds).
pub fn spool_record_bytes(fix_checksum: bool, key: &SpoolKey, value: &[u8]) -> Vec<u8> {
    let mut out = vec![fix_checksum as u8, u8::try_from(key.0.len()).expect("short key")];
    out.extend_from_slice(&key.0);
    out.extend_from_slice(value);
    out
}

/// CRC-32 (IEEE), bitwise: the checksum the record format documents, computed independently
/// of the agent's (crc32fast) so a wrong checksum in the agent would show.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// `spool_record`: [`record::decode`], [`record::decode_owned`], [`record::decode_unkeyed`]
/// and [`SpoolKey::parts`] on any key and value. Properties:
/// - no panic; every key displays;
/// - a key's parts rebuild the same key;
/// - a value that decodes holds a frame the wire contract accepts, and re-encodes to exactly
///   the same bytes (a version-1 value: to the same frame);
/// - `decode` and `decode_owned` agree (same frame or same error), and succeed exactly when
///   the value decodes on its own and the key names its camera and sequence number.
pub fn spool_record(data: &[u8]) {
    let (key, value) = spool_record_input(data);
    let shown = key.to_string();
    let parts = key.parts();
    match parts {
        Some((camera, seq)) => assert_eq!(SpoolKey::new(camera, seq), key, "parts {camera:?}#{seq} of {shown}"),
        None => assert!(shown.starts_with("<malformed key"), "{shown}"),
    }

    let keyed = record::decode(&key, &value);
    let owned = record::decode_owned(&key, Bytes::copy_from_slice(&value));
    assert_eq!(keyed, owned, "decode and decode_owned disagree");
    let unkeyed = record::decode_unkeyed(&value);
    match &unkeyed {
        Ok(frame) => {
            frame.meta.validate().expect("a decoded frame satisfies the wire contract");
            if value[1] == record::VERSION {
                assert_eq!(record::encode(frame), value, "a decoded record re-encodes to the same bytes");
            } else {
                // An older format (version 1, before the capture clock) is rewritten in the current one.
                assert_eq!(record::decode_unkeyed(&record::encode(frame)).as_ref(), Ok(frame), "an older record re-encodes to the same frame");
            }
            let own_key = SpoolKey::new(&frame.meta.camera_id, frame.meta.seq);
            assert_eq!(own_key.parts(), Some((frame.meta.camera_id.as_str(), frame.meta.seq)));
            assert_eq!(record::decode(&own_key, &value).as_ref(), Ok(frame), "under its own key");
            let matches = parts == Some((frame.meta.camera_id.as_str(), frame.meta.seq));
            assert_eq!(keyed.is_ok(), matches, "decode under {shown}: {keyed:?}");
            if let Ok(k) = &keyed {
                assert_eq!(k, frame);
            }
        }
        Err(e) => assert_eq!(keyed.as_ref().err(), Some(e), "decode under {shown} of a value that does not decode"),
    }
}

/// Seeds: records as the agent spools them, made by its own synthetic source and JPEG
/// encoder and by [`record::encode`]: both camera ids of `configs/demo/agent.toml`, each
/// pixel format, an empty and a larger payload, a foreign key, a stale checksum.
pub fn spool_record_seeds() -> Vec<(String, Vec<u8>)> {
    use framelink_agent::encoder::{Encoder, EncoderConfig};
    use framelink_agent::frame::{Captured, PixelFormat};
    use framelink_agent::source::synthetic::Synthetic;

    let mut encoder = Encoder::new(EncoderConfig::default()).expect("encoder");
    let (w, h) = (32, 24);
    let capture_ns = 1_763_776_929_123_456_789;
    let jpeg = |n: u64, encoder: &mut Encoder| {
        let data = Synthetic::new(w, h, 10.0).render(n, capture_ns);
        let captured = Captured { capture_ns, width: w, height: h, stride: w as usize, format: PixelFormat::J420, source_format: "J420", data: Bytes::from(data), clock: Default::default() };
        encoder.encode(&captured).expect("encode").jpeg
    };
    let frame = |camera: &str, seq: u64, fmt: &str, payload: Bytes| Frame {
        meta: FrameMeta {
            device_id: "demo-device".into(),
            camera_id: camera.into(),
            seq,
            capture_ns,
            width: w,
            height: h,
            pixel_format: fmt.into(),
            content_type: framelink_common::wire::CONTENT_TYPE_JPEG.into(),
            clock: Default::default(),
        },
        payload,
    };
    let frames = [
        frame("cam0", 0, "RGB24", jpeg(0, &mut encoder)),
        frame("cam1", 4097, "YUYV", jpeg(1, &mut encoder)),
        frame("cam0", u64::MAX, "MJPG", Bytes::new()),
        frame("gate-east", 77, "PNG", Bytes::from(vec![0x5a; 1500])),
    ];
    let mut seeds = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let value = record::encode(f);
        let key = SpoolKey::new(&f.meta.camera_id, f.meta.seq);
        seeds.push((format!("record-{i}"), spool_record_bytes(false, &key, &value)));
        seeds.push((format!("record-{i}-fix-checksum"), spool_record_bytes(true, &key, &value)));
    }
    let value = record::encode(&frames[0]);
    seeds.push(("foreign-key".into(), spool_record_bytes(false, &SpoolKey::new("cam1", 0), &value)));
    let mut stale = value.clone();
    stale[10] ^= 1;
    seeds.push(("stale-checksum".into(), spool_record_bytes(false, &SpoolKey::new("cam0", 0), &stale)));
    seeds
}

/// Byte scheme of `agent_config`: the bytes are the text of an `agent.toml` (UTF-8; invalid
/// sequences are replaced, lossily).
pub fn config_text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// `agent_config`: [`config_file::from_toml_str`] into an [`AgentConfig`], then
/// [`AgentConfig::validate`] (the whole of `check-config` but the environment overrides).
/// Properties:
/// - no panic; every error displays;
/// - loading is deterministic: the same text loads and validates to the same config, or fails
///   validation with the same error (a load error: see `LOAD_ERRORS_ARE_DETERMINISTIC`);
/// - a config that validates gives frames and spool keys the rest of the agent can use: for
///   every camera, a frame of `<device.id>/<camera id>` satisfies the wire contract and the
///   camera's spool key splits back into its id.
pub fn agent_config(data: &[u8]) {
    let text = config_text(data);
    let load = || -> Result<Option<framelink_agent::config::Validated>, Failure> {
        let cfg: AgentConfig = config_file::from_toml_str(&text).map_err(|e| Failure::Load(e.to_string()))?;
        if !kafka_files::reads_only_plain_files(&cfg.kafka) {
            return Ok(None);
        }
        cfg.validate().map(Some).map_err(|e| Failure::Validate(format!("{e:#}")))
    };
    let show = |r: &Result<Option<framelink_agent::config::Validated>, Failure>| match r {
        Ok(v) => format!("{v:?}"),
        Err(Failure::Load(_)) if !LOAD_ERRORS_ARE_DETERMINISTIC => "load error".into(),
        Err(Failure::Load(e)) => format!("load error: {e}"),
        Err(Failure::Validate(e)) => format!("invalid: {e}"),
    };
    let first = load();
    assert_eq!(show(&first), show(&load()), "loading twice");
    let Ok(Some(validated)) = first else { return };
    let cfg = &validated.config;
    let mut ids = std::collections::HashSet::new();
    for (i, camera) in cfg.cameras.iter().enumerate() {
        assert!(ids.insert(&camera.id), "cameras[{i}].id {:?} twice", camera.id);
        let meta = FrameMeta {
            device_id: cfg.device.id.clone(),
            camera_id: camera.id.clone(),
            seq: 0,
            capture_ns: 0,
            width: 1,
            height: 1,
            pixel_format: "RGB24".into(),
            content_type: framelink_common::wire::CONTENT_TYPE_JPEG.into(),
            clock: Default::default(),
        };
        meta.validate().unwrap_or_else(|e| panic!("cameras[{i}] of a valid config: {e}"));
        let key = SpoolKey::new(&camera.id, 42);
        assert_eq!(key.parts(), Some((camera.id.as_str(), 42)), "cameras[{i}] spool key");
        let frame = Frame { meta: FrameMeta { seq: 42, ..meta }, payload: Bytes::new() };
        assert_eq!(record::decode(&key, &record::encode(&frame)).as_ref(), Ok(&frame), "cameras[{i}] spooled");
    }
    assert!(!validated.kafka.brokers.is_empty());
}

/// Seeds: every `agent.toml` under `configs/` (the shipped defaults and the examples), and
/// the smallest config that validates.
pub fn agent_config_seeds(repo: &Path) -> Vec<(String, Vec<u8>)> {
    let mut seeds = config_files(repo, "agent");
    seeds.push((
        "minimal".into(),
        b"[device]\nid = \"dev-1\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"\nsecurity_protocol = \"PLAINTEXT\"\n".to_vec(),
    ));
    seeds
}
