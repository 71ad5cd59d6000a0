//! Batches of encoded records, and the batcher that closes them on count, age or size.

use crate::config::{self, PayloadMode};
use crate::sample::signal::Micros;

/// The records payload's envelope: `{"records":[` + the records joined by `,` + `]}`.
const ENVELOPE_HEAD: &[u8] = b"{\"records\":[";
const ENVELOPE_TAIL: &[u8] = b"]}";

/// `{"records":[` + `]}`: what the records payload adds around the comma-joined records.
pub const RECORDS_ENVELOPE: usize = ENVELOPE_HEAD.len() + ENVELOPE_TAIL.len();

/// The records payload of one message: the bodies (each records joined by `,`) joined by
/// `,` in the envelope. The one place the envelope is built, for one batch (stdout) or
/// several (the uplink's messages).
pub fn records_payload<'a>(bodies: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let len: usize = bodies.clone().map(|b| b.len() + 1).sum();
    let mut p = Vec::with_capacity(len + RECORDS_ENVELOPE);
    p.extend_from_slice(ENVELOPE_HEAD);
    for (i, body) in bodies.enumerate() {
        if i > 0 {
            p.push(b',');
        }
        p.extend_from_slice(body);
    }
    p.extend_from_slice(ENVELOPE_TAIL);
    p
}

/// Digits an epoch-millisecond timestamp may have beyond a boot-clock one.
const BOOT_TIMESTAMP_GROWTH: usize = 13;

/// Consecutive records, the unit of durability and acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Assigned in order by the batcher (and later by the spool); acks name it.
    pub seq: u64,
    pub first_at: Micros,
    pub last_at: Micros,
    /// The records joined by `,`.
    pub body: Vec<u8>,
    /// End offset in `body` of each record.
    pub ends: Vec<u32>,
    /// `Some(boot id)`: the timestamps are on that boot's clock, not UTC (sampled while the
    /// wall clock was not trusted); converted before they are published.
    pub boot: Option<[u8; 16]>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The records, each without separators.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0usize;
        self.ends.iter().map(move |&end| {
            let rec = &self.body[start..end as usize];
            start = end as usize + 1;
            rec
        })
    }

    /// Moves every record's `timestamp` (and the batch's times) by `delta_us`: the
    /// conversion of boot-clock readings to UTC once the offset is known.
    pub fn shift_timestamps(&mut self, delta_us: i64) {
        const KEY: &[u8] = b"\"timestamp\":";
        let delta_ms = delta_us.div_euclid(1000);
        let mut body = Vec::with_capacity(self.body.len() + 8 * self.ends.len());
        let mut ends = Vec::with_capacity(self.ends.len());
        for rec in self.records() {
            if !body.is_empty() {
                body.push(b',');
            }
            // The first `"timestamp":` is the key: inside a JSON string a quote is escaped.
            match rec.windows(KEY.len()).position(|w| w == KEY) {
                Some(k) => {
                    let start = k + KEY.len();
                    let len = rec[start..]
                        .iter()
                        .position(|c| !(c.is_ascii_digit() || *c == b'-'))
                        .unwrap_or(rec.len() - start);
                    let old: i64 = std::str::from_utf8(&rec[start..start + len])
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    body.extend_from_slice(&rec[..start]);
                    body.extend_from_slice(itoa::Buffer::new().format(old + delta_ms).as_bytes());
                    body.extend_from_slice(&rec[start + len..]);
                }
                None => body.extend_from_slice(rec),
            }
            ends.push(body.len() as u32);
        }
        self.body = body;
        self.ends = ends;
        self.first_at += delta_us;
        self.last_at += delta_us;
        self.boot = None;
    }

    /// The size of this batch as one records payload.
    pub fn payload_len(&self) -> usize {
        self.body.len() + RECORDS_ENVELOPE
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_records: usize,
    pub max_age: Micros,
    pub max_bytes: usize,
    pub mode: PayloadMode,
}

impl Limits {
    pub fn from_config(c: &config::Batch) -> Self {
        Self {
            max_records: c.max_records,
            max_age: c.max_age.0.as_micros() as Micros,
            max_bytes: c.max_bytes.0 as usize,
            mode: c.payload,
        }
    }

    /// Largest payload a message may carry.
    fn payload_cap(&self) -> usize {
        self.max_bytes
    }
}

