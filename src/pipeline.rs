//! The house wired together: source → sampler → batcher → publisher (or stdout), one task per
//! stage, bounded channels between them. Stopping the source drains every stage behind it.

use crate::config::Config;
use crate::config::{SourceKind, SyncInterval};
use crate::ops::clock::{ClockSource, LiveClock, TimeBase};
use crate::ops::stats::Stats;
use crate::sample::batch::{self, Batch, Batcher, Limits};
use crate::sample::record::{Reading, RecordEncoder};
use crate::sample::sampler::{DataClock, Sampler};
use crate::sample::signal::{Micros, SourceEvent};
use crate::source::line_protocol::LineParser;
use crate::source::sim_run::{self, SimSettings};
use crate::spool::{self, Cmd, SpoolStats};
use crate::uplink::publisher::{self, Inputs, PublisherSettings};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Which clock the sampler ticks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// The wall clock: the car (and `run`).
    Live,
    /// The data's own clock: simulation and replay, deterministic at any speed.
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Mqtt,
    Stdout,
}

pub struct Plan {
    pub config: Config,
    pub session_id: String,
    pub timing: Timing,
    pub sink: Sink,
    pub sim: SimSettings,
    /// Where the spool lives (publishing only).
    pub spool: spool::Options,
    /// The spool is this run's own and goes with it (`simulate` without `[spool]`).
    pub spool_is_temporary: bool,
    /// A candump log to replay instead of the configured source.
    pub replay: Option<crate::source::replay::Replay>,
    /// Where the local status snapshot goes (none: not written).
    pub status_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Default)]
pub struct Summary {
    /// Batches the broker never acknowledged; they stay in the spool.
    pub unacked_batches: u64,
}

/// An error that stops the agent before it runs: a config key and what is wrong with it.
#[derive(Debug)]
pub struct StartError {
    pub key: String,
    pub message: String,
}

/// Where closed batches go.
enum BatchOut {
    Stdout(mpsc::Sender<Batch>),
    /// The spool thread, its counters (for the queue it has not taken yet), and the bound
    /// of that queue.
    Spool(std::sync::mpsc::Sender<Cmd>, Arc<SpoolStats>, QueueCap),
}

/// The most the spool thread's queue may hold (it grows only while the disk hangs):
/// `delivery.memory_batches` batches and `delivery.memory_bytes` bytes.
#[derive(Debug, Clone, Copy)]
struct QueueCap {
    batches: u64,
    bytes: u64,
}

pub async fn run(
    plan: Plan,
    stats: Arc<Stats>,
    spool_stats: Arc<SpoolStats>,
    stop: CancellationToken,
) -> Result<Summary, StartError> {
    let Plan {
        config,
        session_id,
        timing,
        sink,
        sim,
        spool: spool_opts,
        spool_is_temporary,
        replay,
        status_file,
    } = plan;
    let stop = stop.child_token();
    let meta = meta_of(&config, &session_id, timing, replay.is_some());
    let (src_tx, src_rx) = mpsc::channel::<SourceEvent>(1024);
    let (reading_tx, reading_rx) = mpsc::channel::<Reading>(256);
    let upstream_done = CancellationToken::new();
    let wiring = Wiring {
        config: &config,
        stats: &stats,
        spool_stats: &spool_stats,
        stop: &stop,
        gps: config.clock.gps.as_ref().map(|_| {
            Arc::new(std::sync::Mutex::new(crate::ops::gps_time::GpsJudge::new(
                crate::ops::clock::build_floor_us(),
            )))
        }),
    };

    // The spool and the publisher start first: a spool.dir that can never be a spool (not
    // a directory, not ours, another agent's) stops the start, before sampling. A disk
    // that is full, read-only or failing does not: the spool thread runs from memory and
    // takes the spool up when the disk allows (see `spool::service`).
    let (out, delivery) = match sink {
        Sink::Mqtt => {
            wiring.start_publishing(&spool_opts, spool_is_temporary, &meta, &upstream_done)?
        }
        Sink::Stdout => {
            let (batch_tx, batch_rx) = mpsc::channel::<Batch>(8);
            let printer = tokio::spawn(stdout_sink(batch_rx, config.batch.payload));
            (BatchOut::Stdout(batch_tx), Delivery::Stdout(printer))
        }
    };
    let (clock, timebase) = wiring.start_clock(timing, &out);
    let source = wiring.start_source(timing, replay, sim, clock, src_tx)?;
    let sampling = wiring.start_sampler(timing, clock, src_rx, reading_tx);
    let batching = {
        let encoder = RecordEncoder::new(&config, &session_id);
        let period = 1_000_000 / i64::from(config.sampling.rate_hz);
        let batcher = Batcher::new(Limits::from_config(&config.batch), period, 0);
        tokio::spawn(batch_readings(
            reading_rx,
            out,
            encoder,
            batcher,
            timebase,
            timing,
            stats.clone(),
        ))
    };
    let publishing = matches!(delivery, Delivery::Mqtt { .. });
    let health = wiring.start_health(status_file, &meta, publishing);

    // Stopping the source drains every stage behind it.
    let _ = source.await;
    let _ = sampling.await;
    let _ = batching.await;
    upstream_done.cancel();
    let summary = finish_delivery(delivery, &spool_stats).await?;
    health.finish(&stop).await;
    Ok(summary)
}

