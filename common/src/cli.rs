//! What both binaries' command lines share: the options every subcommand takes, logging
//! set-up, how a failed command ends the process, and the `check-config` report.
//!
//! Binaries stay thin: they parse arguments, load their config, and call into libraries.

use std::process::ExitCode;
use std::time::Duration;

use crate::kafka_config::KafkaSettings;
use crate::link::check_connection;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (default on a terminal).
    #[default]
    Text,
    /// One JSON object per line (for journald / log shippers).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: use `text` or `json`")),
        }
    }
}

/// The options of every subcommand, flattened into each binary's parser
/// (`#[command(flatten)] global: GlobalArgs`).
#[derive(clap::Args, Debug)]
pub struct GlobalArgs {
    /// Log format: `text` or `json`. The level comes from FRAMELINK_LOG (default `info`).
    #[arg(long, global = true, default_value = "text", env = "FRAMELINK_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// The process's end: success, or the error with its causes (`error: a: b: c`) on stderr and
/// exit status 1.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the global `tracing` subscriber. The filter comes from `FRAMELINK_LOG` (same
/// syntax as `RUST_LOG`, e.g. `info,librdkafka=warn`), default `info`.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FRAMELINK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn,wgpu_hal=warn,wgpu_core=warn"));
    use std::io::IsTerminal;
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// How long `check-config --connect` waits for the brokers' metadata.
pub const CHECK_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The `check-config --connect` step: one metadata request, with the diagnosed cause on failure.
pub fn report_connection(settings: &KafkaSettings, timeout: Duration) -> Result<String, crate::link::ConnectError> {
    let summary = check_connection(settings, timeout)?;
    Ok(format!(
        "connected: {} broker(s), {} topic(s) visible over {}",
        summary.brokers,
        summary.topics,
        settings.describe()
    ))
}
