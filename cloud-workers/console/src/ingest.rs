//! Reads the fleet from Kafka into [`Fleet`]: heartbeats from the beginning of their compacted
//! topic (the last known state of every agent and worker, at once), results, motion events and
//! dead letters from their ends (a live view; the console never replays history).
//!
//! The console is a reader, not a member of the workers' group: it assigns every partition
//! itself, commits nothing, and picks up partitions and topics that appear later (checked every
//! 30 s). The heartbeats topic is created compacted when missing, so that beats of devices that
//! left do not pile up and a restart reads one record per agent and worker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use framelink_common::heartbeat::now_ms;
use framelink_common::link::{LinkContext, LinkStatus};
use framelink_common::shutdown::Shutdown;
use framelink_common::wire::{dead_letter_header as dlq_header, header, result_header};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Topics;
use crate::state::{DeadLetter, Fleet, ResultMeta};

/// Which topic a record came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Heartbeats,
    Results,
    Events,
    Dlq,
}

pub struct Ingest {
    consumer: BaseConsumer<LinkContext>,
    topics: Vec<(String, Kind)>,
    assigned: BTreeSet<(String, i32)>,
    fleet: Arc<Mutex<Fleet>>,
    admin: rdkafka::ClientConfig,
    created_heartbeats: bool,
}

impl Ingest {
    pub fn new(kafka: &framelink_common::KafkaSettings, topics: &Topics, fleet: Arc<Mutex<Fleet>>, link: Arc<LinkStatus>) -> anyhow::Result<Self> {
        let mut c = kafka.client_config("framelink-console");
        // A group id is required by librdkafka's consumer; the console never joins or commits.
        c.set("group.id", "framelink-console-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // Results are frame-sized: fetch in large slices, cap the memory prefetched.
            .set("fetch.max.bytes", "52428800")
            .set("queued.max.messages.kbytes", "65536")
            .set("isolation.level", "read_committed");
        let consumer: BaseConsumer<LinkContext> = c.create_with_context(LinkContext::new(link))?;
        let mut list = vec![(topics.heartbeats.clone(), Kind::Heartbeats)];
        for (t, k) in [(&topics.results, Kind::Results), (&topics.events, Kind::Events), (&topics.dlq, Kind::Dlq)] {
            if !t.is_empty() {
                list.push((t.clone(), k));
            }
        }
        Ok(Self { consumer, topics: list, assigned: BTreeSet::new(), fleet, admin: kafka.client_config("framelink-console-admin"), created_heartbeats: false })
    }

    /// Assigns partitions not yet assigned (heartbeats from the beginning, the rest from the
    /// end); creates the heartbeats topic, compacted, if it does not exist. Returns whether a
    /// configured topic is still missing.
    fn assign_new(&mut self) -> bool {
        let metadata = match self.consumer.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the cluster's topics yet; retrying.");
                return true;
            }
        };
        let mut missing = false;
        let mut new = TopicPartitionList::new();
        for (topic, kind) in &self.topics {
            let Some(t) = metadata.topics().iter().find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()) else {
                missing = true;
                if *kind == Kind::Heartbeats && !self.created_heartbeats {
                    self.created_heartbeats = true;
                    create_compacted(&self.admin, topic);
                } else {
                    tracing::debug!(topic, "Topic not there yet.");
                }
                continue;
            };
            for p in t.partitions() {
                if self.assigned.insert((topic.clone(), p.id())) {
                    let offset = if *kind == Kind::Heartbeats { Offset::Beginning } else { Offset::End };
                    let _ = new.add_partition_offset(topic, p.id(), offset);
                }
            }
        }
        if new.count() > 0 {
            match self.consumer.incremental_assign(&new) {
                Ok(()) => tracing::info!(partitions = new.count(), "Reading the fleet's topics."),
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot assign partitions; retrying.");
                    for e in new.elements() {
                        self.assigned.remove(&(e.topic().to_owned(), e.partition()));
                    }
                    missing = true;
                }
            }
        }
        missing
    }

    /// Runs until `shutdown`.
    pub fn run(mut self, shutdown: Shutdown) {
        // New partitions are looked for every 30 s; every 2 s while a topic is missing (a
        // topic appears with its first record: the DLQ's with the first dead letter).
        let mut last_check: Option<Instant> = None;
        let mut missing = true;
        while !shutdown.is_set() {
            let every = if missing { Duration::from_secs(2) } else { Duration::from_secs(30) };
            if last_check.is_none_or(|t| t.elapsed() > every) {
                missing = self.assign_new();
                last_check = Some(Instant::now());
            }
            let Some(msg) = self.consumer.poll(Duration::from_millis(200)) else { continue };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "Consumer error.");
                    continue;
                }
            };
            let kind = self.topics.iter().find(|(t, _)| t == msg.topic()).map(|(_, k)| *k);
            let now = now_ms();
            // Headers are read and payloads copied before the fleet is locked (pages read it
            // too); a heartbeat's JSON is parsed under the lock (it is small).
            match kind {
                Some(Kind::Heartbeats) => {
                    let result = msg.payload().map(|v| self.fleet.lock().expect("fleet lock").heartbeat(v, now));
                    if let Some(Err(e)) = result {
                        tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), key = ?msg.key().map(String::from_utf8_lossy), error = %e, "A heartbeat that does not parse (counted in heartbeats_invalid).");
                    }
                }
                Some(Kind::Results) => match result_meta(&msg) {
                    Some(meta) => {
                        let jpeg = Bytes::copy_from_slice(msg.payload().unwrap_or_default());
                        self.fleet.lock().expect("fleet lock").result(meta, jpeg, now);
                    }
                    None => self.fleet.lock().expect("fleet lock").result_invalid(),
                },
                Some(Kind::Events) => {
                    let (device, camera) = key_parts(&msg);
                    let event: serde_json::Value = msg.payload().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or(serde_json::Value::Null);
                    let at = event["capture_ns"].as_u64().map(|n| n / 1_000_000).unwrap_or(now);
                    self.fleet.lock().expect("fleet lock").event(device, camera, at, event);
                }
                Some(Kind::Dlq) => {
                    let h = headers(&msg);
                    let get = |k: &str| h.get(k).cloned().unwrap_or_default();
                    let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                    let letter = DeadLetter {
                        v: 0,
                        at_ms: msg.timestamp().to_millis().map(|t| t as u64).unwrap_or(now),
                        reason: h.get(dlq_header::ERROR).cloned().unwrap_or_else(|| "unknown".into()),
                        detail: get(dlq_header::ERROR_DETAIL),
                        source: get(dlq_header::SOURCE),
                        worker: get(dlq_header::WORKER),
                        key,
                    };
                    self.fleet.lock().expect("fleet lock").dead_letter(letter);
                }
                None => {}
            }
        }
    }
}