/// Who the status messages say is running.
fn meta_of(
    config: &Config,
    session_id: &str,
    timing: Timing,
    replay: bool,
) -> crate::ops::health::Meta {
    crate::ops::health::Meta {
        vehicle_id: config.vehicle.id.clone(),
        session_id: session_id.to_owned(),
        started_ms: crate::ops::clock::wall_now_us() / 1000,
        source: if replay {
            "replay".to_string()
        } else if timing == Timing::Data {
            "simulator".to_string()
        } else {
            format!("{:?}", config.source.kind).to_lowercase()
        },
    }
}

/// What every stage constructor needs.
struct Wiring<'a> {
    config: &'a Config,
    stats: &'a Arc<Stats>,
    spool_stats: &'a Arc<SpoolStats>,
    stop: &'a CancellationToken,
    /// Live with `[clock] gps`: the source's GPS time goes here, the clock watcher reads it.
    gps: Option<Arc<std::sync::Mutex<crate::ops::gps_time::GpsJudge>>>,
}

/// The health tasks: status file, systemd supervisor, periodic stats line.
struct Health {
    status_file: Option<tokio::task::JoinHandle<()>>,
    supervisor: tokio::task::JoinHandle<()>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Health {
    async fn finish(self, stop: &CancellationToken) {
        self.ticker.abort();
        self.supervisor.abort();
        // A run that ended by itself (simulate, replay) was never asked to stop: the status
        // file task writes its last snapshot and ends only on this token.
        stop.cancel();
        if let Some(t) = self.status_file {
            let _ = t.await;
        }
    }
}

impl Wiring<'_> {
    /// The spool thread and the MQTT publisher.
    fn start_publishing(
        &self,
        spool_opts: &spool::Options,
        temporary: bool,
        meta: &crate::ops::health::Meta,
        upstream_done: &CancellationToken,
    ) -> Result<(BatchOut, Delivery), StartError> {
        let config = self.config;
        let settings = publisher_settings(config, meta)?;
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let (thread, channels) = spool::service::start(
            spool_settings(config, spool_opts, temporary),
            cmd_rx,
            self.spool_stats.clone(),
        )
        .map_err(|e| StartError {
            key: "spool.dir".into(),
            message: format!("cannot use {} as the spool: {e}", spool_opts.dir.display()),
        })?;
        let inputs = Inputs {
            live: channels.live,
            backlog: channels.backlog,
            spool: cmd_tx.clone(),
            upstream_done: upstream_done.clone(),
            spool_stats: self.spool_stats.clone(),
        };
        let queue_cap = QueueCap {
            batches: config.delivery.memory_batches as u64,
            bytes: config.delivery.memory_bytes.0,
        };
        let config = config.clone();
        let stats = self.stats.clone();
        let stop = self.stop.clone();
        let publisher = tokio::spawn(async move {
            let result = publisher::run(&config, settings, inputs, stats, stop.clone()).await;
            if result.is_err() {
                // Without a publisher nothing can leave: stop the rest.
                stop.cancel();
            }
            result
        });
        Ok((
            BatchOut::Spool(cmd_tx, self.spool_stats.clone(), queue_cap),
            Delivery::Mqtt { publisher, thread },
        ))
    }

