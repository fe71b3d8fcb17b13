//! framelink-common: what the edge agent and the cloud workers must agree on.
//!
//! - [`wire`]: the record contract (key, headers, [`wire::FrameMeta`]);
//! - [`kafka_config`]: typed, validated Kafka connection settings (PLAINTEXT, SSL/mTLS, SASL_SSL);
//! - [`tls_files`]: offline checks of PEM certificates and keys, with errors naming the file;
//! - [`link`]: the rdkafka client context that turns librdkafka's error callbacks into a
//!   diagnosis (TLS vs. unreachable vs. authentication);
//! - [`config_file`]: TOML + `FRAMELINK__` environment loading with errors naming the key;
//! - [`systemd`]: readiness, stopping and watchdog notifications.

pub mod cli;
pub mod config_file;
pub mod http;
pub mod kafka_config;
pub mod link;
pub mod systemd;
pub mod tls_files;
pub mod wire;

pub use kafka_config::{KafkaConfig, KafkaSettings};
pub use wire::FrameMeta;
