//! What the link really delivers, measured from PUBACK timing: the delivery rate (bytes
//! acknowledged per second), the round trip, and from them how many bytes may be in flight
//! and how large a backlog message should be.
//!
//! The estimators follow TCP BBR: the bottleneck rate is the windowed maximum of delivery
//! rate samples; the round trip is the windowed minimum over messages that had the link to
//! themselves (nothing unacknowledged ahead of them). A rate sample spans from the last
//! acknowledgement before a message was handed over (or its hand-over, if nothing was in
//! flight) to its own acknowledgement, so idle time never counts as a slow link. A busy
//! link gives no clean round trip, so when the last one is older than `RTT_WINDOW` the
//! model asks for a probe, as BBR's ProbeRTT does: the backlog waits until the link is
//! empty and the next message goes alone. On a thin link that costs a tenth of a second
//! every ten; on a long one about one round trip.
//!
//! No I/O and no clock of its own: every call takes `now`, so a test drives it with a fake
//! clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a rate sample counts.
const WINDOW: Duration = Duration::from_secs(10);
/// How long a round-trip sample counts before a probe is due.
const RTT_WINDOW: Duration = Duration::from_secs(10);
/// Before the first acknowledgement: a guess that a thin link survives (a 4 KiB first
/// message) and a fast one outgrows within a round trip.
const INITIAL_RATE: f64 = 8.0 * 1024.0;
const INITIAL_RTT: Duration = Duration::from_millis(200);
/// How much backlog may wait in the link ahead of a live message.
pub const BACKLOG_QUEUE: Duration = Duration::from_millis(500);
/// How much may wait ahead of live messages themselves (they are small and rare).
pub const LIVE_QUEUE: Duration = Duration::from_secs(2);
/// A backlog message is sized to this much link time.
pub const MESSAGE_TIME: Duration = Duration::from_millis(500);
/// The backlog's bytes in flight never exceed this, however fast the link: each byte in
/// flight is held in memory (the message, rumqttc's copy), and 512 KiB already fills a
/// 10 MB/s link with a 50 ms round trip, beyond a car's uplink.
pub const MAX_BACKLOG_WINDOW: u64 = 512 << 10;

/// What the model remembers of a message until its acknowledgement.
#[derive(Debug, Clone, Copy)]
pub struct Flight {
    /// Bytes on the wire (payload, topic and MQTT header).
    pub wire: usize,
    pub sent_at: Instant,
    /// Bytes in flight when it was handed over, itself included.
    pub ahead: u64,
    /// `delivered` and the start of the rate interval at hand-over.
    pub delivered_at_send: u64,
    pub interval_start: Instant,
}

#[derive(Debug)]
pub struct LinkModel {
    rates: VecDeque<(Instant, f64)>,
    rtts: VecDeque<(Instant, Duration)>,
    last_rate: f64,
    last_rtt: Duration,
    /// When the last clean round trip was measured (or the model made).
    rtt_at: Instant,
    /// Bytes acknowledged since the start.
    delivered: u64,
    last_ack_at: Option<Instant>,
}

impl LinkModel {
    pub fn new(now: Instant) -> Self {
        Self {
            rates: VecDeque::new(),
            rtts: VecDeque::new(),
            last_rate: INITIAL_RATE,
            last_rtt: INITIAL_RTT,
            rtt_at: now,
            delivered: 0,
            last_ack_at: None,
        }
    }

    /// A new connection: rate intervals start again; the estimates stay (the best guess of
    /// what the next connection can carry).
    pub fn on_connect(&mut self, now: Instant) {
        self.last_ack_at = Some(now);
    }

    /// What to remember of a message handed over now, with `inflight` bytes (itself
    /// included) unacknowledged.
    pub fn on_send(&mut self, now: Instant, wire: usize, inflight: u64) -> Flight {
        let idle = inflight <= wire as u64;
        if idle {
            // A clean round trip is on its way: no probe needed meanwhile.
            self.rtt_at = now;
        }
        Flight {
            wire,
            sent_at: now,
            ahead: inflight,
            delivered_at_send: self.delivered,
            interval_start: match self.last_ack_at {
                Some(t) if !idle => t,
                _ => now,
            },
        }
    }

    pub fn on_ack(&mut self, now: Instant, f: &Flight) {
        self.delivered += f.wire as u64;
        self.last_ack_at = Some(now);
        let interval = now
            .saturating_duration_since(f.interval_start)
            .max(Duration::from_millis(1));
        let rate = (self.delivered - f.delivered_at_send) as f64 / interval.as_secs_f64();
        push_sample(&mut self.rates, now, rate);
        if f.ahead <= f.wire as u64 {
            // Alone on the link: the round trip plus its own serialisation, a safe
            // overestimate of the propagation delay by at most one message.
            push_sample(
                &mut self.rtts,
                now,
                now.saturating_duration_since(f.sent_at),
            );
            self.rtt_at = now;
        }
        expire(&mut self.rates, now, WINDOW);
        expire(&mut self.rtts, now, RTT_WINDOW);
        if let Some(r) = self.rates.iter().map(|s| s.1).reduce(f64::max) {
            self.last_rate = r;
        }
        if let Some(r) = self.rtts.iter().map(|s| s.1).min() {
            self.last_rtt = r;
        }
    }