    /// Live: the sampling clock, and what the wall clock is worth (see `clock`), watched
    /// from here on. Data timing needs neither.
    fn start_clock(
        &self,
        timing: Timing,
        out: &BatchOut,
    ) -> (LiveClock, Option<tokio::sync::watch::Receiver<TimeBase>>) {
        let config = self.config;
        let boot_id = crate::ops::clock::boot_id();
        let clock_source = clock_source(config);
        let grid_step = crate::ops::clock::grid_step(config.sampling.rate_hz);
        let (clock, tb) = match (timing, clock_source.check()) {
            (Timing::Data, _) => return (LiveClock::start(0), None),
            (Timing::Live, crate::ops::clock::Verdict::Trusted) => {
                let offset = crate::ops::clock::boot_to_utc_us();
                if let BatchOut::Spool(tx, ..) = out {
                    // Readings an earlier run of this boot stamped on the boot clock can go.
                    let _ = tx.send(Cmd::BootOffset {
                        boot_id,
                        offset: crate::ops::clock::offset_on_grid(offset, grid_step),
                    });
                }
                let tb = TimeBase {
                    trusted: true,
                    correction: 0,
                    boot_id,
                };
                (LiveClock::start(offset), tb)
            }
            (Timing::Live, crate::ops::clock::Verdict::Untrusted(why)) => {
                tracing::warn!(
                    "wall clock not trusted ({why}): readings are stamped on the boot clock and kept in the spool until it is"
                );
                let tb = TimeBase {
                    trusted: false,
                    correction: 0,
                    boot_id,
                };
                (LiveClock::start(0), tb)
            }
        };
        let (tx, rx) = tokio::sync::watch::channel(tb);
        let spool_tx = match out {
            BatchOut::Spool(t, ..) => Some(t.clone()),
            BatchOut::Stdout(_) => None,
        };
        let judge = ClockJudge {
            source: clock_source,
            gps: self.gps.clone(),
            grid_step,
        };
        tokio::spawn(watch_clock(
            judge,
            clock,
            tx,
            spool_tx,
            config.clock.check_interval.0,
            self.stop.clone(),
        ));
        (clock, Some(rx))
    }

    /// The configured source, a replayed log, or the simulated car.
    fn start_source(
        &self,
        timing: Timing,
        replay: Option<crate::source::replay::Replay>,
        sim: SimSettings,
        clock: LiveClock,
        src_tx: mpsc::Sender<SourceEvent>,
    ) -> Result<tokio::task::JoinHandle<()>, StartError> {
        let config = self.config.clone();
        let stop = self.stop.clone();
        let stats = self.stats.clone();
        let start_error = |(key, message)| StartError { key, message };
        if let Some(replay) = replay {
            let grid = crate::ops::clock::grid_step(config.sampling.rate_hz);
            let decoding = match config.source.kind {
                SourceKind::Can => crate::source::can::Decoding::from_config(&config),
                _ => crate::source::can::Decoding::for_simulator(&config),
            }
            .map_err(start_error)?;
            return Ok(tokio::spawn(async move {
                let file = replay.file.display().to_string();
                if let Err(e) =
                    crate::source::replay::run(replay, decoding, grid, stats.clone(), src_tx, stop)
                        .await
                {
                    tracing::error!("replay of {file}: {e}");
                    Stats::add(&stats.source_unusable, 1);
                }
            }));
        }
        Ok(match (config.source.kind, timing) {
            (SourceKind::Serial, Timing::Live) => {
                let format = config.line_format().map_err(start_error)?;
                let parser = LineParser::new(format).map_err(|e| StartError {
                    key: "source".into(),
                    message: e.to_string(),
                })?;
                tokio::spawn(async move {
                    crate::source::serial::run(&config, parser, clock, src_tx, stats, stop).await
                })
            }
            (SourceKind::Can, Timing::Live) => {
                let mut decoding =
                    crate::source::can::Decoding::from_config(&config).map_err(start_error)?;
                if let Some(judge) = &self.gps {
                    decoding.set_gps_judge(judge.clone());
                }
                tokio::spawn(async move {
                    crate::source::can::run(&config, decoding, clock, src_tx, stats, stop).await
                })
            }
            _ => {
                let mut decoding =
                    crate::source::can::Decoding::for_simulator(&config).map_err(start_error)?;
                if let (Some(judge), Timing::Live) = (&self.gps, timing) {
                    decoding.set_gps_judge(judge.clone());
                }
                let encoder = crate::source::can::FrameEncoder::new(&config, &decoding);
                // Live, the simulated car runs on the sampling clock like any other source.
                let sim = match timing {
                    Timing::Live => {
                        let start = clock.now();
                        SimSettings {
                            start,
                            utc_offset: sim.start - start,
                            ..sim
                        }
                    }
                    Timing::Data => sim,
                };
                tokio::spawn(async move {
                    sim_run::simulator(&config, sim, Some((encoder, decoding)), stats, src_tx, stop)
                        .await
                })
            }
        })
    }

