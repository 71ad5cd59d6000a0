//! CAN: the bindings of record fields to DBC signals, the SocketCAN source, and the frames
//! the simulated car puts on its bus.
//!
//! The SocketCAN source installs kernel filters for the bound identifiers only, so a busy
//! bus costs the process nothing it does not use. A missing interface, a link going down,
//! bus-off, or the interface disappearing and coming back: the source reopens it with
//! backoff, the fields go stale meanwhile, and the process never exits for it.

use crate::config::{Config, Convert, SignalBinding, SourceKind, split_signal};
use crate::ops::clock::LiveClock;
use crate::ops::gps_time::{GpsAssembler, GpsJudge, Part};
use crate::ops::stats::Stats;
use crate::sample::signal::{Micros, SignalUpdate, SourceEvent};
use crate::source::dbc::{Dbc, Decoder, SignalRef};
use crate::source::reopen::Reopen;
use crate::source::simulator::Sensor;
use socketcan::{CanAnyFrame, CanFilter, EmbeddedFrame, Frame, SocketOptions};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The bus of the simulated car (shipped as `config/redline-gt3.dbc`).
pub const GT3_DBC: &str = include_str!("../../config/redline-gt3.dbc");

/// Where the simulated car's sensors sit on the GT3 bus.
pub const GT3_BINDINGS: [(&str, &str); 4] = [
    ("brake_disc_temp_fl", "BrakeTemps.DiscFL"),
    ("brake_disc_temp_fr", "BrakeTemps.DiscFR"),
    ("engine_rpm", "Engine.RPM"),
    ("engine_oil_temp", "EngineTemps.OilTemp"),
];

/// Decodes frames into field values, with the per-field unit conversions.
pub struct Decoding {
    decoder: Decoder,
    convert: Vec<Option<Convert>>,
    /// (field, signal) for every binding, for the encoder of the simulated car.
    bound: Vec<(usize, SignalRef, Option<Convert>)>,
    scratch: Vec<(usize, f64)>,
    /// Record fields; decoder outputs from here on are parts of the GPS time.
    fields: usize,
    gps: Option<GpsFeed>,
}

/// The GPS time signals (`[clock] gps`): decoded like fields, then judged as a clock.
struct GpsFeed {
    /// Decoder output `fields + k` is part `parts[k].1` of the time.
    parts: Vec<(SignalRef, Part)>,
    assembler: GpsAssembler,
    judge: Arc<Mutex<GpsJudge>>,
}

impl GpsFeed {
    /// Decoder output `fields + k` of a frame heard at `at`.
    fn offer(&mut self, k: usize, value: f64, at: Micros) {
        let Some(&(_, part)) = self.parts.get(k) else {
            return;
        };
        if let Some(sample) = self.assembler.offer(part, value, at)
            && let Ok(mut judge) = self.judge.lock()
        {
            judge.offer(sample);
        }
    }
}

impl Decoding {
    /// From `[source] dbc` and `[source.signals]`; errors name the config key.
    pub fn from_config(config: &Config) -> Result<Self, (String, String)> {
        let path = config.source.dbc.as_ref().ok_or_else(|| {
            (
                "source.dbc".to_string(),
                "a CAN source needs a DBC file".to_string(),
            )
        })?;
        let dbc = Dbc::load_with(path, config.source.dbc_strict)
            .map_err(|e| ("source.dbc".to_string(), e.to_string()))?;
        let bindings: Vec<(String, SignalBinding)> = config
            .source
            .signals
            .iter()
            .map(|(f, b)| (f.clone(), b.clone()))
            .collect();
        let decoding = Self::new(config, &dbc, &bindings, &path.display().to_string())?;
        // A defect in a bound message failed the binding above: these are all elsewhere.
        for defect in dbc.defects() {
            tracing::warn!("{defect}");
        }
        Ok(decoding)
    }

    /// The simulated car's bus: the config's own DBC for a CAN source, else the GT3 bus
    /// with its sensors bound to the record fields of the same names.
    pub fn for_simulator(config: &Config) -> Result<Self, (String, String)> {
        if config.source.kind == SourceKind::Can {
            return Self::from_config(config);
        }
        let dbc = Dbc::from_text(GT3_DBC).map_err(|e| ("source".to_string(), e.to_string()))?;
        let bindings: Vec<(String, SignalBinding)> = GT3_BINDINGS
            .iter()
            .filter(|(f, _)| config.fields.contains_key(*f))
            .map(|(f, s)| (f.to_string(), SignalBinding::Name(s.to_string())))
            .collect();
        Self::new(config, &dbc, &bindings, "the built-in GT3 bus")
    }

