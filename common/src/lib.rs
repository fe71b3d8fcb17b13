//! framelink-common: what the edge agent and the cloud workers must agree on.
//!
//! - [`wire`]: the record contract (key, headers, [`wire::FrameMeta`]);
//! - [`kafka_config`]: typed, validated Kafka connection settings (PLAINTEXT, SSL/mTLS, SASL_SSL);
//! - [`tls_files`]: offline checks of PEM certificates and keys, with errors naming the file;
//! - [`link`]: the rdkafka client context that turns librdkafka's error callbacks into a
//!   diagnosis (TLS vs. unreachable vs. authentication);
//! - [`config_file`]: TOML + `FRAMELINK__` environment loading with errors naming the key, and
//!   the validated-config loader both daemons start from;
//! - [`heartbeat`]: the JSON beat agents and workers publish for `framelink-console`;
//! - [`systemd`]: readiness, stopping and watchdog notifications;
//! - the plumbing both daemons run on, one copy for both: [`shutdown`] (signals and waits that
//!   a stop wakes), [`http`] (the `/metrics` and `/healthz` listener and its `[http]` table),
//!   [`metrics`] (labels and rendering), [`clock`] (Unix-epoch time), [`cli`] (global options,
//!   logging, exit status, `check-config --connect`).

pub mod cli;
pub mod clock;
pub mod config_file;
pub mod fault;
pub mod flush;
pub mod heartbeat;
pub mod http;
pub mod kafka_config;
pub mod link;
pub mod metrics;
pub mod pipeline;
pub mod shutdown;
pub mod systemd;
pub mod tile_wire;
pub mod tiling;
pub mod tls_files;
pub mod wire;

pub use kafka_config::{KafkaConfig, KafkaSettings};
pub use wire::{CaptureClock, FrameMeta};

/// Captures what `tracing` logs while a closure runs (tests of warnings).
#[cfg(test)]
pub(crate) mod testlog {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` with a subscriber local to this thread; returns its result and the log text.
    pub fn capture<R>(f: impl FnOnce() -> R) -> (R, String) {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        let r = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (r, text)
    }
}
