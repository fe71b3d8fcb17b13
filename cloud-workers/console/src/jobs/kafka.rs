//! The jobs' Kafka side: the topics (created when missing), the producer of tiles and job
//! records, reading the jobs back at start, and the reader of tile results that stitches.
//!
//! - **Tiles** go out with acks=all and idempotence; a tile Kafka does not take fails the job
//!   (its record says which tile and why) rather than leaving it waiting forever.
//! - **Job records** are written before the first tile (`queuing`, with the tile-results
//!   topic's end offsets: where this job's results can begin), after the last (`running`) and at
//!   the end (`done`, `failed`, `cancelled`); a tombstone when the job expires.
//! - **At start** the jobs topic is read to its end before the API answers for jobs; then the
//!   tile results are read from the earliest point a job held still needs (its `results_from`),
//!   so every job's image is stitched again; a job still `queuing` when the console stopped
//!   lost its source image with it and fails, asking for the upload again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use framelink_common::heartbeat::now_ms;
use framelink_common::link::{LinkContext, LinkStatus};
use framelink_common::shutdown::Shutdown;
use framelink_common::tile_wire::{JobRecord, TileMeta, TileResultMeta};
use framelink_common::tiling::Plan;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::JobsConfig;
use super::image_io::Decoded;
use super::state::{Jobs, Outcome};

pub struct JobsKafka {
    pub cfg: JobsConfig,
    producer: FutureProducer<LinkContext>,
    settings: framelink_common::KafkaSettings,
    /// Job records are written one at a time, each the job's state at the time of writing, so
    /// the topic's last record of a job is its latest state (a cancel is never overtaken).
    records: tokio::sync::Mutex<()>,
}

impl JobsKafka {
    pub fn new(settings: &framelink_common::KafkaSettings, cfg: &JobsConfig, link: Arc<LinkStatus>) -> anyhow::Result<Self> {
        let mut c = settings.client_config("framelink-console-jobs");
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.max.bytes", (cfg.max_record_bytes + 64 * 1024).to_string())
            .set("queue.buffering.max.kbytes", "262144")
            .set("message.timeout.ms", "120000");
        let producer = c.create_with_context(LinkContext::new(link))?;
        Ok(Self { cfg: cfg.clone(), producer, settings: settings.clone(), records: tokio::sync::Mutex::new(()) })
    }

