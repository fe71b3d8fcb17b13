//! The wire contract between the edge agent and the cloud workers, as code.
//!
//! A frame is one Kafka record that any Kafka client can read without framelink code:
//! - key: `<device_id>/<camera_id>`, so one camera's frames stay on one partition, in order;
//! - value: the encoded image bytes as they are (JPEG), no envelope;
//! - headers (UTF-8 text): the names in [`header`], version [`WIRE_VERSION`].
//!
//! Parsing is strict about the framelink headers it needs (a missing, duplicated, non-UTF-8 or
//! malformed header is an error that names the header) and lenient about everything else:
//! unknown headers are ignored, so producers may add their own and later versions may add
//! optional ones without breaking older workers. A change to the meaning of an existing header
//! bumps [`WIRE_VERSION`]; readers refuse versions they do not know.

use rdkafka::message::{Header, Headers, OwnedHeaders};

/// The version of the contract written by this build, sent in [`header::VERSION`].
pub const WIRE_VERSION: u32 = 1;

/// Content type of JPEG frames.
pub const CONTENT_TYPE_JPEG: &str = "image/jpeg";

/// Longest device or camera id accepted (bytes).
pub const MAX_ID_LEN: usize = 128;

/// Header names of the contract. All values are UTF-8 text; numbers are decimal.
/// The default topic names and consumer group every component agrees on (each is a config
/// key of the component that uses it).
pub mod defaults {
    /// Frames from the agents (`forwarder.topic`, the workers' `consumer.topics`).
    pub const FRAMES_TOPIC: &str = "frames";
    /// Result images (`output.results_topic`).
    pub const RESULTS_TOPIC: &str = "frames.processed";
    /// Motion events (`output.events_topic`).
    pub const EVENTS_TOPIC: &str = "frames.events";
    /// Dead letters (`output.dlq_topic`).
    pub const DLQ_TOPIC: &str = "frames.dlq";
    /// The workers' consumer group (`consumer.group_id`).
    pub const WORKER_GROUP: &str = "framelink-workers";
    /// Large-image jobs: tiles to process (console → workers).
    pub const TILES_TOPIC: &str = "framelink.tiles";
    /// Large-image jobs: processed tiles (workers → console).
    pub const TILE_RESULTS_TOPIC: &str = "framelink.tiles.results";
    /// Large-image jobs: each job's state, compacted (console → console after a restart, workers).
    pub const JOBS_TOPIC: &str = "framelink.jobs";
}

pub mod header {
    /// Contract version, `1`.
    pub const VERSION: &str = "framelink-version";
    /// Device id, e.g. `site7-gate`.
    pub const DEVICE: &str = "framelink-device";
    /// Camera id, unique within the device, e.g. `cam0`.
    pub const CAMERA: &str = "framelink-camera";
    /// Per-camera sequence number; strictly increasing, also across agent restarts.
    pub const SEQ: &str = "framelink-seq";
    /// Capture time, nanoseconds since the Unix epoch (UTC).
    pub const CAPTURE_NS: &str = "framelink-capture-ns";
    /// Image width in pixels.
    pub const WIDTH: &str = "framelink-width";
    /// Image height in pixels.
    pub const HEIGHT: &str = "framelink-height";
    /// Pixel format the camera delivered, e.g. `YUYV`, `MJPG`, `RGB24` (before encoding).
    pub const PIXEL_FORMAT: &str = "framelink-pixel-format";
    /// MIME type of the record value, e.g. `image/jpeg`.
    pub const CONTENT_TYPE: &str = "content-type";

    /// Optional: which clock `framelink-capture-ns` was read from — `camera` (the camera's own
    /// wall clock, e.g. an RTSP camera's RTCP sender reports) or `agent` (the agent's clock when
    /// the frame arrived). Absent (records of older agents): `agent`.
    pub const CLOCK: &str = "framelink-clock";

    /// Whether `name` is a header [`super::FrameMeta`] writes ([`ALL`] and [`CLOCK`]): a
    /// writer that copies a record's other headers must leave these out.
    pub fn is_frame_header(name: &str) -> bool {
        ALL.contains(&name) || name == CLOCK
    }