    /// Whether the round trip should be measured again: until then the backlog waits for
    /// an empty link.
    pub fn probe_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.rtt_at) > RTT_WINDOW
    }

    /// Bottleneck rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.last_rate
    }

    /// Round trip of a message alone on the link (no queue ahead of it).
    pub fn rtt(&self) -> Duration {
        self.last_rtt
    }

    fn bytes_in(&self, t: Duration) -> u64 {
        (self.rate() * t.as_secs_f64()) as u64
    }

    /// Backlog may be handed over while fewer bytes than this are in flight: the
    /// bandwidth-delay product plus half a second of queue.
    pub fn backlog_window(&self) -> u64 {
        self.bytes_in(self.rtt() + BACKLOG_QUEUE)
            .min(MAX_BACKLOG_WINDOW)
    }

    /// Live and status messages may be handed over while fewer bytes than this are in
    /// flight (they only wait if the link cannot carry even them).
    pub fn live_window(&self) -> u64 {
        self.bytes_in(self.rtt() + LIVE_QUEUE)
    }

    /// The payload size a backlog message should have.
    pub fn message_target(&self) -> usize {
        self.bytes_in(MESSAGE_TIME) as usize
    }

    /// How long the acknowledgement of `f` may take on this link: its bytes and those
    /// ahead of it at half the measured rate, plus round trips.
    pub fn ack_due(&self, f: &Flight) -> Duration {
        let serial = Duration::from_secs_f64(2.0 * f.ahead as f64 / self.rate().max(1.0));
        serial + 4 * self.rtt() + Duration::from_secs(2)
    }
}

fn push_sample<T>(q: &mut VecDeque<(Instant, T)>, now: Instant, v: T) {
    q.push_back((now, v));
    // A bounded history even at thousands of acks a second.
    if q.len() > 1024 {
        q.pop_front();
    }
}

fn expire<T>(q: &mut VecDeque<(Instant, T)>, now: Instant, window: Duration) {
    while q
        .front()
        .is_some_and(|s| now.saturating_duration_since(s.0) > window)
    {
        q.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link of `rate` B/s and `prop` round trip, fed as the scheduler feeds it: messages
    /// of `message_target()` bytes while fewer than `backlog_window()` bytes are in flight,
    /// each acknowledged when the link has carried it plus `prop`. Returns the model after
    /// `secs` seconds.
    fn drive(rate: f64, prop: Duration, secs: u64) -> LinkModel {
        let t0 = Instant::now();
        let mut m = LinkModel::new(t0);
        m.on_connect(t0);
        let end = t0 + Duration::from_secs(secs);
        let mut flights: VecDeque<(Flight, Instant)> = VecDeque::new();
        let mut link_free = t0;
        let mut now = t0;
        let mut inflight = 0u64;
        while now < end {
            while flights.is_empty() || (inflight < m.backlog_window() && !m.probe_due(now)) {
                let size = m.message_target().clamp(1500, 131_072);
                inflight += size as u64;
                let f = m.on_send(now, size, inflight);
                link_free = link_free.max(now) + Duration::from_secs_f64(size as f64 / rate);
                flights.push_back((f, link_free + prop));
            }
            let Some((f, at)) = flights.pop_front() else {
                break;
            };
            now = at;
            inflight -= f.wire as u64;
            m.on_ack(now, &f);
            if std::env::var_os("LINK_DEBUG").is_some() {
                eprintln!(
                    "{:?} rate {:.0} rtt {:?} window {} inflight {inflight}",
                    now - t0,
                    m.rate(),
                    m.rtt(),
                    m.backlog_window()
                );
            }
        }
        m
    }

    #[test]
    fn measures_a_thin_link() {
        let m = drive(3072.0, Duration::from_millis(100), 60);
        let r = m.rate();
        assert!((2700.0..=3500.0).contains(&r), "rate {r}");
        // A message alone: its 1.5 KB take half a second, plus the 100 ms; the estimate
        // errs on the long side by less than the half-second message.
        let rtt = m.rtt().as_secs_f64();
        assert!((0.55..=1.1).contains(&rtt), "rtt {rtt}");
        // About a second and a half of link in flight: no more queues ahead of live.
        let w = m.backlog_window();
        assert!((2500..=4700).contains(&w), "window {w}");
    }

    #[test]
    fn finds_a_long_fat_link_from_a_small_start() {
        // 64 KiB/s, 600 ms: the window must grow to cover the 38 KB in flight.
        let rate = 65536.0;
        let m = drive(rate, Duration::from_millis(600), 60);
        let r = m.rate();
        // Rate samples reach the bottleneck only while the window keeps the pipe full.
        assert!(r >= 0.9 * rate, "rate {r} after 15 s");
        let carried = m.delivered as f64 / 60.0;
        assert!(carried >= 0.9 * rate, "carried {carried} B/s of {rate}");
    }

    #[test]
    fn idle_time_is_not_a_slow_link() {
        // One small message a second on a fast link: the rate is not the traffic rate.
        let t0 = Instant::now();
        let mut m = LinkModel::new(t0);
        m.on_connect(t0);
        for i in 0..10u32 {
            let at = t0 + Duration::from_secs(u64::from(i));
            let f = m.on_send(at, 1800, 1800);
            m.on_ack(at + Duration::from_millis(60), &f);
        }
        assert!(m.rate() > 20_000.0, "rate {}", m.rate());
    }

    #[test]
    fn ack_deadline_follows_the_bytes_ahead() {
        let mut m = drive(3072.0, Duration::from_millis(100), 60);
        let t = Instant::now();
        let small = m.on_send(t, 1500, 1500);
        let deep = m.on_send(t, 1500, 30_000);
        assert!(m.ack_due(&deep) > m.ack_due(&small) + Duration::from_secs(15));
    }
}
