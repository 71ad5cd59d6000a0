//! The command line: `run`, `simulate`, `check-config`.

use crate::config::{Config, ConfigError};
use crate::ops::logging::LogFormat;
use crate::ops::stats::Stats;
use crate::pipeline::{self, Plan, Sink, Timing};
use crate::source::sim_run::{SimSettings, Speed};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_CONFIG: &str = "/etc/redline-agent/agent.toml";

/// Exit codes beyond 0 (success) and 1 (failure).
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_UNDELIVERED: u8 = 3;
/// A replayed log held nothing usable (no frame of the interface, none decoded).
pub const EXIT_NOTHING_USABLE: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "redline-agent",
    version,
    about = "Race-car telemetry agent: sensors → 10 Hz records → MQTT with mutual TLS to AWS IoT Core"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (the daemon): read the configured source, publish to the broker.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print each message payload on stdout instead of publishing (bench and debugging).
        #[arg(long)]
        stdout: bool,
    },
    /// Bench mode: a simulated car replaces the configured source; sampling, batching and
    /// publishing are the real path.
    Simulate(SimulateArgs),
    /// Replay a `candump -L` log through the real decoding path, on the log's own clock.
    Replay {
        /// The candump log.
        file: PathBuf,
        /// Configuration file ([source] dbc and signals; without a CAN source, the
        /// simulated car's GT3 bus).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print each message payload on stdout instead of publishing.
        #[arg(long)]
        stdout: bool,
        /// Time compression: a factor such as `10`, or `max`.
        #[arg(long, default_value = "max")]
        speed: Speed,
        /// Replay only the frames of this interface (default: `source.interface` of a CAN
        /// source, else every frame); `all` for every frame.
        #[arg(long)]
        interface: Option<String>,
    },
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Do not check the certificate and key files: for a config whose certificates are
        /// not installed yet (the DBC and its bindings are still checked).
        #[arg(long)]
        no_files: bool,
    },
    /// Show what the running agent last wrote to its status file: link, backlog, counters.
    Status {
        /// Configuration file (for `status.file`).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Read this status file instead of the configured one.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the raw JSON snapshot.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the disk spool (works while the daemon is stopped).
    #[command(subcommand)]
    Spool(SpoolCommand),
}

#[derive(Subcommand, Debug)]
pub enum SpoolCommand {
    /// Segments, bytes, unacknowledged readings, their time span, and damage seen.
    Stats {
        /// Configuration file (for `spool.dir`).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Every unacknowledged record as one JSON line on stdout (to recover data from a
    /// pulled SD card).
    Export {
        /// Configuration file (for `spool.dir`).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Read this spool directory instead of the configured one.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Configuration file (default: built-in bench defaults, printing to stdout).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print each message payload on stdout instead of publishing.
    #[arg(long)]
    pub stdout: bool,
    /// Simulated time to run, e.g. `30s` or `1h` (default: until stopped).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Time compression: a factor such as `10`, or `max` for as fast as the machine goes.
    #[arg(long, default_value = "1")]
    pub speed: Speed,
    /// Seed of the simulated car (default: `source.seed` of the config, else 1).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Start of the simulated clock, RFC 3339 (default: now).
    #[arg(long, value_parser = parse_start)]
    pub start: Option<i64>,
    /// Inject sensor faults: a sensor that stops, non-finite and out-of-range values.
    #[arg(long)]
    pub faults: bool,
    /// Write the simulated car as lines to this serial device or pty (a bench rig for the
    /// serial source) instead of running the pipeline.
    #[arg(long, value_name = "PATH")]
    pub serial: Option<PathBuf>,
    /// Line format for `--serial` (default: `source.format` of the config, else nmea).
    #[arg(long, value_enum, requires = "serial")]
    pub format: Option<SerialFormat>,
    /// Put the simulated car's frames on this CAN interface (a bench rig for the CAN source)
    /// instead of running the pipeline.
    #[arg(long, value_name = "IFACE", conflicts_with = "serial")]
    pub can: Option<String>,
    /// Lines per second for `--serial`.
    #[arg(long, default_value_t = 20, requires = "serial")]
    pub line_rate: u32,
}

impl SimulateArgs {
    /// The simulated car these arguments ask for, with the config's seed and faults as
    /// defaults.
    fn settings(&self, cfg: &Config) -> SimSettings {
        SimSettings {
            seed: self.seed.unwrap_or(cfg.source.seed),
            start: self.start.unwrap_or_else(crate::ops::clock::wall_now_us),
            faults: self.faults || cfg.source.faults,
            duration: self.duration,
            speed: self.speed,
            utc_offset: 0,
        }
    }
}

/// The agent's runtime: one thread, because it is small and quiet on a busy ECU (the
/// spool has its own thread for the disk).
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("redline-agent: cannot start the runtime: {e}");
            None
        }
    }
}

