//! What goes on the wire next: live before backlog, messages sized for the link, a window
//! of bytes in flight, and which acknowledgement is overdue. No I/O: the publisher feeds it
//! batches, packet ids and PUBACKs with the time they happened, and moves the bytes.
//!
//! The unit of bookkeeping is a stored batch (one record of it in `single` mode). Messages
//! are built only when they are handed over, so the backlog is coalesced to the size the
//! link takes in about half a second, and after a disconnect whatever was not acknowledged
//! is cut back into batches and coalesced again for the next connection.

use super::link_model::{Flight, LinkModel};
use crate::config::{MAX_RECORDS_PER_MESSAGE, PayloadMode};
use crate::sample::batch::{Batch, Control, RECORDS_ENVELOPE, records_payload};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Live,
    Backlog,
}

/// A batch (or, in `single` mode, one record of it) waiting to be sent.
#[derive(Debug, Clone)]
struct Unit {
    seq: u64,
    records: usize,
    /// Records joined by `,` (`single` mode: one record).
    body: Bytes,
    sent_before: bool,
}

/// A status message: its payload and where it goes.
#[derive(Debug, Clone)]
pub struct ControlMsg {
    pub payload: Bytes,
    pub to: Arc<Control>,
}

/// A message to hand to the MQTT client.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub payload: Bytes,
    /// `None`: the telemetry topic.
    pub control: Option<Arc<Control>>,
    pub lane: Lane,
    pub records: usize,
}

#[derive(Debug)]
struct InFlight {
    order: u64,
    lane: Lane,
    units: Vec<Unit>,
    control: Option<ControlMsg>,
    pkid: Option<u16>,
    flight: Flight,
}

/// A batch whose every message has been acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub seq: u64,
    pub records: usize,
}

/// Why the connection should be dropped and its messages sent again on a new one.
#[derive(Debug, Clone, PartialEq)]
pub enum Overdue {
    /// Nothing acknowledged for this long while messages wait: the link or broker is dead.
    Stalled(Duration),
    /// Later messages were acknowledged, this one was not within its deadline: the broker
    /// dropped it (AWS throttles by withholding PUBACKs).
    Lost(Duration),
}

/// Figures of the link and the queue, for the status report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    pub rate_bps: u64,
    pub rtt_ms: u64,
    pub inflight_bytes: u64,
    pub inflight_messages: u64,
    pub window_bytes: u64,
    pub message_bytes: u64,
    pub live_queued: u64,
    pub backlog_queued_bytes: u64,
}

#[derive(Debug)]
pub struct Settings {
    pub mode: PayloadMode,
    /// The largest payload (AWS: 128 KiB).
    pub max_payload: usize,
    /// The most messages in flight (`mqtt.max_inflight`).
    pub max_inflight: usize,
    /// Topic and MQTT header bytes a telemetry message adds on the wire.
    pub overhead: usize,
    /// No acknowledgement at all for this long: the link is dead (`mqtt.ack_timeout`).
    pub ack_timeout: Duration,
}

#[derive(Debug)]
pub struct Scheduler {
    s: Settings,
    model: LinkModel,
    urgent: VecDeque<ControlMsg>,
    status: Option<ControlMsg>,
    live: VecDeque<Unit>,
    backlog: VecDeque<Unit>,
    backlog_bytes: usize,
    inflight: VecDeque<InFlight>,
    inflight_bytes: u64,
    /// Per batch: units not yet acknowledged, records.
    open: HashMap<u64, (usize, usize)>,
    next_order: u64,
    newest_acked: Option<u64>,
    last_ack_at: Option<Instant>,
    /// Set at a stop: the backlog stays where it is.
    backlog_held: bool,
    /// Payload bytes of batches sent a second time.
    pub resent_bytes: u64,
    /// Messages in flight at a disconnect.
    pub requeued_messages: u64,
}

impl Scheduler {
    pub fn new(s: Settings, now: Instant) -> Self {
        Self {
            s,
            model: LinkModel::new(now),
            urgent: VecDeque::new(),
            status: None,
            live: VecDeque::new(),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            open: HashMap::new(),
            next_order: 0,
            newest_acked: None,
            last_ack_at: None,
            backlog_held: false,
            resent_bytes: 0,
            requeued_messages: 0,
        }
    }