    fn new(
        config: &Config,
        dbc: &Dbc,
        bindings: &[(String, SignalBinding)],
        dbc_name: &str,
    ) -> Result<Self, (String, String)> {
        let mut refs = Vec::new();
        let mut convert = vec![None; config.fields.len()];
        let mut bound = Vec::new();
        for (field, binding) in bindings {
            let key = format!("source.signals.{field}");
            let Some(index) = config.fields.get_index_of(field) else {
                return Err((key, format!("`{field}` is not a record field")));
            };
            let (message, signal) = split_signal(binding.signal()).ok_or_else(|| {
                (
                    key.clone(),
                    format!("expected \"Message.Signal\", got {:?}", binding.signal()),
                )
            })?;
            let r = dbc
                .signal(message, signal)
                .map_err(|e| (key.clone(), format!("{e} in {dbc_name}")))?;
            refs.push((r, index));
            convert[index] = binding.convert();
            bound.push((index, r, binding.convert()));
        }
        let fields = config.fields.len();
        let mut gps = None;
        if config.clock.gps.is_some() {
            let mut bound_parts = Vec::new();
            for (key, signal, part) in config.clock.gps_bindings() {
                let (message, name) = split_signal(signal).ok_or_else(|| {
                    (
                        key.clone(),
                        format!("expected \"Message.Signal\", got {signal:?}"),
                    )
                })?;
                let r = dbc
                    .signal(message, name)
                    .map_err(|e| (key.clone(), format!("{e} in {dbc_name}")))?;
                refs.push((r, fields + bound_parts.len()));
                bound_parts.push((r, part));
            }
            gps = Some(GpsFeed {
                parts: bound_parts,
                assembler: GpsAssembler::new(config.clock.gps_valid.is_some()),
                judge: Arc::new(Mutex::new(GpsJudge::new(
                    crate::ops::clock::build_floor_us(),
                ))),
            });
        }
        let decoder =
            Decoder::new(dbc, &refs).map_err(|e| ("source.signals".to_string(), e.to_string()))?;
        Ok(Self {
            decoder,
            convert,
            bound,
            scratch: Vec::with_capacity(16),
            fields,
            gps,
        })
    }

    /// The judge the GPS time goes to (None without `[clock] gps`).
    pub fn gps_judge(&self) -> Option<Arc<Mutex<GpsJudge>>> {
        self.gps.as_ref().map(|g| g.judge.clone())
    }

    /// Sends the GPS time to `judge` (the live clock watcher's) instead of this decoding's own.
    pub fn set_gps_judge(&mut self, judge: Arc<Mutex<GpsJudge>>) {
        if let Some(g) = &mut self.gps {
            g.judge = judge;
        }
    }

    /// Kernel receive filters: exactly the identifiers that carry bound signals.
    pub fn filters(&self) -> Vec<CanFilter> {
        self.decoder
            .ids()
            .iter()
            .map(|id| {
                if id.extended {
                    CanFilter::new(id.id | libc_eff_flag(), 0x1FFF_FFFF | libc_eff_flag())
                } else {
                    CanFilter::new(id.id, 0x7FF | libc_eff_flag())
                }
            })
            .collect()
    }

    /// Decodes one frame stamped `at` into updates; a frame it cannot use is counted by
    /// reason and skipped.
    pub fn decode(
        &mut self,
        id: u32,
        extended: bool,
        data: &[u8],
        at: Micros,
        stats: &Stats,
        out: &mut Vec<SourceEvent>,
    ) {
        Stats::add(&stats.frames, 1);
        self.scratch.clear();
        if let Err(e) = self.decoder.decode(id, extended, data, &mut self.scratch) {
            stats.source_error(e.reason());
            return;
        }
        for &(field, value) in &self.scratch {
            if field >= self.fields {
                if let Some(gps) = &mut self.gps {
                    gps.offer(field - self.fields, value, at);
                }
                continue;
            }
            let value = match self.convert.get(field).copied().flatten() {
                Some(c) => c.apply(value),
                None => value,
            };
            out.push(SourceEvent::Update(SignalUpdate { field, value, at }));
        }
    }

    pub fn dbc(&self) -> &Dbc {
        self.decoder.dbc()
    }
}

const fn libc_eff_flag() -> u32 {
    0x8000_0000
}