    /// Every header [`super::FrameMeta`] must have, in the order it writes them (then [`CLOCK`]).
    pub const ALL: [&str; 9] = [
        VERSION,
        DEVICE,
        CAMERA,
        SEQ,
        CAPTURE_NS,
        WIDTH,
        HEIGHT,
        PIXEL_FORMAT,
        CONTENT_TYPE,
    ];
}

/// Headers the worker adds to a result record and to a motion event record, after the frame
/// headers of [`header`] (which describe the result image).
pub mod result_header {
    /// Width of the frame the result was made from.
    pub const SOURCE_WIDTH: &str = "framelink-source-width";
    /// Height of the frame the result was made from.
    pub const SOURCE_HEIGHT: &str = "framelink-source-height";
    /// The op chain that made it, e.g. `resize:640x360,grayscale`.
    pub const PIPELINE: &str = "framelink-pipeline";
    /// The worker that made it (`worker.id`, else its host name).
    pub const WORKER: &str = "framelink-worker";
    /// Time spent processing the frame, microseconds.
    pub const PROCESSING_US: &str = "framelink-processing-us";
    /// Capture to result, milliseconds (the worker's clock against the camera's).
    pub const LATENCY_MS: &str = "framelink-latency-ms";

    /// Every header the worker adds to a result, in the order it adds them.
    pub const ALL: [&str; 6] = [SOURCE_WIDTH, SOURCE_HEIGHT, PIPELINE, WORKER, PROCESSING_US, LATENCY_MS];
}

/// Headers the worker adds to a dead letter, after the original record's headers.
pub mod dead_letter_header {
    /// Why, one of [`super::DeadLetterReason`] (stable; also the metric label).
    pub const ERROR: &str = "framelink-error";
    /// What exactly, for a person (the error text, the header or limit involved).
    pub const ERROR_DETAIL: &str = "framelink-error-detail";
    /// Where the record came from: `topic/partition/offset`.
    pub const SOURCE: &str = "framelink-source";
    /// The worker that dead-lettered it.
    pub const WORKER: &str = super::result_header::WORKER;

    /// Every header the worker adds to a dead letter, in the order it adds them.
    pub const ALL: [&str; 4] = [ERROR, ERROR_DETAIL, SOURCE, WORKER];
}

/// Why a record went to the dead-letter topic: the value of its
/// [`dead_letter_header::ERROR`] header and the `reason` label of the worker's
/// `dead_letters` metric. The strings are part of the contract (consumers of the dead-letter
/// topic match on them); new reasons may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// The record has no value.
    Empty,
    /// The value is not a JPEG.
    NotJpeg,
    /// A truncated or corrupt JPEG (or one with too many progressive scans).
    CorruptJpeg,
    /// The image (or what its headers claim) has more pixels than `worker.max_pixels`.
    TooLarge,
    /// A framelink header is missing, duplicated or malformed.
    BadHeaders,
    /// `content-type` is not `image/jpeg`.
    UnsupportedContentType,
    /// An op could not run on this image (e.g. a crop outside it).
    OpFailed,
    /// The result could not be encoded.
    EncodeFailed,
    /// The result or event is larger than its topic's `max.message.bytes`.
    ResultTooLarge,
    /// Kafka refused the result or event (topic missing, ACL, limit lowered).
    OutputRefused,
    /// Processing panicked.
    Panic,
    /// A `detect:` op's model could not run on the frame (the detail says why).
    ModelFailed,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 12] = [
        Self::Empty,
        Self::NotJpeg,
        Self::CorruptJpeg,
        Self::TooLarge,
        Self::BadHeaders,
        Self::UnsupportedContentType,
        Self::OpFailed,
        Self::EncodeFailed,
        Self::ResultTooLarge,
        Self::OutputRefused,
        Self::Panic,
        Self::ModelFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::NotJpeg => "not_jpeg",
            Self::CorruptJpeg => "corrupt_jpeg",
            Self::TooLarge => "too_large",
            Self::BadHeaders => "bad_headers",
            Self::UnsupportedContentType => "unsupported_content_type",
            Self::OpFailed => "op_failed",
            Self::EncodeFailed => "encode_failed",
            Self::ResultTooLarge => "result_too_large",
            Self::OutputRefused => "output_refused",
            Self::Panic => "panic",
            Self::ModelFailed => "model_failed",
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a record's headers (or key) do not satisfy the contract. Each variant names the header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header `{name}` is missing")]
    Missing { name: &'static str },
    #[error("header `{name}` appears more than once")]
    Duplicate { name: &'static str },
    #[error("header `{name}` is not UTF-8")]
    NotUtf8 { name: &'static str },
    #[error("header `{name}` has invalid value {value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("header `{}` is {found}, this build reads version {WIRE_VERSION}", header::VERSION)]
    UnsupportedVersion { found: u32 },
    #[error("record key {key:?} does not match the headers' `<device>/<camera>` = {expected:?}")]
    KeyMismatch { key: String, expected: String },
}

/// Which clock a capture time was read from ([`header::CLOCK`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CaptureClock {
    /// The agent's clock when the frame arrived (every source but a camera that sends its own).
    #[default]
    Agent,
    /// The camera's wall clock (RTSP: RTP timestamps mapped through RTCP sender reports).
    Camera,
}

impl CaptureClock {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Camera => "camera",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Self::Agent),
            "camera" => Some(Self::Camera),
            _ => None,
        }
    }
}