    /// No more backlog is handed over (a stop: it stays in the spool).
    pub fn hold_backlog(&mut self) {
        self.backlog_held = true;
    }

    /// Nothing live waits or is in flight (backlog still queued does not count).
    pub fn live_settled(&self) -> bool {
        self.live.is_empty() && self.inflight.is_empty() && self.urgent.is_empty()
    }

    fn units_of(&mut self, b: &Batch) -> Vec<Unit> {
        let units: Vec<Unit> = match self.s.mode {
            PayloadMode::Records => vec![Unit {
                seq: b.seq,
                records: b.len(),
                body: Bytes::copy_from_slice(&b.body),
                sent_before: false,
            }],
            PayloadMode::Single => b
                .records()
                .map(|r| Unit {
                    seq: b.seq,
                    records: 1,
                    body: Bytes::copy_from_slice(r),
                    sent_before: false,
                })
                .collect(),
        };
        self.open.insert(b.seq, (units.len(), b.len()));
        units
    }

    /// A batch just made.
    pub fn push_live(&mut self, b: &Batch) {
        let units = self.units_of(b);
        self.live.extend(units);
    }

    /// A stored batch, oldest first.
    pub fn push_backlog(&mut self, b: &Batch) {
        let units = self.units_of(b);
        self.backlog_bytes += units.iter().map(|u| u.body.len()).sum::<usize>();
        self.backlog.extend(units);
    }

    /// A status message that must go before anything else (online at connect).
    pub fn push_urgent(&mut self, m: ControlMsg) {
        self.urgent.push_back(m);
    }

    /// The periodic status: only the newest waits.
    pub fn set_status(&mut self, m: ControlMsg) {
        self.status = Some(m);
    }

    /// Live batches waiting (the publisher takes more only while few wait).
    pub fn live_queued(&self) -> usize {
        self.live.len()
    }

    /// Whether another parcel of backlog should be taken: less than two messages' worth
    /// waits.
    pub fn wants_backlog(&self) -> bool {
        self.backlog_bytes < 2 * self.target()
    }

    fn target(&self) -> usize {
        self.model.message_target().clamp(1, self.s.max_payload)
    }

    /// How many units from the front of `q` make the next message, and its payload length.
    fn plan(&self, q: &VecDeque<Unit>) -> (usize, usize) {
        if self.s.mode == PayloadMode::Single {
            return q.front().map_or((0, 0), |u| (1, u.body.len()));
        }
        let target = self.target();
        let mut n = 0;
        let mut records = 0;
        let mut len = RECORDS_ENVELOPE;
        for u in q {
            let grown = len + u.body.len() + usize::from(n > 0);
            let fits = records + u.records <= MAX_RECORDS_PER_MESSAGE
                && grown <= self.s.max_payload
                && grown <= target;
            if n > 0 && !fits {
                break;
            }
            n += 1;
            records += u.records;
            len = grown;
        }
        (n, len)
    }

    /// The next message to hand over, if the window has room and `admit` (the rate limits)
    /// agrees to its wire size.
    pub fn next(&mut self, now: Instant, admit: &mut dyn FnMut(usize) -> bool) -> Option<Outgoing> {
        if self.inflight.len() >= self.s.max_inflight {
            return None;
        }
        let empty = self.inflight.is_empty();
        let live_room = empty || self.inflight_bytes < self.model.live_window();
        // While a round-trip probe is due the backlog waits for an empty link.
        let backlog_room = empty
            || (self.inflight_bytes < self.model.backlog_window() && !self.model.probe_due(now));
        if live_room && let Some(c) = self.urgent.front() {
            let wire = c.payload.len() + c.to.topic.len() + 4;
            if !admit(wire) {
                return None;
            }
            let c = self.urgent.pop_front()?;
            return Some(self.launch(now, Lane::Live, Vec::new(), Some(c), wire));
        }
        if live_room && !self.live.is_empty() {
            return self.launch_units(now, Lane::Live, admit);
        }
        if live_room && let Some(c) = &self.status {
            let wire = c.payload.len() + c.to.topic.len() + 4;
            if !admit(wire) {
                return None;
            }
            let c = self.status.take()?;
            return Some(self.launch(now, Lane::Live, Vec::new(), Some(c), wire));
        }
        if backlog_room && !self.backlog_held && !self.backlog.is_empty() {
            return self.launch_units(now, Lane::Backlog, admit);
        }
        None
    }

