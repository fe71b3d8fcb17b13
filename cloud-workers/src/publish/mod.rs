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
//!   text ([`refusals`]). The refused output's acknowledgement unit moves to the dead letter,
//!   so the input's offset is committed only once the dead letter is acknowledged.
//! - **The dead letter refused too**: the input's partition is paused (nothing is committed
//!   past the input, since it stays in flight), `/healthz` says `degraded` naming the cause,
//!   `framelink_worker_dead_letters_refused` counts it, and the dead letter is produced again
//!   with backoff (1 s doubling to 60 s, ±20 % jitter) until Kafka takes it — then the
//!   partition resumes by itself.
//!
//! - [`record`]: the output record, its headers, the dead letter (pure, unit-tested);
//! - [`limits`]: each output topic's record-size limit;
//! - [`producer`]: the Kafka producer, its delivery callback, produce-with-retry;
//! - [`refusals`]: refused outputs, stalled partitions, backoff.

pub mod limits;
pub mod producer;
pub mod record;
pub mod refusals;

pub use limits::{KAFKA_DEFAULT_MAX_BYTES, PRODUCER_MAX_BYTES, TopicLimits};
pub use record::{Job, OutRecord, OutputKind, Publishing};