    fn start_sampler(
        &self,
        timing: Timing,
        clock: LiveClock,
        src_rx: mpsc::Receiver<SourceEvent>,
        reading_tx: mpsc::Sender<Reading>,
    ) -> tokio::task::JoinHandle<()> {
        let sampler = Sampler::new(self.config, self.stats.clone());
        match timing {
            Timing::Data => tokio::spawn(sample_on_data_clock(
                src_rx,
                reading_tx,
                DataClock::new(sampler),
            )),
            Timing::Live => tokio::spawn(sample_on_live_clock(
                src_rx,
                reading_tx,
                sampler,
                clock,
                self.stats.clone(),
                self.stop.clone(),
            )),
        }
    }

    /// The status file, READY and the watchdog, the stats line every minute.
    fn start_health(
        &self,
        status_file: Option<std::path::PathBuf>,
        meta: &crate::ops::health::Meta,
        publishing: bool,
    ) -> Health {
        let (stats, stop) = (self.stats, self.stop);
        let spool = publishing.then(|| self.spool_stats.clone());
        let status_file = status_file
            .filter(|p| !p.as_os_str().is_empty())
            .map(|path| {
                tokio::spawn(write_status_file(
                    path,
                    self.config.status.file_interval.0,
                    meta.clone(),
                    stats.clone(),
                    spool.clone(),
                    stop.clone(),
                ))
            });
        let supervisor = tokio::spawn(crate::ops::notify::supervise(
            stats.clone(),
            spool.clone(),
            publishing,
            stop.clone(),
        ));
        // A spool that cannot be written does not hold READY back; the STATUS says so at once.
        crate::ops::notify::ready(&crate::ops::notify::status_line(stats, spool.as_deref()));
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                crate::ops::notify::stopping();
            });
        }
        let ticker = {
            let stats = stats.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                every.tick().await;
                loop {
                    tokio::select! {
                        _ = every.tick() => tracing::info!("stats: {}", stats.line()),
                        _ = stop.cancelled() => return,
                    }
                }
            })
        };
        Health {
            status_file,
            supervisor,
            ticker,
        }
    }
}

fn publisher_settings(
    config: &Config,
    meta: &crate::ops::health::Meta,
) -> Result<PublisherSettings, StartError> {
    let m = config.mqtt.as_ref().ok_or_else(|| StartError {
        key: "mqtt".into(),
        message: "the [mqtt] table is required to publish (or use --stdout)".into(),
    })?;
    let topic = config.topic().ok_or_else(|| StartError {
        key: "mqtt.topic".into(),
        message: "not a valid topic".into(),
    })?;
    Ok(PublisherSettings {
        topic,
        window: usize::from(m.max_inflight),
        shutdown_timeout: config.delivery.shutdown_timeout.0,
        endpoint: format!("{}:{}", m.endpoint, m.port),
        status: config
            .status_topic()
            .map(|topic| crate::uplink::publisher::StatusSettings {
                topic,
                interval: config.status.interval.0,
                meta: meta.clone(),
            }),
    })
}

fn spool_settings(config: &Config, opts: &spool::Options, temporary: bool) -> spool::Settings {
    let sync_interval = match config.spool.as_ref().map(|s| s.sync_interval) {
        Some(SyncInterval::Always) => None,
        Some(SyncInterval::Every(d)) => Some(d.0),
        None => Some(Duration::from_secs(1)),
    };
    spool::Settings {
        log: opts.clone(),
        sync_interval,
        order: config.delivery.order,
        mode: config.batch.payload,
        max_payload: config.batch.max_bytes.0 as usize,
        memory_batches: config.delivery.memory_batches,
        memory_bytes: usize::try_from(config.delivery.memory_bytes.0).unwrap_or(usize::MAX),
        temporary,
    }
}

/// Waits for the publisher (or the printer) and the spool thread to end.
async fn finish_delivery(
    delivery: Delivery,
    spool_stats: &SpoolStats,
) -> Result<Summary, StartError> {
    match delivery {
        Delivery::Stdout(printer) => {
            let _ = printer.await;
            Ok(Summary::default())
        }
        Delivery::Mqtt { publisher, thread } => {
            match publisher.await {
                Ok(Ok(())) => {}
                Ok(Err((key, message))) => return Err(StartError { key, message }),
                Err(e) => tracing::error!("publisher task failed: {e}"),
            }
            // Every sender of spool commands is gone now: the spool syncs and ends.
            if tokio::task::spawn_blocking(move || thread.join())
                .await
                .is_err()
            {
                tracing::error!("spool thread failed");
            }
            // Batches held for a clock are unacknowledged too, in segments of their own.
            Ok(Summary {
                unacked_batches: Stats::get(&spool_stats.unacked_batches)
                    + Stats::get(&spool_stats.held_batches),
            })
        }
    }
}

