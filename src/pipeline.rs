//! The house wired together: source → sampler → batcher → publisher (or stdout), one task per
//! stage, bounded channels between them. Stopping the source drains every stage behind it.

use crate::batch::{self, Batch, Batcher, Limits};
use crate::clock::LiveClock;
use crate::config::Config;
use crate::publisher::{self, PublisherSettings};
use crate::record::{Reading, RecordEncoder};
use crate::sampler::{DataClock, Sampler};
use crate::signal::{Micros, SourceEvent};
use crate::source::{self, SimSettings};
use crate::stats::Stats;
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
}

#[derive(Debug, Default)]
pub struct Summary {
    pub unacked_batches: u64,
    pub unacked_records: u64,
}

/// An error that stops the agent before it runs: a config key and what is wrong with it.
#[derive(Debug)]
pub struct StartError {
    pub key: String,
    pub message: String,
}

pub async fn run(
    plan: Plan,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<Summary, StartError> {
    let Plan {
        config,
        session_id,
        timing,
        sink,
        sim,
    } = plan;
    let period = 1_000_000 / i64::from(config.sampling.rate_hz);
    // In data time the publisher holds few batches (backpressure slows the simulation
    // instead of losing data); live, its queue is the memory buffer for a link outage.
    let batch_cap = match timing {
        Timing::Data => 8,
        Timing::Live => config.delivery.memory_batches,
    };
    let batch_chan = 8;
    let (src_tx, src_rx) = mpsc::channel::<SourceEvent>(1024);
    let (reading_tx, reading_rx) = mpsc::channel::<Reading>(256);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(batch_chan);

    // The publisher is built first: a TLS or key problem stops the start, before sampling.
    let publisher = match sink {
        Sink::Mqtt => {
            let topic = config.topic().ok_or_else(|| StartError {
                key: "mqtt".into(),
                message: "the [mqtt] table is required to publish (or use --stdout)".into(),
            })?;
            let m = config.mqtt.as_ref().ok_or_else(|| StartError {
                key: "mqtt".into(),
                message: "the [mqtt] table is required".into(),
            })?;
            let settings = PublisherSettings {
                topic,
                mode: config.batch.payload,
                window: usize::from(m.max_inflight),
                shutdown_timeout: config.delivery.shutdown_timeout.0,
                endpoint: format!("{}:{}", m.endpoint, m.port),
                max_queued_batches: batch_cap,
            };
            let config = config.clone();
            let stats = stats.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                publisher::run(&config, settings, batch_rx, None, stats, stop).await
            })
        }
        Sink::Stdout => {
            let mode = config.batch.payload;
            tokio::spawn(async move {
                stdout_sink(batch_rx, mode).await;
                Ok(publisher::Outcome::default())
            })
        }
    };

    let source = {
        let config = config.clone();
        let stop = stop.clone();
        tokio::spawn(async move { source::simulator(&config, sim, src_tx, stop).await })
    };
    let sampler = Sampler::new(&config, stats.clone());
    let sampling = match timing {
        Timing::Data => tokio::spawn(sample_on_data_clock(
            src_rx,
            reading_tx,
            DataClock::new(sampler),
        )),
        Timing::Live => tokio::spawn(sample_on_live_clock(
            src_rx,
            reading_tx,
            sampler,
            LiveClock::start(),
            stats.clone(),
            stop.clone(),
        )),
    };
    let batching = {
        let encoder = RecordEncoder::new(&config, &session_id);
        let batcher = Batcher::new(Limits::from_config(&config.batch), period, 0);
        let stats = stats.clone();
        tokio::spawn(batch_readings(
            reading_rx, batch_tx, encoder, batcher, timing, stats,
        ))
    };
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

    let _ = source.await;
    let _ = sampling.await;
    let _ = batching.await;
    let outcome = match publisher.await {
        Ok(Ok(o)) => o,
        Ok(Err((key, message))) => return Err(StartError { key, message }),
        Err(e) => {
            tracing::error!("publisher task failed: {e}");
            publisher::Outcome::default()
        }
    };
    ticker.abort();
    Ok(Summary {
        unacked_batches: outcome.unacked_batches,
        unacked_records: outcome.unacked_records,
    })
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
    loop {
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
    tx: mpsc::Sender<Batch>,
    encoder: RecordEncoder,
    mut batcher: Batcher,
    timing: Timing,
    stats: Arc<Stats>,
) {
    let mut record = Vec::with_capacity(512);
    let mut closed = Vec::new();
    let mut dropped_since_log = 0u64;
    while let Some(reading) = rx.recv().await {
        record.clear();
        encoder.encode(&reading, &mut record);
        batcher.push(&record, reading.at, &mut closed);
        for b in closed.drain(..) {
            if !emit(&tx, b, timing, &stats, &mut dropped_since_log).await {
                return;
            }
        }
    }
    if let Some(b) = batcher.flush() {
        emit(&tx, b, timing, &stats, &mut dropped_since_log).await;
    }
    if batcher.oversize > 0 {
        tracing::warn!(
            "{} record(s) larger than batch.max_bytes were dropped",
            batcher.oversize
        );
    }
}

/// Hands a batch on. Live, a full buffer drops the batch (counted, logged) rather than
/// stalling the sampler; in data time it waits.
async fn emit(
    tx: &mpsc::Sender<Batch>,
    b: Batch,
    timing: Timing,
    stats: &Stats,
    dropped_since_log: &mut u64,
) -> bool {
    Stats::add(&stats.batches, 1);
    match timing {
        Timing::Data => tx.send(b).await.is_ok(),
        Timing::Live => match tx.try_send(b) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(b)) => {
                Stats::add(&stats.batches_dropped, 1);
                Stats::add(&stats.readings_dropped, b.len() as u64);
                if *dropped_since_log == 0 {
                    tracing::error!(
                        "memory buffer full (delivery.memory_batches): dropping readings from {} ms",
                        b.first_at / 1000
                    );
                }
                *dropped_since_log += 1;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        },
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
