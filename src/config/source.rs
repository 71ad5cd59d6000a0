//! `[source]`: which source feeds the record (simulator, serial, CAN) and its settings.

use super::Config;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    pub fn line_format(
        &self,
    ) -> Result<crate::source::line_protocol::LineFormat, (String, String)> {
        use crate::source::line_protocol::LineFormat;
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

impl Config {
    /// `[source]`: the keys of its kind, and the signal bindings against the fields.
    pub(super) fn validate_source(&self) -> Result<(), (String, String)> {
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
            crate::source::line_protocol::LineParser::new(format)
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
}

/// `"Message.Signal"` → `("Message", "Signal")`.
pub fn split_signal(s: &str) -> Option<(&str, &str)> {
    let (m, sig) = s.split_once('.')?;
    (!m.is_empty() && !sig.is_empty() && !sig.contains('.')).then_some((m, sig))
}
