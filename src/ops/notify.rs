//! The systemd side: READY once started, a STATUS line that answers "is it working?", and
//! the watchdog, fed only while readings are being made and the publisher loop turns.
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use crate::ops::stats::Stats;
use crate::spool::SpoolStats;
use sd_notify::NotifyState;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining the spool"),
    ]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("systemd notify failed: {e}");
    }
}

/// The one-line summary for `systemctl status`.
pub fn status_line(stats: &Stats, spool: Option<&SpoolStats>) -> String {
    let g = Stats::get;
    let link = if g(&stats.connected) == 1 {
        "connected"
    } else {
        "not connected"
    };
    let last = match g(&stats.last_ack_ms) {
        0 => "never".to_string(),
        ms => {
            let ago = (crate::ops::clock::wall_now_us() / 1000 - ms as i64).max(0);
            format!("{:.0}s ago", ago as f64 / 1000.0)
        }
    };
    let backlog = spool.map_or(0, |s| Stats::get(&s.unacked_batches));
    // A spool that cannot be written comes first: readings are only in memory.
    let fault = spool
        .and_then(|s| {
            s.fault().map(|(_, error)| {
                format!(
                    "SPOOL NOT WRITABLE ({error}): {} batch(es) in memory; ",
                    Stats::get(&s.memory_batches)
                )
            })
        })
        .unwrap_or_default();
    format!(
        "{fault}{link}; backlog {backlog} batch(es); last PUBACK {last}; {} readings, {} acknowledged",
        g(&stats.readings),
        g(&stats.readings_acked)
    )
}

/// Feeds the watchdog while the pipeline moves and keeps STATUS current. `publishing`:
/// whether a publisher must be turning too (not for `--stdout`).
pub async fn supervise(
    stats: Arc<Stats>,
    spool: Option<Arc<SpoolStats>>,
    publishing: bool,
    stop: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    // Look at least twice per watchdog period, and every 5 s for STATUS.
    let period = watchdog.map_or(Duration::from_secs(5), |d| {
        (d / 3).min(Duration::from_secs(5))
    });
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    // Moving: a new reading, and a turn of the publisher loop (it turns at least twice a
    // second), each within the last GRACE.
    const GRACE: Duration = Duration::from_secs(2);
    let now = tokio::time::Instant::now;
    let (mut readings, mut beats) = (
        Stats::get(&stats.readings),
        Stats::get(&stats.publisher_beats),
    );
    let (mut readings_at, mut beats_at) = (now(), now());
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let (r, b) = (
            Stats::get(&stats.readings),
            Stats::get(&stats.publisher_beats),
        );
        if r != readings {
            (readings, readings_at) = (r, now());
        }
        if b != beats {
            (beats, beats_at) = (b, now());
        }
        let sampling = readings_at.elapsed() < GRACE;
        let moving = sampling && (!publishing || beats_at.elapsed() < GRACE);
        let status = status_line(&stats, spool.as_deref());
        if moving {
            if stalled {
                tracing::info!("pipeline moving again");
                stalled = false;
            }
            if watchdog.is_some() {
                send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
                continue;
            }
        } else if !stalled {
            stalled = true;
            tracing::error!(
                "pipeline stalled ({}): not feeding the systemd watchdog",
                if sampling {
                    "publisher loop not turning"
                } else {
                    "no new readings"
                }
            );
        }
        send(&[NotifyState::Status(&status)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_leads_with_a_spool_fault() {
        let stats = Stats::new(vec!["engine_rpm".into()]);
        let spool = SpoolStats::default();
        assert!(!status_line(&stats, Some(&spool)).contains("SPOOL"));
        spool.set_fault(Some("Read-only file system (os error 30)"));
        spool
            .memory_batches
            .store(7, std::sync::atomic::Ordering::Relaxed);
        let line = status_line(&stats, Some(&spool));
        assert!(
            line.starts_with(
                "SPOOL NOT WRITABLE (Read-only file system (os error 30)): 7 batch(es) in memory; "
            ),
            "{line}"
        );
        spool.set_fault(None);
        assert!(!status_line(&stats, Some(&spool)).contains("SPOOL"));
    }
}