fn headers(msg: &impl Message) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(h) = msg.headers() {
        for i in 0..h.count() {
            let x = h.get(i);
            if let Some(v) = x.value {
                out.insert(x.key.to_owned(), String::from_utf8_lossy(v).into_owned());
            }
        }
    }
    out
}

fn key_parts(msg: &impl Message) -> (String, String) {
    let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
    match key.split_once('/') {
        Some((d, c)) => (d.to_owned(), c.to_owned()),
        None => (key, String::new()),
    }
}

/// A result's metadata from its headers; `None` when the device or camera is missing.
fn result_meta(msg: &impl Message) -> Option<ResultMeta> {
    let h = headers(msg);
    let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(ResultMeta {
        device: h.get(header::DEVICE)?.clone(),
        camera: h.get(header::CAMERA)?.clone(),
        seq: num(header::SEQ).unwrap_or(0),
        capture_ns: num(header::CAPTURE_NS).unwrap_or(0),
        width: num(header::WIDTH).unwrap_or(0) as u32,
        height: num(header::HEIGHT).unwrap_or(0) as u32,
        pipeline: h.get(result_header::PIPELINE).cloned().unwrap_or_default(),
        worker: h.get(result_header::WORKER).cloned().unwrap_or_default(),
        latency_ms: num(result_header::LATENCY_MS),
    })
}

/// Creates `topic` compacted (beats are replaced per key; a week of retention for deleted ones).
fn create_compacted(config: &rdkafka::ClientConfig, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = match config.create() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot create an admin client to create the heartbeats topic.");
            return;
        }
    };
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact").set("min.compaction.lag.ms", "60000");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    // The admin future needs a runtime to be driven; a small one of its own keeps this thread
    // independent of the web server's.
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime");
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), admin.create_topics([&new], &opts)).await }) {
        Ok(Ok(results)) => {
            for r in results {
                match r {
                    Ok(t) => tracing::info!(topic = t, "Created the heartbeats topic (compacted)."),
                    Err((t, e)) => tracing::warn!(topic = t, error = %e, "Cannot create the heartbeats topic; create it compacted (see README)."),
                }
            }
        }
        Ok(Err(e)) => tracing::warn!(topic, error = %e, "Cannot create the heartbeats topic; create it compacted (see README)."),
        Err(_) => tracing::warn!(topic, "Creating the heartbeats topic timed out; retrying later."),
    }
}