/// Groups records into batches. A batch closes when it holds `max_records`, when it spans
/// `max_age` of sampling time (data time, so a replay batches the same at any speed), or
/// when the next record would push its payload over `max_bytes`.
pub struct Batcher {
    limits: Limits,
    period: Micros,
    next_seq: u64,
    open: Option<Batch>,
    /// Records too large to ever fit a message; they are counted and dropped.
    pub oversize: u64,
    /// The clock new batches are stamped on (`None`: UTC).
    pub boot: Option<[u8; 16]>,
}

impl Batcher {
    /// `period`: the sampling period, so that 10 readings at 10 Hz span 1 s.
    pub fn new(limits: Limits, period: Micros, first_seq: u64) -> Self {
        Self {
            limits,
            period,
            next_seq: first_seq,
            open: None,
            oversize: 0,
            boot: None,
        }
    }

    /// Adds one encoded record sampled at `at`; returns the batches it closed.
    pub fn push(&mut self, record: &[u8], at: Micros, out: &mut Vec<Batch>) {
        // A boot-clock timestamp grows by up to 13 digits when it is converted to epoch
        // milliseconds before publishing: keep room for it.
        let room = if self.boot.is_some() {
            BOOT_TIMESTAMP_GROWTH
        } else {
            0
        };
        let record_len = record.len() + room;
        let fits_alone = match self.limits.mode {
            PayloadMode::Records => record_len + RECORDS_ENVELOPE <= self.limits.payload_cap(),
            PayloadMode::Single => record_len <= self.limits.payload_cap(),
        };
        if !fits_alone {
            self.oversize += 1;
            return;
        }
        if let Some(open) = &self.open
            && open.payload_len() + room * open.len() + 1 + record_len > self.limits.payload_cap()
        {
            out.extend(self.open.take());
        }
        let seq = &mut self.next_seq;
        let boot = self.boot;
        let batch = self.open.get_or_insert_with(|| {
            let b = Batch {
                seq: *seq,
                first_at: at,
                last_at: at,
                body: Vec::with_capacity(4096),
                ends: Vec::new(),
                boot,
            };
            *seq += 1;
            b
        });
        if !batch.body.is_empty() {
            batch.body.push(b',');
        }
        batch.body.extend_from_slice(record);
        batch.ends.push(batch.body.len() as u32);
        batch.last_at = at;
        let full = batch.len() >= self.limits.max_records;
        let old = batch.last_at + self.period - batch.first_at >= self.limits.max_age;
        if full || old {
            out.extend(self.open.take());
        }
    }

    /// Closes the open batch, if any (at shutdown).
    pub fn flush(&mut self) -> Option<Batch> {
        self.open.take()
    }
}

/// One MQTT publish: a payload and the batches whose records it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub payload: bytes::Bytes,
    pub records: usize,
    pub batches: Vec<u64>,
    /// A status message: its own topic, maybe retained. `None`: telemetry.
    pub control: Option<std::sync::Arc<Control>>,
}

/// Where a status message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub topic: String,
    pub retain: bool,
}

