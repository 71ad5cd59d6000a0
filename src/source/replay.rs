//! candump replay: a `candump -L` log through the real decoding path, on the log's own
//! clock, so the same log gives the same records at any speed.

use crate::ops::stats::Stats;
use crate::sample::signal::{Micros, SourceEvent};
use crate::source::can::Decoding;
use crate::source::candump::{self, LineError};
use crate::source::sim_run::Speed;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Malformed lines logged one by one; after that only counted (and summed up at the end).
const LOG_FIRST: u64 = 20;

pub struct Replay {
    pub file: PathBuf,
    pub speed: Speed,
    /// Only frames of this interface (none: all).
    pub interface: Option<String>,
}

impl Replay {
    /// Whether frames of `interface` are replayed.
    fn takes(&self, interface: &str) -> bool {
        self.interface.as_deref().is_none_or(|i| i == interface)
    }
}

/// How far into the log (on its clock) GPS time is looked for.
const GPS_SEARCH: Micros = 600_000_000;

/// Reads the log and sends its frames' values, paced on the log's clock. With `[clock] gps`
/// bound and GPS time in the log that disagrees with the log's clock (a logger without a
/// battery-backed clock stamps 1970), every timestamp is moved onto GPS time, by a whole
/// number of `grid_step`s so the sampling grid stays.
pub async fn run(
    replay: Replay,
    mut decoding: Decoding,
    grid_step: Micros,
    stats: Arc<Stats>,
    tx: mpsc::Sender<SourceEvent>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let shift = gps_shift(&replay, &mut decoding, grid_step).await?;
    let file = tokio::fs::File::open(&replay.file).await?;
    let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, file);
    let mut line = Vec::with_capacity(256);
    let mut events = Vec::with_capacity(16);
    let (mut number, mut bad) = (0u64, 0u64);
    // Frames per interface, to say what the log holds; frames replayed; values decoded.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let (mut used, mut values) = (0u64, 0u64);
    let mut first: Option<(Micros, Instant)> = None;
    let mut last: Option<Micros> = None;
    loop {
        if stop.is_cancelled() {
            break;
        }
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            break;
        }
        number += 1;
        let frame = match candump::parse_line(&line) {
            Ok(f) => f,
            Err(LineError::Empty) => continue,
            Err(e) => {
                bad += 1;
                stats.source_error(e.reason());
                if bad <= LOG_FIRST {
                    tracing::warn!(
                        "{} line {number}: {} ({}), skipped",
                        replay.file.display(),
                        e.reason(),
                        String::from_utf8_lossy(&line).trim_end()
                    );
                }
                continue;
            }
        };
        match seen.get_mut(frame.interface) {
            Some(n) => *n += 1,
            None => {
                seen.insert(frame.interface.to_owned(), 1);
            }
        }
        if !replay.takes(frame.interface) {
            continue;
        }
        used += 1;
        // The log's clock never runs backwards for the sampler (candump logs from several
        // interfaces can interleave out of order by microseconds).
        let time_us = frame.time_us + shift;
        let at = last.map_or(time_us, |l| l.max(time_us));
        last = Some(at);
        if frame.remote {
            stats.source_error("remote_frame");
            continue;
        }
        if let Speed::Factor(x) = replay.speed {
            let (t0, w0) = *first.get_or_insert((at, Instant::now()));
            let due = w0 + Duration::from_micros((at - t0).max(0) as u64).div_f64(x);
            if due > Instant::now() + Duration::from_millis(5) {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
        decoding.decode(
            frame.id,
            frame.extended,
            frame.data(),
            at,
            &stats,
            &mut events,
        );
        values += events.len() as u64;
        for ev in events.drain(..) {
            if tx.send(ev).await.is_err() {
                return Ok(());
            }
        }
    }
    let holds = log_summary(&replay, number, bad, used, values, &seen);
    if let Some(t) = last {
        // Every tick up to the last frame is due.
        let _ = tx.send(SourceEvent::Clock(t + 1)).await;
    }
    if values == 0 && !stop.is_cancelled() {
        return Err(std::io::Error::other(nothing_usable(
            &holds,
            used,
            replay.interface.as_deref(),
            &seen,
        )));
    }
    Ok(())
}