    fn launch_units(
        &mut self,
        now: Instant,
        lane: Lane,
        admit: &mut dyn FnMut(usize) -> bool,
    ) -> Option<Outgoing> {
        let q = match lane {
            Lane::Live => &self.live,
            Lane::Backlog => &self.backlog,
        };
        let (n, len) = self.plan(q);
        let wire = len + self.s.overhead;
        if n == 0 || !admit(wire) {
            return None;
        }
        let q = match lane {
            Lane::Live => &mut self.live,
            Lane::Backlog => &mut self.backlog,
        };
        let units: Vec<Unit> = q.drain(..n).collect();
        if lane == Lane::Backlog {
            self.backlog_bytes = self
                .backlog_bytes
                .saturating_sub(units.iter().map(|u| u.body.len()).sum());
        }
        Some(self.launch(now, lane, units, None, wire))
    }

    fn launch(
        &mut self,
        now: Instant,
        lane: Lane,
        units: Vec<Unit>,
        control: Option<ControlMsg>,
        wire: usize,
    ) -> Outgoing {
        let payload = match (&control, self.s.mode) {
            (Some(c), _) => c.payload.clone(),
            (None, PayloadMode::Single) => {
                units.first().map(|u| u.body.clone()).unwrap_or_default()
            }
            (None, PayloadMode::Records) => envelope(&units),
        };
        for u in &units {
            if u.sent_before {
                self.resent_bytes += u.body.len() as u64;
            }
        }
        self.inflight_bytes += wire as u64;
        let flight = self.model.on_send(now, wire, self.inflight_bytes);
        let out = Outgoing {
            payload,
            control: control.as_ref().map(|c| c.to.clone()),
            lane,
            records: units.iter().map(|u| u.records).sum(),
        };
        self.inflight.push_back(InFlight {
            order: self.next_order,
            lane,
            units,
            control,
            pkid: None,
            flight,
        });
        self.next_order += 1;
        out
    }

    /// The client refused the message just handed over: it goes back to the front.
    pub fn unsend_last(&mut self) {
        let Some(f) = self.inflight.pop_back() else {
            return;
        };
        self.next_order -= 1;
        self.inflight_bytes = self.inflight_bytes.saturating_sub(f.flight.wire as u64);
        self.requeue(f, false);
    }

    fn requeue(&mut self, f: InFlight, sent: bool) {
        if let Some(c) = f.control {
            // A status is only worth sending if it is the newest; online goes first again.
            if c.to.retain {
                self.urgent.push_front(c);
            } else if self.status.is_none() {
                self.status = Some(c);
            }
            return;
        }
        let q = match f.lane {
            Lane::Live => &mut self.live,
            Lane::Backlog => &mut self.backlog,
        };
        for mut u in f.units.into_iter().rev() {
            u.sent_before |= sent;
            if f.lane == Lane::Backlog {
                self.backlog_bytes += u.body.len();
            }
            q.push_front(u);
        }
    }

    /// The client wrote a publish with this packet id (in hand-over order); returns the
    /// wire size of the message it belongs to.
    pub fn on_sent(&mut self, pkid: u16) -> Option<usize> {
        let f = self.inflight.iter_mut().find(|f| f.pkid.is_none())?;
        f.pkid = Some(pkid);
        Some(f.flight.wire)
    }

