//! The simulated car run as a source (`simulator`: its frames go through the CAN decoder as
//! on the car), and as bench rigs that put it on a serial device (`emit_lines`) or a CAN
//! interface (`emit_can`).

use crate::config::Config;
use crate::sample::signal::{FieldId, Micros, SignalUpdate, SourceEvent};
use crate::source::simulator::{Sensor, Simulator};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How fast simulated time runs against the wall clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    Factor(f64),
    Max,
}

impl std::str::FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(Speed::Factor(x)),
            _ => Err(format!("expected a positive number or `max`, got {s:?}")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimSettings {
    pub seed: u64,
    pub start: Micros,
    pub faults: bool,
    pub duration: Option<Duration>,
    pub speed: Speed,
    /// UTC minus the simulated car's clock: its GPS receiver (when `[clock] gps` is bound)
    /// reports this machine's wall clock even when the agent samples on the boot clock.
    pub utc_offset: Micros,
}

/// How often the simulated GPS receiver sends its time.
const GPS_EVERY: Micros = 100_000;

/// The simulated GPS receiver's frames up to `now`.
fn gps_frames(
    encoder: &crate::source::can::FrameEncoder,
    next: &mut Micros,
    now: Micros,
    utc_offset: Micros,
    out: &mut Vec<(Micros, crate::source::can::RawFrame)>,
) {
    if !encoder.has_gps() {
        return;
    }
    while *next <= now {
        encoder.gps_frames(*next + utc_offset, *next, out);
        *next += GPS_EVERY;
    }
}

/// The simulated car's clock against the wall clock: where it ends, and how fast it runs.
struct Pacer {
    start: Micros,
    end: Option<Micros>,
    speed: Speed,
    wall_start: Instant,
    steps: u64,
}

impl Pacer {
    fn new(settings: &SimSettings) -> Self {
        Self {
            start: settings.start,
            end: settings
                .duration
                .map(|d| settings.start + d.as_micros() as Micros),
            speed: settings.speed,
            wall_start: Instant::now(),
            steps: 0,
        }
    }

    /// After one step that reached simulated time `now`: sleeps until the wall clock has
    /// caught up (every `every` steps: quiet enough, smooth enough).
    async fn pace(&mut self, now: Micros, every: u64, stop: &CancellationToken) {
        self.steps += 1;
        if let Speed::Factor(x) = self.speed
            && self.steps.is_multiple_of(every)
        {
            let sim_elapsed = Duration::from_micros((now - self.start).max(0) as u64);
            tokio::select! {
                _ = tokio::time::sleep_until(self.wall_start + sim_elapsed.div_f64(x)) => {}
                _ = stop.cancelled() => {}
            }
        }
    }
}

/// Which configured field each simulated sensor feeds (sensors with no field are ignored).
fn field_map(config: &Config) -> Vec<(Sensor, FieldId)> {
    Sensor::ALL
        .iter()
        .filter_map(|&s| config.fields.get_index_of(s.name()).map(|f| (s, f)))
        .collect()
}

/// Runs the simulated car and sends its sensor values; ends at the end of the duration or
/// when `stop` fires, with a last `Clock` event so the sampler takes every tick before it.
///
/// The car's values travel as they would on the real car: encoded into frames of its CAN bus
/// (`bus`), then decoded by the same decoder a CAN source uses.
pub async fn simulator(
    config: &Config,
    settings: SimSettings,
    mut bus: Option<(
        crate::source::can::FrameEncoder,
        crate::source::can::Decoding,
    )>,
    stats: std::sync::Arc<crate::ops::stats::Stats>,
    tx: mpsc::Sender<SourceEvent>,
    stop: CancellationToken,
) {
    let map = field_map(config);
    let mut decoded = Vec::new();
    let mut frames = Vec::new();
    let mut sim = Simulator::new(settings.seed, settings.start, settings.faults);
    let mut pacer = Pacer::new(&settings);
    let end = pacer.end;
    let mut updates = Vec::new();
    let mut next_gps = settings.start;
    if tx.send(SourceEvent::Clock(settings.start)).await.is_err() {
        return;
    }
    loop {
        if stop.is_cancelled() {
            let _ = tx.send(SourceEvent::Clock(sim.now())).await;
            return;
        }
        updates.clear();
        let now = sim.step(&mut updates);
        updates.retain(|u| end.is_none_or(|e| u.at < e));
        if let Some((encoder, decoding)) = &mut bus {
            frames.clear();
            encoder.step_frames(&updates, &mut frames);
            let upto = end.map_or(now, |e| now.min(e - 1));
            gps_frames(
                encoder,
                &mut next_gps,
                upto,
                settings.utc_offset,
                &mut frames,
            );
            for (at, f) in &frames {
                decoding.decode(f.id, f.extended, f.data(), *at, &stats, &mut decoded);
            }
            for ev in decoded.drain(..) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        } else {
            for u in &updates {
                if let Some(&(_, field)) = map.iter().find(|(s, _)| *s == u.sensor) {
                    let ev = SourceEvent::Update(SignalUpdate {
                        field,
                        value: u.value,
                        at: u.at,
                    });
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        }
        if let Some(e) = end
            && now >= e
        {
            let _ = tx.send(SourceEvent::Clock(e)).await;
            return;
        }
        pacer.pace(now, 5, &stop).await;
    }
}

/// Writes the simulated car as sensor lines (`line_rate` a second, each with the latest
/// value of every field) to the configured serial device: a bench rig for the serial source.
pub async fn emit_lines(
    config: &Config,
    parser: crate::source::line_protocol::LineParser,
    settings: SimSettings,
    line_rate: u32,
    stop: CancellationToken,
) -> std::io::Result<u64> {
    use tokio::io::AsyncWriteExt;
    use tokio_serial::SerialPortBuilderExt;
    let mut port = crate::source::serial::builder(config).open_native_async()?;
    let map = field_map(config);
    let mut sim = Simulator::new(settings.seed, settings.start, settings.faults);
    let mut pacer = Pacer::new(&settings);
    let end = pacer.end;
    let every = 1_000_000 / i64::from(line_rate);
    let mut next_line = settings.start;
    let mut latest: Vec<Option<f64>> = vec![None; config.fields.len()];
    let mut updates = Vec::new();
    let mut line = Vec::with_capacity(256);
    let mut values = Vec::with_capacity(latest.len());
    let mut written = 0u64;
    while !stop.is_cancelled() {
        updates.clear();
        let now = sim.step(&mut updates);
        for u in &updates {
            if let Some(&(_, field)) = map.iter().find(|(s, _)| *s == u.sensor) {
                latest[field] = Some(u.value);
            }
        }
        if end.is_some_and(|e| now > e) {
            break;
        }
        if now < next_line {
            continue;
        }
        next_line += every;
        values.clear();
        values.extend(
            latest
                .iter()
                .enumerate()
                .filter_map(|(f, v)| v.map(|v| (f, v))),
        );
        line.clear();
        parser.format_line(&values, &mut line);
        line.extend_from_slice(b"\r\n");
        port.write_all(&line).await?;
        written += 1;
        pacer.pace(now, 1, &stop).await;
    }
    port.flush().await?;
    Ok(written)
}

/// Puts the simulated car's frames on a real CAN interface, paced at `settings.speed`: a
/// bench rig for the CAN source.
pub async fn emit_can(
    config: &Config,
    iface: &str,
    settings: SimSettings,
    stop: CancellationToken,
) -> std::io::Result<u64> {
    use socketcan::{CanFdFrame, CanFrame, EmbeddedFrame, ExtendedId, Id, StandardId};
    let decoding = crate::source::can::Decoding::for_simulator(config)
        .map_err(|(k, m)| std::io::Error::other(format!("{k}: {m}")))?;
    let mut encoder = crate::source::can::FrameEncoder::new(config, &decoding);
    let socket = socketcan::tokio::CanFdSocket::open(iface)?;
    let mut sim = Simulator::new(settings.seed, settings.start, settings.faults);
    let mut pacer = Pacer::new(&settings);
    let end = pacer.end;
    let mut updates = Vec::new();
    let mut frames = Vec::new();
    let mut sent = 0u64;
    let mut next_gps = settings.start;
    while !stop.is_cancelled() {
        updates.clear();
        let now = sim.step(&mut updates);
        if end.is_some_and(|e| now > e) {
            break;
        }
        frames.clear();
        encoder.step_frames(&updates, &mut frames);
        gps_frames(
            &encoder,
            &mut next_gps,
            now,
            settings.utc_offset,
            &mut frames,
        );
        for (_, f) in &frames {
            let id: Option<Id> = if f.extended {
                ExtendedId::new(f.id).map(Id::Extended)
            } else {
                u16::try_from(f.id)
                    .ok()
                    .and_then(StandardId::new)
                    .map(Id::Standard)
            };
            let Some(id) = id else { continue };
            let result = if f.len <= 8 {
                match CanFrame::new(id, f.data()) {
                    Some(frame) => socket.write_frame(&frame).await,
                    None => continue,
                }
            } else {
                match CanFdFrame::new(id, f.data()) {
                    Some(frame) => socket.write_frame(&frame).await,
                    None => continue,
                }
            };
            result?;
            sent += 1;
        }
        pacer.pace(now, 5, &stop).await;
    }
    Ok(sent)
}
