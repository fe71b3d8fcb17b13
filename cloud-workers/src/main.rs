//! `framelink-worker`: the cloud worker. This binary only parses the command line, loads the
//! config and wires stages together; the work lives in library modules.

use framelink_worker::config;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use framelink_common::cli::{LogFormat, init_logging, report_connection};

/// framelink cloud worker: one member of a Kafka consumer group that decodes frames, runs
/// image operations, and publishes results, events and dead letters.
#[derive(Parser)]
#[command(name = "framelink-worker", version, about, long_about = None)]
struct Cli {
    /// Log format: `text` or `json`. The level comes from FRAMELINK_LOG (default `info`).
    #[arg(long, global = true, default_value = "text", env = "FRAMELINK_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume, process and publish until SIGTERM / SIGINT.
    Run {
        /// Path to worker.toml. Keys can be overridden with FRAMELINK__SECTION__KEY variables.
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides `worker.pipeline`, e.g. `resize:1280x720,grayscale,blur:1.5,sobel`.
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// Watch the fleet's output: print results (with their latency) and motion events from the
    /// config's results and events topics, and optionally save the result JPEGs to a folder.
    Tail {
        /// Path to worker.toml (its [kafka] and [output] tables are used).
        #[arg(long, short)]
        config: PathBuf,
        /// Write result JPEGs as DIR/<device>/<camera>/<seq>.jpg.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long)]
        seconds: Option<f64>,
        /// Stop after this many results.
        #[arg(long)]
        count: Option<u64>,
        /// Print every N-th result and every N-th event.
        #[arg(long, default_value_t = 1)]
        print_every: u64,
        /// Read the topics from the start instead of only new records.
        #[arg(long)]
        from_beginning: bool,
    },
    /// Validate a config file (and the TLS files it names) without starting the worker.
    CheckConfig {
        /// Path to worker.toml. Keys can be overridden with FRAMELINK__SECTION__KEY variables.
        #[arg(long, short)]
        config: PathBuf,
        /// Also connect to Kafka and fetch metadata, reporting TLS/auth/reachability problems.
        #[arg(long)]
        connect: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config, pipeline } => {
            if let Some(p) = pipeline {
                // SAFETY: single-threaded at this point; read by the config loader below.
                unsafe { std::env::set_var("FRAMELINK__WORKER__PIPELINE", p) };
            }
            let v = config::WorkerConfig::load(&config)?;
            let shutdown = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, shutdown.clone())?;
            }
            let metrics = framelink_worker::metrics::Metrics::new();
            if !v.config.http.listen.is_empty() {
                let m1 = metrics.clone();
                let m2 = metrics.clone();
                let addr = v.config.http.listen.parse()?;
                let bound = framelink_common::http::spawn(addr, Arc::new(move || m1.render()), Arc::new(move || m2.health_json()))?;
                tracing::info!(%bound, "Serving /metrics and /healthz.");
            }
            framelink_worker::worker::run(v, shutdown, metrics)
        }
        Command::Tail { config, out, seconds, count, print_every, from_beginning } => {
            let v = config::WorkerConfig::load(&config)?;
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone())?;
            }
            let opts = framelink_worker::tail::TailOptions { out, duration: seconds.map(Duration::from_secs_f64), count, print_every, from_beginning };
            let summary = framelink_worker::tail::run(&v, &opts, stop)?;
            println!("tail: {}", summary.describe());
            Ok(())
        }
        Command::CheckConfig { config, connect } => {
            let v = config::WorkerConfig::load(&config)?;
            println!(
                "config OK: group {:?} reading {:?} -> results {:?}, events {:?}, dead letters {:?}; Kafka {}",
                v.config.consumer.group_id,
                v.config.consumer.topics,
                v.config.output.results_topic,
                v.config.output.events_topic,
                v.config.output.dlq_topic,
                v.kafka.describe()
            );
            if connect {
                println!("{}", report_connection(&v.kafka, Duration::from_secs(15))?);
            }
            Ok(())
        }
    }
}