/// Runs `work` on the agent's runtime until it ends or SIGTERM/SIGINT cancel its token.
/// `None`: the runtime could not start (already reported).
fn until_signal<F: std::future::Future>(
    work: impl FnOnce(CancellationToken) -> F,
) -> Option<F::Output> {
    let runtime = runtime()?;
    Some(runtime.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn(watch_signals(stop.clone()));
        work(stop).await
    }))
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SerialFormat {
    Kv,
    Csv,
    Nmea,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    // humantime's own message names a character position, which helps no one here.
    humantime::parse_duration(s)
        .map_err(|_| format!("expected a duration such as `30s`, `2m` or `1h30m`, got {s:?}"))
}

fn parse_start(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("expected an RFC 3339 time such as 2024-01-14T21:20:00Z: {e}"))?;
    Ok((t.unix_timestamp_nanos() / 1000) as i64)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::ops::logging::init(cli.log_format);
    match cli.command {
        Command::CheckConfig { config, no_files } => match Config::load(&config).and_then(|c| {
            if no_files {
                crate::preflight::dbc(&c, &config.display().to_string())?;
            } else {
                crate::preflight::files(&c, &config.display().to_string())?;
            }
            Ok(c)
        }) {
            Ok(c) => {
                if let Some(w) = c.key_permission_warning() {
                    eprintln!("redline-agent: warning: {w}");
                }
                print!("{}", c.to_toml());
                eprintln!("{}: configuration is valid", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::Spool(cmd) => spool_command(cmd),
        Command::Status { config, file, json } => status_command(&config, file, json),
        Command::Replay {
            file,
            config,
            stdout,
            speed,
            interface,
        } => {
            let (cfg, path) = match load_or_bench(config.as_deref()) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            let sink = if stdout || cfg.mqtt.is_none() {
                Sink::Stdout
            } else {
                Sink::Mqtt
            };
            let replay = crate::source::replay::Replay {
                file,
                speed,
                interface: match interface.as_deref() {
                    Some("all") => None,
                    Some(i) => Some(i.to_owned()),
                    None => (cfg.source.kind == crate::config::SourceKind::Can)
                        .then(|| cfg.source.interface.clone())
                        .flatten(),
                },
            };
            let sim = SimSettings {
                seed: 0,
                start: 0,
                faults: false,
                duration: None,
                speed,
                utc_offset: 0,
            };
            execute_with(cfg, &path, Timing::Data, sink, sim, true, Some(replay))
        }
        Command::Run { config, stdout } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            let sim = SimSettings {
                seed: cfg.source.seed,
                start: crate::ops::clock::wall_now_us(),
                faults: cfg.source.faults,
                duration: None,
                speed: Speed::Factor(1.0),
                utc_offset: 0,
            };
            let sink = if stdout { Sink::Stdout } else { Sink::Mqtt };
            execute(cfg, &config, Timing::Live, sink, sim, false)
        }
        Command::Simulate(args) => {
            let (cfg, path) = match load_or_bench(args.config.as_deref()) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            if let Some(path) = &args.serial {
                return emit_serial(cfg, path, &args);
            }
            if let Some(iface) = &args.can {
                return emit_can(cfg, iface, &args);
            }
            let sink = if args.stdout || cfg.mqtt.is_none() {
                Sink::Stdout
            } else {
                Sink::Mqtt
            };
            let sim = args.settings(&cfg);
            execute(cfg, &path, Timing::Data, sink, sim, args.duration.is_some())
        }
    }
}

/// `simulate --serial`: the simulated car printed as sensor lines on a serial device.
fn emit_serial(mut cfg: Config, path: &Path, args: &SimulateArgs) -> ExitCode {
    use crate::config::LineFormatKind;
    cfg.source.format = Some(match args.format {
        Some(SerialFormat::Kv) => LineFormatKind::Kv,
        Some(SerialFormat::Csv) => LineFormatKind::Csv,
        Some(SerialFormat::Nmea) => LineFormatKind::Nmea,
        None => cfg.source.format.unwrap_or(LineFormatKind::Nmea),
    });
    cfg.source.device = Some(path.to_path_buf());
    let parser =
        match cfg.line_format().map_err(|(_, m)| m).and_then(|f| {
            crate::source::line_protocol::LineParser::new(f).map_err(|e| e.to_string())
        }) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("redline-agent: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    let sim = args.settings(&cfg);
    let rate = args.line_rate.max(1);
    let Some(result) =
        until_signal(|stop| crate::source::sim_run::emit_lines(&cfg, parser, sim, rate, stop))
    else {
        return ExitCode::FAILURE;
    };
    match result {
        Ok(lines) => {
            tracing::info!("wrote {lines} line(s) to {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("redline-agent: cannot write to {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// `simulate --can`: the simulated car's frames on a real CAN interface.
fn emit_can(cfg: Config, iface: &str, args: &SimulateArgs) -> ExitCode {
    let sim = args.settings(&cfg);
    let Some(result) =
        until_signal(|stop| crate::source::sim_run::emit_can(&cfg, iface, sim, stop))
    else {
        return ExitCode::FAILURE;
    };
    match result {
        Ok(frames) => {
            tracing::info!("sent {frames} frame(s) on {iface}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("redline-agent: cannot send on CAN interface {iface}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The named config, or the built-in bench defaults (simulate and replay without --config).
fn load_or_bench(path: Option<&Path>) -> Result<(Config, PathBuf), ExitCode> {
    match path {
        Some(p) => Config::load(p)
            .map(|c| (c, p.to_path_buf()))
            .map_err(|e| config_failure(&e)),
        None => Ok((
            Config::bench_default(),
            PathBuf::from("(built-in defaults)"),
        )),
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("redline-agent: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn execute(
    config: Config,
    path: &Path,
    timing: Timing,
    sink: Sink,
    sim: SimSettings,
    finite: bool,
) -> ExitCode {
    execute_with(config, path, timing, sink, sim, finite, None)
}

fn execute_with(
    config: Config,
    path: &Path,
    timing: Timing,
    sink: Sink,
    sim: SimSettings,
    finite: bool,
    replay: Option<crate::source::replay::Replay>,
) -> ExitCode {
    if sink == Sink::Mqtt
        && let Err(e) = crate::preflight::files(&config, &path.display().to_string())
    {
        return config_failure(&e);
    }
    if sink == Sink::Mqtt
        && let Some(w) = config.key_permission_warning()
    {
        tracing::warn!("{w}");
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let session_id = session_id(&config);
    let stats = Arc::new(Stats::new(config.field_names()));
    let payload = config.batch.payload;
    log_start(&config, path, timing, sink, replay.as_ref(), &session_id);
    // The daemon always writes its status file; a bench run only when the config names one.
    let status_file = (timing == Timing::Live
        || config.status.file.as_os_str() != crate::config::DEFAULT_STATUS_FILE)
        .then(|| config.status.file.clone());
    // `_temporary` (a spool of its own for `simulate`) lives as long as the run.
    let (spool, temporary) = match spool_for(&config, timing) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let plan = Plan {
        config,
        session_id,
        timing,
        sink,
        sim,
        spool: crate::spool::Options {
            dir: spool.dir,
            segment_bytes: spool.segment_bytes.0,
            max_bytes: spool.max_bytes.0,
        },
        spool_is_temporary: temporary.is_some(),
        replay,
        status_file,
    };
    let spool_stats = Arc::new(crate::spool::SpoolStats::default());
    let result = runtime.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn(watch_signals(stop.clone()));
        pipeline::run(plan, stats.clone(), spool_stats.clone(), stop).await
    });
    exit_code(result, path, sink, finite, &stats, &spool_stats, payload)
}

/// `vehicle.session_id`, or a new UUID for "auto".
fn session_id(config: &Config) -> String {
    if config.vehicle.session_id == "auto" {
        uuid::Uuid::new_v4().to_string()
    } else {
        config.vehicle.session_id.clone()
    }
}

/// The first log line: who, which config, what is sampled and where it goes.
fn log_start(
    config: &Config,
    path: &Path,
    timing: Timing,
    sink: Sink,
    replay: Option<&crate::source::replay::Replay>,
    session_id: &str,
) {
    tracing::info!(
        "redline-agent {} starting: vehicle {}, session {session_id}, config {}, {} to {}",
        env!("CARGO_PKG_VERSION"),
        config.vehicle.id,
        path.display(),
        match (timing, replay) {
            (_, Some(r)) => format!("replay of {}", r.file.display()),
            (Timing::Live, None) =>
                format!("live sampling ({:?} source)", config.source.kind).to_lowercase(),
            (Timing::Data, None) => "simulated car".to_string(),
        },
        match (sink, config.topic()) {
            (Sink::Mqtt, Some(t)) => t,
            _ => "stdout".to_string(),
        }
    );
}

/// The spool of a run: the config's, the default one for the daemon, or for `simulate`
/// without a [spool] table one of its own that ends with the run (with the guard that
/// removes it).
fn spool_for(
    config: &Config,
    timing: Timing,
) -> Result<(crate::config::Spool, Option<tempfile::TempDir>), ExitCode> {
    let mut temporary = None;
    let spool = match (&config.spool, timing) {
        (Some(sp), _) => sp.clone(),
        (None, Timing::Live) => crate::config::Spool::default(),
        (None, Timing::Data) => {
            let dir = match tempfile::Builder::new().prefix("redline-spool-").tempdir() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("redline-agent: cannot make a temporary spool: {e}");
                    return Err(ExitCode::FAILURE);
                }
            };
            let sp = crate::config::Spool {
                dir: dir.path().to_path_buf(),
                ..Default::default()
            };
            temporary = Some(dir);
            sp
        }
    };
    Ok((spool, temporary))
}

/// The summary lines and the exit code of a finished run.
fn exit_code(
    result: Result<pipeline::Summary, pipeline::StartError>,
    path: &Path,
    sink: Sink,
    finite: bool,
    stats: &Stats,
    spool_stats: &crate::spool::SpoolStats,
    payload: crate::config::PayloadMode,
) -> ExitCode {
    match result {
        Ok(summary) => {
            if sink == Sink::Mqtt {
                tracing::info!("summary: {}", stats.line());
                tracing::info!("summary: {}", spool_stats.line());
            } else {
                tracing::info!("summary: {}", stats.printed_line(payload));
            }
            if Stats::get(&stats.source_unusable) > 0 {
                return ExitCode::from(EXIT_NOTHING_USABLE);
            }
            if summary.unacked_batches > 0 {
                tracing::warn!(
                    "{} batch(es) not acknowledged by the broker yet",
                    summary.unacked_batches,
                );
                if finite {
                    return ExitCode::from(EXIT_UNDELIVERED);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => config_failure(&ConfigError {
            file: path.display().to_string(),
            key: e.key,
            message: e.message,
        }),
    }
}

fn spool_command(cmd: SpoolCommand) -> ExitCode {
    let (config, dir_override) = match &cmd {
        SpoolCommand::Stats { config } => (config, None),
        SpoolCommand::Export { config, dir } => (config, dir.clone()),
    };
    let dir = match dir_override {
        Some(d) => d,
        None => match Config::load(config) {
            Ok(c) => c.spool.unwrap_or_default().dir,
            Err(e) => return config_failure(&e),
        },
    };
    let result = match cmd {
        SpoolCommand::Stats { .. } => crate::spool::inspect::stats(&dir).map(|r| {
            let ms = |t: Option<i64>| t.map_or_else(|| "-".to_string(), format_ms);
            println!("spool:              {}", dir.display());
            println!("segments:           {}", r.segments);
            println!("bytes:              {}", r.bytes);
            println!("unacked batches:    {}", r.unacked_batches);
            println!("unacked readings:   {}", r.unacked_readings);
            println!("oldest unacked:     {}", ms(r.oldest_ms));
            println!("newest unacked:     {}", ms(r.newest_ms));
            println!("damaged segments:   {}", r.damaged_segments);
            println!("damaged bytes:      {}", r.damaged_bytes);
            println!("corrupt copies:     {}", r.corrupt_copies);
            println!("old-format segments: {}", r.old_format_segments);
            println!("read retries:       {}", r.read_retries);
            println!(
                "boot-clock batches: {} (sampled before the clock was trusted; times not yet UTC; {} held segment(s))",
                r.boot_clock_batches, r.held_segments
            );
        }),
        SpoolCommand::Export { .. } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            crate::spool::inspect::export(&dir, &mut out).map(|r| {
                eprintln!(
                    "exported {} reading(s) in {} batch(es) from {}",
                    r.unacked_readings,
                    r.unacked_batches,
                    dir.display()
                );
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "redline-agent: cannot read the spool {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn status_command(config: &Path, file: Option<PathBuf>, json: bool) -> ExitCode {
    let path = match file {
        Some(f) => f,
        None => match Config::load(config) {
            Ok(c) => c.status.file,
            Err(e) => return config_failure(&e),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "redline-agent: no status at {} ({e}): is the agent running? (systemctl status redline-agent)",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if json {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "redline-agent: {} is not a status snapshot: {e}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let age = value
        .get("at_ms")
        .and_then(serde_json::Value::as_i64)
        .map(|at| ((crate::ops::clock::wall_now_us() / 1000 - at).max(0) / 1000) as u64);
    print!("{}", crate::ops::health::render(&value, age));
    if value.get("state").and_then(serde_json::Value::as_str) == Some("stopped") {
        println!("the agent has stopped");
    } else if age.is_some_and(|a| a > 60) {
        println!(
            "WARNING: the snapshot is {} s old: the agent may be hung or stopped",
            age.unwrap_or(0)
        );
    }
    ExitCode::SUCCESS
}

fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or_else(|| format!("{ms} ms"), |t| format!("{t} ({ms})"))
}

/// SIGTERM or SIGINT: stop sampling and drain. A second one exits at once.
async fn watch_signals(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if round == 0 {
            tracing::info!(
                "stop requested: closing the open batch and waiting for acknowledgements"
            );
            stop.cancel();
        } else {
            tracing::warn!("second stop request: exiting now");
            std::process::exit(130);
        }
    }
}
