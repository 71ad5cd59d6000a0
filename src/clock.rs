//! The live sampling clock: wall-clock time read once at start, advanced by the monotonic
//! clock, so that a step of the wall clock (NTP) cannot bend the 100 ms grid mid-run.

use crate::signal::Micros;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct LiveClock {
    anchor_us: Micros,
    anchor: Instant,
}

impl LiveClock {
    pub fn start() -> Self {
        Self {
            anchor_us: wall_now_us(),
            anchor: Instant::now(),
        }
    }

    pub fn now(&self) -> Micros {
        self.anchor_us + self.anchor.elapsed().as_micros() as Micros
    }

    /// The monotonic instant at which this clock reads `t` (now, if `t` is past).
    pub fn instant_of(&self, t: Micros) -> Instant {
        let ahead = t - self.anchor_us;
        if ahead <= 0 {
            return self.anchor;
        }
        self.anchor + std::time::Duration::from_micros(ahead as u64)
    }
}

pub fn wall_now_us() -> Micros {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as Micros,
        Err(e) => -(e.duration().as_micros() as Micros),
    }
}
