//! The spool's own thread: appends every batch before it is offered for publishing, hands
//! new batches out live, reads the backlog oldest first in parcels of up to one message's
//! worth (the publisher sizes the messages for the link), records acknowledgements, and
//! syncs on the interval.
//!
//! A thread, not a task: `fsync` on an SD card can take a long time, and the sampler must
//! never wait for it.
//!
//! When the disk cannot be written (full, read-only, I/O errors), even at start when the
//! spool cannot be opened at all, new batches are kept in a memory buffer bounded by bytes
//! (`delivery.memory_bytes`) and by count (`delivery.memory_batches`), and still published.
//! The fault is logged, shown in the status and in systemd's STATUS. Every second the disk
//! is tried again (the spool opened, or the oldest batch in memory written); once it takes
//! writes, every batch in memory that the broker has not acknowledged is written to it,
//! oldest first and before any newer batch, and synced. A batch the bound pushes out of
//! memory before it was handed to the publisher is lost: counted and logged. One already
//! handed out is lost only if its PUBACK never comes; that is counted at the stop.
//!
//! A batch stamped on a boot clock whose offset to UTC is not known goes to the held
//! segments (`held`), never published with an invented time. When the offset of a boot
//! becomes known, its held segments are released a segment per turn of the loop (converted
//! to UTC, appended to the log behind what it holds), so appends never wait for all of them.

use super::boots::Boots;
use super::log::{Dropped, Losses, Options, SpoolLog};
use crate::config::{Order, PayloadMode};
use crate::ops::stats::Stats;
use crate::sample::batch::{Batch, RECORDS_ENVELOPE};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Commands taken in one turn of the spool thread's loop, at most.
const COMMANDS_PER_TURN: usize = 4096;

/// Sequence numbers of batches kept in memory start here, far above any the disk log gives
/// out: an acknowledgement tells at once whether it names a batch on disk or in memory.
const MEMORY_SEQ_BASE: u64 = 1 << 62;
/// How often a disk that failed is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often losses from the memory buffer are logged while they go on.
const LOSS_REPORT_EVERY: Duration = Duration::from_secs(10);

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
    /// The most batches the memory buffer holds while the disk cannot be written.
    pub memory_batches: usize,
    /// The most bytes (records, see [`memory_cost`]) the memory buffer holds.
    pub memory_bytes: usize,
    /// The spool is the run's own and is removed with it (`simulate` without `[spool]`):
    /// nothing is kept for a next start.
    pub temporary: bool,
}

/// Counters of the spool, shared with the health reporting.
#[derive(Debug, Default)]
pub struct SpoolStats {
    pub unacked_batches: AtomicU64,
    pub bytes: AtomicU64,
    pub cap_dropped_readings: AtomicU64,
    pub corrupt_bytes: AtomicU64,
    pub corrupt_cuts: AtomicU64,
    /// Frames the damaged bytes held (as far as their sync markers tell).
    pub corrupt_frames: AtomicU64,
    pub write_errors: AtomicU64,
    /// Reads of the spool tried again after an I/O error (not damage; nothing cut).
    pub read_retries: AtomicU64,
    /// Reads that failed through every retry (the backlog pauses and reads them again).
    pub read_failures: AtomicU64,
    pub memory_dropped_readings: AtomicU64,
    pub memory_dropped_batches: AtomicU64,
    pub backlog_parcels: AtomicU64,
    /// Readings in the unacknowledged batches the spool has seen (exact once the backlog
    /// has been read since the start).
    pub unacked_readings: AtomicU64,
    /// Sampling time of the oldest unacknowledged batch seen, epoch ms (0: none).
    pub oldest_unacked_ms: AtomicU64,
    /// Batches kept back until the clock they were stamped on can be converted (in the held
    /// segments; those present at start once the idle scan counted them), and their bytes.
    pub held_batches: AtomicU64,
    pub held_bytes: AtomicU64,
    /// Of `cap_dropped_readings`' batches, those held for a clock.
    pub cap_dropped_held_batches: AtomicU64,
    /// Batches sent to the spool thread and not yet taken (grows only if the disk hangs).
    pub queued_appends: AtomicU64,
    /// Their bytes ([`memory_cost`]): bounded by `delivery.memory_bytes`.
    pub queued_append_bytes: AtomicU64,
    /// The most `queued_append_bytes` has been since the start.
    pub queued_append_peak_bytes: AtomicU64,
    /// Since when (wall clock, epoch ms) the spool cannot be written; 0: it can.
    pub fault_since_ms: AtomicU64,
    /// What the disk said, while `fault_since_ms` is set.
    pub fault_error: Mutex<String>,
    /// Batches (and their bytes) held in memory because the disk would not take them.
    pub memory_batches: AtomicU64,
    pub memory_bytes: AtomicU64,
    /// The byte bound of the memory buffer (`delivery.memory_bytes`).
    pub memory_limit_bytes: AtomicU64,
    /// Batches written to the spool from memory once the disk took writes again.
    pub written_from_memory_batches: AtomicU64,
}