/// Logs what the log held and what was replayed; returns the "what it holds" part for
/// the error when nothing was usable.
fn log_summary(
    replay: &Replay,
    number: u64,
    bad: u64,
    used: u64,
    values: u64,
    seen: &BTreeMap<String, u64>,
) -> String {
    if bad > LOG_FIRST {
        tracing::warn!(
            "{}: {bad} malformed line(s) in all ({} not shown)",
            replay.file.display(),
            bad - LOG_FIRST
        );
    }
    let holds = if seen.is_empty() {
        "no candump frame".to_owned()
    } else {
        seen.iter()
            .map(|(i, n)| format!("{n} frame(s) on {i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    tracing::info!(
        "{}: {number} line(s): {holds}; {used} frame(s) replayed{}, {values} value(s) decoded",
        replay.file.display(),
        replay
            .interface
            .as_deref()
            .map_or(String::new(), |i| format!(" from {i}"))
    );
    holds
}

/// The whole number of `grid_step`s that puts the log's clock on GPS time: 0 without
/// `[clock] gps`, without GPS time the judge believes in the log's first `GPS_SEARCH`, or
/// when the log's clock already agrees with GPS time.
async fn gps_shift(
    replay: &Replay,
    decoding: &mut Decoding,
    grid_step: Micros,
) -> std::io::Result<Micros> {
    let Some(judge) = decoding.gps_judge() else {
        return Ok(0);
    };
    let file = tokio::fs::File::open(&replay.file).await?;
    let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, file);
    let mut line = Vec::with_capacity(256);
    let mut scratch = Vec::with_capacity(16);
    // This pass only looks: its frames are counted by the replay itself.
    let uncounted = Stats::default();
    let mut first: Option<Micros> = None;
    let mut offset = None;
    while offset.is_none() {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            break;
        }
        let Ok(frame) = candump::parse_line(&line) else {
            continue;
        };
        if !replay.takes(frame.interface) || frame.remote {
            continue;
        }
        if frame.time_us - *first.get_or_insert(frame.time_us) > GPS_SEARCH {
            break;
        }
        decoding.decode(
            frame.id,
            frame.extended,
            frame.data(),
            frame.time_us,
            &uncounted,
            &mut scratch,
        );
        scratch.clear();
        offset = judge.lock().ok().and_then(|j| j.offset());
    }
    let file = replay.file.display();
    let Some(offset) = offset else {
        tracing::warn!(
            "{file}: no GPS time to believe in the log (clock.gps): its timestamps are kept"
        );
        return Ok(0);
    };
    if offset.abs() <= crate::ops::gps_time::AGREEMENT {
        tracing::info!(
            "{file}: the log's clock agrees with GPS time ({:+.3} s): its timestamps are kept",
            offset as f64 / 1e6
        );
        return Ok(0);
    }
    let shift = crate::ops::clock::offset_on_grid(offset, grid_step);
    tracing::info!(
        "{file}: the log's clock is {:+.3} s from GPS time: timestamps moved by {:+.1} s onto it",
        -offset as f64 / 1e6,
        shift as f64 / 1e6
    );
    Ok(shift)
}

/// Why a log gave no value, and what to try.
fn nothing_usable(
    holds: &str,
    used: u64,
    interface: Option<&str>,
    seen: &BTreeMap<String, u64>,
) -> String {
    match interface {
        Some(i) if used == 0 && !seen.is_empty() => {
            let others: Vec<&str> = seen.keys().map(String::as_str).collect();
            format!(
                "nothing to replay: the log holds {holds} and none on {i}; \
                 replay one of them with --interface {} (or --interface all)",
                others.join(" / --interface ")
            )
        }
        _ if seen.is_empty() => format!(
            "nothing to replay: {holds} (is it a `candump -L` log? lines look like \
             `(1705267200.000000) can0 123#DEADBEEF`)"
        ),
        _ => format!(
            "nothing decoded from {used} frame(s) ({holds}): none is a message the DBC \
             binds to a field (source.dbc, source.signals)"
        ),
    }
}
