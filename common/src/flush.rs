//! Flushing a `ThreadedProducer` without waiting on 100 ms steps.
//!
//! rdkafka's `Producer::flush` calls `rd_kafka_flush(rk, 0)` and then polls the producer's
//! queue for 100 ms before it asks again (rdkafka 0.39's `poll` runs to its deadline). With a
//! `ThreadedProducer` the producer's own thread takes every delivery report off that queue
//! first anyway: a flush returned only on 100 ms steps however quickly the broker answered
//! (the exactly-once worker flushes before each commit). rdkafka asks
//! librdkafka for delivery reports as events; `rd_kafka_flush` with a timeout then does not
//! poll at all but waits for librdkafka's count of undelivered messages to reach zero, which
//! happens as the producer's thread serves the reports, and returns at once.

use std::time::Duration;

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};

/// Waits up to `timeout` for every message handed to `producer` to be delivered (or to fail)
/// and its delivery report served by the producer's thread.
pub fn flush<C: ProducerContext + 'static>(producer: &ThreadedProducer<C>, timeout: Duration) -> KafkaResult<()> {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the client pointer is valid for the producer's lifetime; rd_kafka_flush is
    // thread-safe and only waits.
    let err = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms) };
    match RDKafkaErrorCode::from(err) {
        RDKafkaErrorCode::NoError => Ok(()),
        code => Err(KafkaError::Flush(code)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext};
    use std::time::Instant;

    #[test]
    fn an_empty_producer_flushes_at_once_and_an_unreachable_one_times_out() {
        let p: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9").set("message.timeout.ms", "60000").create().unwrap();
        let t = Instant::now();
        flush(&p, Duration::from_secs(5)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
        p.send(BaseRecord::<(), [u8]>::to("t").payload(&b"x"[..])).map_err(|(e, _)| e).unwrap();
        let t = Instant::now();
        let e = flush(&p, Duration::from_millis(300)).unwrap_err();
        assert_eq!(e, KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(250));
    }
}
