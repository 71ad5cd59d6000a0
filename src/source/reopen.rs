//! Reopening a device that comes and goes (a CAN interface, a serial adapter): backoff
//! from 250 ms to 5 s, and one log line per outage, not one per attempt.

use std::fmt::Display;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const MIN: Duration = Duration::from_millis(250);
const MAX: Duration = Duration::from_secs(5);

pub struct Reopen {
    what: String,
    since: Option<Instant>,
    backoff: Duration,
}

impl Reopen {
    /// `what`: how the log names the device, e.g. "CAN interface can0".
    pub fn new(what: String) -> Self {
        Self {
            what,
            since: None,
            backoff: MIN,
        }
    }

    /// Opening failed: logged once per outage. Waits the backoff; false when stopped.
    pub async fn failed(&mut self, err: impl Display, stop: &CancellationToken) -> bool {
        if self.since.is_none() {
            tracing::warn!(
                "{} unavailable ({err}); its fields go stale; retrying",
                self.what
            );
            self.since = Some(Instant::now());
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX);
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = stop.cancelled() => false,
        }
    }

    /// The open device stopped working. Waits a moment before reopening; false when stopped.
    pub async fn lost(&mut self, err: impl Display, stop: &CancellationToken) -> bool {
        tracing::warn!("{} lost ({err}); its fields go stale; reopening", self.what);
        self.since = Some(Instant::now());
        tokio::select! {
            _ = tokio::time::sleep(MIN) => true,
            _ = stop.cancelled() => false,
        }
    }

    /// The device is open: says so (with the outage's length after one).
    pub fn opened(&mut self, detail: &str) {
        match self.since.take() {
            Some(since) => tracing::info!(
                "{} back after {:.1}s",
                self.what,
                since.elapsed().as_secs_f64()
            ),
            None => tracing::info!("reading {}{detail}", self.what),
        }
        self.backoff = MIN;
    }
}
