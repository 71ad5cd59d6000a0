//! `[sampling]`: the tick rate and when a value is too old to report.

use crate::units::Dur;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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

impl Sampling {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if !(1..=1000).contains(&self.rate_hz) {
            return e(
                "sampling.rate_hz",
                format!("expected 1 to 1000, got {}", self.rate_hz),
            );
        }
        if self.stale_after.0.is_zero() {
            return e("sampling.stale_after", "must be above zero".into());
        }
        Ok(())
    }
}
