//! Counters every stage updates, read by the periodic stats line and the exit summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a field of a reading is `null`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullReason {
    Missing,
    Stale,
    NonFinite,
    OutOfRange,
}

impl NullReason {
    pub const ALL: [NullReason; 4] = [
        NullReason::Missing,
        NullReason::Stale,
        NullReason::NonFinite,
        NullReason::OutOfRange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NullReason::Missing => "missing",
            NullReason::Stale => "stale",
            NullReason::NonFinite => "non_finite",
            NullReason::OutOfRange => "out_of_range",
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    field_names: Vec<String>,
    nulls: Vec<[AtomicU64; 4]>,
    pub readings: AtomicU64,
    pub ticks_missed: AtomicU64,
    /// Ticks of a long silence in replayed or simulated data, skipped (see `DataClock`).
    pub ticks_skipped: AtomicU64,
    pub batches: AtomicU64,
    pub batches_dropped: AtomicU64,
    pub readings_dropped: AtomicU64,
    pub messages_published: AtomicU64,
    pub bytes_published: AtomicU64,
    pub pubacks: AtomicU64,
    pub batches_acked: AtomicU64,
    pub readings_acked: AtomicU64,
    pub republished: AtomicU64,
    pub reconnects: AtomicU64,
    pub inflight: AtomicU64,
    /// The link as measured from PUBACK timing (see `uplink::link_model`).
    pub link_rate_bps: AtomicU64,
    pub link_rtt_ms: AtomicU64,
    /// Bytes handed over and not yet acknowledged: what a new message queues behind.
    pub link_queued_bytes: AtomicU64,
    pub link_window_bytes: AtomicU64,
    pub link_message_bytes: AtomicU64,
    /// Payload bytes of batches sent again after a disconnect.
    pub bytes_resent: AtomicU64,
    /// 1 while the MQTT connection is up.
    pub connected: AtomicU64,
    /// Epoch milliseconds of the last PUBACK (0: none yet).
    pub last_ack_ms: AtomicU64,
    /// Turns of the publisher loop (it turns at least once a second while alive).
    pub publisher_beats: AtomicU64,
    /// Lines (serial) or frames (CAN) the source took in.
    pub lines: AtomicU64,
    pub frames: AtomicU64,
    /// 1 when a finite input (a replayed log) held nothing the source could use.
    pub source_unusable: AtomicU64,
    /// What the source could not use, by reason (bad checksum, unknown id, ...).
    source_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// The last connection failure: class, detail, epoch ms.
    last_error: Mutex<Option<(&'static str, String, i64)>>,
}

impl Stats {
    pub fn new(field_names: Vec<String>) -> Self {
        let nulls = field_names.iter().map(|_| Default::default()).collect();
        Self {
            field_names,
            nulls,
            ..Default::default()
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    pub fn null(&self, field: usize, reason: NullReason) {
        if let Some(row) = self.nulls.get(field) {
            row[reason as usize].fetch_add(1, Relaxed);
        }
    }

    pub fn nulls(&self, field: usize, reason: NullReason) -> u64 {
        self.nulls
            .get(field)
            .map_or(0, |row| row[reason as usize].load(Relaxed))
    }

    /// Counts one input the source could not use.
    pub fn source_error(&self, reason: &'static str) {
        if let Ok(mut m) = self.source_errors.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    pub fn source_errors(&self) -> BTreeMap<&'static str, u64> {
        self.source_errors
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn set_last_error(&self, class: &'static str, detail: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some((class, detail, crate::ops::clock::wall_now_us() / 1000));
        }
    }

    pub fn last_error(&self) -> Option<(&'static str, String, i64)> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    pub fn field_names(&self) -> &[String] {
        &self.field_names
    }

    /// The summary of a run that printed its messages instead of publishing them.
    pub fn printed_line(&self, mode: crate::config::PayloadMode) -> String {
        let g = Self::get;
        let printed = match mode {
            crate::config::PayloadMode::Records => g(&self.batches),
            crate::config::PayloadMode::Single => g(&self.readings),
        };
        let mut s = format!(
            "readings={} ticks_missed={} batches={} printed_messages={printed} dropped_readings={}",
            g(&self.readings),
            g(&self.ticks_missed),
            g(&self.batches),
            g(&self.readings_dropped),
        );
        s.push_str(&self.input_tail());
        s
    }

    /// One line with every counter, for the log.
    pub fn line(&self) -> String {
        let g = Self::get;
        let mut s = format!(
            "readings={} ticks_missed={} batches={} published={} bytes={} pubacks={} \
             acked_readings={} republished={} resent_bytes={} reconnects={} inflight={} \
             link_rate_bps={} link_rtt_ms={} dropped_readings={}",
            g(&self.readings),
            g(&self.ticks_missed),
            g(&self.batches),
            g(&self.messages_published),
            g(&self.bytes_published),
            g(&self.pubacks),
            g(&self.readings_acked),
            g(&self.republished),
            g(&self.bytes_resent),
            g(&self.reconnects),
            g(&self.inflight),
            g(&self.link_rate_bps),
            g(&self.link_rtt_ms),
            g(&self.readings_dropped),
        );
        s.push_str(&self.input_tail());
        s
    }

    /// Nulls, input lines and frames, rejected input: the part of a summary about the source.
    fn input_tail(&self) -> String {
        let g = Self::get;
        let mut s = String::new();
        let mut nulls = String::new();
        for (i, name) in self.field_names.iter().enumerate() {
            for reason in NullReason::ALL {
                let n = self.nulls(i, reason);
                if n > 0 {
                    let _ = write!(nulls, " {name}.{}={n}", reason.name());
                }
            }
        }
        if !nulls.is_empty() {
            let _ = write!(s, " nulls:{nulls}");
        }
        let skipped = g(&self.ticks_skipped);
        if skipped > 0 {
            let _ = write!(s, " ticks_skipped_in_silence={skipped}");
        }
        let (lines, frames) = (g(&self.lines), g(&self.frames));
        if lines > 0 {
            let _ = write!(s, " lines={lines}");
        }
        if frames > 0 {
            let _ = write!(s, " frames={frames}");
        }
        let errors = self.source_errors();
        if !errors.is_empty() {
            let _ = write!(s, " rejected:");
            for (reason, n) in errors {
                let _ = write!(s, " {reason}={n}");
            }
        }
        s
    }
}
