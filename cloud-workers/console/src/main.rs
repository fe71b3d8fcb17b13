//! `framelink-console`: the operators' live dashboard. This binary parses the command line,
//! loads the config and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use framelink_common::cli::{CHECK_CONNECT_TIMEOUT, GlobalArgs, exit_code, init_logging, report_connection};
use framelink_common::shutdown::Shutdown;
use framelink_console::config::ConsoleConfig;

/// framelink console: the fleet's live dashboard (cameras, devices, workers, lag, dead
/// letters) from the heartbeats and results on Kafka, with a JSON API.
#[derive(Parser)]
#[command(name = "framelink-console", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the dashboard until SIGTERM / SIGINT.
    Run {
        /// Path to console.toml. Keys can be overridden with FRAMELINK__SECTION__KEY variables.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the config (and with --connect, reach the brokers), then exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Also connect to Kafka and read the cluster's metadata.
        #[arg(long)]
        connect: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    exit_code(match cli.command {
        Command::Run { config } => (|| {
            let v = ConsoleConfig::load(&config)?;
            let scheme = if v.config.console.tls_certificate.is_some() { "https" } else { "http" };
            let shutdown = Shutdown::on_signals()?;
            framelink_console::run(v, shutdown, |addr| tracing::info!(url = format!("{scheme}://{addr}/"), "Console serving."))
        })(),
        Command::CheckConfig { config, connect } => (|| {
            let v = ConsoleConfig::load(&config)?;
            println!("config OK: listening on {}, {} ({})", v.addr, v.kafka.describe(), if v.token.is_some() { "bearer token required" } else { "no token: loopback only" });
            if connect {
                println!("{}", report_connection(&v.kafka, CHECK_CONNECT_TIMEOUT)?);
            }
            Ok(())
        })(),
    })
}
