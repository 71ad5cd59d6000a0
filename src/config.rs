//! The TOML configuration: its layout, its defaults, and validation that names the key.

use crate::units::{Dur, Size};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// AWS IoT Core's largest message payload.
pub const AWS_MAX_PAYLOAD: u64 = 128 * 1024;
/// AWS IoT Core's largest batch the rule's batchMode accepts, and our cap on records per message.
pub const MAX_RECORDS_PER_MESSAGE: usize = 500;
/// AWS IoT Core's cap on unacknowledged QoS 1 publishes per connection.
pub const AWS_MAX_INFLIGHT: u16 = 100;

/// Keys the record always carries before the measured fields.
const RESERVED_KEYS: [&str; 3] = ["vehicle_id", "timestamp", "session_id"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub vehicle: Vehicle,
    #[serde(default)]
    pub sampling: Sampling,
    #[serde(default = "default_fields")]
    pub fields: IndexMap<String, FieldSpec>,
    #[serde(default)]
    pub source: Source,
    #[serde(default)]
    pub batch: Batch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<Mqtt>,
    #[serde(default)]
    pub delivery: Delivery,
    /// `None`: not in the file. `run` then uses the defaults; `simulate` a temporary spool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool: Option<Spool>,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub clock: Clock,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Clock {
    /// When the wall clock is trusted: `floor` (not before the agent was built) or `synced`
    /// (also synchronised by a time service, per the kernel: the right choice on a car).
    pub trust: Trust,
    /// How often the clock is looked at (trust arriving, NTP steps).
    pub check_interval: Dur,
    /// A GNSS receiver's time on the CAN bus (`Message.Signal` of UTC seconds since 1970, or
    /// a date/time set): trusts the clock when the wall clock is not (see `gps_time`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gps: Option<GpsSignals>,
    /// The receiver's fix flag (`Message.Signal`, non-zero while the fix is valid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gps_valid: Option<String>,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            trust: Trust::Floor,
            check_interval: Dur(Duration::from_secs(1)),
            gps: None,
            gps_valid: None,
        }
    }
}

/// Where the GPS time is on the bus.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum GpsSignals {
    /// `"GpsTime.UtcTime"`: UTC seconds since 1970-01-01.
    UtcSeconds(String),
    /// `{ year = "GpsDate.Year", month = …, day = …, hour = …, minute = …, second = … }`.
    DateTime(GpsDateTime),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GpsDateTime {
    pub year: String,
    pub month: String,
    pub day: String,
    pub hour: String,
    pub minute: String,
    pub second: String,
}

impl GpsSignals {
    /// Each bound signal with its config key and the part of the time it is.
    pub fn parts(&self) -> Vec<(String, &str, crate::gps_time::Part)> {
        use crate::gps_time::Part;
        match self {
            GpsSignals::UtcSeconds(s) => vec![("clock.gps".into(), s.as_str(), Part::UtcSeconds)],
            GpsSignals::DateTime(d) => {
                let signals = [&d.year, &d.month, &d.day, &d.hour, &d.minute, &d.second];
                Part::DATE_TIME
                    .iter()
                    .zip(signals)
                    .map(|(&(key, part), s)| (format!("clock.gps.{key}"), s.as_str(), part))
                    .collect()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    Floor,
    Synced,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Status {
    /// Status messages over MQTT: online at connect (retained), the last will (retained
    /// offline), the counters every `interval`.
    pub enabled: bool,
    pub topic: String,
    pub interval: Dur,
    /// The local snapshot `redline-agent status` reads ("" to write none). `simulate` and
    /// `replay` write it only when the config names it.
    pub file: PathBuf,
    pub file_interval: Dur,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            enabled: true,
            topic: "redline/status/{vehicle_id}".into(),
            interval: Dur(Duration::from_secs(60)),
            file: PathBuf::from(DEFAULT_STATUS_FILE),
            file_interval: Dur(Duration::from_secs(5)),
        }
    }
}

pub const DEFAULT_STATUS_FILE: &str = "/run/redline-agent/status.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Spool {
    pub dir: PathBuf,
    pub max_bytes: Size,
    pub segment_bytes: Size,
    pub sync_interval: SyncInterval,
}

impl Default for Spool {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/redline-agent/spool"),
            max_bytes: Size(1 << 30),
            segment_bytes: Size(8 << 20),
            sync_interval: SyncInterval::Every(Dur(Duration::from_secs(1))),
        }
    }
}

/// `"always"` (sync after every batch) or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncInterval {
    Always,
    Every(Dur),
}

