//! Publishing a frame's outputs: the output record, the record-size limit of each output topic,
//! and what happens when Kafka refuses an output.
//!
//! The promise is that no input is committed without its outputs, and no refusal is silent:
//!
//! - **Too large for its topic.** Each output topic's `max.message.bytes` is learned from the
//!   cluster at start, after every rebalance and once a minute ([`TopicLimits`]); a result or
//!   event whose record would exceed it is not produced (the broker would refuse it) and the
//!   frame goes to the dead-letter topic with the reason `result_too_large`, naming the topic
//!   and its limit.
//! - **Refused by Kafka** (topic missing, ACL denied, a limit lowered after it was learned): the
//!   frame goes to the dead-letter topic with the reason `output_refused` and Kafka's error
//!   text ([`Refusals`]). The refused output's acknowledgement unit moves to the dead letter,
//!   so the input's offset is committed only once the dead letter is acknowledged.
//! - **The dead letter refused too**: the input's partition is paused (nothing is committed
//!   past the input, since it stays in flight), `/healthz` says `degraded` naming the cause,
//!   `framelink_worker_dead_letters_refused` counts it, and the dead letter is produced again
//!   with backoff (1 s doubling to 60 s, ±20 % jitter) until Kafka takes it — then the
//!   partition resumes by itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::tracker::Tp;

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
    pub tp: Tp,
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
        format!("{}/{}/{}", self.tp.0, self.tp.1, self.offset)
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
pub fn dead_letter(job: &Job, dlq_topic: &str, reason: &str, detail: &str, worker: &str) -> OutRecord {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &job.headers {
        headers = headers.insert(Header { key: k, value: v.as_deref() });
    }
    let src = job.source();
    for (k, v) in [("framelink-error", reason), ("framelink-error-detail", detail), ("framelink-source", src.as_str()), ("framelink-worker", worker)] {
        headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    OutRecord { topic: dlq_topic.to_owned(), kind: OutputKind::DeadLetter, key: job.key.clone(), payload: job.payload.clone().unwrap_or_default(), headers }
}

/// The largest record the worker's producer sends (its `message.max.bytes`); a topic may set
/// a lower limit, never a higher one that the worker would use.
pub const PRODUCER_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Kafka's default `max.message.bytes` (1 MiB + 12).
pub const KAFKA_DEFAULT_MAX_BYTES: usize = 1_048_588;

/// Each output topic's record-size limit, as the cluster says (`max.message.bytes`, which
/// includes the broker's default when the topic does not override it).
pub struct TopicLimits {
    limits: Mutex<HashMap<String, usize>>,
    /// Producer cap (the worker's `message.max.bytes`).
    cap: usize,
}

impl TopicLimits {
    pub fn new(cap: usize) -> Self {
        Self { limits: Mutex::new(HashMap::new()), cap }
    }

    /// The largest record `topic` takes: its learned limit, capped by the producer's. A topic
    /// whose limit could not be read gets the producer's cap: a record over the real limit is
    /// then refused by the broker and dead-lettered as `output_refused`.
    pub fn limit(&self, topic: &str) -> usize {
        self.limits.lock().unwrap().get(topic).copied().unwrap_or(self.cap).min(self.cap)
    }

    pub fn set(&self, topic: &str, limit: usize) {
        self.limits.lock().unwrap().insert(topic.to_owned(), limit);
    }

    /// Reads `max.message.bytes` of `topics` from the cluster (DescribeConfigs). Topics whose
    /// configuration cannot be read keep what was known and are returned with the error.
    pub fn learn(&self, client: &ClientConfig, topics: &[String]) -> Result<(), String> {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = client.create().map_err(|e| format!("admin client: {e}"))?;
        let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = pollster::block_on(admin.describe_configs(&specs, &opts)).map_err(|e| format!("DescribeConfigs: {e}"))?;
        let mut errors = Vec::new();
        for (topic, r) in topics.iter().zip(results) {
            match r {
                Ok(res) => match res.get("max.message.bytes").and_then(|e| e.value.as_deref()).and_then(|v| v.parse::<usize>().ok()) {
                    Some(limit) => self.set(topic, limit),
                    None => errors.push(format!("{topic}: no max.message.bytes in its configuration")),
                },
                Err(e) => errors.push(format!("{topic}: {e}")),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    pub fn snapshot(&self) -> BTreeMap<String, usize> {
        self.limits.lock().unwrap().iter().map(|(t, l)| (t.clone(), (*l).min(self.cap))).collect()
    }
}

/// Keeps [`TopicLimits`] fresh (they were read once at start): reads them again every minute
/// and whenever poked (after a rebalance). Runs until `stop` is set.
pub fn spawn_limits_refresher(limits: Arc<TopicLimits>, client: ClientConfig, topics: Vec<String>, stop: Arc<AtomicBool>) -> crossbeam_channel::Sender<()> {
    let (poke, rx) = crossbeam_channel::bounded::<()>(1);
    let _ = std::thread::Builder::new().name("topic-limits".into()).spawn(move || {
        let mut warned = false;
        while !stop.load(Ordering::Relaxed) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                if rx.recv_timeout(Duration::from_millis(500)).is_ok() {
                    break;
                }
            }
            match limits.learn(&client, &topics) {
                Ok(()) => warned = false,
                Err(e) if !warned => {
                    tracing::warn!(error = %e, "Cannot read the output topics' max.message.bytes; results are checked against what is known.");
                    warned = true;
                }
                Err(_) => {}
            }
        }
    });
    poke
}

/// Backoff before the `attempt`-th retry of a refused dead letter: 1 s doubling to 60 s, with
/// ±20 % jitter so a fleet does not retry in step.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60));
    let jitter = 0.8 + 0.4 * rand_unit();
    base.mul_f64(jitter)
}

fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// An output Kafka refused, to be dead-lettered (or, a dead letter, retried).
pub struct Refusal {
    pub job: Arc<Job>,
    /// What was refused.
    pub record: OutRecord,
    pub error: String,
    /// Tries of this dead letter so far (0 for a refused result or event).
    pub attempt: u32,
    /// Not refused by Kafka: the producer failed (fatal error); send it again as it is.
    pub resend: bool,
}

/// Partitions stopped because their dead letters are refused, and why (for `/healthz`).
#[derive(Default)]
pub struct Stalls {
    by_tp: Mutex<BTreeMap<Tp, (u32, String)>>,
}

impl Stalls {
    /// Notes a refused dead letter on `tp` (`first`: its first refusal, counted; else a retry
    /// refused again, which only updates the cause); true when the partition was not stalled.
    pub fn add(&self, tp: &Tp, cause: String, first: bool) -> bool {
        let mut m = self.by_tp.lock().unwrap();
        let e = m.entry(tp.clone()).or_insert((0, String::new()));
        e.0 += u32::from(first);
        e.1 = cause;
        first && e.0 == 1
    }

    /// One refused dead letter on `tp` went through; true when the partition has none left.
    pub fn resolve(&self, tp: &Tp) -> bool {
        let mut m = self.by_tp.lock().unwrap();
        let Some(e) = m.get_mut(tp) else { return false };
        e.0 = e.0.saturating_sub(1);
        if e.0 == 0 {
            m.remove(tp);
            return true;
        }
        false
    }

    pub fn forget(&self, tps: &[Tp]) {
        let mut m = self.by_tp.lock().unwrap();
        for tp in tps {
            m.remove(tp);
        }
    }

    /// `topic[partition]: cause` for each stalled partition.
    pub fn causes(&self) -> Vec<String> {
        self.by_tp.lock().unwrap().iter().map(|((t, p), (_, c))| format!("{t}[{p}]: {c}")).collect()
    }

    pub fn count(&self) -> usize {
        self.by_tp.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            tp: ("frames".into(), 2),
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
        let d = dead_letter(&job(), "frames.dlq", "output_refused", "frames.processed refused the result: too large", "w-1");
        assert_eq!((d.topic.as_str(), d.kind), ("frames.dlq", OutputKind::DeadLetter));
        assert_eq!(d.key.as_deref(), Some(&b"dev/cam"[..]));
        assert_eq!(d.payload, vec![0xff, 0xd8, 1, 2, 3]);
        assert_eq!(header(&d.headers, "framelink-seq"), Some(&b"7"[..]));
        assert_eq!(header(&d.headers, "framelink-error"), Some(&b"output_refused"[..]));
        assert_eq!(header(&d.headers, "framelink-source"), Some(&b"frames/2/41"[..]));
        assert!(d.size() > 5 + 7 + 61, "size counts payload, key, headers and batch framing: {}", d.size());
    }

    #[test]
    fn limits_default_to_kafkas_and_are_capped_by_the_producer() {
        let l = TopicLimits::new(PRODUCER_MAX_BYTES);
        assert_eq!(l.limit("unknown"), PRODUCER_MAX_BYTES, "not learned: the broker decides");
        l.set("big", 64 << 20);
        assert_eq!(l.limit("big"), PRODUCER_MAX_BYTES);
        l.set("small", 500_000);
        assert_eq!(l.limit("small"), 500_000);
    }

    #[test]
    fn a_record_just_over_the_limit_is_seen_as_over() {
        let h = OwnedHeaders::new().insert(Header { key: "framelink-seq", value: Some(b"1") });
        let payload = vec![0u8; KAFKA_DEFAULT_MAX_BYTES - 61 - 26 - 3 - (13 + 1 + 10)];
        assert_eq!(record_size(Some(b"a/b"), &payload, &h), KAFKA_DEFAULT_MAX_BYTES);
        let payload = vec![0u8; payload.len() + 1];
        assert!(record_size(Some(b"a/b"), &payload, &h) > KAFKA_DEFAULT_MAX_BYTES);
    }

    #[test]
    fn stalls_count_refusals_per_partition_until_each_went_through() {
        let s = Stalls::default();
        let tp: Tp = ("frames".into(), 0);
        assert!(s.add(&tp, "dlq refused: RecordTooLarge".into(), true), "first refusal stalls the partition");
        assert!(!s.add(&tp, "dlq refused: RecordTooLarge".into(), true), "a second dead letter on it");
        assert!(!s.add(&tp, "dlq refused: TopicAuthorizationFailed".into(), false), "a retry refused again is not counted");
        assert_eq!(s.causes(), vec!["frames[0]: dlq refused: TopicAuthorizationFailed".to_string()]);
        assert!(!s.resolve(&tp), "one dead letter still refused");
        assert!(s.resolve(&tp), "all through: resume");
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn backoff_grows_to_a_minute_with_jitter() {
        for attempt in 0..12 {
            let b = backoff(attempt).as_secs_f64();
            let base = (1u64 << attempt.min(6)).min(60) as f64;
            assert!(b >= base * 0.8 - 1e-9 && b <= base * 1.2 + 1e-9, "attempt {attempt}: {b}");
        }
    }
}

/// Exactly-once: outputs Kafka refused inside a transaction, by input. The transaction is
/// aborted and the partitions rewound; when the input comes again its outputs are replaced by
/// a dead letter (`output_refused`), in the next transaction. A refused dead letter keeps its
/// partition paused for a backoff before the next try, so the worker never loops aborting on
/// the same record.
#[derive(Default)]
pub struct Poisoned {
    by_input: Mutex<HashMap<(Tp, i64), PoisonedInput>>,
}

/// What was refused for one input.
#[derive(Clone, Debug)]
pub struct PoisonedInput {
    pub kind: OutputKind,
    pub topic: String,
    pub error: String,
    /// Refusals of its dead letter so far.
    pub dead_letter_refusals: u32,
}

impl Poisoned {
    /// Notes a refusal for input `offset` of `tp`.
    pub fn refused(&self, tp: &Tp, offset: i64, kind: OutputKind, topic: &str, error: String) {
        let mut m = self.by_input.lock().unwrap();
        let e = m.entry((tp.clone(), offset)).or_insert_with(|| PoisonedInput { kind, topic: topic.to_owned(), error: error.clone(), dead_letter_refusals: 0 });
        if kind == OutputKind::DeadLetter {
            e.dead_letter_refusals += 1;
            e.error = error;
        } else if e.kind != OutputKind::DeadLetter {
            (e.kind, e.topic, e.error) = (kind, topic.to_owned(), error);
        }
    }

    pub fn get(&self, tp: &Tp, offset: i64) -> Option<PoisonedInput> {
        self.by_input.lock().unwrap().get(&(tp.clone(), offset)).cloned()
    }

    /// The input's dead letter was accepted: forgotten; returns whether it had been refused.
    pub fn accepted(&self, tp: &Tp, offset: i64) -> Option<PoisonedInput> {
        self.by_input.lock().unwrap().remove(&(tp.clone(), offset))
    }

    /// Partitions whose dead letters were refused, with the refusal count (for the backoff).
    pub fn stalled(&self) -> Vec<(Tp, u32)> {
        let m = self.by_input.lock().unwrap();
        let mut v: Vec<(Tp, u32)> = m.iter().filter(|(_, p)| p.dead_letter_refusals > 0).map(|((tp, _), p)| (tp.clone(), p.dead_letter_refusals)).collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        v
    }

    pub fn forget(&self, tps: &[Tp]) {
        self.by_input.lock().unwrap().retain(|(tp, _), _| !tps.contains(tp));
    }
}

#[cfg(test)]
mod poisoned_tests {
    use super::*;

    #[test]
    fn a_refused_output_then_its_refused_dead_letter_are_remembered_per_input() {
        let p = Poisoned::default();
        let tp: Tp = ("frames".into(), 1);
        p.refused(&tp, 5, OutputKind::Result, "out", "too large".into());
        let e = p.get(&tp, 5).unwrap();
        assert_eq!((e.kind, e.topic.as_str(), e.dead_letter_refusals), (OutputKind::Result, "out", 0));
        assert!(p.stalled().is_empty(), "a refused result is dead-lettered, not stalled");
        p.refused(&tp, 5, OutputKind::DeadLetter, "dlq", "denied".into());
        p.refused(&tp, 5, OutputKind::DeadLetter, "dlq", "denied".into());
        assert_eq!(p.get(&tp, 5).unwrap().kind, OutputKind::Result, "the original refusal stays the reason");
        assert_eq!(p.stalled(), vec![(tp.clone(), 2)]);
        assert_eq!(p.accepted(&tp, 5).unwrap().dead_letter_refusals, 2);
        assert!(p.get(&tp, 5).is_none() && p.stalled().is_empty());
        p.refused(&tp, 6, OutputKind::Event, "ev", "x".into());
        p.forget(std::slice::from_ref(&tp));
        assert!(p.get(&tp, 6).is_none());
    }
}