enum Delivery {
    Stdout(tokio::task::JoinHandle<()>),
    Mqtt {
        publisher: tokio::task::JoinHandle<Result<(), (String, String)>>,
        thread: std::thread::JoinHandle<()>,
    },
}

/// The wall clock's judge: the system per `[clock] trust`; in a build with the `test-hooks`
/// feature (tests only, never the car), the file named by `REDLINE_TEST_CLOCK_FILE` when set.
fn clock_source(config: &Config) -> ClockSource {
    #[cfg(feature = "test-hooks")]
    if let Some(path) = std::env::var_os("REDLINE_TEST_CLOCK_FILE") {
        tracing::warn!(
            "test hook active: REDLINE_TEST_CLOCK_FILE={}: the wall clock is judged by this file, not by [clock] trust",
            std::path::Path::new(&path).display()
        );
        return ClockSource::File(path.into());
    }
    ClockSource::System {
        floor_us: crate::ops::clock::build_floor_us(),
        require_sync: config.clock.trust == crate::config::Trust::Synced,
    }
}

/// Looks at the wall clock every `every`: when it becomes trusted, new readings carry UTC
/// and the spool converts those stamped on the boot clock; when it steps (NTP), timestamps
/// follow the step in whole grid periods, so the grid of the readings goes on unbroken.
async fn watch_clock(
    judge: ClockJudge,
    clock: LiveClock,
    tx: tokio::sync::watch::Sender<TimeBase>,
    spool: Option<std::sync::mpsc::Sender<Cmd>>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut by_gps = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let mut tb = *tx.borrow();
        let wall_minus_sampling = crate::ops::clock::wall_now_us() - clock.now();
        let moved = if by_gps {
            judge.follow_gps(&mut tb, &mut by_gps, wall_minus_sampling)
        } else if tb.trusted {
            judge.follow_wall(&mut tb, wall_minus_sampling)
        } else {
            judge.trust(&mut tb, &mut by_gps, wall_minus_sampling)
        };
        if !moved {
            continue;
        }
        if let Some(spool) = &spool {
            // UTC − boot clock: from the wall clock when it is trusted; from GPS time, the
            // correction plus how far the sampling clock is from the boot clock.
            let utc_minus_boot = if by_gps {
                tb.correction + clock.now() - crate::ops::clock::boot_now_us()
            } else {
                crate::ops::clock::boot_to_utc_us()
            };
            let _ = spool.send(Cmd::BootOffset {
                boot_id: tb.boot_id,
                offset: crate::ops::clock::offset_on_grid(utc_minus_boot, judge.grid_step),
            });
        }
        if tx.send(tb).is_err() {
            return;
        }
    }
}

/// What the clock watcher believes: the wall clock's verdict, and GPS time when bound.
struct ClockJudge {
    source: ClockSource,
    gps: Option<Arc<std::sync::Mutex<crate::ops::gps_time::GpsJudge>>>,
    grid_step: Micros,
}

impl ClockJudge {
    fn gps_offset(&self) -> Option<Micros> {
        self.gps.as_ref()?.lock().ok()?.offset()
    }

    /// Untrusted so far: the wall clock, else GPS time, may make it trusted.
    fn trust(&self, tb: &mut TimeBase, by_gps: &mut bool, wall_minus_sampling: Micros) -> bool {
        if self.source.check() == crate::ops::clock::Verdict::Trusted {
            tb.correction = crate::ops::clock::offset_on_grid(wall_minus_sampling, self.grid_step);
            tracing::info!(
                "wall clock trusted now: readings stamped on the boot clock are converted with an offset of {:.3} s",
                tb.correction as f64 / 1e6
            );
        } else if let Some(offset) = self.gps_offset() {
            tb.correction = crate::ops::clock::offset_on_grid(offset, self.grid_step);
            *by_gps = true;
            tracing::info!(
                "clock trusted from GPS time: readings stamped on the boot clock are converted with an offset of {:.3} s (the wall clock is {:+.3} s from GPS time)",
                tb.correction as f64 / 1e6,
                (wall_minus_sampling - offset) as f64 / 1e6
            );
        } else {
            return false;
        }
        tb.trusted = true;
        true
    }

