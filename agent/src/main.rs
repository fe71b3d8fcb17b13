//! `framelink-agent`: the edge daemon. This binary only parses the command line, loads the
//! config and wires stages together; the work lives in library modules.

use framelink_agent::config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use framelink_common::cli::{CHECK_CONNECT_TIMEOUT, GlobalArgs, exit_code, init_logging, report_connection};

/// framelink edge agent: captures camera frames, JPEG-encodes them, keeps them in a bounded
/// on-disk spool while the network is down, and forwards them to Kafka over TLS.
#[derive(Parser)]
#[command(name = "framelink-agent", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: capture, encode, spool and forward frames until SIGTERM / SIGINT.
    Run {
        /// Path to agent.toml. Keys can be overridden with FRAMELINK__SECTION__KEY variables.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List V4L2 cameras with the formats and sizes they offer.
    ListCameras,
    /// Validate a config file (and the TLS files it names) without starting the agent.
    CheckConfig {
        /// Path to agent.toml. Keys can be overridden with FRAMELINK__SECTION__KEY variables.
        #[arg(long, short)]
        config: PathBuf,
        /// Also connect to Kafka and fetch metadata, reporting TLS/auth/reachability problems.
        #[arg(long)]
        connect: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    exit_code(run(cli.command))
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::ListCameras => {
            #[cfg(all(target_os = "linux", feature = "v4l2"))]
            print!("{}", framelink_agent::source::v4l2::list_cameras());
            #[cfg(not(all(target_os = "linux", feature = "v4l2")))]
            println!("this build has no V4L2 support (cargo feature `v4l2`, Linux only)");
            Ok(())
        }
        Command::Run { config } => framelink_agent::run::run(config::AgentConfig::load_for_run(&config)?),
        Command::CheckConfig { config, connect } => {
            let v = config::AgentConfig::load(&config)?;
            println!(
                "config OK: device {:?}, {} camera(s), topic {:?}, Kafka {}",
                v.config.device.id,
                v.config.cameras.len(),
                v.config.forwarder.topic,
                v.kafka.describe()
            );
            if connect {
                println!("{}", report_connection(&v.kafka, CHECK_CONNECT_TIMEOUT)?);
            }
            Ok(())
        }
    }
}