impl SpoolStats {
    pub fn line(&self) -> String {
        let g = Stats::get;
        format!(
            "spool: unacked_batches={} bytes={} dropped_at_cap_readings={} corrupt_cuts={} corrupt_bytes={} corrupt_frames={} write_errors={} read_retries={} read_failures={} dropped_from_memory_readings={} dropped_from_memory_batches={} written_from_memory_batches={} memory_batches={}",
            g(&self.unacked_batches),
            g(&self.bytes),
            g(&self.cap_dropped_readings),
            g(&self.corrupt_cuts),
            g(&self.corrupt_bytes),
            g(&self.corrupt_frames),
            g(&self.write_errors),
            g(&self.read_retries),
            g(&self.read_failures),
            g(&self.memory_dropped_readings),
            g(&self.memory_dropped_batches),
            g(&self.written_from_memory_batches),
            g(&self.memory_batches),
        )
    }

    /// A batch is queued for the spool thread (see `queued_appends`).
    pub fn put_queued(&self, b: &Batch) {
        self.queued_appends.fetch_add(1, Relaxed);
        let cost = memory_cost(b) as u64;
        let now = self.queued_append_bytes.fetch_add(cost, Relaxed) + cost;
        self.queued_append_peak_bytes.fetch_max(now, Relaxed);
    }

    /// The spool thread took a queued batch. Saturating: a caller may count batches
    /// without their bytes.
    pub fn take_queued(&self, b: &Batch) {
        let cost = memory_cost(b) as u64;
        let less = |n: u64, by: u64| Some(n.saturating_sub(by));
        let _ = self
            .queued_appends
            .fetch_update(Relaxed, Relaxed, |n| less(n, 1));
        let _ = self
            .queued_append_bytes
            .fetch_update(Relaxed, Relaxed, |n| less(n, cost));
    }

    /// The disk fault, if the spool cannot be written now: (since, epoch ms; the error).
    pub fn fault(&self) -> Option<(u64, String)> {
        let since = Stats::get(&self.fault_since_ms);
        if since == 0 {
            return None;
        }
        let error = self
            .fault_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        Some((since, error))
    }

    /// Records the disk fault (`None`: the spool is writable).
    pub fn set_fault(&self, error: Option<&str>) {
        let mut text = self.fault_error.lock().unwrap_or_else(|p| p.into_inner());
        match error {
            Some(e) => {
                text.clear();
                text.push_str(e);
                let now = (crate::ops::clock::wall_now_us() / 1000).max(1) as u64;
                self.fault_since_ms.store(now, Relaxed);
            }
            None => {
                text.clear();
                self.fault_since_ms.store(0, Relaxed);
            }
        }
    }
}

pub struct Channels {
    pub live: mpsc::Receiver<Parcel>,
    pub backlog: mpsc::Receiver<Parcel>,
}

/// Whether an error opening the spool is the configuration's (exit 2), not the disk's. No
/// state of the disk mends these: `spool.dir` (or a parent) is not a directory, is not
/// accessible to the agent's user, is not a valid path, or another agent holds it. A full,
/// read-only or failing disk (ENOSPC, EDQUOT, EROFS, EIO, ...) is the disk's: the agent
/// runs from memory and takes the spool up when it can.
pub fn is_config_error(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::WouldBlock {
        // The lock: another agent runs on this spool.
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOTDIR
                | libc::EEXIST
                | libc::EISDIR
                | libc::EACCES
                | libc::EPERM
                | libc::ENAMETOOLONG
                | libc::ELOOP
                | libc::EINVAL
        )
    )
}

/// What a batch costs the memory buffer: its records and their offsets.
pub fn memory_cost(b: &Batch) -> usize {
    b.body.len() + 4 * b.ends.len()
}