    /// Trusted by the wall clock: timestamps follow its steps (NTP), the grid goes on.
    fn follow_wall(&self, tb: &mut TimeBase, wall_minus_sampling: Micros) -> bool {
        let step = wall_minus_sampling - tb.correction;
        self.follow(tb, step, self.grid_step / 2 + 1, "wall clock stepped")
    }

    /// Timestamps follow a `step` of at least `threshold`, in whole ticks.
    fn follow(&self, tb: &mut TimeBase, step: Micros, threshold: Micros, what: &str) -> bool {
        if step.abs() < threshold {
            return false;
        }
        let adjust = crate::ops::clock::offset_on_grid(step, self.grid_step);
        tracing::warn!(
            "{what} by {:+.3} s: timestamps follow it by {:+.1} s, the sampling grid goes on",
            step as f64 / 1e6,
            adjust as f64 / 1e6
        );
        tb.correction += adjust;
        true
    }

    /// Trusted by GPS time: a wall clock trusted later takes over; until then timestamps
    /// follow GPS time when it moves by more than one and a half ticks (the boot clock's
    /// drift, a receiver's new fix), not its jitter.
    fn follow_gps(
        &self,
        tb: &mut TimeBase,
        by_gps: &mut bool,
        wall_minus_sampling: Micros,
    ) -> bool {
        if self.source.check() == crate::ops::clock::Verdict::Trusted {
            *by_gps = false;
            let wall = crate::ops::clock::offset_on_grid(wall_minus_sampling, self.grid_step);
            tracing::info!(
                "wall clock trusted now: it takes over from GPS time ({:+.3} s from it)",
                (wall - tb.correction) as f64 / 1e6
            );
            let moved = wall != tb.correction;
            tb.correction = wall;
            return moved;
        }
        let Some(offset) = self.gps_offset() else {
            return false;
        };
        let step = offset - tb.correction;
        self.follow(
            tb,
            step,
            self.grid_step + self.grid_step / 2,
            "GPS time moved",
        )
    }
}

/// Writes the status snapshot every `every` (and once more at the end, as stopped).
async fn write_status_file(
    path: std::path::PathBuf,
    every: Duration,
    meta: crate::ops::health::Meta,
    stats: Arc<Stats>,
    spool: Option<Arc<SpoolStats>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        let mut snap = crate::ops::health::snapshot(&meta, &stats, spool.as_deref());
        if stopping {
            snap["state"] = "stopped".into();
        }
        match crate::ops::health::write_file(&path, &snap) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("cannot write the status file {}: {e}", path.display());
            }
            Err(_) => {}
        }
        if stopping {
            return;
        }
    }
}

async fn sample_on_data_clock(
    mut rx: mpsc::Receiver<SourceEvent>,
    tx: mpsc::Sender<Reading>,
    mut clock: DataClock,
) {
    let mut out = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            SourceEvent::Update(u) => clock.update(u, &mut out),
            SourceEvent::Clock(t) => clock.advance_before(t, &mut out),
        }
        for r in out.drain(..) {
            if tx.send(r).await.is_err() {
                return;
            }
        }
    }
}