/// Encodes the simulated car's sensor values into the frames of its bus: each frame
/// carries the latest value of every bound signal of its message.
pub struct FrameEncoder {
    dbc: Dbc,
    /// Per sensor: the field it feeds, if bound.
    sensor_field: Vec<(Sensor, usize)>,
    /// Per field: (message name, signal name, conversion).
    signal_of: Vec<Option<(String, String, Option<Convert>)>>,
    latest: Vec<Option<f64>>,
    /// The GPS receiver's signals: (message, signal, part of the time).
    /// The GPS receiver's messages, each with its signals and the part of the time they are.
    gps: Vec<(String, Vec<(String, Part)>)>,
}

/// One CAN frame: identifier and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame {
    pub id: u32,
    pub extended: bool,
    pub len: usize,
    pub data: [u8; 64],
}

impl RawFrame {
    pub fn data(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl FrameEncoder {
    pub fn new(config: &Config, decoding: &Decoding) -> Self {
        let dbc = decoding.dbc().clone();
        let mut signal_of = vec![None; config.fields.len()];
        for &(field, r, convert) in &decoding.bound {
            if let Ok((m, s)) = dbc.resolve(r) {
                signal_of[field] = Some((m.name.clone(), s.name.clone(), convert));
            }
        }
        let sensor_field = Sensor::ALL
            .iter()
            .filter_map(|&s| config.fields.get_index_of(s.name()).map(|f| (s, f)))
            .filter(|(_, f)| signal_of[*f].is_some())
            .collect();
        let mut gps: Vec<(String, Vec<(String, Part)>)> = Vec::new();
        for &(r, part) in decoding.gps.iter().flat_map(|g| &g.parts) {
            let Ok((m, s)) = dbc.resolve(r) else { continue };
            let signal = (s.name.clone(), part);
            match gps.iter_mut().find(|(name, _)| *name == m.name) {
                Some((_, signals)) => signals.push(signal),
                None => gps.push((m.name.clone(), vec![signal])),
            }
        }
        Self {
            dbc,
            sensor_field,
            signal_of,
            latest: vec![None; config.fields.len()],
            gps,
        }
    }

    /// The frames of a GPS receiver with a valid fix at `utc`, heard at `at`.
    pub fn gps_frames(&self, utc: Micros, at: Micros, out: &mut Vec<(Micros, RawFrame)>) {
        let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(utc) * 1000) else {
            return;
        };
        let value = |part: Part| match part {
            Part::UtcSeconds => utc as f64 / 1e6,
            Part::Year => f64::from(t.year()),
            Part::Month => f64::from(u8::from(t.month())),
            Part::Day => f64::from(t.day()),
            Part::Hour => f64::from(t.hour()),
            Part::Minute => f64::from(t.minute()),
            Part::Second => f64::from(t.second()) + f64::from(t.microsecond()) / 1e6,
            Part::Valid => 1.0,
        };
        for (message, signals) in &self.gps {
            let values: Vec<(&str, f64)> = signals
                .iter()
                .map(|(s, part)| (s.as_str(), value(*part)))
                .collect();
            let Ok(msg) = self.dbc.message(message) else {
                continue;
            };
            let mut data = [0u8; 64];
            if let Ok(len) = self.dbc.encode(message, &values, &mut data) {
                let (id, extended) = (msg.id.id, msg.id.extended);
                out.push((
                    at,
                    RawFrame {
                        id,
                        extended,
                        len,
                        data,
                    },
                ));
            }
        }
    }

    pub fn has_gps(&self) -> bool {
        !self.gps.is_empty()
    }

    /// Takes a new value of `sensor`; returns the message that carries it, if it is on the
    /// bus. A sensor that fails sends its "invalid" code, all ones, as real ECUs do; the
    /// agent sees a value outside the physical range and records null.
    pub fn set(&mut self, sensor: Sensor, value: f64) -> Option<&str> {
        let &(_, field) = self.sensor_field.iter().find(|(s, _)| *s == sensor)?;
        let (message, signal, _) = self.signal_of[field].as_ref()?;
        let value = if value.is_finite() {
            value
        } else {
            let msg = self.dbc.message(message).ok()?;
            msg.signal(signal)?.physical_range().1
        };
        self.latest[field] = Some(value);
        Some(message.as_str())
    }

    /// The frame of `message` with the latest value of every bound signal it carries (a
    /// real ECU cannot put a negative RPM on an unsigned signal: then nothing is sent).
    pub fn frame_of(&self, message: &str) -> Option<RawFrame> {
        let mut values: Vec<(&str, f64)> = Vec::new();
        for (f, sig) in self.signal_of.iter().enumerate() {
            if let (Some((m, s, convert)), Some(v)) = (sig, self.latest[f])
                && m == message
            {
                values.push((s.as_str(), convert.map_or(v, |c| c.invert(v))));
            }
        }
        let msg = self.dbc.message(message).ok()?;
        let (id, extended) = (msg.id.id, msg.id.extended);
        let mut data = [0u8; 64];
        let len = self.dbc.encode(message, &values, &mut data).ok()?;
        Some(RawFrame {
            id,
            extended,
            len,
            data,
        })
    }

    /// The frames one step of the simulated car puts on the bus: one per message whose
    /// signals changed, as each ECU sends its message once per cycle.
    pub fn step_frames(
        &mut self,
        updates: &[crate::source::simulator::SimUpdate],
        out: &mut Vec<(Micros, RawFrame)>,
    ) {
        let mut touched: Vec<(String, Micros)> = Vec::new();
        for u in updates {
            if let Some(m) = self.set(u.sensor, u.value)
                && !touched.iter().any(|(t, _)| t == m)
            {
                touched.push((m.to_string(), u.at));
            }
        }
        for (m, at) in touched {
            if let Some(f) = self.frame_of(&m) {
                out.push((at, f));
            }
        }
    }
}

/// Reads the configured interface until `stop`.
pub async fn run(
    config: &Config,
    mut decoding: Decoding,
    clock: LiveClock,
    tx: mpsc::Sender<SourceEvent>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let iface = config.source.interface.clone().unwrap_or_default();
    let filters = decoding.filters();
    let mut reopen = Reopen::new(format!("CAN interface {iface}"));
    let mut events = Vec::with_capacity(16);
    loop {
        let socket = socketcan::tokio::CanFdSocket::open(&iface).and_then(|s| {
            s.set_filters(&filters)?;
            // Error frames tell us about bus-off; nothing else of them is used.
            s.set_error_filter(
                socketcan::errors::CAN_ERR_BUSOFF | socketcan::errors::CAN_ERR_RESTARTED,
            )?;
            Ok(s)
        });
        // A socket binds to a down interface; only an up one counts as back.
        let socket = socket.and_then(|s| match link_state(&iface) {
            Some((_, true)) => Ok(s),
            _ => Err(std::io::Error::other("interface is down")),
        });
        let bound_index = link_state(&iface).map(|(i, _)| i);
        let socket = match socket {
            Ok(s) => s,
            Err(e) => {
                if !reopen.failed(e, &stop).await {
                    return;
                }
                continue;
            }
        };
        reopen.opened(&format!(
            " ({} identifier(s) filtered in the kernel)",
            filters.len()
        ));
        // A link going down or the interface going away wakes no read: look at it.
        let mut health = tokio::time::interval(Duration::from_millis(250));
        let lost = loop {
            let frame = tokio::select! {
                f = socket.read_frame() => f,
                _ = health.tick() => {
                    match link_state(&iface) {
                        Some((i, true)) if Some(i) == bound_index => continue,
                        Some((_, true)) => Err(std::io::Error::other("interface re-created")),
                        Some((_, false)) => Err(std::io::Error::other("interface is down")),
                        None => Err(std::io::Error::other("interface removed")),
                    }
                }
                _ = stop.cancelled() => return,
            };
            let at = clock.now();
            let frame = match frame {
                Ok(f) => f,
                Err(e) => break e,
            };
            let data: Option<(u32, bool, &[u8])> = match &frame {
                CanAnyFrame::Normal(f) => Some((f.raw_id(), f.is_extended(), f.data())),
                CanAnyFrame::Fd(f) => Some((f.raw_id(), f.is_extended(), f.data())),
                _ => None,
            };
            if let Some((id, extended, payload)) = data {
                decoding.decode(id, extended, payload, at, &stats, &mut events);
            }
            match &frame {
                CanAnyFrame::Normal(_) | CanAnyFrame::Fd(_) => {}
                CanAnyFrame::Remote(_) => stats.source_error("remote_frame"),
                CanAnyFrame::Error(e) => {
                    stats.source_error("error_frame");
                    tracing::warn!(
                        "CAN interface {iface}: controller error ({:?})",
                        e.error_bits()
                    );
                }
            }
            for ev in events.drain(..) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        };
        if !reopen.lost(lost, &stop).await {
            return;
        }
    }
}

/// (ifindex, IFF_UP) of an interface from sysfs; None when it does not exist.
fn link_state(iface: &str) -> Option<(u32, bool)> {
    let dir = std::path::Path::new("/sys/class/net").join(iface);
    let index = std::fs::read_to_string(dir.join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let flags = std::fs::read_to_string(dir.join("flags")).ok()?;
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()?;
    Some((index, flags & 1 != 0))
}
