//! `[clock]`: when the wall clock is trusted, and how often it is looked at.

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
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            trust: Trust::Floor,
            check_interval: Dur(Duration::from_secs(1)),
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
}
