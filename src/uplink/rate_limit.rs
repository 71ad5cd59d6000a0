//! Two token buckets below AWS IoT's per-connection limits (publishes/s and bytes/s).

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

pub struct RateLimits {
    messages: Option<DefaultDirectRateLimiter>,
    bytes: Option<DefaultDirectRateLimiter>,
    clock: DefaultClock,
    /// Set when a message was refused: how long until it may go.
    pub wait: Option<Duration>,
}

impl RateLimits {
    /// 0 turns a limit off (a local broker).
    pub fn new(per_sec: u32, bytes_per_sec: u64) -> Self {
        // A tenth of a second of burst: smooth, and never more than a second's worth
        // right after a reconnect.
        let messages = NonZeroU32::new(per_sec).map(|rate| {
            let burst = NonZeroU32::new((per_sec / 10).max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        let bytes = NonZeroU32::new(bytes_per_sec.min(u64::from(u32::MAX)) as u32).map(|rate| {
            // A whole message must fit the bucket; that is the whole burst.
            let burst = crate::config::AWS_MAX_PAYLOAD as u32 + 1024;
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            messages,
            bytes,
            clock: DefaultClock::default(),
            wait: None,
        }
    }

    /// Whether a message of `len` bytes may go now; if not, `wait` says how long until it may.
    pub fn admit(&mut self, len: usize) -> bool {
        if let Some(m) = &self.messages
            && let Err(n) = m.check()
        {
            self.wait = Some(n.wait_time_from(self.clock.now()));
            return false;
        }
        if let Some(b) = &self.bytes {
            let n = NonZeroU32::new(len as u32).unwrap_or(NonZeroU32::MIN);
            match b.check_n(n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    self.wait = Some(not_until.wait_time_from(self.clock.now()));
                    return false;
                }
                // Larger than the bucket: cannot happen (the bucket holds a full message).
                Err(_) => {}
            }
        }
        true
    }
}
