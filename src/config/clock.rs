//! `[clock]`: when the wall clock is trusted, and how often it is looked at.

use super::{SourceKind, split_signal};
use crate::units::Dur;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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
    pub fn parts(&self) -> Vec<(String, &str, crate::ops::gps_time::Part)> {
        use crate::ops::gps_time::Part;
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

impl Clock {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.check_interval.0 < Duration::from_millis(100) {
            return Err((
                "clock.check_interval".into(),
                "expected at least 100ms".into(),
            ));
        }
        Ok(())
    }

    /// Every GPS signal bound (the time and the fix flag) with its config key and the
    /// part of the time it is; empty without `gps`.
    pub fn gps_bindings(&self) -> Vec<(String, &str, crate::ops::gps_time::Part)> {
        let mut bindings = self.gps.as_ref().map(GpsSignals::parts).unwrap_or_default();
        if let Some(v) = &self.gps_valid {
            bindings.push((
                "clock.gps_valid".into(),
                v,
                crate::ops::gps_time::Part::Valid,
            ));
        }
        bindings
    }

    /// The GPS bindings: `Message.Signal`s, on a source that has a CAN bus.
    pub(super) fn validate_gps(&self, source: SourceKind) -> Result<(), (String, String)> {
        if self.gps.is_none() {
            if self.gps_valid.is_some() {
                return Err(("clock.gps_valid".into(), "needs clock.gps".into()));
            }
            return Ok(());
        };
        if source == SourceKind::Serial {
            return Err((
                "clock.gps".into(),
                "GPS time is read from the CAN bus (a DBC signal): it needs source.kind = \"can\" or \"simulator\"".into(),
            ));
        }
        for (key, signal, _) in self.gps_bindings() {
            if split_signal(signal).is_none() {
                return Err((key, format!("expected \"Message.Signal\", got {signal:?}")));
            }
        }
        Ok(())
    }
}
