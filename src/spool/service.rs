//! The spool's own thread: appends every batch before it is offered for publishing, hands
//! new batches out live, reads the backlog oldest first in parcels of up to one message's
//! worth (the publisher sizes the messages for the link), records acknowledgements, and
//! syncs on the interval.
//!
//! A thread, not a task: `fsync` on an SD card can take a long time, and the sampler must
//! never wait for it. When the disk cannot be written (full, read-only, I/O errors), new
//! batches are kept in a bounded memory buffer and still published; the spool is tried
//! again with every batch and used as soon as it works.

use super::boots::Boots;
use super::log::{Dropped, Losses, Options, SpoolLog, Summary};
use crate::batch::{Batch, RECORDS_ENVELOPE};
use crate::config::{Order, PayloadMode};
use crate::stats::Stats;
use std::collections::VecDeque;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the spool thread is asked to do.
#[derive(Debug)]
pub enum Cmd {
    Append(Batch),
    Ack(u64),
    /// The publisher took a parcel from the backlog channel: there is room for another.
    Wake,
    /// The batcher has finished: once everything is handed out, the channels close.
    UpstreamDone,
    /// The offset from a boot's clock to UTC is known: its held batches can go.
    BootOffset {
        boot_id: [u8; 16],
        offset: i64,
    },
}

/// Batches handed to the publisher, oldest first, timestamps in UTC.
#[derive(Debug, Clone)]
pub struct Parcel {
    pub batches: Vec<Batch>,
}

