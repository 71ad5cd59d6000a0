//! `[delivery]`: the order batches go out in, the memory kept while the disk fails, the
//! rate limits and the shutdown wait.

use super::Batch;
use crate::units::{Dur, Size};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// New batches go out as they are made; the backlog drains in the remaining budget.
    LiveFirst,
    /// Strictly oldest first.
    Fifo,
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

impl Delivery {
    /// `batch`: the memory bound is checked against its largest batch.
    pub(super) fn validate(&self, batch: &Batch) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if self.memory_batches == 0 {
            return e("delivery.memory_batches", "must be at least 1".into());
        }
        // Two of the largest batches: one full batch always fits beside the one coming in.
        let least = 2 * batch.max_bytes.0;
        if self.memory_bytes.0 < least {
            return e(
                "delivery.memory_bytes",
                format!(
                    "expected at least twice batch.max_bytes ({}), got {}",
                    Size(least),
                    self.memory_bytes
                ),
            );
        }
        // The token buckets allow a tenth of a second of burst (publishes) and one whole
        // message (bytes) on top of the rate: the caps keep rate + burst within AWS's limits.
        if self.max_publish_per_sec > 90 {
            return e(
                "delivery.max_publish_per_sec",
                format!(
                    "expected 0 (no limit) to 90 (AWS IoT allows 100 per connection; the limiter bursts 10% above the rate), got {}",
                    self.max_publish_per_sec
                ),
            );
        }
        if self.max_bytes_per_sec.0 > 384 * 1024 {
            return e(
                "delivery.max_bytes_per_sec",
                format!(
                    "expected 0 (no limit) to 384KiB (AWS IoT allows 512 KiB/s per connection; the limiter may send one 128 KiB message early), got {}",
                    self.max_bytes_per_sec
                ),
            );
        }
        Ok(())
    }
}