    /// Creates the tiles and tile-results topics (`partitions` each; kept a little longer
    /// than a job lives) and the compacted jobs topic, where missing.
    pub async fn ensure_topics(&self) {
        let admin: AdminClient<DefaultClientContext> = match self.settings.client_config("framelink-console-admin").create() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot create an admin client; create the jobs' topics by hand (see docs/jobs.md).");
                return;
            }
        };
        let retention = ((self.cfg.expire_after_s + 3600) * 1000).to_string();
        let tiles = NewTopic::new(&self.cfg.tiles_topic, self.cfg.partitions, TopicReplication::Fixed(-1)).set("retention.ms", &retention);
        let results = NewTopic::new(&self.cfg.results_topic, self.cfg.partitions, TopicReplication::Fixed(-1)).set("retention.ms", &retention);
        let jobs = NewTopic::new(&self.cfg.jobs_topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact").set("min.compaction.lag.ms", "60000");
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match tokio::time::timeout(Duration::from_secs(15), admin.create_topics([&tiles, &results, &jobs], &opts)).await {
            Ok(Ok(results)) => {
                for r in results {
                    match r {
                        Ok(t) => tracing::info!(topic = t, "Created a topic for large-image jobs."),
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, e)) => tracing::warn!(topic = t, error = %e, "Cannot create a topic for large-image jobs; create it by hand (see docs/jobs.md)."),
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "Cannot create the topics for large-image jobs."),
            Err(_) => tracing::warn!("Creating the topics for large-image jobs timed out."),
        }
    }

    /// The tile-results topic's end offsets now (where a new job's results can begin).
    pub fn results_ends(&self) -> anyhow::Result<Vec<(i32, i64)>> {
        let consumer: BaseConsumer = self.reader_config("framelink-console-offsets").create()?;
        let md = consumer.fetch_metadata(Some(&self.cfg.results_topic), Duration::from_secs(10))?;
        let t = md.topics().iter().find(|t| t.name() == self.cfg.results_topic && t.error().is_none() && !t.partitions().is_empty());
        let Some(t) = t else { anyhow::bail!("topic {} does not exist (yet)", self.cfg.results_topic) };
        t.partitions().iter().map(|p| Ok((p.id(), consumer.fetch_watermarks(&self.cfg.results_topic, p.id(), Duration::from_secs(10))?.1))).collect()
    }

    fn reader_config(&self, id: &str) -> rdkafka::ClientConfig {
        let mut c = self.settings.client_config(id);
        c.set("group.id", "framelink-console-jobs-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // A job's results_from below the log's start (retention) reads from the start.
            .set("auto.offset.reset", "earliest")
            .set("fetch.max.bytes", "52428800")
            .set("queued.max.messages.kbytes", "131072")
            .set("isolation.level", "read_committed");
        c
    }

    /// Writes job `id`'s current state (its tombstone once it is gone) and waits for Kafka.
    pub async fn write_current(&self, jobs: &Mutex<Jobs>, id: &str) -> Result<(), String> {
        let _one_at_a_time = self.records.lock().await;
        let record = jobs.lock().expect("jobs lock").get(id).map(|j| j.record.clone());
        self.write_record(id, record.as_ref()).await
    }

    /// Writes a job's record (or, with `None`, its tombstone) and waits for Kafka.
    async fn write_record(&self, id: &str, record: Option<&JobRecord>) -> Result<(), String> {
        let value = record.map(|r| serde_json::to_vec(r).expect("a job record serializes"));
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.cfg.jobs_topic).key(id);
        if let Some(v) = &value {
            rec = rec.payload(v);
        }
        self.producer.send(rec, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| format!("topic {}: {e}", self.cfg.jobs_topic))
    }

    /// Queues every tile of a job; returns the first tile Kafka refused, and why.
    pub async fn queue_tiles(&self, id: &str, img: &Decoded, plan: &Plan, jobs: &Mutex<Jobs>) -> Result<(), String> {
        let mut pending: std::collections::VecDeque<(u32, DeliveryFuture)> = Default::default();
        for tile in &plan.tiles {
            let meta = TileMeta::of(id, plan, tile, img.channels);
            let payload = region(img, tile.region);
            let mut headers = OwnedHeaders::new_with_capacity(12);
            for (k, v) in meta.to_header_pairs() {
                headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
            }
            let key = meta.key();
            loop {
                let rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.cfg.tiles_topic).key(key.as_str()).payload(payload.as_slice()).headers(headers.clone());
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        pending.push_back((tile.index, f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => match pending.pop_front() {
                        Some((i, f)) => delivered(i, f.await, &self.cfg.tiles_topic)?,
                        None => tokio::time::sleep(Duration::from_millis(50)).await,
                    },
                    Err((e, _)) => return Err(format!("tile {}: {e}", tile.index)),
                }
            }
            // Completed deliveries are collected as we go (progress for the page).
            while let Some((i, f)) = pending.front_mut() {
                let Some(r) = futures_util::FutureExt::now_or_never(f) else { break };
                delivered(*i, r, &self.cfg.tiles_topic)?;
                pending.pop_front();
            }
            match jobs.lock().expect("jobs lock").get_mut(id) {
                Some(j) if j.record.status.wants_tiles() => j.queued = tile.index + 1 - pending.len() as u32,
                // Cancelled (or expired) while queuing: the rest is not queued.
                _ => return Ok(()),
            }
        }
        for (i, f) in pending {
            delivered(i, f.await, &self.cfg.tiles_topic)?;
        }
        Ok(())
    }

    /// At start: every job on the jobs topic, read to its end.
    pub fn restore(&self, jobs: &Mutex<Jobs>, shutdown: &Shutdown) -> anyhow::Result<usize> {
        let consumer: BaseConsumer = self.reader_config("framelink-console-jobs-restore").create()?;
        let topic = &self.cfg.jobs_topic;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic && t.error().is_none()) else { return Ok(0) };
        let mut ends = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            if high > low {
                ends.insert(p.id(), high);
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
        if ends.is_empty() {
            return Ok(0);
        }
        consumer.assign(&tpl)?;
        let mut read = 0;
        while !ends.is_empty() && !shutdown.is_set() {
            let Some(m) = consumer.poll(Duration::from_millis(500)) else { continue };
            let m = m?;
            read += 1;
            if let Some(id) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                let record = m.payload().and_then(|v| serde_json::from_slice::<JobRecord>(v).map_err(|e| tracing::warn!(job = id, error = %e, "A job record that does not parse; ignored (counted in job_records_ignored).")).ok());
                let mut j = jobs.lock().expect("jobs lock");
                if m.payload().is_none() || record.is_some() {
                    j.restore(id, record);
                } else {
                    j.counters.records_ignored.inc();
                }
            }
            if ends.get(&m.partition()).is_some_and(|&end| m.offset() + 1 >= end) {
                ends.remove(&m.partition());
            }
        }
        Ok(read)
    }

    /// Reads tile results (from where the jobs held need them) and stitches, until `shutdown`.
    /// Finished jobs' records are written by `finish` (which the caller runs on its runtime).
    /// `ready` runs once every partition known at start is assigned at an explicit offset: from
    /// then on a new job's `results_from` (the ends at its creation) cannot be behind the reader.
    pub fn read_results(&self, jobs: &Arc<Mutex<Jobs>>, shutdown: &Shutdown, finish: &dyn Fn(String), ready: &dyn Fn()) -> anyhow::Result<()> {
        let consumer: BaseConsumer = self.reader_config("framelink-console-tile-results").create()?;
        let topic = &self.cfg.results_topic;
        let mut assigned = 0usize;
        let mut last_check: Option<std::time::Instant> = None;
        let from = jobs.lock().expect("jobs lock").results_from();
        while !shutdown.is_set() {
            let every = if assigned == 0 { Duration::from_secs(2) } else { Duration::from_secs(30) };
            if last_check.is_none_or(|t| t.elapsed() > every) {
                last_check = Some(std::time::Instant::now());
                if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
                    && let Some(t) = md.topics().iter().find(|t| t.name() == topic && t.error().is_none())
                    && t.partitions().len() > assigned
                {
                    let mut tpl = TopicPartitionList::new();
                    let mut ok = true;
                    for p in t.partitions().iter().filter(|p| p.id() as usize >= assigned) {
                        // Partitions known at start: from where a held job's results begin, or
                        // their end now (an explicit offset: a job created after this point has
                        // its results after it); partitions added later: from their beginning.
                        let offset = match (assigned, from.get(&p.id())) {
                            (0, Some(&o)) => Offset::Offset(o),
                            (0, None) => match consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)) {
                                Ok((_, high)) => Offset::Offset(high),
                                Err(e) => {
                                    tracing::warn!(topic, partition = p.id(), error = %e, "Cannot read a tile-results partition's end yet; retrying.");
                                    ok = false;
                                    break;
                                }
                            },
                            _ => Offset::Beginning,
                        };
                        tpl.add_partition_offset(topic, p.id(), offset)?;
                    }
                    if ok {
                        consumer.incremental_assign(&tpl)?;
                        if assigned == 0 {
                            ready();
                        }
                        assigned = t.partitions().len();
                        tracing::info!(topic, partitions = assigned, "Reading tile results.");
                    }
                }
            }
            let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "Tile results.");
                    continue;
                }
            };
            let pairs: Vec<(&str, Option<&[u8]>)> = m.headers().map(|h| h.iter().map(|x| (x.key, x.value)).collect()).unwrap_or_default();
            let meta = match TileResultMeta::from_header_pairs(pairs.into_iter()) {
                Ok(meta) => meta,
                Err(e) => {
                    tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "A tile result without its headers; ignored (counted in job_results_ignored{{reason=\"bad_result\"}}).");
                    jobs.lock().expect("jobs lock").counters.ignored.get_or_create(&vec![("reason", "bad_result".to_owned())]).inc();
                    continue;
                }
            };
            let outcome = jobs.lock().expect("jobs lock").result(&meta, m.payload().unwrap_or_default(), now_ms());
            if let Outcome::Finished(record) = outcome {
                tracing::info!(job = record.id, status = record.status.as_str(), "Job finished.");
                finish(record.id);
            }
        }
        Ok(())
    }
}

fn delivered<E>(index: u32, r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>, topic: &str) -> Result<(), String> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(format!("tile {index}: topic {topic} refused it: {e}")),
        Err(_) => Err(format!("tile {index}: the producer went away")),
    }
}

/// A tile's pixels, copied out of the source image.
pub fn region(img: &Decoded, r: framelink_common::tiling::Rect) -> Vec<u8> {
    let ch = img.channels as usize;
    let mut out = Vec::with_capacity(r.w as usize * r.h as usize * ch);
    for y in r.y..r.y + r.h {
        let start = (y as usize * img.width as usize + r.x as usize) * ch;
        out.extend_from_slice(&img.data[start..start + r.w as usize * ch]);
    }
    out
}