/// The typed form of a frame's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameMeta {
    pub device_id: String,
    pub camera_id: String,
    /// Per-camera sequence number, strictly increasing across agent restarts.
    pub seq: u64,
    /// Capture time, nanoseconds since the Unix epoch.
    pub capture_ns: u64,
    pub width: u32,
    pub height: u32,
    /// The pixel format the camera gave (`YUYV`, `MJPG`, ...), before any encoding.
    pub pixel_format: String,
    /// MIME type of the record value.
    pub content_type: String,
    /// Where `capture_ns` comes from ([`header::CLOCK`]).
    pub clock: CaptureClock,
}

impl FrameMeta {
    /// The record key: `<device_id>/<camera_id>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.device_id, self.camera_id)
    }

    /// Checks the values a writer controls, naming the header that is wrong.
    pub fn validate(&self) -> Result<(), HeaderError> {
        check_id(header::DEVICE, &self.device_id)?;
        check_id(header::CAMERA, &self.camera_id)?;
        check_dimension(header::WIDTH, self.width)?;
        check_dimension(header::HEIGHT, self.height)?;
        check_token(header::PIXEL_FORMAT, &self.pixel_format, 32)?;
        check_token(header::CONTENT_TYPE, &self.content_type, 128)?;
        Ok(())
    }

    /// The headers as (name, UTF-8 value) pairs, in [`header::ALL`] order, then [`header::CLOCK`].
    pub fn to_header_pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            (header::VERSION, WIRE_VERSION.to_string()),
            (header::DEVICE, self.device_id.clone()),
            (header::CAMERA, self.camera_id.clone()),
            (header::SEQ, self.seq.to_string()),
            (header::CAPTURE_NS, self.capture_ns.to_string()),
            (header::WIDTH, self.width.to_string()),
            (header::HEIGHT, self.height.to_string()),
            (header::PIXEL_FORMAT, self.pixel_format.clone()),
            (header::CONTENT_TYPE, self.content_type.clone()),
            (header::CLOCK, self.clock.as_str().to_owned()),
        ]
    }

    /// The headers for an rdkafka record.
    pub fn to_kafka_headers(&self) -> OwnedHeaders {
        self.append_to(OwnedHeaders::new_with_capacity(header::ALL.len()))
    }

    /// Appends the contract headers to `headers` (results carry the source's headers plus their own).
    pub fn append_to(&self, mut headers: OwnedHeaders) -> OwnedHeaders {
        for (name, value) in self.to_header_pairs() {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        headers
    }

    /// Parses the contract headers from (name, value) pairs; other headers are ignored.
    pub fn from_header_pairs<'a, I>(pairs: I) -> Result<Self, HeaderError>
    where
        I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    {
        let mut found: [Option<Option<&'a [u8]>>; 9] = [None; 9];
        let mut clock: Option<Option<&'a [u8]>> = None;
        for (name, value) in pairs {
            if name == header::CLOCK {
                if clock.is_some() {
                    return Err(HeaderError::Duplicate { name: header::CLOCK });
                }
                clock = Some(value);
            } else if let Some(i) = header::ALL.iter().position(|h| *h == name) {
                if found[i].is_some() {
                    return Err(HeaderError::Duplicate {
                        name: header::ALL[i],
                    });
                }
                found[i] = Some(value);
            }
        }
        let text = |i: usize| -> Result<&'a str, HeaderError> {
            let name = header::ALL[i];
            match found[i] {
                None | Some(None) => Err(HeaderError::Missing { name }),
                Some(Some(bytes)) => {
                    std::str::from_utf8(bytes).map_err(|_| HeaderError::NotUtf8 { name })
                }
            }
        };
        let version: u32 = parse_number(header::VERSION, text(0)?)?;
        if version != WIRE_VERSION {
            return Err(HeaderError::UnsupportedVersion { found: version });
        }
        let meta = FrameMeta {
            device_id: text(1)?.to_owned(),
            camera_id: text(2)?.to_owned(),
            seq: parse_number(header::SEQ, text(3)?)?,
            capture_ns: parse_number(header::CAPTURE_NS, text(4)?)?,
            width: parse_number(header::WIDTH, text(5)?)?,
            height: parse_number(header::HEIGHT, text(6)?)?,
            pixel_format: text(7)?.to_owned(),
            content_type: text(8)?.to_owned(),
            clock: match clock {
                None | Some(None) => CaptureClock::Agent,
                Some(Some(bytes)) => {
                    let v = std::str::from_utf8(bytes).map_err(|_| HeaderError::NotUtf8 { name: header::CLOCK })?;
                    CaptureClock::parse(v).ok_or_else(|| invalid(header::CLOCK, v, "expected `camera` or `agent`"))?
                }
            },
        };
        meta.validate()?;
        Ok(meta)
    }

    /// Parses the contract headers of an rdkafka record.
    pub fn from_kafka_headers<H: Headers>(headers: &H) -> Result<Self, HeaderError> {
        Self::from_header_pairs(headers.iter().map(|h| (h.key, h.value)))
    }

    /// Checks that a record key agrees with these headers.
    pub fn check_key(&self, key: Option<&[u8]>) -> Result<(), HeaderError> {
        let expected = self.key();
        if key == Some(expected.as_bytes()) {
            Ok(())
        } else {
            Err(HeaderError::KeyMismatch {
                key: key
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_else(|| "<none>".into()),
                expected,
            })
        }
    }
}

