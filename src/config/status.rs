//! `[status]`: the status messages over MQTT and the local status file.

use super::mqtt::expand_topic;
use crate::units::Dur;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

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

impl Status {
    /// The MQTT status messages: their topic and interval.
    pub(super) fn validate_messages(&self, vehicle_id: &str) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if self.enabled
            && let Err(msg) = expand_topic(&self.topic, vehicle_id)
        {
            return e("status.topic", msg);
        }
        if self.interval.0 < Duration::from_secs(1) {
            return e("status.interval", "expected at least 1s".into());
        }
        Ok(())
    }

    /// The local status file.
    pub(super) fn validate_file(&self) -> Result<(), (String, String)> {
        if self.file_interval.0 < Duration::from_millis(100) {
            return Err((
                "status.file_interval".into(),
                "expected at least 100ms".into(),
            ));
        }
        Ok(())
    }
}