/// Opens the spool (recovering it) and starts its thread. The thread ends once every
/// `Sender<Cmd>` is gone, after a final sync.
///
/// An error is returned only for a configuration error ([`is_config_error`]). When the
/// disk is at fault the thread starts without the spool, keeps batches in memory, and
/// opens the spool as soon as the disk allows.
pub fn start(
    settings: Settings,
    cmds: Receiver<Cmd>,
    spool_stats: Arc<SpoolStats>,
) -> io::Result<(std::thread::JoinHandle<()>, Channels)> {
    let (log, open_error) = match SpoolLog::open(settings.log.clone()) {
        Ok(log) => {
            report_recovery(&log);
            (Some(log), None)
        }
        Err(e) if is_config_error(&e) => return Err(e),
        Err(e) => (None, Some(e)),
    };
    let boots = Boots::load(&settings.log.dir);
    let (live_tx, live) = mpsc::channel(4);
    let (backlog_tx, backlog) = mpsc::channel(2);
    spool_stats
        .memory_limit_bytes
        .store(settings.memory_bytes as u64, Relaxed);
    let mut svc = Service {
        log,
        settings,
        live_tx: Some(live_tx),
        backlog_tx: Some(backlog_tx),
        pending: None,
        carry: None,
        memory: Memory::default(),
        next_memory_seq: MEMORY_SEQ_BASE,
        unretained: BTreeMap::new(),
        alias: HashMap::new(),
        losses: LossReport::default(),
        fault: None,
        next_retry: Instant::now() + RETRY_EVERY,
        last_sync: Instant::now(),
        spool_stats,
        scanning: true,
        boots,
        releasing: Vec::new(),
        release_retry: Instant::now(),
        upstream_open: true,
    };
    svc.queue_releases();
    if let Some(e) = open_error {
        svc.disk_error(&e);
    }
    let handle = std::thread::Builder::new()
        .name("spool".into())
        .spawn(move || svc.run(cmds))?;
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

struct Release {
    boot: [u8; 16],
    offset: i64,
    since: Instant,
    batches: u64,
    readings: u64,
}

struct Fault {
    since: Instant,
    last_report: Instant,
    error: String,
}

/// A batch the disk has not taken (yet).
struct Kept {
    batch: Batch,
    /// Handed to the publisher (which holds its own copy until the PUBACK).
    handed: bool,
}

/// Batches not on disk and not acknowledged, oldest first; bounded by bytes and count.
#[derive(Default)]
struct Memory {
    batches: VecDeque<Kept>,
    bytes: usize,
}

impl Memory {
    fn push(&mut self, batch: Batch) {
        self.bytes += memory_cost(&batch);
        self.batches.push_back(Kept {
            batch,
            handed: false,
        });
    }

    fn remove(&mut self, idx: usize) -> Option<Kept> {
        let k = self.batches.remove(idx)?;
        self.bytes = self.bytes.saturating_sub(memory_cost(&k.batch));
        Some(k)
    }

    fn pop_front(&mut self) -> Option<Kept> {
        self.remove(0)
    }

    fn push_front(&mut self, k: Kept) {
        self.bytes += memory_cost(&k.batch);
        self.batches.push_front(k);
    }

    fn position(&self, seq: u64) -> Option<usize> {
        self.batches.iter().position(|k| k.batch.seq == seq)
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    fn len(&self) -> usize {
        self.batches.len()
    }
}

/// Readings dropped from the memory buffer and not logged yet (one line per
/// `LOSS_REPORT_EVERY` while it goes on, so a long outage does not flood the log).
#[derive(Default)]
struct LossReport {
    readings: u64,
    batches: u64,
    first_at: Option<i64>,
    last_at: Option<i64>,
    last_logged: Option<Instant>,
}

impl LossReport {
    fn add(&mut self, b: &Batch) {
        self.readings += b.len() as u64;
        self.batches += 1;
        self.first_at = Some(self.first_at.map_or(b.first_at, |t| t.min(b.first_at)));
        self.last_at = Some(self.last_at.map_or(b.last_at, |t| t.max(b.last_at)));
    }

    /// Logs what is pending if `force`, or if the last line is old enough.
    fn flush(&mut self, force: bool, why: &str) {
        if self.batches == 0 {
            return;
        }
        if !force
            && self
                .last_logged
                .is_some_and(|t| t.elapsed() < LOSS_REPORT_EVERY)
        {
            return;
        }
        let ms = |t: Option<i64>| t.map_or_else(|| "?".to_string(), |t| (t / 1000).to_string());
        tracing::error!(
            "{why}: dropped {} reading(s) in {} batch(es) from the memory buffer, sampled from {} ms to {} ms",
            self.readings,
            self.batches,
            ms(self.first_at),
            ms(self.last_at)
        );
        *self = LossReport {
            last_logged: Some(Instant::now()),
            ..LossReport::default()
        };
    }
}

struct Service {
    /// `None` while the spool could not be opened (a disk fault at start).
    log: Option<SpoolLog>,
    settings: Settings,
    live_tx: Option<mpsc::Sender<Parcel>>,
    backlog_tx: Option<mpsc::Sender<Parcel>>,
    /// A backlog parcel waiting for room in the channel.
    pending: Option<Parcel>,
    /// A batch read from the backlog that did not fit the last parcel.
    carry: Option<Batch>,
    /// Batches the disk would not take, not acknowledged yet.
    memory: Memory,
    next_memory_seq: u64,
    /// Batches handed out from memory that the bound pushed out of it before their PUBACK:
    /// seq → readings. Delivered if the PUBACK comes, lost (and counted) otherwise.
    unretained: BTreeMap<u64, u64>,
    /// Batches handed out from memory and written to the disk since: memory seq → disk
    /// seq, so that their PUBACK acknowledges the copy on disk.
    alias: HashMap<u64, u64>,
    losses: LossReport,
    fault: Option<Fault>,
    /// When the failed disk is tried again.
    next_retry: Instant,
    last_sync: Instant,
    spool_stats: Arc<SpoolStats>,
    /// The idle scan (counts for the health report) is not done.
    scanning: bool,
    boots: Boots,
    /// Boots whose held batches are being released (their offset is known now), a held
    /// segment per turn of the loop: (boot, offset, when it began, batches released).
    releasing: Vec<Release>,
    /// After a failed release, not before this.
    release_retry: Instant,
    upstream_open: bool,
}

impl Service {
    fn run(mut self, cmds: Receiver<Cmd>) {
        loop {
            if self.fault.is_some() && Instant::now() >= self.next_retry {
                self.retry_disk();
            }
            self.release_step();
            self.fill_backlog();
            self.report_losses(false);
            self.publish_stats();
            if !self.upstream_open && self.memory_handed_out() {
                // The last live batch is out: closing the channel tells the publisher so.
                self.live_tx = None;
                if self.drained() {
                    // Nothing more will come.
                    self.backlog_tx = None;
                }
            }
            let wait = match self.settings.sync_interval {
                Some(i) => i
                    .saturating_sub(self.last_sync.elapsed())
                    .max(Duration::from_millis(1)),
                None => Duration::from_secs(1),
            };
            // With a parcel waiting for room, look again soon even without a wake-up.
            let busy = !self.releasing.is_empty() && Instant::now() >= self.release_retry;
            let wait = if busy {
                Duration::ZERO
            } else if self.pending.is_some() || !self.memory.is_empty() {
                wait.min(Duration::from_millis(50))
            } else {
                wait
            };
            let wait = if self.fault.is_some() {
                wait.min(
                    self.next_retry
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                )
            } else {
                wait
            };
            // Every command waiting is taken before the next turn's work (hand-out, stats):
            // a turn per acknowledgement would let the publisher, acknowledging a fast
            // link's messages, run ahead of this thread by thousands of batches.
            let mut next = Some(cmds.recv_timeout(wait));
            let mut taken = 0;
            while let Some(received) = next.take() {
                match received {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {
                        if self.scanning
                            && let Some(log) = &mut self.log
                        {
                            self.scanning = log.scan_step();
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        self.finish();
                        return;
                    }
                }
                taken += 1;
                if taken < COMMANDS_PER_TURN {
                    next = cmds.try_recv().ok().map(Ok);
                }
            }
            if self
                .settings
                .sync_interval
                .is_some_and(|i| self.last_sync.elapsed() >= i)
            {
                self.sync();
            }
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Append(b) => {
                self.spool_stats.take_queued(&b);
                self.append(b)
            }
            Cmd::Ack(seq) => self.ack(seq),
            Cmd::Wake => {}
            Cmd::UpstreamDone => {
                self.upstream_open = false;
                // No new batch will come: closing the live channel (once the memory
                // buffer is handed out) tells the publisher the last one is in.
                if self.memory_handed_out() {
                    self.live_tx = None;
                }
            }
            Cmd::BootOffset { boot_id, offset } => {
                if let Err(e) = self.boots.set(boot_id, offset) {
                    tracing::warn!("spool: cannot record the clock offset of this boot: {e}");
                }
                self.queue_releases();
            }
        }
    }

    /// The end: what memory still holds goes to the disk if it can; what cannot is lost,
    /// counted and logged; then the final sync.
    fn finish(&mut self) {
        if self.fault.is_some() {
            self.retry_disk();
        }
        let mut lost_batches = 0u64;
        while let Some(k) = self.memory.pop_front() {
            self.losses.add(&k.batch);
            lost_batches += 1;
            Stats::add(&self.spool_stats.memory_dropped_batches, 1);
            Stats::add(
                &self.spool_stats.memory_dropped_readings,
                k.batch.len() as u64,
            );
        }
        // Pushed out of memory while the publisher had them, never acknowledged.
        let unretained = std::mem::take(&mut self.unretained);
        for readings in unretained.values() {
            self.losses.readings += readings;
            self.losses.batches += 1;
            Stats::add(&self.spool_stats.memory_dropped_batches, 1);
            Stats::add(&self.spool_stats.memory_dropped_readings, *readings);
        }
        if lost_batches > 0 || !unretained.is_empty() {
            self.losses.flush(
                true,
                "stopping with the spool not writable (never written to disk nor acknowledged)",
            );
        } else {
            self.report_losses(true);
        }
        if let Some(log) = &mut self.log {
            // The held batches the idle scan did not count yet: the stop reports them all.
            log.count_held();
        }
        self.publish_stats();
        let Some(log) = self.log.take() else {
            tracing::error!(
                "spool {} never opened: nothing kept for the next start",
                self.settings.log.dir.display()
            );
            return;
        };
        let bytes = log.bytes();
        let unacked = log.unacked_batches();
        if let Err(e) = log.close() {
            tracing::error!("spool: final sync failed: {e}");
        }
        if unacked > 0 && self.settings.temporary {
            tracing::warn!(
                "{unacked} unacknowledged batch(es), {bytes} bytes, go with this run's temporary spool (simulate without [spool]; a [spool] table keeps them for the next run)"
            );
        } else if unacked > 0 {
            tracing::info!(
                "spool keeps {unacked} unacknowledged batch(es), {bytes} bytes, for the next start"
            );
        }
    }

    fn report_losses(&mut self, force: bool) {
        if self.losses.batches > 0 {
            let why = self.loss_reason();
            self.losses.flush(force, &why);
        }
    }

    fn loss_reason(&self) -> String {
        format!(
            "memory buffer full (delivery.memory_bytes = {}, delivery.memory_batches = {}) while the spool is not writable",
            crate::units::Size(self.settings.memory_bytes as u64),
            self.settings.memory_batches
        )
    }

    /// Boots with held batches whose offset is known now: queued for release.
    fn queue_releases(&mut self) {
        let Some(log) = &self.log else { return };
        for boot in log.held_boots() {
            let Some(offset) = self.boots.get(&boot) else {
                continue;
            };
            if self.releasing.iter().any(|r| r.boot == boot) {
                continue;
            }
            self.releasing.push(Release {
                boot,
                offset,
                since: Instant::now(),
                batches: 0,
                readings: 0,
            });
        }
    }

    /// Releases one held segment (converted to UTC, appended to the log): a segment per
    /// turn, so appends and acknowledgements go on in between.
    fn release_step(&mut self) {
        if self.releasing.is_empty() || self.fault.is_some() || Instant::now() < self.release_retry
        {
            return;
        }
        let Some(log) = &mut self.log else { return };
        let Some(r) = self.releasing.first_mut() else {
            return;
        };
        match log.release_step(&r.boot, r.offset) {
            Ok(Some((batches, readings, dropped))) => {
                r.batches += batches;
                r.readings += readings;
                report_dropped(dropped);
            }
            Ok(None) => {
                let r = self.releasing.remove(0);
                if r.batches > 0 {
                    tracing::info!(
                        "clock of boot {} known: {} held batch(es), {} reading(s) converted to UTC and queued in {:.3} s",
                        crate::ops::clock::boot_id_hex(&r.boot),
                        r.batches,
                        r.readings,
                        r.since.elapsed().as_secs_f64()
                    );
                }
            }
            Err(e) => {
                self.release_retry = Instant::now() + RETRY_EVERY;
                tracing::error!(
                    "spool: cannot release the held batches of boot {} now ({e}): they stay held, tried again in {}s",
                    crate::ops::clock::boot_id_hex(&r.boot),
                    RETRY_EVERY.as_secs()
                );
            }
        }
    }

    /// Nothing more to hand out (held batches wait for a clock that may never come; batches
    /// in memory already handed out wait only for their PUBACK).
    fn drained(&self) -> bool {
        self.pending.is_none() && self.carry.is_none() && self.memory_handed_out()
    }

    /// Every batch in memory that may go out has been handed to the publisher.
    fn memory_handed_out(&self) -> bool {
        self.memory
            .batches
            .iter()
            .all(|k| k.handed || !self.may_hand_out(&k.batch))
    }

    /// A batch stamped on a boot clock goes out only once that clock's offset is known.
    fn may_hand_out(&self, b: &Batch) -> bool {
        b.boot.is_none_or(|id| self.boots.get(&id).is_some())
    }

    fn ack(&mut self, seq: u64) {
        if seq < MEMORY_SEQ_BASE {
            self.ack_on_disk(seq);
            return;
        }
        if let Some(idx) = self.memory.position(seq) {
            // Delivered before the disk took it: it never needs to go there.
            self.memory.remove(idx);
        }
        self.unretained.remove(&seq);
        if let Some(disk_seq) = self.alias.remove(&seq) {
            self.ack_on_disk(disk_seq);
        }
    }

    fn ack_on_disk(&mut self, seq: u64) {
        let Some(log) = &mut self.log else { return };
        if let Err(e) = log.ack(seq) {
            self.disk_error(&e);
        }
    }

    fn append(&mut self, b: Batch) {
        if self.fault.is_none() && self.memory.is_empty() {
            match self.write(b) {
                Ok(b) => {
                    if self.settings.sync_interval.is_none() {
                        self.sync();
                    }
                    let may_go_live = match self.settings.order {
                        Order::LiveFirst => true,
                        Order::Fifo => false,
                    } && b.boot.is_none();
                    if may_go_live {
                        self.hand_live(b);
                    }
                }
                Err((b, e)) => {
                    self.disk_error(&e);
                    self.keep(b);
                }
            }
        } else {
            // Nothing new goes to the disk before what memory holds.
            self.keep(b);
        }
        self.flush_memory();
    }

    /// Appends one batch to the spool; on failure the batch comes back as it was.
    fn write(&mut self, mut b: Batch) -> Result<Batch, (Batch, io::Error)> {
        let seq = b.seq;
        let Some(log) = &mut self.log else {
            let e = io::Error::other("the spool is not open");
            return Err((b, e));
        };
        let before = log.next_seq();
        // Stamped on a boot clock with no known offset: kept in the held segments.
        let held = b.boot.filter(|id| self.boots.get(id).is_none());
        if let Some(boot) = held {
            return match log.append_held(&b, boot) {
                Ok(dropped) => {
                    report_dropped(dropped);
                    Ok(b)
                }
                Err(e) => Err((b, e)),
            };
        }
        match log.append(&mut b) {
            Ok(dropped) => {
                report_dropped(dropped);
                Ok(b)
            }
            Err(e) if log.next_seq() > before => {
                // Written; what failed came after (the clean-up at the size cap).
                Stats::add(&self.spool_stats.write_errors, 1);
                tracing::error!(
                    "spool {}: a batch was written but the clean-up after it failed: {e}",
                    log.dir().display()
                );
                Ok(b)
            }
            Err(e) => {
                b.seq = seq;
                Err((b, e))
            }
        }
    }

    /// Keeps a batch the disk did not take, within the memory bound.
    fn keep(&mut self, mut b: Batch) {
        b.seq = self.next_memory_seq;
        self.next_memory_seq += 1;
        self.memory.push(b);
        while self.memory.bytes > self.settings.memory_bytes
            || self.memory.len() > self.settings.memory_batches
        {
            // The oldest batch that only memory holds goes; failing that, the oldest one
            // the publisher holds too stops being kept for the disk.
            match self.memory.batches.iter().position(|k| !k.handed) {
                Some(idx) => {
                    if let Some(k) = self.memory.remove(idx) {
                        Stats::add(&self.spool_stats.memory_dropped_batches, 1);
                        Stats::add(
                            &self.spool_stats.memory_dropped_readings,
                            k.batch.len() as u64,
                        );
                        self.losses.add(&k.batch);
                    }
                }
                None => match self.memory.pop_front() {
                    Some(k) => {
                        self.unretained.insert(k.batch.seq, k.batch.len() as u64);
                    }
                    None => break,
                },
            }
        }
        self.report_losses(false);
    }

    /// Offers a just-written batch to the publisher at once; if it has no room the batch
    /// simply stays in the backlog on disk.
    fn hand_live(&mut self, b: Batch) {
        let Some(tx) = &self.live_tx else { return };
        if tx.capacity() == 0 {
            return;
        }
        let seq = b.seq;
        if tx.try_send(Parcel::of_batch(&b)).is_ok()
            && let Some(log) = &mut self.log
        {
            log.handed_live(seq, b.len() as u32, b.first_at);
        }
    }

    /// Hands the batches in memory to the publisher, oldest first, as the live channel has
    /// room; they stay in memory (for the disk) until their PUBACK.
    fn flush_memory(&mut self) {
        let Some(tx) = &self.live_tx else { return };
        for k in self.memory.batches.iter_mut().filter(|k| !k.handed) {
            if tx.capacity() == 0 {
                break;
            }
            let parcel = match k.batch.boot {
                None => Parcel::of_batch(&k.batch),
                Some(id) => match self.boots.get(&id) {
                    Some(offset) => {
                        let mut b = k.batch.clone();
                        b.shift_timestamps(offset);
                        Parcel { batches: vec![b] }
                    }
                    // Never published with an invented time: kept (and written to the
                    // disk when it can be) until the offset of its boot is known.
                    None => continue,
                },
            };
            if tx.try_send(parcel).is_err() {
                break;
            }
            k.handed = true;
        }
    }

    /// Tries the failed disk again: opens the spool if it is not open, then writes what
    /// memory holds to it, oldest first. The fault ends when all of it is written and
    /// synced.
    fn retry_disk(&mut self) {
        self.next_retry = Instant::now() + RETRY_EVERY;
        if self.log.is_none() {
            match SpoolLog::open(self.settings.log.clone()) {
                Ok(log) => {
                    tracing::info!("spool {} opened", log.dir().display());
                    report_recovery(&log);
                    self.log = Some(log);
                    self.scanning = true;
                    self.queue_releases();
                }
                Err(e) => {
                    self.disk_error(&e);
                    return;
                }
            }
        }
        let mut written = 0u64;
        while let Some(k) = self.memory.pop_front() {
            let memory_seq = k.batch.seq;
            let held = k.batch.boot.is_some_and(|id| self.boots.get(&id).is_none());
            match self.write(k.batch) {
                Ok(b) => {
                    written += 1;
                    Stats::add(&self.spool_stats.written_from_memory_batches, 1);
                    if k.handed && !held {
                        // The publisher has it: its PUBACK names the memory seq.
                        self.alias.insert(memory_seq, b.seq);
                        if let Some(log) = &mut self.log {
                            log.handed_live(b.seq, b.len() as u32, b.first_at);
                        }
                    }
                    // Not handed out: the backlog reads it from the disk.
                }
                Err((batch, e)) => {
                    self.memory.push_front(Kept {
                        batch,
                        handed: k.handed,
                    });
                    self.disk_error(&e);
                    if written > 0 {
                        tracing::warn!(
                            "spool: {written} batch(es) from memory written before the disk failed again; {} still in memory",
                            self.memory.len()
                        );
                    }
                    return;
                }
            }
        }
        // Durable before the fault is declared over.
        if let Some(log) = &mut self.log
            && let Err(e) = log.sync()
        {
            self.last_sync = Instant::now();
            self.disk_error(&e);
            return;
        }
        self.last_sync = Instant::now();
        self.report_losses(true);
        if let Some(f) = self.fault.take() {
            self.spool_stats.set_fault(None);
            tracing::warn!(
                "spool writable again after {:.0}s ({}); {written} batch(es) from memory written to it, oldest first",
                f.since.elapsed().as_secs_f64(),
                f.error,
            );
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
                    None => match self.log.as_mut().map(SpoolLog::next_backlog) {
                        None => None,
                        Some(Ok(b)) => b,
                        // A read error that outlasted its retries: logged and counted by the
                        // reader, and the backlog pauses. Not a write fault: new batches
                        // still go to the disk.
                        Some(Err(_)) => None,
                    },
                };
                let Some(mut b) = next else { break };
                if let Some(id) = b.boot {
                    match self.boots.get(&id) {
                        Some(offset) => b.shift_timestamps(offset),
                        None => {
                            // Never published with an invented time: moved to the held
                            // segments until the offset of its boot is known (if ever),
                            // exported by `spool export`.
                            self.hold(&b, id);
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
            self.settle_held();
            if batches.is_empty() {
                return;
            }
            self.pending = Some(Parcel { batches });
        }
    }

    /// A batch of the log stamped on a boot clock with no known offset (written before the
    /// held segments existed, or its boot's offset was lost): copied to the held segments.
    fn hold(&mut self, b: &Batch, boot: [u8; 16]) {
        let Some(log) = &mut self.log else { return };
        match log.hold(b, boot) {
            Ok(dropped) => report_dropped(dropped),
            // It stays in the log, handed out (so not read again before a restart).
            Err(e) => self.disk_error(&e),
        }
    }

    fn settle_held(&mut self) {
        let Some(log) = &mut self.log else { return };
        if let Err(e) = log.settle_held() {
            self.disk_error(&e);
        }
    }

    fn sync(&mut self) {
        self.last_sync = Instant::now();
        if self.fault.is_some() {
            return;
        }
        let Some(log) = &mut self.log else { return };
        if let Err(e) = log.sync() {
            self.disk_error(&e);
        }
    }

    fn disk_error(&mut self, e: &io::Error) {
        Stats::add(&self.spool_stats.write_errors, 1);
        let dir = self.settings.log.dir.display();
        match &mut self.fault {
            None => {
                let what = if self.log.is_some() {
                    ""
                } else {
                    " and cannot be opened"
                };
                tracing::error!(
                    "spool {dir} not writable ({e}){what}: new readings are kept in memory (at most {} or {} batches) and still published; trying again every {}s",
                    crate::units::Size(self.settings.memory_bytes as u64),
                    self.settings.memory_batches,
                    RETRY_EVERY.as_secs()
                );
                self.fault = Some(Fault {
                    since: Instant::now(),
                    last_report: Instant::now(),
                    error: e.to_string(),
                });
                self.spool_stats.set_fault(Some(&e.to_string()));
                self.next_retry = Instant::now() + RETRY_EVERY;
            }
            Some(f) if f.last_report.elapsed() >= Duration::from_secs(60) => {
                f.last_report = Instant::now();
                f.error = e.to_string();
                self.spool_stats.set_fault(Some(&f.error));
                tracing::error!(
                    "spool {dir} still not writable after {:.0}s ({e}); {} batch(es), {} bytes in memory",
                    f.since.elapsed().as_secs_f64(),
                    self.memory.len(),
                    self.memory.bytes
                );
            }
            Some(_) => {}
        }
    }

    fn publish_stats(&self) {
        let s = &self.spool_stats;
        s.memory_batches.store(self.memory.len() as u64, Relaxed);
        s.memory_bytes.store(self.memory.bytes as u64, Relaxed);
        let Some(log) = &self.log else { return };
        let (held_batches, _, held_bytes) = log.held_counts();
        s.held_batches.store(held_batches, Relaxed);
        s.held_bytes.store(held_bytes, Relaxed);
        s.unacked_readings.store(log.unacked_readings(), Relaxed);
        let oldest = log
            .oldest_unacked_us()
            .map_or(0, |at| (at / 1000).max(0) as u64);
        s.oldest_unacked_ms.store(oldest, Relaxed);
        let Losses {
            cap_readings,
            corrupt_bytes,
            corrupt_cuts,
            corrupt_frames,
            ..
        } = log.losses;
        let io = log.read_io();
        s.read_retries.store(io.retries, Relaxed);
        s.read_failures.store(io.failures, Relaxed);
        s.corrupt_frames.store(corrupt_frames, Relaxed);
        s.unacked_batches.store(log.unacked_batches(), Relaxed);
        s.bytes.store(log.bytes(), Relaxed);
        s.cap_dropped_readings.store(cap_readings, Relaxed);
        s.cap_dropped_held_batches
            .store(log.losses.cap_held_batches, Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &std::path::Path) -> Options {
        Options {
            dir: dir.to_path_buf(),
            segment_bytes: 64 * 1024,
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn config_errors_are_told_from_disk_faults() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("a-file");
        std::fs::write(&file, b"x").expect("write");
        // spool.dir is a regular file, or below one: no disk state mends that.
        for dir in [file.clone(), file.join("spool")] {
            match SpoolLog::open(opts(&dir)) {
                Ok(_) => panic!("{} opened as a spool", dir.display()),
                Err(e) => assert!(
                    is_config_error(&e),
                    "{}: {e} ({:?})",
                    dir.display(),
                    e.kind()
                ),
            }
        }
        // Another agent holds the spool.
        let dir = tmp.path().join("spool");
        let _first = SpoolLog::open(opts(&dir)).expect("first open");
        match SpoolLog::open(opts(&dir)) {
            Ok(_) => panic!("a second open of a locked spool succeeded"),
            Err(e) => assert!(is_config_error(&e), "{e}"),
        }
        // The disk's own faults.
        for errno in [
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EROFS,
            libc::EIO,
            libc::ENOMEM,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(!is_config_error(&e), "{e} taken for a configuration error");
        }
    }

    #[test]
    fn fault_is_set_and_cleared() {
        let s = SpoolStats::default();
        assert_eq!(s.fault(), None);
        s.set_fault(Some("No space left on device (os error 28)"));
        let (since, error) = s.fault().expect("a fault");
        assert!(since > 0);
        assert_eq!(error, "No space left on device (os error 28)");
        s.set_fault(None);
        assert_eq!(s.fault(), None);
    }
}