impl<'de> Deserialize<'de> for SyncInterval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "always" {
            return Ok(SyncInterval::Always);
        }
        humantime::parse_duration(&s)
            .map(|d| SyncInterval::Every(Dur(d)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "expected \"always\" or a duration such as \"1s\", got {s:?} ({e})"
                ))
            })
    }
}

impl Serialize for SyncInterval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SyncInterval::Always => s.serialize_str("always"),
            SyncInterval::Every(d) => d.serialize(s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// New batches go out as they are made; the backlog drains in the remaining budget.
    LiveFirst,
    /// Strictly oldest first.
    Fifo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vehicle {
    pub id: String,
    #[serde(default = "default_session")]
    pub session_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    pub rate_hz: u32,
    pub stale_after: Dur,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            rate_hz: 10,
            stale_after: Dur(Duration::from_millis(500)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Float,
    Int,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub ty: FieldType,
    pub min: f64,
    pub max: f64,
    /// Round float values to this many decimals (the sensor's resolution); none: as decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decimals: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Simulator,
    Serial,
    Can,
}

/// A record field bound to a DBC signal: `"Message.Signal"`, or a table with a unit
/// conversion for DBCs whose units disagree with the schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SignalBinding {
    Name(String),
    Table {
        signal: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        convert: Option<Convert>,
    },
}

impl SignalBinding {
    pub fn signal(&self) -> &str {
        match self {
            SignalBinding::Name(s) | SignalBinding::Table { signal: s, .. } => s,
        }
    }

    pub fn convert(&self) -> Option<Convert> {
        match self {
            SignalBinding::Name(_) => None,
            SignalBinding::Table { convert, .. } => *convert,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Convert {
    KelvinToCelsius,
    FahrenheitToCelsius,
}

impl Convert {
    pub fn apply(self, v: f64) -> f64 {
        match self {
            Convert::KelvinToCelsius => v - 273.15,
            Convert::FahrenheitToCelsius => (v - 32.0) * 5.0 / 9.0,
        }
    }

    pub fn invert(self, v: f64) -> f64 {
        match self {
            Convert::KelvinToCelsius => v + 273.15,
            Convert::FahrenheitToCelsius => v * 9.0 / 5.0 + 32.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineFormatKind {
    Kv,
    Csv,
    Nmea,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Odd,
    Even,
}

/// One table for every kind of source; each kind uses its own keys (validated per kind).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Source {
    pub kind: SourceKind,
    /// Simulator: the seed of the simulated car.
    pub seed: u64,
    /// Simulator: inject sensor faults (stuck, non-finite, out of range).
    pub faults: bool,
    /// Serial: the device, e.g. `/dev/ttyUSB0` or a stable `/dev/serial/by-id/...` path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    /// Serial: line speed.
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    /// Serial: the line format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LineFormatKind>,
    /// Serial csv/nmea: the field of each column, in order; `""` or `"-"` skips a column.
    /// Default: the record's fields in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Serial kv: the key each field has in the line (default: the field's own name).
    #[serde(skip_serializing_if = "IndexMap::is_empty")]
    pub keys: IndexMap<String, String>,
    /// Serial nmea: the sentence id after `$`.
    pub sentence: String,
    /// Serial: longest accepted line, in bytes.
    pub max_line: usize,
    /// CAN: the SocketCAN interface, e.g. `can0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// CAN: the DBC file that describes the bus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dbc: Option<PathBuf>,
    /// CAN: refuse a DBC file with any defect. Default: a defect outside the bound messages
    /// is a warning at start and the rest of the file is used (see `dbc::Defect`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dbc_strict: bool,
    /// CAN: each record field bound to a `Message.Signal` of the DBC.
    #[serde(skip_serializing_if = "IndexMap::is_empty")]
    pub signals: IndexMap<String, SignalBinding>,
}

impl Default for Source {
    fn default() -> Self {
        Self {
            kind: SourceKind::Simulator,
            seed: 1,
            faults: false,
            device: None,
            baud: 115_200,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            format: None,
            columns: None,
            keys: IndexMap::new(),
            sentence: "RDLTM".into(),
            max_line: 512,
            interface: None,
            dbc: None,
            dbc_strict: false,
            signals: IndexMap::new(),
        }
    }
}

impl Config {
    /// The serial line format as the parser wants it. Valid after `validate`.
    pub fn line_format(&self) -> Result<crate::line_protocol::LineFormat, (String, String)> {
        use crate::line_protocol::LineFormat;
        let src = &self.source;
        let field = |name: &str, key: &str| {
            self.fields.get_index_of(name).ok_or_else(|| {
                (
                    key.to_string(),
                    format!(
                        "`{name}` is not a record field (fields: {})",
                        self.field_names().join(", ")
                    ),
                )
            })
        };
        let columns = || -> Result<Vec<Option<usize>>, (String, String)> {
            match &src.columns {
                None => Ok((0..self.fields.len()).map(Some).collect()),
                Some(cols) => cols
                    .iter()
                    .map(|c| match c.as_str() {
                        "" | "-" => Ok(None),
                        name => field(name, "source.columns").map(Some),
                    })
                    .collect(),
            }
        };
        match src.format {
            None => Err((
                "source.format".into(),
                "a serial source needs a format: \"kv\", \"csv\" or \"nmea\"".into(),
            )),
            Some(LineFormatKind::Kv) => {
                let mut keys = Vec::new();
                for (i, name) in self.fields.keys().enumerate() {
                    let key = src.keys.get(name).cloned().unwrap_or_else(|| name.clone());
                    keys.push((key, i));
                }
                for name in src.keys.keys() {
                    field(name, &format!("source.keys.{name}"))?;
                }
                Ok(LineFormat::Kv { keys })
            }
            Some(LineFormatKind::Csv) => Ok(LineFormat::Csv {
                columns: columns()?,
            }),
            Some(LineFormatKind::Nmea) => Ok(LineFormat::Nmea {
                sentence: src.sentence.clone(),
                columns: columns()?,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadMode {
    Records,
    Single,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Batch {
    pub max_records: usize,
    pub max_age: Dur,
    pub max_bytes: Size,
    pub payload: PayloadMode,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            max_records: 10,
            max_age: Dur(Duration::from_secs(1)),
            max_bytes: Size(AWS_MAX_PAYLOAD),
            payload: PayloadMode::Records,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    pub endpoint: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default = "default_topic")]
    pub topic: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub alpn: Vec<String>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Dur,
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: Dur,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: Dur,
    /// A publish without PUBACK for this long: the connection is dropped and everything
    /// unacknowledged is sent again on a new one (AWS throttles by withholding PUBACKs).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Dur,
}

/// `delivery.memory_bytes` by default: about half an hour at 10 Hz of ten-record batches,
/// little for an ECU.
pub const DEFAULT_MEMORY_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// How long a stop waits for outstanding PUBACKs.
    pub shutdown_timeout: Dur,
    /// Batches kept in memory while the spool cannot be written (a bound besides
    /// `memory_bytes`, whichever is reached first; also the most batches waiting for a
    /// hung disk).
    pub memory_batches: usize,
    /// Bytes of batches kept in memory while the spool cannot be written; also the most
    /// bytes waiting for a hung disk.
    pub memory_bytes: Size,
    pub order: Order,
    /// 0: no limit (a local broker). AWS IoT allows 100 per connection.
    pub max_publish_per_sec: u32,
    /// 0: no limit. AWS IoT allows 512 KiB/s per connection.
    pub max_bytes_per_sec: Size,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            shutdown_timeout: Dur(Duration::from_secs(5)),
            memory_batches: 3600,
            memory_bytes: Size(DEFAULT_MEMORY_BYTES),
            order: Order::LiveFirst,
            max_publish_per_sec: 50,
            max_bytes_per_sec: Size(256 * 1024),
        }
    }
}

fn default_session() -> String {
    "auto".into()
}
fn default_port() -> u16 {
    8883
}
fn default_topic() -> String {
    "redline/telemetry/{vehicle_id}".into()
}
fn default_keep_alive() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_inflight() -> u16 {
    20
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_reconnect_min() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_ack_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_reconnect_max() -> Dur {
    Dur(Duration::from_secs(60))
}

/// The four fields of the documented record schema, with their physical ranges.
pub fn default_fields() -> IndexMap<String, FieldSpec> {
    let f = |ty, min, max| FieldSpec {
        ty,
        min,
        max,
        decimals: (ty == FieldType::Float).then_some(1),
    };
    IndexMap::from([
        (
            "brake_disc_temp_fl".to_string(),
            f(FieldType::Float, -40.0, 1400.0),
        ),
        (
            "brake_disc_temp_fr".to_string(),
            f(FieldType::Float, -40.0, 1400.0),
        ),
        ("engine_rpm".to_string(), f(FieldType::Int, 0.0, 20000.0)),
        (
            "engine_oil_temp".to_string(),
            f(FieldType::Float, -40.0, 200.0),
        ),
    ])
}

/// A configuration error: which file, which key, what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "configuration error in {}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "configuration error in {}: key `{}`: {}",
                self.file, self.key, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The built-in configuration of `simulate` without `--config`: simulator, stdout.
    pub fn bench_default() -> Self {
        Self {
            vehicle: Vehicle {
                id: "GT3-RACER-01".into(),
                session_id: default_session(),
            },
            sampling: Sampling::default(),
            fields: default_fields(),
            source: Source::default(),
            batch: Batch::default(),
            mqtt: None,
            delivery: Delivery::default(),
            spool: None,
            status: Status::default(),
            clock: Clock::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse_in(&text, &file, base)?;
        config.use_credentials();
        Ok(config)
    }

    /// Under systemd with `LoadCredential=mqtt.key:...`, the private key comes from the
    /// credentials directory (readable by the service alone) instead of `mqtt.key`.
    fn use_credentials(&mut self) {
        let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
            return;
        };
        let key = Path::new(&dir).join("mqtt.key");
        if let Some(m) = &mut self.mqtt
            && key.is_file()
        {
            m.key = key;
        }
    }

    /// Parses and validates `text`; `file` is used in error messages only.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, file, Path::new("."))
    }

    /// As `parse`, with relative file paths in the config taken from `base` (the config
    /// file's directory).
    pub fn parse_in(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let err = |key: String, message: String| ConfigError {
            file: file.to_string(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            err(
                String::new(),
                format!("not valid TOML: {}", e.to_string().trim()),
            )
        })?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.message().to_string();
            // serde reports an unknown key at its parent's path; name the key itself.
            let key = match unknown_field_name(&msg) {
                Some(name) if path == "." => name,
                Some(name) if path.ends_with(&name) => path,
                Some(name) => format!("{path}.{name}"),
                None if path == "." => String::new(),
                None => path,
            };
            let line = inner
                .span()
                .map(|s| format!(" (line {})", line_of(text, s.start)))
                .unwrap_or_default();
            err(key, format!("{msg}{line}"))
        })?;
        if let Some(m) = &mut config.mqtt {
            for p in [&mut m.ca, &mut m.cert, &mut m.key] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        if let Some(sp) = &mut config.spool
            && sp.dir.is_relative()
        {
            sp.dir = base.join(&sp.dir);
        }
        if let Some(dev) = &mut config.source.device
            && dev.is_relative()
        {
            *dev = base.join(&*dev);
        }
        if let Some(dbc) = &mut config.source.dbc
            && dbc.is_relative()
        {
            *dbc = base.join(&*dbc);
        }
        if config.status.file.is_relative() && !config.status.file.as_os_str().is_empty() {
            config.status.file = base.join(&config.status.file);
        }
        config
            .validate()
            .map_err(|(key, message)| err(key, message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if self.vehicle.id.is_empty() {
            return e("vehicle.id", "must not be empty".into());
        }
        if self.vehicle.session_id.is_empty() {
            return e(
                "vehicle.session_id",
                "must not be empty (use \"auto\" for a new UUID at each start)".into(),
            );
        }
        if !(1..=1000).contains(&self.sampling.rate_hz) {
            return e(
                "sampling.rate_hz",
                format!("expected 1 to 1000, got {}", self.sampling.rate_hz),
            );
        }
        if self.sampling.stale_after.0.is_zero() {
            return e("sampling.stale_after", "must be above zero".into());
        }
        if self.fields.is_empty() {
            return e("fields", "at least one field is needed".into());
        }
        self.validate_source()?;
        for (name, spec) in &self.fields {
            let key = format!("fields.{name}");
            let snake = name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !snake {
                return e(
                    &key,
                    "field names must be lower-case snake_case (a-z, 0-9, _), as the Glue schema expects".into(),
                );
            }
            if RESERVED_KEYS.contains(&name.as_str()) {
                return e(&key, format!("`{name}` is a reserved record key"));
            }
            if spec.decimals.is_some_and(|d| d > 9) {
                return e(&format!("{key}.decimals"), "expected 0 to 9".into());
            }
            if !(spec.min.is_finite() && spec.max.is_finite() && spec.min <= spec.max) {
                return e(
                    &key,
                    format!(
                        "expected finite min <= max, got min = {}, max = {}",
                        spec.min, spec.max
                    ),
                );
            }
        }
        let b = &self.batch;
        if !(1..=MAX_RECORDS_PER_MESSAGE).contains(&b.max_records) {
            return e(
                "batch.max_records",
                format!(
                    "expected 1 to {MAX_RECORDS_PER_MESSAGE}, got {}",
                    b.max_records
                ),
            );
        }
        if b.max_age.0.is_zero() {
            return e("batch.max_age", "must be above zero".into());
        }
        if b.max_bytes.0 > AWS_MAX_PAYLOAD || b.max_bytes.0 < 1024 {
            return e(
                "batch.max_bytes",
                format!(
                    "expected 1KiB to 128KiB (AWS IoT's message limit), got {}",
                    b.max_bytes
                ),
            );
        }
        if let Some(m) = &self.mqtt {
            self.validate_mqtt(m)?;
        }
        if self.status.enabled
            && let Err(msg) = expand_topic(&self.status.topic, &self.vehicle.id)
        {
            return e("status.topic", msg);
        }
        if self.status.interval.0 < Duration::from_secs(1) {
            return e("status.interval", "expected at least 1s".into());
        }
        if self.clock.check_interval.0 < Duration::from_millis(100) {
            return e("clock.check_interval", "expected at least 100ms".into());
        }
        self.validate_gps()?;
        if self.status.file_interval.0 < Duration::from_millis(100) {
            return e("status.file_interval", "expected at least 100ms".into());
        }
        if self.delivery.memory_batches == 0 {
            return e("delivery.memory_batches", "must be at least 1".into());
        }
        // Two of the largest batches: one full batch always fits beside the one coming in.
        let least = 2 * self.batch.max_bytes.0;
        if self.delivery.memory_bytes.0 < least {
            return e(
                "delivery.memory_bytes",
                format!(
                    "expected at least twice batch.max_bytes ({}), got {}",
                    Size(least),
                    self.delivery.memory_bytes
                ),
            );
        }
        // The token buckets allow a tenth of a second of burst (publishes) and one whole
        // message (bytes) on top of the rate: the caps keep rate + burst within AWS's limits.
        if self.delivery.max_publish_per_sec > 90 {
            return e(
                "delivery.max_publish_per_sec",
                format!(
                    "expected 0 (no limit) to 90 (AWS IoT allows 100 per connection; the limiter bursts 10% above the rate), got {}",
                    self.delivery.max_publish_per_sec
                ),
            );
        }
        if self.delivery.max_bytes_per_sec.0 > 384 * 1024 {
            return e(
                "delivery.max_bytes_per_sec",
                format!(
                    "expected 0 (no limit) to 384KiB (AWS IoT allows 512 KiB/s per connection; the limiter may send one 128 KiB message early), got {}",
                    self.delivery.max_bytes_per_sec
                ),
            );
        }
        if let Some(sp) = &self.spool {
            if sp.segment_bytes.0 < 64 * 1024 {
                return e("spool.segment_bytes", "expected at least 64KiB".into());
            }
            if sp.max_bytes.0 < 2 * sp.segment_bytes.0 {
                return e(
                    "spool.max_bytes",
                    format!(
                        "expected at least twice spool.segment_bytes ({}), got {}",
                        sp.segment_bytes, sp.max_bytes
                    ),
                );
            }
            if sp.sync_interval == SyncInterval::Every(Dur(Duration::ZERO)) {
                return e(
                    "spool.sync_interval",
                    "must be above zero (or \"always\")".into(),
                );
            }
        }
        Ok(())
    }

    fn validate_gps(&self) -> Result<(), (String, String)> {
        let Some(gps) = &self.clock.gps else {
            if self.clock.gps_valid.is_some() {
                return Err(("clock.gps_valid".into(), "needs clock.gps".into()));
            }
            return Ok(());
        };
        if self.source.kind == SourceKind::Serial {
            return Err((
                "clock.gps".into(),
                "GPS time is read from the CAN bus (a DBC signal): it needs source.kind = \"can\" or \"simulator\"".into(),
            ));
        }
        let mut signals = gps.parts();
        if let Some(v) = &self.clock.gps_valid {
            signals.push(("clock.gps_valid".into(), v, crate::gps_time::Part::Valid));
        }
        for (key, signal, _) in signals {
            if split_signal(signal).is_none() {
                return Err((key, format!("expected \"Message.Signal\", got {signal:?}")));
            }
        }
        Ok(())
    }

    fn validate_source(&self) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        let src = &self.source;
        if src.kind == SourceKind::Serial {
            if src.device.is_none() {
                return e(
                    "source.device",
                    "a serial source needs a device, e.g. \"/dev/ttyUSB0\"".into(),
                );
            }
            if src.baud == 0 {
                return e("source.baud", "must be above zero".into());
            }
            if !(5..=8).contains(&src.data_bits) {
                return e(
                    "source.data_bits",
                    format!("expected 5 to 8, got {}", src.data_bits),
                );
            }
            if !(1..=2).contains(&src.stop_bits) {
                return e(
                    "source.stop_bits",
                    format!("expected 1 or 2, got {}", src.stop_bits),
                );
            }
            if !(16..=65_536).contains(&src.max_line) {
                return e(
                    "source.max_line",
                    format!("expected 16 to 65536, got {}", src.max_line),
                );
            }
            let format = self.line_format()?;
            crate::line_protocol::LineParser::new(format)
                .map_err(|err| ("source".to_string(), err.to_string()))?;
        }
        if src.kind == SourceKind::Can {
            if src.interface.as_deref().is_none_or(str::is_empty) {
                return e(
                    "source.interface",
                    "a CAN source needs an interface, e.g. \"can0\"".into(),
                );
            }
            if src.dbc.is_none() {
                return e("source.dbc", "a CAN source needs a DBC file".into());
            }
            if src.signals.is_empty() {
                return e(
                    "source.signals",
                    "bind at least one record field to a DBC signal, e.g. engine_rpm = \"Engine.RPM\"".into(),
                );
            }
        }
        for (field, binding) in &src.signals {
            let key = format!("source.signals.{field}");
            if !self.fields.contains_key(field) {
                return e(
                    &key,
                    format!(
                        "`{field}` is not a record field (fields: {})",
                        self.field_names().join(", ")
                    ),
                );
            }
            if split_signal(binding.signal()).is_none() {
                return e(
                    &key,
                    format!("expected \"Message.Signal\", got {:?}", binding.signal()),
                );
            }
        }
        Ok(())
    }

    fn validate_mqtt(&self, m: &Mqtt) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if m.endpoint.is_empty() {
            return e("mqtt.endpoint", "must not be empty".into());
        }
        let client_id = self.client_id();
        if client_id.is_empty() || client_id.len() > 128 {
            return e(
                "mqtt.client_id",
                format!(
                    "expected 1 to 128 bytes (AWS IoT's limit), got {}",
                    client_id.len()
                ),
            );
        }
        if let Err(msg) = telemetry_topic(&m.topic, &self.vehicle.id) {
            return e("mqtt.topic", msg);
        }
        let ka = m.keep_alive.0;
        if ka < Duration::from_secs(5) || ka > Duration::from_secs(1200) {
            return e(
                "mqtt.keep_alive",
                format!(
                    "expected 5s to 1200s (AWS IoT uses 30s to 1200s), got {}",
                    humantime::format_duration(ka)
                ),
            );
        }
        if !(1..=AWS_MAX_INFLIGHT).contains(&m.max_inflight) {
            return e(
                "mqtt.max_inflight",
                format!("expected 1 to {AWS_MAX_INFLIGHT}, got {}", m.max_inflight),
            );
        }
        if m.connect_timeout.0 < Duration::from_secs(1) {
            return e("mqtt.connect_timeout", "expected at least 1s".into());
        }
        if m.reconnect_min.0 < Duration::from_secs(1) {
            return e(
                "mqtt.reconnect_min",
                "expected at least 1s (AWS IoT allows one CONNECT per second per client id)".into(),
            );
        }
        if m.ack_timeout.0 < Duration::from_secs(1) {
            return e("mqtt.ack_timeout", "expected at least 1s".into());
        }
        if m.reconnect_max.0 < m.reconnect_min.0 {
            return e(
                "mqtt.reconnect_max",
                "must not be below mqtt.reconnect_min".into(),
            );
        }
        Ok(())
    }

    /// A warning when the private key can be read by anyone but its owner (and group): it
    /// identifies the car to AWS.
    pub fn key_permission_warning(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let key = &self.mqtt.as_ref()?.key;
        let mode = std::fs::metadata(key).ok()?.permissions().mode();
        (mode & 0o077 != 0).then(|| {
            format!(
                "the private key {} is readable by other users (mode {:o}): chmod 0600 (the systemd unit hands it to the service with LoadCredential=)",
                key.display(),
                mode & 0o777
            )
        })
    }

    pub fn client_id(&self) -> String {
        self.mqtt
            .as_ref()
            .and_then(|m| m.client_id.clone())
            .unwrap_or_else(|| self.vehicle.id.clone())
    }

    /// The status topic with its placeholders filled in, if status messages are on.
    pub fn status_topic(&self) -> Option<String> {
        if !self.status.enabled {
            return None;
        }
        expand_topic(&self.status.topic, &self.vehicle.id).ok()
    }

    /// The topic with its placeholders filled in. Valid after `validate`.
    pub fn topic(&self) -> Option<String> {
        let m = self.mqtt.as_ref()?;
        telemetry_topic(&m.topic, &self.vehicle.id).ok()
    }

    pub fn field_names(&self) -> Vec<String> {
        self.fields.keys().cloned().collect()
    }

    /// The effective configuration as TOML, as `check-config` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Fills `{vehicle_id}` into a topic template; any other placeholder is an error.
pub fn expand_topic(template: &str, vehicle_id: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + vehicle_id.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in {template:?}"))?;
        match &after[..close] {
            "vehicle_id" => out.push_str(vehicle_id),
            other => {
                return Err(format!(
                    "unknown placeholder `{{{other}}}` in {template:?}: the only placeholder is {{vehicle_id}}"
                ));
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    if out.is_empty() || out.contains(['+', '#']) || out.starts_with('$') {
        return Err(format!(
            "{template:?} is not a topic one can publish to (empty, a wildcard, or reserved `$`)"
        ));
    }
    Ok(out)
}

/// AWS IoT Basic Ingest: publishing to `$aws/rules/RULE/…` hands the message straight to
/// the rule, without the message broker (and its cost).
pub const BASIC_INGEST_PREFIX: &str = "$aws/rules/";

/// The telemetry topic: a normal topic, or a Basic Ingest one
/// (`$aws/rules/RULE_NAME/redline/telemetry/{vehicle_id}`). Either must fit AWS IoT's
/// limits: at most 256 bytes and 7 slashes (after the Basic Ingest prefix and rule name).
pub fn telemetry_topic(template: &str, vehicle_id: &str) -> Result<String, String> {
    let (prefix, rest) = match template.strip_prefix(BASIC_INGEST_PREFIX) {
        Some(after) => {
            let (rule, rest) = after.split_once('/').ok_or_else(|| {
                format!("{template:?}: Basic Ingest needs `$aws/rules/RULE_NAME/TOPIC`")
            })?;
            if rule.is_empty() || !rule.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "{template:?}: the rule name {rule:?} may hold only letters, digits and `_`"
                ));
            }
            (
                &template[..BASIC_INGEST_PREFIX.len() + rule.len() + 1],
                rest,
            )
        }
        None => ("", template),
    };
    let topic = expand_topic(rest, vehicle_id)?;
    let slashes = topic.matches('/').count();
    if slashes > 7 {
        return Err(format!(
            "{template:?} has {slashes} `/` (AWS IoT allows 7{})",
            if prefix.is_empty() {
                ""
            } else {
                " after the Basic Ingest prefix"
            }
        ));
    }
    let full = format!("{prefix}{topic}");
    if full.len() > 256 {
        return Err(format!(
            "{template:?} is {} bytes once filled in (AWS IoT allows 256)",
            full.len()
        ));
    }
    Ok(full)
}

/// `"Message.Signal"` → `("Message", "Signal")`.
pub fn split_signal(s: &str) -> Option<(&str, &str)> {
    let (m, sig) = s.split_once('.')?;
    (!m.is_empty() && !sig.is_empty() && !sig.contains('.')).then_some((m, sig))
}

fn unknown_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml")
    }

    #[test]
    fn minimal_config_has_documented_defaults() {
        let c = parse("[vehicle]\nid = \"GT3\"\n").expect("valid");
        assert_eq!(c.sampling.rate_hz, 10);
        assert_eq!(c.batch.max_records, 10);
        assert_eq!(c.batch.max_bytes.0, 131_072);
        assert_eq!(
            c.field_names(),
            [
                "brake_disc_temp_fl",
                "brake_disc_temp_fr",
                "engine_rpm",
                "engine_oil_temp"
            ]
        );
        assert_eq!(c.vehicle.session_id, "auto");
    }

    #[test]
    fn gps_time_bindings_are_checked() {
        let base = "[vehicle]\nid = \"x\"\n";
        let c = parse(&format!("{base}[clock]\ngps = \"GpsTime.UtcTime\"\n")).expect("valid");
        assert_eq!(
            c.clock.gps,
            Some(GpsSignals::UtcSeconds("GpsTime.UtcTime".into()))
        );
        let c = parse(&format!(
            "{base}[clock]\ngps_valid = \"GpsStatus.Fix\"\n[clock.gps]\nyear = \"D.Y\"\nmonth = \"D.M\"\nday = \"D.D\"\nhour = \"T.H\"\nminute = \"T.M\"\nsecond = \"T.S\"\n"
        ))
        .expect("valid date/time set");
        let parts = c
            .clock
            .gps
            .as_ref()
            .map(GpsSignals::parts)
            .unwrap_or_default();
        assert_eq!(parts.len(), 6);
        assert_eq!(parts[5].0, "clock.gps.second");
        for (extra, key) in [
            ("[clock]\ngps = \"UtcTime\"\n", "clock.gps"),
            ("[clock]\ngps_valid = \"G.Fix\"\n", "clock.gps_valid"),
            (
                "[clock]\ngps = \"G.T\"\ngps_valid = \"Fix\"\n",
                "clock.gps_valid",
            ),
            (
                "[clock.gps]\nyear = \"D.Y\"\nmonth = \"D.M\"\nday = \"D.D\"\nhour = \"T.H\"\nminute = \"T.M\"\nsecond = \"S\"\n",
                "clock.gps.second",
            ),
            (
                "[source]\nkind = \"serial\"\ndevice = \"/dev/ttyUSB0\"\nformat = \"kv\"\n[clock]\ngps = \"G.T\"\n",
                "clock.gps",
            ),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[vehicle]\nid = \"x\"\n[batch]\nfoo = 1\n").unwrap_err();
        assert_eq!(e.key, "batch.foo");
        assert_eq!(e.file, "test.toml");
        let e = parse("[vehicle]\nid = \"x\"\n[nope]\n").unwrap_err();
        assert_eq!(e.key, "nope");
    }

    #[test]
    fn type_errors_name_the_key_and_line() {
        let e = parse("[vehicle]\nid = \"x\"\n[sampling]\nrate_hz = \"ten\"\n").unwrap_err();
        assert_eq!(e.key, "sampling.rate_hz");
        assert!(e.message.contains("line 4"), "{e}");
        let e = parse("[vehicle]\nid = \"x\"\n[batch]\nmax_age = \"soon\"\n").unwrap_err();
        assert_eq!(e.key, "batch.max_age");
        let e =
            parse("[vehicle]\nid = \"x\"\n[fields]\nrpm = { type = \"bool\", min = 0, max = 1 }\n")
                .unwrap_err();
        assert_eq!(e.key, "fields.rpm.type");
    }

    #[test]
    fn limits_are_enforced() {
        let base = "[vehicle]\nid = \"x\"\n";
        for (extra, key) in [
            ("[batch]\nmax_bytes = \"200KiB\"\n", "batch.max_bytes"),
            ("[batch]\nmax_records = 501\n", "batch.max_records"),
            ("[batch]\nmax_records = 0\n", "batch.max_records"),
            ("[sampling]\nrate_hz = 0\n", "sampling.rate_hz"),
            (
                "[fields]\nEngineRPM = { type = \"int\", min = 0, max = 1 }\n",
                "fields.EngineRPM",
            ),
            (
                "[fields]\nx = { type = \"int\", min = 5, max = 1 }\n",
                "fields.x",
            ),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}");
        }
    }

    #[test]
    fn memory_bytes_default_and_bound() {
        let c = parse("[vehicle]\nid = \"GT3\"\n").expect("valid");
        assert_eq!(c.delivery.memory_bytes.0, 4 << 20);
        assert_eq!(c.delivery.memory_batches, 3600);
        let c = parse("[vehicle]\nid = \"GT3\"\n[delivery]\nmemory_bytes = \"256KiB\"\n")
            .expect("twice batch.max_bytes is enough");
        assert_eq!(c.delivery.memory_bytes.0, 256 << 10);
        let e =
            parse("[vehicle]\nid = \"GT3\"\n[delivery]\nmemory_bytes = \"200KiB\"\n").unwrap_err();
        assert_eq!(e.key, "delivery.memory_bytes");
        assert!(e.message.contains("256KiB"), "{}", e.message);
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = parse("[vehicle\nid = 1").unwrap_err();
        assert!(e.to_string().contains("test.toml"));
        assert!(e.message.contains("line 1"), "{}", e.message);
    }

    #[test]
    fn topic_placeholders() {
        assert_eq!(
            expand_topic("redline/telemetry/{vehicle_id}", "GT3").as_deref(),
            Ok("redline/telemetry/GT3")
        );
        assert!(
            expand_topic("x/{nope}", "GT3")
                .unwrap_err()
                .contains("{nope}")
        );
        assert!(expand_topic("x/{vehicle_id", "GT3").is_err());
        assert!(expand_topic("x/+", "GT3").is_err());
        assert_eq!(
            telemetry_topic(
                "$aws/rules/redline_telemetry/redline/telemetry/{vehicle_id}",
                "GT3"
            )
            .as_deref(),
            Ok("$aws/rules/redline_telemetry/redline/telemetry/GT3")
        );
        assert!(telemetry_topic("$aws/rules/bad-name/x", "GT3").is_err());
        assert!(telemetry_topic("$aws/rules/rule", "GT3").is_err());
        assert!(
            telemetry_topic("$aws/things/x", "GT3").is_err(),
            "other $ topics stay reserved"
        );
        assert!(
            telemetry_topic("a/b/c/d/e/f/g/h/i", "GT3").is_err(),
            "8 slashes"
        );
        assert!(
            telemetry_topic("$aws/rules/r/a/b/c/d/e/f/g/h", "GT3").is_ok(),
            "7 after the prefix"
        );
        assert!(telemetry_topic(&"x".repeat(257), "GT3").is_err());
    }
}