fn invalid(name: &'static str, value: &str, reason: impl Into<String>) -> HeaderError {
    HeaderError::Invalid {
        name,
        value: value.chars().take(64).collect(),
        reason: reason.into(),
    }
}

fn parse_number<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T, HeaderError>
where
    T::Err: std::fmt::Display,
{
    // `str::parse` accepts a leading `+`; the contract is plain decimal digits.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(name, value, "expected a decimal number"));
    }
    value.parse().map_err(|e: T::Err| invalid(name, value, e.to_string()))
}

/// Checks a device or camera id (`name` is the header it travels in): 1 to [`MAX_ID_LEN`]
/// bytes, no `/`, no control characters.
pub fn check_id(name: &'static str, value: &str) -> Result<(), HeaderError> {
    if value.is_empty() {
        return Err(invalid(name, value, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(invalid(name, value, format!("longer than {MAX_ID_LEN} bytes")));
    }
    if value.contains('/') {
        return Err(invalid(name, value, "must not contain `/` (it separates key parts)"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(name, value, "must not contain control characters"));
    }
    Ok(())
}

fn check_dimension(name: &'static str, value: u32) -> Result<(), HeaderError> {
    if value == 0 {
        return Err(invalid(name, "0", "must be at least 1"));
    }
    Ok(())
}

fn check_token(name: &'static str, value: &str, max: usize) -> Result<(), HeaderError> {
    if value.is_empty() || value.len() > max {
        return Err(invalid(name, value, format!("must be 1 to {max} bytes")));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(name, value, "must be printable ASCII without spaces"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FrameMeta {
        FrameMeta {
            device_id: "site7-gate".into(),
            camera_id: "cam0".into(),
            seq: 42,
            capture_ns: 1_763_776_929_123_456_789,
            width: 1920,
            height: 1080,
            pixel_format: "YUYV".into(),
            content_type: CONTENT_TYPE_JPEG.into(),
            clock: CaptureClock::Camera,
        }
    }

    fn pairs(meta: &FrameMeta) -> Vec<(&'static str, Vec<u8>)> {
        meta.to_header_pairs()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect()
    }

    fn parse(p: &[(&str, Vec<u8>)]) -> Result<FrameMeta, HeaderError> {
        FrameMeta::from_header_pairs(p.iter().map(|(k, v)| (*k, Some(v.as_slice()))))
    }

    fn with(name: &str, value: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
        let mut p = pairs(&sample());
        p.iter_mut().find(|(k, _)| *k == name).unwrap().1 = value.to_vec();
        p
    }

    #[test]
    fn round_trips_through_pairs_and_kafka_headers() {
        let meta = sample();
        assert_eq!(parse(&pairs(&meta)).unwrap(), meta);
        let owned = meta.to_kafka_headers();
        assert_eq!(owned.count(), 10);
        assert_eq!(FrameMeta::from_kafka_headers(&owned).unwrap(), meta);
        assert_eq!(meta.key(), "site7-gate/cam0");
        meta.check_key(Some(b"site7-gate/cam0")).unwrap();
    }

    #[test]
    fn header_values_are_plain_text() {
        let p = sample().to_header_pairs();
        assert_eq!(p[0], ("framelink-version", "1".to_string()));
        assert_eq!(p[3], ("framelink-seq", "42".to_string()));
        assert_eq!(p[8], ("content-type", "image/jpeg".to_string()));
    }

    #[test]
    fn the_clock_header_is_optional_and_checked() {
        let without: Vec<_> = pairs(&sample()).into_iter().filter(|(k, _)| *k != header::CLOCK).collect();
        assert_eq!(parse(&without).unwrap().clock, CaptureClock::Agent, "absent: the agent's clock");
        assert_eq!(parse(&with(header::CLOCK, b"agent")).unwrap().clock, CaptureClock::Agent);
        assert!(matches!(parse(&with(header::CLOCK, b"gps")), Err(HeaderError::Invalid { name: header::CLOCK, .. })));
        let mut twice = pairs(&sample());
        twice.push((header::CLOCK, b"camera".to_vec()));
        assert_eq!(parse(&twice), Err(HeaderError::Duplicate { name: header::CLOCK }));
    }

    #[test]
    fn unknown_headers_are_ignored() {
        let mut p = pairs(&sample());
        p.insert(0, ("traceparent", b"00-abc".to_vec()));
        p.push(("x-site", vec![0xff, 0xfe]));
        assert_eq!(parse(&p).unwrap(), sample());
    }

    #[test]
    fn missing_header_is_named() {
        for name in header::ALL {
            let p: Vec<_> = pairs(&sample()).into_iter().filter(|(k, _)| *k != name).collect();
            assert_eq!(parse(&p), Err(HeaderError::Missing { name }), "{name}");
        }
        let mut p = pairs(&sample());
        let null: Vec<(&str, Option<&[u8]>)> = p
            .iter_mut()
            .map(|(k, v)| (*k, if *k == header::SEQ { None } else { Some(v.as_slice()) }))
            .collect();
        assert_eq!(
            FrameMeta::from_header_pairs(null),
            Err(HeaderError::Missing { name: header::SEQ })
        );
    }

    #[test]
    fn malformed_values_name_the_header() {
        let cases: [(&str, &[u8]); 10] = [
            (header::SEQ, b"-1"),
            (header::SEQ, b"+5"),
            (header::SEQ, b"99999999999999999999999"),
            (header::CAPTURE_NS, b"yesterday"),
            (header::WIDTH, b"0"),
            (header::HEIGHT, b""),
            (header::DEVICE, b"a/b"),
            (header::CAMERA, b""),
            (header::PIXEL_FORMAT, b"YU YV"),
            (header::CONTENT_TYPE, b"image/jpeg\n"),
        ];
        for (name, value) in cases {
            match parse(&with(name, value)) {
                Err(HeaderError::Invalid { name: got, .. }) => assert_eq!(got, name, "{value:?}"),
                other => panic!("{name}={value:?}: expected Invalid, got {other:?}"),
            }
        }
        assert_eq!(
            parse(&with(header::WIDTH, &[0xc3, 0x28])),
            Err(HeaderError::NotUtf8 { name: header::WIDTH })
        );
    }

    #[test]
    fn duplicate_and_version_errors() {
        let mut p = pairs(&sample());
        p.push((header::SEQ, b"43".to_vec()));
        assert_eq!(parse(&p), Err(HeaderError::Duplicate { name: header::SEQ }));
        assert_eq!(
            parse(&with(header::VERSION, b"2")),
            Err(HeaderError::UnsupportedVersion { found: 2 })
        );
        let msg = parse(&with(header::WIDTH, b"wide")).unwrap_err().to_string();
        assert!(msg.contains("framelink-width") && msg.contains("wide"), "{msg}");
    }

    #[test]
    fn key_must_match_headers() {
        let err = sample().check_key(Some(b"other/cam0")).unwrap_err();
        assert!(matches!(err, HeaderError::KeyMismatch { .. }));
        assert!(sample().check_key(None).is_err());
    }

    #[test]
    fn dead_letter_reasons_are_distinct_snake_case_and_result_headers_do_not_collide() {
        let names: std::collections::HashSet<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DeadLetterReason::ALL.len());
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        for h in result_header::ALL.iter().chain(&dead_letter_header::ALL) {
            assert!(!header::ALL.contains(h), "{h} is a frame header");
        }
    }
}

/// Property tests: the contract round-trips for every valid frame, and no header list, however
/// malformed, makes the parser panic or accept something it would not write.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> impl Strategy<Value = String> {
        // Any non-control characters but `/`, 1 to MAX_ID_LEN bytes.
        "[^/\\p{Cc}]{1,40}".prop_filter("at most MAX_ID_LEN bytes", |s| s.len() <= MAX_ID_LEN)
    }

    fn token(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(0x21u8..0x7f, 1..=max).prop_map(|b| String::from_utf8(b).unwrap())
    }

    fn meta() -> impl Strategy<Value = FrameMeta> {
        let clock = prop_oneof![Just(CaptureClock::Agent), Just(CaptureClock::Camera)];
        (id(), id(), any::<u64>(), any::<u64>(), 1..=u32::MAX, 1..=u32::MAX, token(32), token(128), clock).prop_map(|(device_id, camera_id, seq, capture_ns, width, height, pixel_format, content_type, clock)| FrameMeta { device_id, camera_id, seq, capture_ns, width, height, pixel_format, content_type, clock })
    }

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![proptest::sample::select(header::ALL.to_vec()).prop_map(str::to_owned), Just(header::CLOCK.to_owned()), "[a-z-]{1,20}"]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_valid_frame_round_trips_among_foreign_headers(m in meta(), foreign in proptest::collection::vec(("x-[a-z]{1,8}", any::<Vec<u8>>()), 0..4), at in any::<proptest::sample::Index>()) {
            prop_assert!(m.validate().is_ok());
            let mut pairs: Vec<(String, Vec<u8>)> = m.to_header_pairs().into_iter().map(|(k, v)| (k.to_owned(), v.into_bytes())).collect();
            let i = at.index(pairs.len() + 1);
            for (k, v) in foreign {
                pairs.insert(i, (k, v));
            }
            let back = FrameMeta::from_header_pairs(pairs.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice())))).unwrap();
            prop_assert_eq!(&back, &m);
            prop_assert!(back.check_key(Some(m.key().as_bytes())).is_ok());
        }

        #[test]
        fn a_duplicated_contract_header_is_refused_by_name(m in meta(), which in 0..header::ALL.len()) {
            let mut pairs = m.to_header_pairs();
            pairs.push(pairs[which].clone());
            let err = FrameMeta::from_header_pairs(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap_err();
            prop_assert_eq!(err, HeaderError::Duplicate { name: header::ALL[which] });
        }

        #[test]
        fn any_header_list_parses_without_panic_and_what_is_accepted_is_valid(pairs in proptest::collection::vec((header_name(), proptest::option::of(any::<Vec<u8>>())), 0..14)) {
            if let Ok(m) = FrameMeta::from_header_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_deref()))) {
                prop_assert!(m.validate().is_ok());
                let again = m.to_header_pairs();
                prop_assert_eq!(FrameMeta::from_header_pairs(again.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap(), m);
            }
        }
    }
}