    /// A PUBACK: returns false if it matches no message; fills `done` with the batches it
    /// completed.
    pub fn on_puback(&mut self, now: Instant, pkid: u16, done: &mut Vec<Acked>) -> bool {
        let Some(i) = self.inflight.iter().position(|f| f.pkid == Some(pkid)) else {
            return false;
        };
        let Some(f) = self.inflight.remove(i) else {
            return false;
        };
        self.inflight_bytes = self.inflight_bytes.saturating_sub(f.flight.wire as u64);
        self.model.on_ack(now, &f.flight);
        self.last_ack_at = Some(now);
        self.newest_acked = Some(self.newest_acked.map_or(f.order, |o| o.max(f.order)));
        for u in f.units {
            if let Some((left, records)) = self.open.get_mut(&u.seq) {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    done.push(Acked {
                        seq: u.seq,
                        records: *records,
                    });
                    self.open.remove(&u.seq);
                }
            }
        }
        true
    }

    pub fn on_connect(&mut self, now: Instant) {
        self.model.on_connect(now);
        self.last_ack_at = Some(now);
    }

    /// The connection is gone: what was not acknowledged goes back to the front of its lane,
    /// cut into batches, to be coalesced again for the next connection. Returns how many
    /// messages were in flight.
    pub fn on_disconnect(&mut self) -> usize {
        let n = self.inflight.len();
        self.requeued_messages += n as u64;
        while let Some(f) = self.inflight.pop_back() {
            self.requeue(f, true);
        }
        self.inflight_bytes = 0;
        self.newest_acked = None;
        n
    }

    /// Whether the connection should be dropped, judged at `now`.
    pub fn overdue(&self, now: Instant) -> Option<Overdue> {
        let oldest = self.inflight.iter().find(|f| f.pkid.is_some())?;
        let waited = now.saturating_duration_since(oldest.flight.sent_at);
        if self.newest_acked.is_some_and(|o| o > oldest.order)
            && waited > self.model.ack_due(&oldest.flight)
        {
            return Some(Overdue::Lost(waited));
        }
        let since = self
            .last_ack_at
            .map_or(oldest.flight.sent_at, |t| t.max(oldest.flight.sent_at));
        let quiet = now.saturating_duration_since(since);
        // A message that needs longer than `ack_timeout` on this link (a huge one on a thin
        // link) gets the time it needs.
        let serial =
            Duration::from_secs_f64(2.0 * oldest.flight.ahead as f64 / self.model.rate().max(1.0));
        if quiet > self.s.ack_timeout.max(serial) {
            return Some(Overdue::Stalled(quiet));
        }
        None
    }

    pub fn figures(&self) -> Figures {
        Figures {
            rate_bps: self.model.rate() as u64,
            rtt_ms: self.model.rtt().as_millis() as u64,
            inflight_bytes: self.inflight_bytes,
            inflight_messages: self.inflight.len() as u64,
            window_bytes: self.model.backlog_window(),
            message_bytes: self.target() as u64,
            live_queued: self.live.len() as u64,
            backlog_queued_bytes: self.backlog_bytes as u64,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Messages waiting to be handed over.
    pub fn queued(&self) -> usize {
        self.urgent.len()
            + self.live.len()
            + self.backlog.len()
            + usize::from(self.status.is_some())
    }

    /// Batches not yet fully acknowledged.
    pub fn open_batches(&self) -> usize {
        self.open.len()
    }

    pub fn open_records(&self) -> usize {
        self.open.values().map(|(_, r)| r).sum()
    }

    /// Every batch acknowledged (status messages do not count).
    pub fn is_idle(&self) -> bool {
        self.open.is_empty()
    }
}

fn envelope(units: &[Unit]) -> Bytes {
    records_payload(units.iter().map(|u| &u.body[..])).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, n: usize, rec_len: usize) -> Batch {
        let mut body = Vec::new();
        let mut ends = Vec::new();
        for i in 0..n {
            if i > 0 {
                body.push(b',');
            }
            let r = format!("{{\"s\":{seq},\"i\":{i},\"p\":\"");
            body.extend_from_slice(r.as_bytes());
            body.resize(body.len() + rec_len.saturating_sub(r.len() + 2), b'x');
            body.extend_from_slice(b"\"}");
            ends.push(body.len() as u32);
        }
        Batch {
            seq,
            first_at: 0,
            last_at: 0,
            body,
            ends,
            boot: None,
        }
    }

    fn sched(mode: PayloadMode) -> Scheduler {
        Scheduler::new(
            Settings {
                mode,
                max_payload: 128 * 1024,
                max_inflight: 20,
                overhead: 40,
                ack_timeout: Duration::from_secs(30),
            },
            Instant::now(),
        )
    }

    fn yes(_: usize) -> bool {
        true
    }

    /// Hands over everything the window allows; returns the messages with packet ids.
    fn drain(s: &mut Scheduler, now: Instant, pkid: &mut u16) -> Vec<(u16, Outgoing)> {
        let mut out = Vec::new();
        while let Some(m) = s.next(now, &mut yes) {
            *pkid += 1;
            s.on_sent(*pkid);
            out.push((*pkid, m));
        }
        out
    }

    #[test]
    fn live_goes_before_a_queued_backlog() {
        let mut s = sched(PayloadMode::Records);
        let t = Instant::now();
        s.on_connect(t);
        for seq in 0..100 {
            s.push_backlog(&batch(seq, 10, 175));
        }
        let mut id = 0;
        let first = drain(&mut s, t, &mut id);
        assert!(!first.is_empty());
        assert!(first.iter().all(|(_, m)| m.lane == Lane::Backlog));
        // The window is full of backlog; a live batch still goes at once.
        s.push_live(&batch(1000, 10, 175));
        let m = s.next(t, &mut yes).expect("live passes the backlog window");
        assert_eq!(m.lane, Lane::Live);
        // And it waits behind at most about half a second of backlog plus one message.
        let ahead = s.figures().inflight_bytes - (m.payload.len() + 40) as u64;
        let limit = s.model.backlog_window() + s.target() as u64 + 2000;
        assert!(ahead <= limit, "{ahead} bytes ahead of live, limit {limit}");
    }

    #[test]
    fn backlog_messages_follow_the_link_rate() {
        // A 3 KiB/s link: messages shrink to about half a second of it.
        let mut s = sched(PayloadMode::Records);
        let mut t = Instant::now();
        s.on_connect(t);
        for seq in 0..400 {
            s.push_backlog(&batch(seq, 10, 175));
        }
        let rate = 3072.0;
        let mut id = 0;
        let mut sizes = Vec::new();
        let mut link_free = t;
        for _ in 0..60 {
            let sent = drain(&mut s, t, &mut id);
            let mut acks = Vec::new();
            for (pkid, m) in sent {
                sizes.push(m.payload.len());
                link_free = link_free.max(t)
                    + Duration::from_secs_f64((m.payload.len() + 40) as f64 / rate);
                acks.push((pkid, link_free + Duration::from_millis(100)));
            }
            // Deliver the first acknowledgement due, then look again.
            if let Some(&(pkid, at)) = acks.first() {
                t = at;
                s.on_puback(t, pkid, &mut Vec::new());
            } else if let Some(f) = s.inflight.front() {
                let pkid = f.pkid.unwrap_or(0);
                t += Duration::from_millis(600);
                s.on_puback(t, pkid, &mut Vec::new());
            }
        }
        let late = &sizes[sizes.len() - 10..];
        assert!(
            late.iter().all(|&l| l < 4000),
            "backlog messages of {late:?} bytes on a 3 KiB/s link"
        );
        assert!(s.figures().rate_bps > 1500, "{:?}", s.figures());
    }

    #[test]
    fn a_coalesced_message_acknowledges_every_batch_it_carries() {
        let mut s = sched(PayloadMode::Records);
        let t = Instant::now();
        s.on_connect(t);
        for seq in 4..7 {
            s.push_backlog(&batch(seq, 2, 100));
        }
        let mut id = 0;
        let sent = drain(&mut s, t, &mut id);
        assert_eq!(sent.len(), 1, "three small batches fit one message");
        let text = std::str::from_utf8(&sent[0].1.payload).unwrap_or("");
        assert!(text.starts_with("{\"records\":[{\"s\":4") && text.ends_with("}]}"));
        let mut done = Vec::new();
        assert!(s.on_puback(t, sent[0].0, &mut done));
        assert_eq!(done.iter().map(|a| a.seq).collect::<Vec<_>>(), [4, 5, 6]);
        assert!(s.is_idle());
        assert!(
            !s.on_puback(t, sent[0].0, &mut done),
            "a second PUBACK matches nothing"
        );
    }

    #[test]
    fn single_mode_acks_a_batch_after_its_last_record() {
        let mut s = sched(PayloadMode::Single);
        let t = Instant::now();
        s.on_connect(t);
        s.push_live(&batch(9, 3, 100));
        let mut id = 0;
        let sent = drain(&mut s, t, &mut id);
        assert_eq!(sent.len(), 3);
        let mut done = Vec::new();
        s.on_puback(t, sent[2].0, &mut done);
        s.on_puback(t, sent[0].0, &mut done);
        assert!(done.is_empty());
        s.on_puback(t, sent[1].0, &mut done);
        assert_eq!(done, [Acked { seq: 9, records: 3 }]);
    }

    #[test]
    fn a_disconnect_resends_only_the_unacknowledged_in_order() {
        let mut s = sched(PayloadMode::Records);
        let t = Instant::now();
        s.on_connect(t);
        for seq in 0..6 {
            s.push_live(&batch(seq, 10, 175));
        }
        // Force one batch a message by a tiny window: acknowledge as they go.
        let mut id = 0;
        let sent = drain(&mut s, t, &mut id);
        let mut done = Vec::new();
        s.on_puback(t, sent[0].0, &mut done);
        let acked: Vec<u64> = done.iter().map(|a| a.seq).collect();
        let n = s.on_disconnect();
        assert_eq!(n, sent.len() - 1);
        s.on_connect(t);
        let again = drain(&mut s, t, &mut id);
        let text: String = again
            .iter()
            .map(|(_, m)| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        // Every batch not acknowledged comes back exactly once, in order.
        let seqs: Vec<u64> = (0..6).filter(|q| !acked.contains(q)).collect();
        let mut at = 0;
        for q in &seqs {
            let needle = format!("{{\"s\":{q},\"i\":0,");
            let found = text[at..].find(&needle).map(|i| i + at);
            assert!(found.is_some(), "batch {q} not re-sent in order: {text}");
            at = found.unwrap_or(0);
        }
        for q in &acked {
            assert!(
                !text.contains(&format!("{{\"s\":{q},")),
                "acked batch {q} re-sent"
            );
        }
        let resent: u64 = seqs.len() as u64 * batch(0, 10, 175).body.len() as u64;
        assert_eq!(s.resent_bytes, resent);
    }

    #[test]
    fn a_stalled_link_is_overdue_after_ack_timeout_and_not_before() {
        let mut s = sched(PayloadMode::Records);
        let t = Instant::now();
        s.on_connect(t);
        s.push_live(&batch(0, 10, 175));
        let mut id = 0;
        drain(&mut s, t, &mut id);
        assert_eq!(s.overdue(t + Duration::from_secs(29)), None);
        assert!(matches!(
            s.overdue(t + Duration::from_secs(31)),
            Some(Overdue::Stalled(_))
        ));
    }

    #[test]
    fn a_slow_link_that_acknowledges_is_never_overdue() {
        // 3 KiB/s, every message acknowledged in turn, for five minutes.
        let mut s = sched(PayloadMode::Records);
        let mut t = Instant::now();
        s.on_connect(t);
        for seq in 0..2000 {
            s.push_backlog(&batch(seq, 10, 175));
        }
        let mut id = 0;
        let end = t + Duration::from_secs(300);
        let mut link_free = t;
        let mut due: VecDeque<(u16, Instant)> = VecDeque::new();
        while t < end {
            for (pkid, m) in drain(&mut s, t, &mut id) {
                link_free = link_free.max(t)
                    + Duration::from_secs_f64((m.payload.len() + 40) as f64 / 3072.0);
                due.push_back((pkid, link_free + Duration::from_millis(300)));
            }
            let Some((pkid, at)) = due.pop_front() else {
                break;
            };
            // Check just before each acknowledgement arrives.
            assert_eq!(s.overdue(at - Duration::from_millis(1)), None);
            t = at;
            s.on_puback(t, pkid, &mut Vec::new());
        }
        assert!(t >= end, "the link kept moving for five minutes");
    }

    #[test]
    fn a_withheld_puback_behind_acknowledged_ones_is_lost() {
        let mut s = sched(PayloadMode::Records);
        let t = Instant::now();
        s.on_connect(t);
        s.push_live(&batch(0, 10, 175));
        s.push_urgent(ControlMsg {
            payload: Bytes::from_static(b"{}"),
            to: Arc::new(Control {
                topic: "s".into(),
                retain: true,
            }),
        });
        let mut id = 0;
        let sent = drain(&mut s, t, &mut id);
        assert_eq!(sent.len(), 2);
        // The status (first) is never acknowledged; the telemetry after it is.
        s.on_puback(t + Duration::from_millis(100), sent[1].0, &mut Vec::new());
        assert_eq!(s.overdue(t + Duration::from_secs(1)), None);
        assert!(matches!(
            s.overdue(t + Duration::from_secs(10)),
            Some(Overdue::Lost(_))
        ));
    }
}
