//! The worker's Kafka producer: its client settings, the delivery callback that acknowledges
//! outputs (and hands refusals on), handing a record to the producer with retry while its
//! queue is full, and replacing a producer that a fatal librdkafka error left unusable (or whose
//! outputs wait behind a leaderless partition: `crate::leaderless`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crossbeam_channel::Sender;
use framelink_common::link::LinkContext;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

use super::record::{Job, OutRecord, OutputKind};
use super::refusals::{Poisoned, Refusal, Stalls};
use crate::metrics::Metrics;
use crate::offsets::Offsets;


/// What a produced output belongs to.
pub struct Output {
    pub job: Arc<Job>,
    pub epoch: u64,
    pub kind: OutputKind,
    /// Tries of a refused dead letter so far (0 for every first send).
    pub attempt: u32,
}

pub struct ProduceContext {
    link: LinkContext,
    offsets: Arc<Offsets>,
    metrics: Arc<Metrics>,
    /// Refused outputs go here (at-least-once) to be dead-lettered or retried; in exactly-once
    /// mode a refusal aborts the transaction instead (`None`).
    refusals: Option<Sender<Refusal>>,
    stalls: Arc<Stalls>,
    /// Exactly-once: refusals inside a transaction, by input.
    poisoned: Arc<Poisoned>,
}

impl ProduceContext {
    pub fn new(link: LinkContext, offsets: Arc<Offsets>, metrics: Arc<Metrics>, refusals: Option<Sender<Refusal>>, stalls: Arc<Stalls>, poisoned: Arc<Poisoned>) -> Self {
        Self { link, offsets, metrics, refusals, stalls, poisoned }
    }
}

framelink_common::impl_link_client_context!(ProduceContext, link);

impl ProducerContext for ProduceContext {
    type DeliveryOpaque = Box<Output>;
    fn delivery(&self, result: &DeliveryResult<'_>, out: Box<Output>) {
        match result {
            Ok(_) => {
                self.metrics.outputs.get_or_create(&vec![("kind", out.kind.as_str().to_owned())]).inc();
                self.metrics.last_output_ns.store(crate::metrics::now_ns(), Ordering::Relaxed);
                if out.kind == OutputKind::DeadLetter
                    && self.refusals.is_none()
                    && self.poisoned.delivered(&out.job.tp, out.job.offset).is_some_and(|p| p.dead_letter_refusals > 0)
                    && self.stalls.resolve(&out.job.tp)
                {
                    tracing::info!(topic = out.job.tp.topic, partition = out.job.tp.partition, offset = out.job.offset, "Dead letter accepted; the partition resumes.");
                    self.metrics.stalled_partitions.set(self.stalls.count() as i64);
                }
                if out.attempt > 0 && self.stalls.resolve(&out.job.tp) {
                    tracing::info!(topic = out.job.tp.topic, partition = out.job.tp.partition, offset = out.job.offset, attempts = out.attempt + 1, "Dead letter accepted; the partition resumes.");
                    self.metrics.stalled_partitions.set(self.stalls.count() as i64);
                    self.offsets.pause(&out.job.tp, false);
                }
            }
            Err(_) if out.epoch != self.offsets.epoch() => {} // purged by an abort
            Err((e, m)) => {
                // Delivery timeout is infinite (at-least-once): a permanent refusal, unless the
                // producer itself failed (fatal error) or was replaced (purged): then the output
                // is sent again as it is.
                let job = &out.job;
                let resend = producer_failure(e);
                if !resend {
                    tracing::error!(topic = m.topic(), input_partition = job.tp.partition, input_offset = job.offset, kind = out.kind.as_str(), error = %e, "Output refused by Kafka.");
                    self.metrics.outputs_refused.get_or_create(&vec![("kind", out.kind.as_str().to_owned())]).inc();
                }
                if self.refusals.is_none() && !resend {
                    // Exactly-once: the transaction aborts; the input comes again and is then
                    // dead-lettered (or, its dead letter refused, waits with its partition).
                    self.poisoned.refused(&job.tp, job.offset, out.kind, m.topic(), e.to_string());
                    if out.kind == OutputKind::DeadLetter {
                        self.metrics.dead_letters_refused.inc();
                        let first = self.poisoned.get(&job.tp, job.offset).is_some_and(|p| p.dead_letter_refusals == 1);
                        self.stalls.add(&job.tp, format!("dead-letter topic {} refuses records: {e}", m.topic()), first);
                        self.metrics.stalled_partitions.set(self.stalls.count() as i64);
                    }
                }
                if let Some(tx) = &self.refusals {
                    let record = OutRecord {
                        topic: m.topic().to_owned(),
                        kind: out.kind,
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        headers: m.headers().map(|h| h.detach()).unwrap_or_default(),
                    };
                    // The output's acknowledgement unit moves to its dead letter (or retry).
                    let _ = tx.send(Refusal { job: out.job.clone(), record, error: e.to_string(), attempt: out.attempt, resend });
                    return;
                }
            }
        }
        self.offsets.output_done(&out.job.tp, out.job.offset, out.epoch);
    }
}

