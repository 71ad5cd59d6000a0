//! `[batch]`: when the batcher closes a batch, and how a batch goes on the wire.

use crate::units::{Dur, Size};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// AWS IoT Core's largest message payload.
pub const AWS_MAX_PAYLOAD: u64 = 128 * 1024;
/// AWS IoT Core's largest batch the rule's batchMode accepts, and our cap on records per message.
pub const MAX_RECORDS_PER_MESSAGE: usize = 500;

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

impl Batch {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if !(1..=MAX_RECORDS_PER_MESSAGE).contains(&self.max_records) {
            return e(
                "batch.max_records",
                format!(
                    "expected 1 to {MAX_RECORDS_PER_MESSAGE}, got {}",
                    self.max_records
                ),
            );
        }
        if self.max_age.0.is_zero() {
            return e("batch.max_age", "must be above zero".into());
        }
        if self.max_bytes.0 > AWS_MAX_PAYLOAD || self.max_bytes.0 < 1024 {
            return e(
                "batch.max_bytes",
                format!(
                    "expected 1KiB to 128KiB (AWS IoT's message limit), got {}",
                    self.max_bytes
                ),
            );
        }
        Ok(())
    }
}
