//! `[spool]`: where and how much the disk spool keeps, and how often it syncs.

use crate::units::{Dur, Size};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

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

impl Spool {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if self.segment_bytes.0 < 64 * 1024 {
            return e("spool.segment_bytes", "expected at least 64KiB".into());
        }
        if self.max_bytes.0 < 2 * self.segment_bytes.0 {
            return e(
                "spool.max_bytes",
                format!(
                    "expected at least twice spool.segment_bytes ({}), got {}",
                    self.segment_bytes, self.max_bytes
                ),
            );
        }
        if self.sync_interval == SyncInterval::Every(Dur(Duration::ZERO)) {
            return e(
                "spool.sync_interval",
                "must be above zero (or \"always\")".into(),
            );
        }
        Ok(())
    }
}