/// Hands one record to the producer, waiting while its queue is full. A record the producer
/// refuses at once (e.g. over its own size limit, unknown topic) is returned with the error.
pub fn produce(producer: &ThreadedProducer<ProduceContext>, record: &OutRecord, mut opaque: Box<Output>) -> Result<(), (Box<Output>, KafkaError)> {
    loop {
        let mut r = BaseRecord::with_opaque_to(&record.topic, opaque).payload(&record.payload).headers(record.headers.clone());
        if let Some(k) = &record.key {
            r = r.key(k);
        }
        match producer.send(r) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                opaque = r.delivery_opaque;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((e, r)) => return Err((r.delivery_opaque, e)),
        }
    }
}

/// Hands a record's outputs to the producer; the record is done once Kafka acknowledged them.
pub fn send(job: &Arc<Job>, records: Vec<OutRecord>, producer: &ThreadedProducer<ProduceContext>, offsets: &Offsets, metrics: &Metrics, refusals: Option<&Sender<Refusal>>) {
    // One unit for the record itself, released below: an offset is never "done" before all
    // of its outputs are handed to the producer.
    offsets.tracker().add_outputs(&job.tp, job.offset, records.len() as u32 + 1);
    for record in records {
        let opaque = Box::new(Output { job: job.clone(), epoch: job.epoch, kind: record.kind, attempt: 0 });
        if let Err((o, e)) = produce(producer, &record, opaque) {
            let resend = producer_failure(&e);
            if !resend {
                tracing::error!(topic = record.topic, kind = record.kind.as_str(), input_offset = job.offset, error = %e, "Output refused by the producer.");
                metrics.outputs_refused.get_or_create(&vec![("kind", record.kind.as_str().to_owned())]).inc();
            }
            match refusals {
                Some(tx) => {
                    let _ = tx.send(Refusal { job: o.job, record, error: e.to_string(), attempt: 0, resend });
                }
                None => offsets.output_done(&o.job.tp, o.job.offset, o.epoch), // exactly-once: the transaction aborts
            }
        }
    }
    offsets.output_done(&job.tp, job.offset, job.epoch);
}

/// Errors that are the producer's, not the record's: after a fatal error librdkafka purges its
/// queue and refuses every send; the record is sent again on the producer that replaces it.
pub fn producer_failure(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(e.rdkafka_error_code(), Some(C::Fatal | C::PurgeQueue | C::PurgeInflight))
}

/// The worker's producer, shared by the processing threads. In at-least-once mode it is
/// replaced after a fatal librdkafka error (e.g. an idempotence sequence error after a leader
/// change), which leaves a producer unusable, and when its outputs wait behind a partition
/// librdkafka keeps without a leader ([`crate::leaderless`]): what it held is sent again on the
/// new one. In
/// exactly-once mode the transactions replace it when a transactional call hangs or keeps
/// timing out (see [`crate::txn`]).
pub struct Producers<C: ProducerContext + 'static = ProduceContext> {
    current: RwLock<Arc<ThreadedProducer<C>>>,
}

impl<C: ProducerContext + 'static> Producers<C> {
    pub fn new(p: Arc<ThreadedProducer<C>>) -> Self {
        Self { current: RwLock::new(p) }
    }

    pub fn get(&self) -> Arc<ThreadedProducer<C>> {
        self.current.read().unwrap().clone()
    }

    pub fn replace(&self, p: Arc<ThreadedProducer<C>>) -> Arc<ThreadedProducer<C>> {
        std::mem::replace(&mut *self.current.write().unwrap(), p)
    }
}

