//! `framelink-worker`: the cloud worker. This binary only parses the command line, loads the
//! config and wires stages together; the work lives in library modules.

mod cli;

use framelink_worker::config;

use std::path::PathBuf;
use std::sync::Arc;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use framelink_common::cli::{CHECK_CONNECT_TIMEOUT, GlobalArgs, exit_code, init_logging, report_connection};
use framelink_common::shutdown::Shutdown;
use framelink_worker::gpu::BackendChoice;

/// framelink cloud worker: one member of a Kafka consumer group that decodes frames, runs
/// image operations, and publishes results, events and dead letters.
#[derive(Parser)]
#[command(name = "framelink-worker", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
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
        /// Overrides `gpu.backend`: auto (a real GPU if present, else CPU), gpu, cpu, software.
        #[arg(long)]
        backend: Option<BackendChoice>,
    },
    /// List the GPU adapters this machine offers (Vulkan/Metal/DX12) and which one `auto`
    /// would take.
    Adapters,
    /// Frames/s per op: CPU backend (1 thread, all cores) against the GPU backend at several
    /// batch sizes, on frames made from photographs; prints a markdown table.
    Bench {
        /// gpu (default: a real GPU, error if none), software (lavapipe), auto, cpu (CPU only).
        #[arg(long, default_value = "gpu")]
        backend: BackendChoice,
        /// Only adapters whose name contains this.
        #[arg(long)]
        adapter: Option<String>,
        /// Folder of JPEG photographs to make frames from.
        #[arg(long, default_value = "testdata/images")]
        images: PathBuf,
        /// Frame size, WxH.
        #[arg(long, default_value = "1920x1080")]
        size: String,
        /// Pipelines to time, separated by spaces (each a worker pipeline).
        #[arg(long, num_args = 1.., default_values = ["grayscale", "blur:1.5", "sobel", "sharpen", "rotate:90", "resize:1280x720", "resize:640x360,grayscale,blur:1.5,sobel"])]
        ops: Vec<String>,
        /// GPU batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        batches: Vec<usize>,
        /// Seconds per measurement (each cell is the median of three).
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// CPU threads for the all-cores column (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Also write the table to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Frames/s of a `[models.NAME]` on this host, as the worker runs it (decode, prepare, run,
    /// decode the outputs), one frame at a time, per ONNX Runtime thread count; JSON lines.
    BenchDetect {
        /// worker.toml with the [inference] and [models.NAME] tables.
        #[arg(long, short)]
        config: PathBuf,
        /// The model (its [models.NAME] table).
        #[arg(long)]
        model: String,
        /// A JPEG frame to run on.
        #[arg(long)]
        image: PathBuf,
        /// ONNX Runtime thread counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Seconds per thread count.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
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
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { framelink_worker::gpu::quiet_headless_probe() };
    framelink_worker::alloc::tune_for_frames();
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    exit_code(run(cli.command))
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config, pipeline, backend } => {
            if let Some(p) = pipeline {
                // SAFETY: single-threaded at this point; read by the config loader below.
                unsafe { std::env::set_var("FRAMELINK__WORKER__PIPELINE", p) };
            }
            if let Some(b) = backend {
                // SAFETY: as above.
                unsafe { std::env::set_var("FRAMELINK__GPU__BACKEND", b.as_str()) };
            }
            let v = config::WorkerConfig::load(&config)?;
            let shutdown = Shutdown::on_signals()?;
            let metrics = framelink_worker::metrics::Metrics::new();
            if let Some(addr) = v.config.http.addr()? {
                let m1 = metrics.clone();
                let m2 = metrics.clone();
                let bound = framelink_common::http::spawn(addr, Arc::new(move || m1.render()), Arc::new(move || m2.health_json()))?;
                tracing::info!(%bound, "Serving /metrics and /healthz.");
            }
            framelink_worker::run::run(v, shutdown, metrics)
        }
        Command::Tail { config, out, seconds, count, print_every, from_beginning } => {
            let v = config::WorkerConfig::load(&config)?;
            let stop = Shutdown::on_signals()?;
            let opts = cli::tail::TailOptions { out, duration: seconds.map(Duration::from_secs_f64), count, print_every, from_beginning };
            let summary = cli::tail::run(&v, &opts, stop)?;
            println!("tail: {}", summary.describe());
            Ok(())
        }
        Command::BenchDetect { config, model, image, threads, seconds } => {
            for row in cli::bench_detect::run(&cli::bench_detect::Options { config, model, image, threads, seconds })? {
                println!("{row}");
            }
            Ok(())
        }
        Command::Adapters => {
            let all = framelink_worker::gpu::adapters();
            if all.is_empty() {
                println!("no adapters: no Vulkan/Metal/DX12 driver found (Linux: libvulkan1 and the GPU's Vulkan driver; mesa-vulkan-drivers for the lavapipe software adapter)");
            }
            for a in &all {
                println!("{a}");
            }
            match framelink_worker::gpu::Gpu::open(BackendChoice::Auto, None)? {
                Some(g) => println!("backend auto -> gpu: {}", g.desc),
                None => println!("backend auto -> cpu (no adapter whose device type is a GPU)"),
            }
            Ok(())
        }
        Command::Bench { backend, adapter, images, size, ops, batches, seconds, threads, out } => {
            let (w, h) = size.split_once('x').and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?))).ok_or_else(|| anyhow::anyhow!("--size {size:?}: expected WxH"))?;
            let o = cli::bench::BenchOptions { backend, adapter, images, size: (w, h), ops, batches, seconds, threads };
            let table = cli::bench::run(&o)?;
            print!("{table}");
            if let Some(out) = out {
                std::fs::write(&out, &table)?;
            }
            Ok(())
        }
        Command::CheckConfig { config, connect } => {
            let v = config::WorkerConfig::load(&config)?;
            // Models: the runtime library is found and loaded, each model opened (a missing or
            // incompatible ONNX Runtime is named here, not at the first frame).
            let models = framelink_worker::infer::check(&v.config.worker.pipeline_ops()?, &v.config.inference, &v.config.models)?;
            println!(
                "config OK: group {:?} reading {:?} -> results {:?}, events {:?}, dead letters {:?}; Kafka {}",
                v.config.consumer.group_id,
                v.config.consumer.topics,
                v.config.output.results_topic,
                v.config.output.events_topic,
                v.config.output.dlq_topic,
                v.kafka.describe()
            );
            for line in models {
                println!("{line}");
            }
            if connect {
                println!("{}", report_connection(&v.kafka, CHECK_CONNECT_TIMEOUT)?);
                // The backend too: a GPU worker without a usable GPU fails here, not at start.
                let g = &v.config.gpu;
                match framelink_worker::gpu::Gpu::open(g.backend, g.adapter.as_deref()).map_err(|e| anyhow::anyhow!("config key `gpu.backend` = {:?}: {e}", g.backend.as_str()))? {
                    Some(gpu) => println!("backend {}: gpu {}", g.backend.as_str(), gpu.desc),
                    None => println!("backend {}: cpu", g.backend.as_str()),
                }
            }
            Ok(())
        }
    }
}