/// Ticks on the wall clock. A tick missed because the process was starved is counted and
/// skipped, never back-filled with made-up readings.
async fn sample_on_live_clock(
    mut rx: mpsc::Receiver<SourceEvent>,
    tx: mpsc::Sender<Reading>,
    mut sampler: Sampler,
    clock: LiveClock,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut n = sampler.first_tick_at_or_after(clock.now());
    // A test hook (`test-hooks` builds only): the systemd watchdog test stalls the sampler
    // to prove it stops the pings.
    #[cfg(feature = "test-hooks")]
    let stall_at = std::env::var("REDLINE_TEST_STALL_SAMPLER_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| {
            tracing::warn!(
                "test hook active: REDLINE_TEST_STALL_SAMPLER_AFTER_MS={ms}: the sampler stalls {ms} ms after start"
            );
            tokio::time::Instant::now() + Duration::from_millis(ms)
        });
    loop {
        #[cfg(feature = "test-hooks")]
        if stall_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
            tracing::warn!("test hook: sampler stalled on purpose");
            stop.cancelled().await;
            return;
        }
        let due: Micros = sampler.tick_time(n);
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(SourceEvent::Update(u)) => sampler.apply(u),
                Some(SourceEvent::Clock(_)) => {}
                None => return,
            },
            _ = tokio::time::sleep_until(clock.instant_of(due)) => {
                let latest = sampler.last_tick_at_or_before(clock.now());
                if latest > n {
                    Stats::add(&stats.ticks_missed, (latest - n) as u64);
                    n = latest;
                }
                let reading = sampler.sample(sampler.tick_time(n));
                n += 1;
                if tx.send(reading).await.is_err() {
                    return;
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

async fn batch_readings(
    mut rx: mpsc::Receiver<Reading>,
    out: BatchOut,
    encoder: RecordEncoder,
    mut batcher: Batcher,
    mut timebase: Option<tokio::sync::watch::Receiver<TimeBase>>,
    timing: Timing,
    stats: Arc<Stats>,
) {
    let mut record = Vec::with_capacity(512);
    let mut closed = Vec::new();
    let mut correction = 0;
    if let Some(tb) = &timebase {
        let tb = *tb.borrow();
        batcher.boot = (!tb.trusted).then_some(tb.boot_id);
    }
    while let Some(mut reading) = rx.recv().await {
        if let Some(tb) = &mut timebase
            && tb.has_changed().unwrap_or(false)
        {
            let now = *tb.borrow_and_update();
            // A batch is on one clock: close the open one at the switch.
            if let Some(b) = batcher.flush()
                && !emit(&out, b, timing, &stats).await
            {
                return;
            }
            batcher.boot = (!now.trusted).then_some(now.boot_id);
            correction = if now.trusted { now.correction } else { 0 };
        }
        reading.at += correction;
        record.clear();
        encoder.encode(&reading, &mut record);
        batcher.push(&record, reading.at, &mut closed);
        for b in closed.drain(..) {
            if !emit(&out, b, timing, &stats).await {
                return;
            }
        }
    }
    if let Some(b) = batcher.flush() {
        emit(&out, b, timing, &stats).await;
    }
    if let BatchOut::Spool(tx, ..) = &out {
        let _ = tx.send(Cmd::UpstreamDone);
    }
    if batcher.oversize > 0 {
        tracing::warn!(
            "{} record(s) larger than batch.max_bytes were dropped",
            batcher.oversize
        );
    }
}

/// Hands a batch on: to the spool (never blocks: sampling must not wait for a disk; if the
/// spool thread is stuck in a hung disk, the batch is dropped and counted once its queue
/// is full, by batches or by bytes), or to stdout (waits: printing is the whole point).
async fn emit(out: &BatchOut, b: Batch, timing: Timing, stats: &Stats) -> bool {
    Stats::add(&stats.batches, 1);
    match out {
        BatchOut::Stdout(tx) => tx.send(b).await.is_ok(),
        BatchOut::Spool(tx, spool, cap) => {
            use std::sync::atomic::Ordering::Relaxed;
            let cost = spool::service::memory_cost(&b) as u64;
            let queued = || {
                (
                    spool.queued_appends.load(Relaxed),
                    spool.queued_append_bytes.load(Relaxed),
                )
            };
            // An empty queue always takes one (`memory_bytes` is at least two of the largest).
            let full = |(n, bytes): (u64, u64)| {
                n >= cap.batches || (bytes > 0 && bytes + cost > cap.bytes)
            };
            // Simulation and replay run on their own clock: they wait instead.
            while timing == Timing::Data && full(queued()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (n, bytes) = queued();
            if full((n, bytes)) {
                if Stats::get(&stats.batches_dropped) == 0 {
                    tracing::error!(
                        "the spool thread has taken none of the last {n} batch(es), {bytes} bytes (a hung disk?): dropping new readings while its queue is at its bound (delivery.memory_batches = {}, delivery.memory_bytes = {})",
                        cap.batches,
                        cap.bytes
                    );
                }
                Stats::add(&stats.batches_dropped, 1);
                Stats::add(&stats.readings_dropped, b.len() as u64);
                return true;
            }
            spool.put_queued(&b);
            tx.send(Cmd::Append(b)).is_ok()
        }
    }
}

/// Prints each message payload as one line on stdout.
async fn stdout_sink(mut rx: mpsc::Receiver<Batch>, mode: crate::config::PayloadMode) {
    let mut messages = Vec::new();
    let stdout = std::io::stdout();
    while let Some(b) = rx.recv().await {
        messages.clear();
        batch::messages_for(&b, mode, &mut messages);
        let mut out = stdout.lock();
        for m in &messages {
            let ok = out.write_all(&m.payload).and_then(|_| out.write_all(b"\n"));
            if ok.is_err() {
                // The reader went away (`| head`): nothing left to print to.
                return;
            }
        }
        let _ = out.flush();
    }
}

#[cfg(all(test, feature = "test-hooks"))]
mod tests {
    use super::*;
    use crate::ops::gps_time::{GpsJudge, GpsSample};

    const GRID: Micros = 100_000;
    const FLOOR: Micros = 1_700_000_000_000_000;
    /// UTC minus the boot clock of this imagined ECU.
    const TRUE_OFFSET: Micros = 1_800_000_000_000_000 - 5_000_000;

    struct Rig {
        _dir: tempfile::TempDir,
        clock_file: std::path::PathBuf,
        gps: Arc<std::sync::Mutex<GpsJudge>>,
        judge: ClockJudge,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock_file = dir.path().join("clock");
        std::fs::write(&clock_file, "untrusted").expect("clock file");
        let gps = Arc::new(std::sync::Mutex::new(GpsJudge::new(FLOOR)));
        let judge = ClockJudge {
            source: ClockSource::File(clock_file.clone()),
            gps: Some(gps.clone()),
            grid_step: GRID,
        };
        Rig {
            _dir: dir,
            clock_file,
            gps,
            judge,
        }
    }

    /// `secs` of a 10 Hz receiver whose time is `offset` ahead of the boot clock, from `from`.
    fn hear(rig: &Rig, from: Micros, secs: i64, offset: Micros) {
        let mut j = rig.gps.lock().expect("lock");
        for i in 0..secs * 10 {
            let at = from + i * 100_000;
            j.offer(GpsSample {
                utc: at + offset - 30_000,
                at,
            });
        }
    }

    fn untrusted() -> TimeBase {
        TimeBase {
            trusted: false,
            correction: 0,
            boot_id: [1; 16],
        }
    }

    #[test]
    fn gps_time_trusts_an_untrusted_clock_and_is_followed_past_one_and_a_half_ticks() {
        let rig = rig();
        let (mut tb, mut by_gps) = (untrusted(), false);
        // The wall clock reads 1970 on this ECU: wall − sampling is about zero.
        assert!(!rig.judge.trust(&mut tb, &mut by_gps, 0), "no GPS yet");
        hear(&rig, 5_000_000, 3, TRUE_OFFSET);
        assert!(rig.judge.trust(&mut tb, &mut by_gps, 0));
        assert!(tb.trusted && by_gps);
        assert_eq!(
            tb.correction, TRUE_OFFSET,
            "30 ms of bus latency rounds away"
        );

        // Jitter of a tick is not followed; a 10 s step of the receiver is, in whole ticks.
        hear(&rig, 8_000_000, 3, TRUE_OFFSET + 120_000);
        assert!(!rig.judge.follow_gps(&mut tb, &mut by_gps, 0));
        assert_eq!(tb.correction, TRUE_OFFSET);
        hear(&rig, 11_000_000, 3, TRUE_OFFSET + 10_000_000);
        assert!(rig.judge.follow_gps(&mut tb, &mut by_gps, 0));
        assert_eq!(tb.correction, TRUE_OFFSET + 10_000_000);

        // NTP arrives: the wall clock takes over from GPS time.
        std::fs::write(&rig.clock_file, "trusted").expect("clock file");
        let wall = TRUE_OFFSET + 10_040_000;
        assert!(
            !rig.judge.follow_gps(&mut tb, &mut by_gps, wall),
            "the wall clock agrees with GPS time on the grid: nothing moves"
        );
        assert!(!by_gps, "but it is the wall clock that is followed now");
        assert_eq!(tb.correction, TRUE_OFFSET + 10_000_000);
        // From now on the wall clock's steps are followed, beyond half a tick.
        assert!(
            !rig.judge.follow_wall(&mut tb, wall),
            "40 ms: within half a tick"
        );
        assert!(rig.judge.follow_wall(&mut tb, wall + 2_000_000));
        assert_eq!(tb.correction, TRUE_OFFSET + 12_000_000);
    }

    #[test]
    fn a_trusted_wall_clock_wins_over_gps_time_at_the_start() {
        let rig = rig();
        std::fs::write(&rig.clock_file, "trusted").expect("clock file");
        hear(&rig, 5_000_000, 3, TRUE_OFFSET);
        let (mut tb, mut by_gps) = (untrusted(), false);
        assert!(rig.judge.trust(&mut tb, &mut by_gps, 7_250_000));
        assert!(tb.trusted && !by_gps);
        assert_eq!(
            tb.correction, 7_300_000,
            "the wall clock's offset, on the grid"
        );
    }
}
