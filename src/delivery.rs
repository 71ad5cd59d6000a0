//! Which message is where: queued, handed to the MQTT client, or acknowledged; and which
//! batches are fully acknowledged. Pure bookkeeping, driven by the publisher.
//!
//! rumqttc does not say which publish a packet id belongs to. It reports
//! `Outgoing::Publish(pkid)` in the order we handed publishes over, so the n-th report names
//! the n-th message still waiting for its id. After a disconnect every unacknowledged
//! message goes back to the front of the queue (rumqttc drops its own copies when the broker
//! keeps no session) and is sent again from here.

use crate::batch::Message;
use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
struct Sent {
    msg: Message,
    pkid: Option<u16>,
    /// When the client wrote it (its packet id known).
    at: Option<std::time::Instant>,
}

/// A batch whose every message has been acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub seq: u64,
    pub records: usize,
}

#[derive(Debug, Default)]
pub struct Delivery {
    queue: VecDeque<Message>,
    sent: VecDeque<Sent>,
    /// Per batch: messages not yet acknowledged, records in the batch.
    open: HashMap<u64, (usize, usize)>,
    window: usize,
    /// Messages sent again after a disconnect.
    pub resent: u64,
}

impl Delivery {
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            ..Default::default()
        }
    }

    /// Queues a status message: at the front (`urgent`, the online message at connect) or
    /// behind the telemetry already queued.
    pub fn enqueue_control(&mut self, msg: Message, urgent: bool) {
        if urgent {
            self.queue.push_front(msg);
        } else {
            self.queue.push_back(msg);
        }
    }

    /// Drops queued (not yet sent) status messages: a newer one replaces them.
    pub fn drop_queued_control(&mut self) {
        self.queue.retain(|m| m.control.is_none());
    }

    /// Queues the messages of one batch.
    pub fn enqueue(&mut self, seq: u64, records: usize, messages: Vec<Message>) {
        self.enqueue_many(&[(seq, records)], messages);
    }

    /// Queues messages carrying the given batches (`(seq, records)`), whether one batch
    /// spans many messages or one message carries many batches.
    pub fn enqueue_many(&mut self, batches: &[(u64, usize)], messages: Vec<Message>) {
        for &(seq, records) in batches {
            let parts = messages.iter().filter(|m| m.batches.contains(&seq)).count();
            self.open.insert(seq, (parts, records));
        }
        self.queue.extend(messages);
    }

    /// The next message to hand to the client, if the in-flight window has room.
    pub fn next_to_send(&mut self) -> Option<Message> {
        if self.sent.len() >= self.window {
            return None;
        }
        let msg = self.queue.pop_front()?;
        self.sent.push_back(Sent {
            msg: msg.clone(),
            pkid: None,
            at: None,
        });
        Some(msg)
    }

    /// The size of the message `next_to_send` would return, if the window has room.
    pub fn next_len(&self) -> Option<usize> {
        if self.sent.len() >= self.window {
            return None;
        }
        self.queue.front().map(|m| m.payload.len())
    }

    /// The client refused the last message handed over: queue it again.
    pub fn unsend_last(&mut self) {
        if let Some(s) = self.sent.pop_back() {
            self.queue.push_front(s.msg);
        }
    }

    /// The client sent a publish with this packet id; returns its payload size, `None` if
    /// no message was waiting for one.
    pub fn on_sent(&mut self, pkid: u16) -> Option<usize> {
        let s = self.sent.iter_mut().find(|s| s.pkid.is_none())?;
        s.pkid = Some(pkid);
        s.at = Some(std::time::Instant::now());
        Some(s.msg.payload.len())
    }

    /// How long the oldest message written to the broker has waited for its PUBACK.
    pub fn oldest_unacked_wait(&self) -> Option<std::time::Duration> {
        self.sent
            .iter()
            .filter_map(|s| s.at)
            .min()
            .map(|t| t.elapsed())
    }

    /// A PUBACK arrived; returns the batches it completed.
    pub fn on_puback(&mut self, pkid: u16, completed: &mut Vec<Acked>) -> bool {
        let Some(i) = self.sent.iter().position(|s| s.pkid == Some(pkid)) else {
            return false;
        };
        let Some(s) = self.sent.remove(i) else {
            return false;
        };
        for seq in s.msg.batches {
            if let Some((left, records)) = self.open.get_mut(&seq) {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    completed.push(Acked {
                        seq,
                        records: *records,
                    });
                    self.open.remove(&seq);
                }
            }
        }
        true
    }

    /// The connection is gone: everything unacknowledged goes back to the queue, in order.
    pub fn on_disconnect(&mut self) {
        self.resent += self.sent.len() as u64;
        while let Some(s) = self.sent.pop_back() {
            self.queue.push_front(s.msg);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.sent.len()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Batches not yet fully acknowledged.
    pub fn open_batches(&self) -> usize {
        self.open.len()
    }

    pub fn open_records(&self) -> usize {
        self.open.values().map(|(_, r)| r).sum()
    }

    pub fn is_idle(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, tag: &str) -> Message {
        Message {
            payload: bytes::Bytes::copy_from_slice(tag.as_bytes()),
            records: 1,
            batches: vec![seq],
            control: None,
        }
    }

    #[test]
    fn acks_are_matched_by_packet_id_in_send_order() {
        let mut d = Delivery::new(10);
        d.enqueue(0, 1, vec![msg(0, "a")]);
        d.enqueue(1, 2, vec![msg(1, "b1"), msg(1, "b2")]);
        let mut sent = Vec::new();
        while let Some(m) = d.next_to_send() {
            sent.push(m);
        }
        assert_eq!(sent.len(), 3);
        assert!(d.on_sent(7).is_some() && d.on_sent(8).is_some() && d.on_sent(9).is_some());
        assert!(d.on_sent(10).is_none());
        let mut done = Vec::new();
        assert!(d.on_puback(9, &mut done));
        assert!(done.is_empty());
        assert!(d.on_puback(8, &mut done));
        assert_eq!(done, [Acked { seq: 1, records: 2 }]);
        assert!(
            !d.on_puback(8, &mut done),
            "a second PUBACK matches nothing"
        );
        assert!(d.on_puback(7, &mut done));
        assert_eq!(done[1], Acked { seq: 0, records: 1 });
        assert!(d.is_idle());
    }

    #[test]
    fn a_coalesced_message_acknowledges_every_batch_it_carries() {
        let mut d = Delivery::new(10);
        let m = Message {
            payload: bytes::Bytes::from_static(b"x"),
            records: 30,
            batches: vec![4, 5, 6],
            control: None,
        };
        d.enqueue_many(&[(4, 10), (5, 10), (6, 10)], vec![m]);
        d.next_to_send();
        assert!(d.oldest_unacked_wait().is_none());
        d.on_sent(1);
        assert!(d.oldest_unacked_wait().is_some());
        let mut done = Vec::new();
        d.on_puback(1, &mut done);
        assert_eq!(done.iter().map(|a| a.seq).collect::<Vec<_>>(), [4, 5, 6]);
        assert!(d.is_idle());
    }

    #[test]
    fn window_bounds_in_flight() {
        let mut d = Delivery::new(2);
        for s in 0..5 {
            d.enqueue(s, 1, vec![msg(s, "x")]);
        }
        assert!(d.next_to_send().is_some() && d.next_to_send().is_some());
        assert!(d.next_to_send().is_none());
        assert_eq!((d.in_flight(), d.queued()), (2, 3));
    }

    #[test]
    fn disconnect_requeues_unacked_in_order_and_stale_acks_match_nothing() {
        let mut d = Delivery::new(10);
        for s in 0..4 {
            d.enqueue(s, 1, vec![msg(s, &format!("m{s}"))]);
        }
        for pkid in 1..=3 {
            d.next_to_send();
            d.on_sent(pkid);
        }
        let mut done = Vec::new();
        d.on_puback(1, &mut done);
        d.on_disconnect();
        assert_eq!(d.resent, 2);
        // A PUBACK of the old connection arriving late matches nothing now.
        assert!(!d.on_puback(2, &mut done));
        let order: Vec<_> = std::iter::from_fn(|| d.next_to_send())
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        assert_eq!(order, ["m1", "m2", "m3"]);
        assert_eq!(d.open_batches(), 3);
    }
}