/// Turns a batch into the messages that carry it: one `{"records":[...]}` message, or one
/// message per record in `single` mode.
pub fn messages_for(batch: &Batch, mode: PayloadMode, out: &mut Vec<Message>) {
    match mode {
        PayloadMode::Records => {
            out.push(Message {
                payload: records_payload(std::iter::once(&batch.body[..])).into(),
                records: batch.len(),
                batches: vec![batch.seq],
                control: None,
            });
        }
        PayloadMode::Single => {
            out.extend(batch.records().map(|r| Message {
                payload: bytes::Bytes::copy_from_slice(r),
                records: 1,
                batches: vec![batch.seq],
                control: None,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Micros = 100_000;

    fn limits(max_records: usize, max_age_ms: i64, max_bytes: usize) -> Limits {
        Limits {
            max_records,
            max_age: max_age_ms * 1000,
            max_bytes,
            mode: PayloadMode::Records,
        }
    }

    fn rec(i: usize, len: usize) -> Vec<u8> {
        let mut r = format!("{{\"i\":{i},\"pad\":\"").into_bytes();
        r.resize(len - 2, b'x');
        r.extend_from_slice(b"\"}");
        r
    }

    fn run(b: &mut Batcher, n: usize, len: usize) -> Vec<Batch> {
        let mut out = Vec::new();
        for i in 0..n {
            b.push(&rec(i, len), i as i64 * P, &mut out);
        }
        out.extend(b.flush());
        out
    }

    #[test]
    fn closes_on_count() {
        let mut b = Batcher::new(limits(10, 60_000, 131_072), P, 0);
        let out = run(&mut b, 25, 200);
        assert_eq!(out.iter().map(Batch::len).collect::<Vec<_>>(), [10, 10, 5]);
        assert_eq!(out.iter().map(|b| b.seq).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn closes_on_age_in_data_time() {
        let mut b = Batcher::new(limits(500, 1000, 131_072), P, 0);
        let out = run(&mut b, 25, 200);
        assert_eq!(out.iter().map(Batch::len).collect::<Vec<_>>(), [10, 10, 5]);
        assert_eq!(out[1].first_at, 10 * P);
    }

    #[test]
    fn closes_on_bytes_and_never_exceeds_them() {
        let mut b = Batcher::new(limits(500, 600_000, 2048), P, 0);
        let out = run(&mut b, 100, 200);
        assert_eq!(out.iter().map(Batch::len).sum::<usize>(), 100);
        for batch in &out {
            let mut msgs = Vec::new();
            messages_for(batch, PayloadMode::Records, &mut msgs);
            assert!(msgs[0].payload.len() <= 2048);
            assert_eq!(msgs[0].payload.len(), batch.payload_len());
        }
        // 200-byte records: 10 fit into 2048 with the envelope and commas.
        assert_eq!(out[0].len(), 10);
    }

    #[test]
    fn five_hundred_records_and_128kib_are_hard_caps() {
        let mut b = Batcher::new(limits(500, 3_600_000, 131_072), P, 0);
        let out = run(&mut b, 1200, 100);
        assert!(out.iter().all(|b| b.len() <= 500));
        assert_eq!(out[0].len(), 500);
        let mut b = Batcher::new(limits(500, 3_600_000, 131_072), P, 0);
        let out = run(&mut b, 1200, 300);
        assert!(out.iter().all(|b| b.payload_len() <= 131_072));
        assert!(out[0].payload_len() > 130_000);
        assert_eq!(out.iter().map(Batch::len).sum::<usize>(), 1200);
    }

    #[test]
    fn shifting_timestamps_rewrites_every_record() {
        let mut b = Batcher::new(limits(10, 1000, 131_072), P, 0);
        b.boot = Some([7; 16]);
        let mut out = Vec::new();
        for (i, t) in [5_000i64, 5_100, 5_200].iter().enumerate() {
            let rec =
                format!("{{\"vehicle_id\":\"a\\\"timestamp\\\":1\",\"timestamp\":{t},\"x\":{i}}}");
            b.push(rec.as_bytes(), t * 1000, &mut out);
        }
        let mut batch = b.flush().expect("open batch");
        assert_eq!(batch.boot, Some([7; 16]));
        batch.shift_timestamps(1_700_000_000_000_000);
        let recs: Vec<serde_json::Value> = batch
            .records()
            .map(|r| serde_json::from_slice(r).expect("json"))
            .collect();
        assert_eq!(recs[0]["timestamp"], 1_700_000_005_000i64);
        assert_eq!(recs[2]["timestamp"], 1_700_000_005_200i64);
        assert_eq!(recs[1]["vehicle_id"], "a\"timestamp\":1");
        assert_eq!(batch.first_at, 1_700_000_005_000_000);
        assert_eq!(batch.boot, None);
    }

    #[test]
    fn a_record_that_cannot_fit_is_dropped_and_counted() {
        let mut b = Batcher::new(limits(10, 1000, 1024), P, 0);
        let mut out = Vec::new();
        b.push(&rec(0, 2000), 0, &mut out);
        assert!(out.is_empty() && b.flush().is_none());
        assert_eq!(b.oversize, 1);
    }

    #[test]
    fn payloads_are_valid_json_in_both_modes() {
        let mut b = Batcher::new(limits(10, 1000, 131_072), P, 0);
        let out = run(&mut b, 10, 50);
        let mut msgs = Vec::new();
        messages_for(&out[0], PayloadMode::Records, &mut msgs);
        let v: serde_json::Value = serde_json::from_slice(&msgs[0].payload).expect("json");
        assert_eq!(v["records"].as_array().map(Vec::len), Some(10));
        msgs.clear();
        messages_for(&out[0], PayloadMode::Single, &mut msgs);
        assert_eq!(msgs.len(), 10);
        for (i, m) in msgs.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
            assert_eq!(v["i"], i);
        }
    }
}
