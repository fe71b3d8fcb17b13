//! The records a frame turns into: the output record type, the result / event headers, the
//! dead letter, and the size check against each output topic's limit. Pure data building: no
//! Kafka client here, so all of it is unit-tested without a broker.

use std::sync::Arc;

use framelink_common::wire::{DeadLetterReason, dead_letter_header, header, result_header};
use rdkafka::message::{Header, Headers, OwnedHeaders};

use super::limits::TopicLimits;
use crate::metrics::Metrics;
use crate::process::{Processed, Rejected};
use crate::topic_partition::TopicPartition;

/// What an output record is (the `kind` label of the outputs metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    Result,
    Event,
    DeadLetter,
}

impl OutputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Result => "result",
            OutputKind::Event => "event",
            OutputKind::DeadLetter => "dead_letter",
        }
    }
}

/// A record consumed from the frames topic, handed to a processing thread. It stays alive
/// (shared) until its outputs are acknowledged, so a refused output can still dead-letter it.
#[derive(Debug)]
pub struct Job {
    pub tp: TopicPartition,
    pub offset: i64,
    /// The tracker's epoch when it was taken (exactly-once: stale after an abort).
    pub epoch: u64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp_ms: Option<i64>,
}

impl Job {
    /// `topic/partition/offset`, the `framelink-source` header of a dead letter.
    pub fn source(&self) -> String {
        format!("{}/{}/{}", self.tp.topic, self.tp.partition, self.offset)
    }
}

/// One output record.
#[derive(Clone)]
pub struct OutRecord {
    pub topic: String,
    pub kind: OutputKind,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: OwnedHeaders,
}

/// Bytes of a record batch (v2) holding only this record, uncompressed: the batch header (61),
/// the record's own framing (at most 5 varints of 5 bytes + attributes) and each header's two
/// length varints. The broker checks `max.message.bytes` against the (compressed) batch, so this
/// is an upper bound for one record; JPEG payloads do not compress anyway.
pub fn record_size(key: Option<&[u8]>, payload: &[u8], headers: &OwnedHeaders) -> usize {
    let headers: usize = headers.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 10).sum();
    61 + 26 + key.map_or(0, <[u8]>::len) + payload.len() + headers
}

impl OutRecord {
    pub fn size(&self) -> usize {
        record_size(self.key.as_deref(), &self.payload, &self.headers)
    }
}