/// The producer's client settings: acks=all and idempotence. Exactly-once adds one
/// transactional id per worker instance (fencing of a worker that lost its partitions goes by
/// the consumer group's generation, KIP-447); at-least-once never gives up on an output, since
/// its input stays uncommitted meanwhile.
pub fn producer_config(v: &crate::config::Validated, id: &str) -> ClientConfig {
    let cfg = &v.config;
    let mut pc = v.kafka.client_config(&format!("framelink-worker-{id}"));
    pc.set("acks", "all").set("enable.idempotence", "true").set("linger.ms", "5").set("message.max.bytes", (super::PRODUCER_MAX_BYTES + 65536).to_string());
    if cfg.worker.delivery == crate::config::Delivery::ExactlyOnce {
        pc.set("transactional.id", format!("framelink-worker-{}-{id}", cfg.consumer.group_id)).set("transaction.timeout.ms", "60000").set("message.timeout.ms", "60000");
    } else {
        pc.set("message.timeout.ms", "0");
    }
    pc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic_partition::TopicPartition;
    use crate::tracker::Tracker;
    use framelink_common::link::LinkStatus;
    use rdkafka::message::OwnedHeaders;

    /// A producer that never reaches a broker (nothing listens on port 1) and refuses records
    /// over 2000 bytes itself, synchronously.
    fn producer(offsets: &Arc<Offsets>, metrics: &Arc<Metrics>, refusals: Option<Sender<Refusal>>) -> ThreadedProducer<ProduceContext> {
        let context = ProduceContext::new(LinkContext::new(Arc::new(LinkStatus::default())), offsets.clone(), metrics.clone(), refusals, Arc::default(), Arc::default());
        ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1").set("message.max.bytes", "2000").set("log_level", "0").create_with_context(context).unwrap()
    }

    fn job(offset: i64) -> Arc<Job> {
        Arc::new(Job { tp: TopicPartition::new("frames", 0), offset, epoch: 0, key: Some(b"d/c".to_vec()), payload: Some(vec![1; 10]), headers: vec![], timestamp_ms: None })
    }

    fn record(kind: OutputKind, bytes: usize) -> OutRecord {
        OutRecord { topic: "out".into(), kind, key: Some(b"d/c".to_vec()), payload: vec![0; bytes], headers: OwnedHeaders::new() }
    }

    #[test]
    fn at_least_once_a_record_the_producer_refuses_at_once_is_handed_on_and_keeps_its_input_in_flight() {
        let tracker = Arc::new(Tracker::default());
        let offsets = Arc::new(Offsets::new(tracker.clone(), true));
        let metrics = Metrics::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        let p = producer(&offsets, &metrics, Some(tx.clone()));
        let j = job(5);
        tracker.start(&j.tp, 5);
        send(&j, vec![record(OutputKind::Result, 50_000)], &p, &offsets, &metrics, Some(&tx));
        let r = rx.try_recv().expect("the refusal is handed to the refusals thread");
        assert_eq!((r.job.offset, r.record.kind, r.resend, r.attempt), (5, OutputKind::Result, false, 0));
        assert!(r.error.contains("too large") || r.error.contains("MessageSizeTooLarge"), "{}", r.error);
        assert_eq!(metrics.outputs_refused.get_or_create(&vec![("kind", "result".to_owned())]).get(), 1);
        assert_eq!(tracker.in_flight(), 1, "the input waits for its dead letter");
        assert!(tracker.take_ready().is_empty(), "nothing committable");
    }

    #[test]
    fn exactly_once_a_refused_record_releases_its_unit_for_the_aborting_transaction() {
        let tracker = Arc::new(Tracker::default());
        let offsets = Arc::new(Offsets::new(tracker.clone(), false));
        let metrics = Metrics::new();
        let p = producer(&offsets, &metrics, None);
        let j = job(8);
        tracker.start(&j.tp, 8);
        send(&j, vec![record(OutputKind::Event, 50_000)], &p, &offsets, &metrics, None);
        assert_eq!(tracker.in_flight(), 0, "the transaction aborts and rewinds; the record does not hang");
        assert_eq!(metrics.outputs_refused.get_or_create(&vec![("kind", "event".to_owned())]).get(), 1);
    }

    #[test]
    fn producer_failures_are_told_apart_from_refusals_of_the_record() {
        use rdkafka::types::RDKafkaErrorCode as C;
        assert!(producer_failure(&KafkaError::MessageProduction(C::PurgeQueue)));
        assert!(producer_failure(&KafkaError::MessageProduction(C::Fatal)));
        assert!(!producer_failure(&KafkaError::MessageProduction(C::MessageSizeTooLarge)));
        assert!(!producer_failure(&KafkaError::MessageProduction(C::TopicAuthorizationFailed)));
    }
}