impl Parcel {
    pub fn of_batch(b: &Batch) -> Parcel {
        Parcel {
            batches: vec![b.clone()],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub log: Options,
    /// `None`: sync after every append.
    pub sync_interval: Option<Duration>,
    pub order: Order,
    pub mode: PayloadMode,
    pub max_payload: usize,
    pub memory_batches: usize,
}

/// Counters of the spool, shared with the health reporting.
#[derive(Debug, Default)]
pub struct SpoolStats {
    pub unacked_batches: AtomicU64,
    pub bytes: AtomicU64,
    pub cap_dropped_readings: AtomicU64,
    pub corrupt_bytes: AtomicU64,
    pub corrupt_cuts: AtomicU64,
    pub write_errors: AtomicU64,
    pub memory_dropped_readings: AtomicU64,
    pub backlog_parcels: AtomicU64,
    /// Readings in the unacknowledged batches the spool has seen (exact once the backlog
    /// has been read since the start).
    pub unacked_readings: AtomicU64,
    /// Sampling time of the oldest unacknowledged batch seen, epoch ms (0: none).
    pub oldest_unacked_ms: AtomicU64,
    /// Batches kept back until the clock they were stamped on can be converted.
    pub held_batches: AtomicU64,
    /// Batches sent to the spool thread and not yet taken (grows only if the disk hangs).
    pub queued_appends: AtomicU64,
}

impl SpoolStats {
    pub fn line(&self) -> String {
        let g = Stats::get;
        format!(
            "spool: unacked_batches={} bytes={} dropped_at_cap_readings={} corrupt_cuts={} corrupt_bytes={} write_errors={} dropped_from_memory_readings={}",
            g(&self.unacked_batches),
            g(&self.bytes),
            g(&self.cap_dropped_readings),
            g(&self.corrupt_cuts),
            g(&self.corrupt_bytes),
            g(&self.write_errors),
            g(&self.memory_dropped_readings),
        )
    }
}

pub struct Channels {
    pub live: mpsc::Receiver<Parcel>,
    pub backlog: mpsc::Receiver<Parcel>,
}

/// Opens the spool (recovering it) and starts its thread. The thread ends once every
/// `Sender<Cmd>` is gone, after a final sync.
pub fn start(
    settings: Settings,
    cmds: Receiver<Cmd>,
    spool_stats: Arc<SpoolStats>,
) -> io::Result<(std::thread::JoinHandle<()>, Channels)> {
    let log = SpoolLog::open(settings.log.clone())?;
    report_recovery(&log);
    let boots = Boots::load(&settings.log.dir);
    let (live_tx, live) = mpsc::channel(4);
    let (backlog_tx, backlog) = mpsc::channel(2);
    let handle = std::thread::Builder::new()
        .name("spool".into())
        .spawn(move || {
            let svc = Service {
                log,
                settings,
                live_tx: Some(live_tx),
                backlog_tx: Some(backlog_tx),
                pending: None,
                carry: None,
                memory: VecDeque::new(),
                fault: None,
                last_sync: Instant::now(),
                spool_stats,
                known: BTreeMap::new(),
                known_readings: 0,
                scanning: true,
                boots,
                held: BTreeSet::new(),
                upstream_open: true,
            };
            svc.run(cmds);
        })?;
    Ok((handle, Channels { live, backlog }))
}

fn report_recovery(log: &SpoolLog) {
    let unacked = log.unacked_batches();
    if unacked > 0 {
        tracing::info!(
            "spool {}: {} segment(s), {} bytes, {unacked} batch(es) not yet acknowledged: they go first",
            log.dir().display(),
            log.segments(),
            log.bytes()
        );
    }
}

struct Fault {
    since: Instant,
    last_report: Instant,
    error: String,
}

struct Service {
    log: SpoolLog,
    settings: Settings,
    live_tx: Option<mpsc::Sender<Parcel>>,
    backlog_tx: Option<mpsc::Sender<Parcel>>,
    /// A backlog parcel waiting for room in the channel.
    pending: Option<Parcel>,
    /// A batch read from the backlog that did not fit the last parcel.
    carry: Option<Batch>,
    /// Batches the disk would not take, not yet handed out.
    memory: VecDeque<Batch>,
    fault: Option<Fault>,
    last_sync: Instant,
    spool_stats: Arc<SpoolStats>,
    /// Unacknowledged batches known: readings and sampling time, for the health report.
    known: BTreeMap<u64, Summary>,
    known_readings: u64,
    scanning: bool,
    boots: Boots,
    /// Batches read but kept back: stamped on a boot clock whose offset is not known yet.
    held: BTreeSet<u64>,
    upstream_open: bool,
}

impl Service {
    fn run(mut self, cmds: Receiver<Cmd>) {
        loop {
            self.fill_backlog();
            self.publish_stats();
            if !self.upstream_open && self.drained() {
                // Nothing more will come: closing the channels tells the publisher so.
                self.live_tx = None;
                self.backlog_tx = None;
            }
            let wait = match self.settings.sync_interval {
                Some(i) => i
                    .saturating_sub(self.last_sync.elapsed())
                    .max(Duration::from_millis(1)),
                None => Duration::from_secs(1),
            };
            // With a parcel waiting for room, look again soon even without a wake-up.
            let wait = if self.pending.is_some() || !self.memory.is_empty() {
                wait.min(Duration::from_millis(50))
            } else {
                wait
            };
            match cmds.recv_timeout(wait) {
                Ok(Cmd::Append(b)) => {
                    self.spool_stats.queued_appends.fetch_sub(1, Relaxed);
                    self.append(b)
                }
                Ok(Cmd::Ack(seq)) => {
                    self.forget(seq);
                    if let Err(e) = self.log.ack(seq) {
                        self.disk_error(&e);
                    }
                }
                Ok(Cmd::Wake) => {}
                Ok(Cmd::UpstreamDone) => {
                    self.upstream_open = false;
                    // No new batch will come: closing the live channel (once the memory
                    // buffer is handed out) tells the publisher the last one is in.
                    if self.memory.is_empty() {
                        self.live_tx = None;
                    }
                }
                Ok(Cmd::BootOffset { boot_id, offset }) => {
                    if let Err(e) = self.boots.set(boot_id, offset) {
                        tracing::warn!("spool: cannot record the clock offset of this boot: {e}");
                    }
                    if !self.held.is_empty() {
                        tracing::info!(
                            "clock trusted: {} held batch(es) converted to UTC and queued",
                            self.held.len()
                        );
                        let held = std::mem::take(&mut self.held);
                        self.log.release(&held);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.scanning {
                        let before = self.known.len();
                        self.scanning = self.log.scan_step(&mut self.known);
                        self.recount(before);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self
                .settings
                .sync_interval
                .is_some_and(|i| self.last_sync.elapsed() >= i)
            {
                self.sync();
            }
        }
        self.publish_stats();
        let bytes = self.log.bytes();
        let unacked = self.log.unacked_batches();
        if let Err(e) = self.log.close() {
            tracing::error!("spool: final sync failed: {e}");
        }
        if unacked > 0 {
            tracing::info!(
                "spool keeps {unacked} unacknowledged batch(es), {bytes} bytes, for the next start"
            );
        }
    }

    fn remember(&mut self, b: &Batch) {
        if self
            .known
            .insert(b.seq, (b.len() as u32, b.first_at))
            .is_none()
        {
            self.known_readings += b.len() as u64;
        }
    }

    fn forget(&mut self, seq: u64) {
        if let Some((n, _)) = self.known.remove(&seq) {
            self.known_readings = self.known_readings.saturating_sub(u64::from(n));
        }
    }

    /// After a scan or a cap drop changed `known` in bulk.
    fn recount(&mut self, _before: usize) {
        let base = self.log.base();
        self.known = self.known.split_off(&base);
        self.known_readings = self.known.values().map(|&(n, _)| u64::from(n)).sum();
    }

    /// Nothing more to hand out (held batches wait for a clock that may never come).
    fn drained(&self) -> bool {
        self.pending.is_none()
            && self.carry.is_none()
            && self
                .memory
                .iter()
                .all(|b| b.boot.is_some_and(|id| self.boots.get(&id).is_none()))
    }

    fn append(&mut self, mut b: Batch) {
        match self.log.append(&mut b) {
            Ok(dropped) => {
                self.remember(&b);
                if dropped.batches > 0 {
                    self.recount(0);
                }
                if let Some(f) = self.fault.take() {
                    tracing::warn!(
                        "spool writable again after {:.0}s ({}); {} batch(es) held in memory meanwhile",
                        f.since.elapsed().as_secs_f64(),
                        f.error,
                        self.memory.len()
                    );
                }
                report_dropped(dropped);
                if self.settings.sync_interval.is_none() {
                    self.sync();
                }
                let may_go_live = match self.settings.order {
                    Order::LiveFirst => true,
                    Order::Fifo => false,
                } && b.boot.is_none();
                if may_go_live && self.memory.is_empty() {
                    self.hand_live(b);
                }
            }
            Err(e) => {
                self.disk_error(&e);
                b.seq = self.log.reserve_seq();
                self.memory.push_back(b);
                while self.memory.len() > self.settings.memory_batches {
                    if let Some(old) = self.memory.pop_front() {
                        Stats::add(&self.spool_stats.memory_dropped_readings, old.len() as u64);
                        tracing::error!(
                            "memory buffer full while the spool is not writable: dropped {} reading(s) from {} ms",
                            old.len(),
                            old.first_at / 1000
                        );
                    }
                }
            }
        }
        self.flush_memory();
    }

    /// Offers a just-written batch to the publisher at once; if it has no room the batch
    /// simply stays in the backlog on disk.
    fn hand_live(&mut self, b: Batch) {
        let Some(tx) = &self.live_tx else { return };
        if tx.capacity() == 0 {
            return;
        }
        let seq = b.seq;
        if tx.try_send(Parcel::of_batch(&b)).is_ok() {
            self.log.handed_live(seq);
        }
    }

    fn flush_memory(&mut self) {
        let Some(tx) = &self.live_tx else { return };
        while let Some(b) = self.memory.front() {
            if tx.try_send(Parcel::of_batch(b)).is_err() {
                break;
            }
            self.memory.pop_front();
        }
    }

    /// Builds the next backlog parcel: stored batches of at most 500 records and
    /// `max_payload` bytes in all (the most one message may carry).
    fn fill_backlog(&mut self) {
        self.flush_memory();
        loop {
            if let Some(p) = self.pending.take() {
                let Some(tx) = &self.backlog_tx else { return };
                match tx.try_send(p) {
                    Ok(()) => Stats::add(&self.spool_stats.backlog_parcels, 1),
                    Err(mpsc::error::TrySendError::Full(p)) => {
                        self.pending = Some(p);
                        return;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            let mut batches: Vec<Batch> = Vec::new();
            let mut records = 0;
            let mut bytes = RECORDS_ENVELOPE;
            loop {
                let next = match self.carry.take() {
                    Some(b) => Some(b),
                    None => match self.log.next_backlog() {
                        Ok(b) => b,
                        Err(e) => {
                            self.disk_error(&e);
                            None
                        }
                    },
                };
                let Some(mut b) = next else { break };
                if let Some(id) = b.boot {
                    match self.boots.get(&id) {
                        Some(offset) => b.shift_timestamps(offset),
                        None => {
                            // Never published with an invented time: kept until the offset
                            // of its boot is known (if ever), exported by `spool export`.
                            self.held.insert(b.seq);
                            continue;
                        }
                    }
                }
                let fits = records + b.len() <= crate::config::MAX_RECORDS_PER_MESSAGE
                    && bytes + b.body.len() < self.settings.max_payload;
                if !batches.is_empty() && !fits {
                    self.carry = Some(b);
                    break;
                }
                records += b.len();
                bytes += b.body.len() + 1;
                batches.push(b);
            }
            if batches.is_empty() {
                return;
            }
            self.pending = Some(Parcel { batches });
        }
    }

    fn sync(&mut self) {
        self.last_sync = Instant::now();
        if self.fault.is_some() {
            return;
        }
        if let Err(e) = self.log.sync() {
            self.disk_error(&e);
        }
    }

    fn disk_error(&mut self, e: &io::Error) {
        Stats::add(&self.spool_stats.write_errors, 1);
        match &mut self.fault {
            None => {
                tracing::error!(
                    "spool {} not writable ({e}): new readings are kept in memory (at most {} batches) and still published; will retry",
                    self.log.dir().display(),
                    self.settings.memory_batches
                );
                self.fault = Some(Fault {
                    since: Instant::now(),
                    last_report: Instant::now(),
                    error: e.to_string(),
                });
            }
            Some(f) if f.last_report.elapsed() >= Duration::from_secs(60) => {
                f.last_report = Instant::now();
                tracing::error!(
                    "spool still not writable after {:.0}s ({e}); {} batch(es) in memory",
                    f.since.elapsed().as_secs_f64(),
                    self.memory.len()
                );
            }
            Some(_) => {}
        }
    }

    fn publish_stats(&self) {
        let s = &self.spool_stats;
        let Losses {
            cap_readings,
            corrupt_bytes,
            corrupt_cuts,
            ..
        } = self.log.losses;
        s.unacked_batches.store(self.log.unacked_batches(), Relaxed);
        s.unacked_readings.store(self.known_readings, Relaxed);
        s.held_batches.store(self.held.len() as u64, Relaxed);
        let oldest = self
            .known
            .values()
            .next()
            .map_or(0, |&(_, at)| (at / 1000).max(0) as u64);
        s.oldest_unacked_ms.store(oldest, Relaxed);
        s.bytes.store(self.log.bytes(), Relaxed);
        s.cap_dropped_readings.store(cap_readings, Relaxed);
        s.corrupt_bytes.store(corrupt_bytes, Relaxed);
        s.corrupt_cuts.store(corrupt_cuts, Relaxed);
    }
}

fn report_dropped(d: Dropped) {
    if d.batches == 0 {
        return;
    }
    let span = |t: Option<i64>| t.map_or_else(|| "?".to_string(), |t| (t / 1000).to_string());
    tracing::error!(
        "spool full (spool.max_bytes): dropped the oldest segment, {} undelivered reading(s) in {} batch(es) from {} ms to {} ms",
        d.readings,
        d.batches,
        span(d.first_at),
        span(d.last_at)
    );
}