/// The dead letter for `job`: the original frame (key, bytes, headers) plus why.
pub fn dead_letter(job: &Job, dlq_topic: &str, reason: DeadLetterReason, detail: &str, worker: &str) -> OutRecord {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &job.headers {
        headers = headers.insert(Header { key: k, value: v.as_deref() });
    }
    let src = job.source();
    for (k, v) in [(dead_letter_header::ERROR, reason.as_str()), (dead_letter_header::ERROR_DETAIL, detail), (dead_letter_header::SOURCE, src.as_str()), (dead_letter_header::WORKER, worker)] {
        headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    OutRecord { topic: dlq_topic.to_owned(), kind: OutputKind::DeadLetter, key: job.key.clone(), payload: job.payload.clone().unwrap_or_default(), headers }
}

/// What a processing thread needs besides the frame: where outputs go and who it is.
#[derive(Clone)]
pub struct Publishing {
    pub out: crate::config::OutputConfig,
    pub worker: String,
    pub spec: String,
    pub limits: Arc<TopicLimits>,
    /// Large-image tiles: where their results go.
    pub tiles: crate::tile::TilesConfig,
}


/// Logs and counts a frame going to the dead-letter topic.
pub fn count_dead_letter(metrics: &Metrics, job: &Job, reason: DeadLetterReason, detail: &str) {
    tracing::warn!(topic = job.tp.topic, partition = job.tp.partition, offset = job.offset, reason = reason.as_str(), detail, "Frame dead-lettered.");
    metrics.dead_letters.get_or_create(&vec![("reason", reason.as_str().to_owned())]).inc();
}

/// The dead letter (`output_refused`) of an input whose `kind` output topic `topic` refused;
/// counted unless `count` is false (the same input dead-lettered again after a rewind).
pub fn refused_dead_letter(job: &Job, kind: OutputKind, topic: &str, error: &str, p: &Publishing, metrics: &Metrics, count: bool) -> OutRecord {
    let detail = format!("topic {topic} refused the {}: {error}", kind.as_str());
    if count {
        count_dead_letter(metrics, job, DeadLetterReason::OutputRefused, &detail);
    }
    dead_letter(job, &p.out.dlq_topic, DeadLetterReason::OutputRefused, &detail, &p.worker)
}

/// A result or event bigger than its topic takes would be refused by Kafka: the frame is
/// dead-lettered instead, naming the topic and its limit.
pub fn check_sizes(records: Vec<OutRecord>, limits: &TopicLimits) -> Result<Vec<OutRecord>, Rejected> {
    for r in &records {
        let (size, limit) = (r.size(), limits.limit(&r.topic));
        if size > limit {
            return Err(Rejected {
                reason: DeadLetterReason::ResultTooLarge,
                detail: format!("the {} record is {size} bytes, over topic {}'s max.message.bytes of {limit}", r.kind.as_str(), r.topic),
            });
        }
    }
    Ok(records)
}

/// The result and event records of a processed frame.
pub fn outputs_of(job: &Job, p: Processed, metrics: &Metrics, publishing: &Publishing) -> Vec<OutRecord> {
    let (out, worker) = (&publishing.out, publishing.worker.as_str());
    let mut records = Vec::new();
    if let Some(o) = p.dct {
        metrics.dct_transforms.get_or_create(&vec![("outcome", o.as_str().to_owned())]).inc();
    }
    for (op, t) in &p.op_times {
        metrics.op_seconds.get_or_create(&vec![("op", op.split(':').next().unwrap_or(op).to_owned())]).observe(t.as_secs_f64());
    }
    let latency_ms = crate::metrics::now_ns().saturating_sub(p.meta.capture_ns) / 1_000_000;
    metrics.latency.observe(latency_ms as f64 / 1000.0);
    let mut meta = p.meta.clone();
    let (src_w, src_h) = (meta.width, meta.height);
    meta.width = p.width;
    meta.height = p.height;
    let mut headers = OwnedHeaders::new();
    // Source headers first (those the contract does not own), then the contract's, then ours.
    for (k, v) in &job.headers {
        let k_str = k.as_str();
        if !header::is_frame_header(k_str) && !result_header::ALL.contains(&k_str) && !dead_letter_header::ALL.contains(&k_str) {
            headers = headers.insert(Header { key: k, value: v.as_deref() });
        }
    }
    headers = meta.append_to(headers);
    let extra = [
        (result_header::SOURCE_WIDTH, src_w.to_string()),
        (result_header::SOURCE_HEIGHT, src_h.to_string()),
        (result_header::PIPELINE, publishing.spec.clone()),
        (result_header::WORKER, worker.to_owned()),
        (result_header::PROCESSING_US, p.took.as_micros().to_string()),
        (result_header::LATENCY_MS, latency_ms.to_string()),
    ];
    for (k, v) in &extra {
        headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    let key = meta.key().into_bytes();
    if let Some(ev) = &p.event {
        metrics.events.inc();
        let body = serde_json::json!({
            "type": "motion",
            "device": meta.device_id, "camera": meta.camera_id, "seq": meta.seq,
            "capture_ns": meta.capture_ns, "changed_fraction": ev.changed_fraction,
            "bbox": {"x": ev.bbox[0], "y": ev.bbox[1], "width": ev.bbox[2], "height": ev.bbox[3]},
            "frame_width": p.width, "frame_height": p.height, "worker": worker,
        });
        records.push(OutRecord { topic: out.events_topic.clone(), kind: OutputKind::Event, key: Some(key.clone()), payload: body.to_string().into_bytes(), headers: headers.clone() });
    }
    if let Some(body) = detection_event(&meta, &p.models, publishing, metrics) {
        records.push(OutRecord { topic: out.events_topic.clone(), kind: OutputKind::Event, key: Some(key.clone()), payload: body.to_string().into_bytes(), headers: headers.clone() });
    }
    if let Some(jpeg) = p.jpeg {
        records.push(OutRecord { topic: out.results_topic.clone(), kind: OutputKind::Result, key: Some(key), payload: jpeg, headers });
    }
    records
}

/// The detection event of a frame (JSON, see docs/inference.md): every model's detections in
/// the source frame's pixels; `None` when no model found anything (after `min_score` and
/// `only_labels`), so such frames make no event.
pub fn detection_event(meta: &framelink_common::FrameMeta, runs: &[crate::process::ModelRun], publishing: &Publishing, metrics: &Metrics) -> Option<serde_json::Value> {
    let mut detections = Vec::new();
    for r in runs {
        for d in &r.detections {
            metrics.infer.detections.get_or_create(&vec![("model", r.model.clone()), ("label", d.label.clone())]).inc();
            let mut v = serde_json::to_value(d).expect("plain data");
            v["model"] = r.model.clone().into();
            detections.push(v);
        }
    }
    if detections.is_empty() {
        return None;
    }
    metrics.detection_events.inc();
    // The size the boxes are in: the JPEG's own (the same for every model of the frame).
    let source = runs[0].frame;
    let models: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| serde_json::json!({"name": r.model, "version": r.version, "family": r.family, "provider": r.provider, "inference_ms": r.took.as_secs_f64() * 1000.0, "batch": r.batch}))
        .collect();
    Some(serde_json::json!({
        "type": "detections",
        "device": meta.device_id, "camera": meta.camera_id, "seq": meta.seq, "capture_ns": meta.capture_ns,
        "frame_width": source.0, "frame_height": source.1,
        "pipeline": publishing.spec, "worker": publishing.worker,
        "models": models,
        "detections": detections,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::KAFKA_DEFAULT_MAX_BYTES;

    fn job() -> Job {
        Job {
            tp: TopicPartition::new("frames", 2),
            offset: 41,
            epoch: 0,
            key: Some(b"dev/cam".to_vec()),
            payload: Some(vec![0xff, 0xd8, 1, 2, 3]),
            headers: vec![("framelink-seq".into(), Some(b"7".to_vec()))],
            timestamp_ms: None,
        }
    }

    fn header<'a>(h: &'a OwnedHeaders, name: &str) -> Option<&'a [u8]> {
        h.iter().find(|x| x.key == name).and_then(|x| x.value)
    }
    #[test]
    fn a_dead_letter_carries_the_frame_its_headers_and_the_reason() {
        let d = dead_letter(&job(), "frames.dlq", DeadLetterReason::OutputRefused, "frames.processed refused the result: too large", "w-1");
        assert_eq!((d.topic.as_str(), d.kind), ("frames.dlq", OutputKind::DeadLetter));
        assert_eq!(d.key.as_deref(), Some(&b"dev/cam"[..]));
        assert_eq!(d.payload, vec![0xff, 0xd8, 1, 2, 3]);
        assert_eq!(header(&d.headers, "framelink-seq"), Some(&b"7"[..]));
        assert_eq!(header(&d.headers, "framelink-error"), Some(&b"output_refused"[..]));
        assert_eq!(header(&d.headers, "framelink-source"), Some(&b"frames/2/41"[..]));
        assert!(d.size() > 5 + 7 + 61, "size counts payload, key, headers and batch framing: {}", d.size());
    }

    #[test]
    fn a_record_just_over_the_limit_is_seen_as_over() {
        let h = OwnedHeaders::new().insert(Header { key: "framelink-seq", value: Some(b"1") });
        let payload = vec![0u8; KAFKA_DEFAULT_MAX_BYTES - 61 - 26 - 3 - (13 + 1 + 10)];
        assert_eq!(record_size(Some(b"a/b"), &payload, &h), KAFKA_DEFAULT_MAX_BYTES);
        let payload = vec![0u8; payload.len() + 1];
        assert!(record_size(Some(b"a/b"), &payload, &h) > KAFKA_DEFAULT_MAX_BYTES);
    }

    fn publishing() -> Publishing {
        Publishing { out: crate::config::OutputConfig::default(), worker: "w-2".into(), spec: "grayscale".into(), limits: Arc::new(TopicLimits::new(crate::publish::PRODUCER_MAX_BYTES)), tiles: Default::default() }
    }

    fn all<'a>(h: &'a OwnedHeaders, name: &str) -> Vec<&'a [u8]> {
        h.iter().filter(|x| x.key == name).filter_map(|x| x.value).collect()
    }

    #[test]
    fn a_result_keeps_foreign_headers_and_replaces_the_workers_own() {
        // A result of an earlier worker, fed in again: its result and dead-letter headers must
        // not come out twice (a reader takes the first of a duplicated header).
        let mut j = job();
        j.headers.push(("x-site".into(), Some(b"north".to_vec())));
        j.headers.push((result_header::WORKER.into(), Some(b"old-worker".to_vec())));
        j.headers.push((result_header::LATENCY_MS.into(), Some(b"99999".to_vec())));
        j.headers.push((dead_letter_header::ERROR.into(), Some(b"panic".to_vec())));
        // The optional frame header too: written once, from the frame's metadata.
        j.headers.push((header::CLOCK.into(), Some(b"camera".to_vec())));
        let pairs = [("framelink-version", "1"), ("framelink-device", "dev"), ("framelink-camera", "cam"), ("framelink-seq", "7"), ("framelink-capture-ns", "1"), ("framelink-width", "8"), ("framelink-height", "4"), ("framelink-pixel-format", "RGB24"), ("content-type", "image/jpeg"), ("framelink-clock", "camera")];
        let meta = framelink_common::FrameMeta::from_header_pairs(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap();
        let processed = Processed { meta, jpeg: Some(vec![0xff, 0xd8]), width: 4, height: 2, event: None, took: std::time::Duration::from_micros(5), op_times: vec![], models: vec![], dct: None, path: "pixels" };
        let out = outputs_of(&j, processed, &Metrics::new(), &publishing());
        assert_eq!(out.len(), 1);
        let h = &out[0].headers;
        assert_eq!(all(h, "x-site"), vec![&b"north"[..]], "foreign headers pass through");
        assert_eq!(all(h, result_header::WORKER), vec![&b"w-2"[..]]);
        assert_eq!(all(h, result_header::LATENCY_MS).len(), 1);
        assert!(all(h, dead_letter_header::ERROR).is_empty());
        assert_eq!(all(h, header::WIDTH), vec![&b"4"[..]], "frame headers describe the result");
        assert_eq!(all(h, header::CLOCK), vec![&b"camera"[..]], "the capture clock once");
        assert_eq!(all(h, result_header::SOURCE_WIDTH), vec![&b"8"[..]]);
    }
}
