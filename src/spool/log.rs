//! The spool on disk: an append-only log of batches in segment files, a cursor that reads
//! the backlog oldest first, and the acknowledged state that lets whole segments go.
//!
//! Start-up reads the ack file and scans only the newest segment (to find where writing
//! resumes and to cut a torn tail); older segments are read lazily by the cursor, checked
//! frame by frame as they go out. Nothing acknowledged is scanned again.
//!
//! Every read of a segment goes through `segment::SegmentReader`. Damage (a framing or CRC
//! failure) is dealt with once, where it is met: a copy of the segment is kept under
//! `corrupt/`, the damaged bytes are counted, and they are either cut (damage that runs to
//! the end of the segment, or any damage in an old-format segment) or marked in place as a
//! hole (damage followed by a valid frame), so that no later reader counts them again. A
//! read error is not damage: it is retried, and then reported as an error with nothing cut.
//!
//! Batches stamped on a boot clock whose offset to UTC is not known are not kept here but
//! in the held segments (`held`), so they never keep the log's head from moving; the size
//! cap weighs both. The health report's counts (unacknowledged readings, the oldest time)
//! are kept per segment, never per batch: the log's memory does not grow with the spool.

use super::acks::{AckFile, sync_dir};
use super::frame::{self, HEADER, SEG_HEAD, Version};
use super::held::{HeldSeg, HeldStore};
use super::segment::{Item, Magic, Read, SegmentReader};
use super::seqset::SeqSet;
use crate::sample::batch::Batch;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use super::segment::ReadIo;

const CORRUPT_KEEP: usize = 8;
/// After a read that failed through its retries, the backlog is not read again for this
/// long (doubled at every new failure, up to `STALL_MAX`): a dead card is not hammered, and
/// the spool thread does not sleep in retries at every turn.
const STALL_FIRST: Duration = Duration::from_secs(1);
const STALL_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub max_bytes: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
    /// Readings of its unacknowledged batches, and the sampling time (µs) of the oldest of
    /// them: the per-segment index behind the health report (no per-batch state). For a
    /// segment present at start, exact once `counted` (the idle scan read it); batches
    /// appended since the start are counted as they are written.
    readings: u64,
    oldest: Option<i64>,
    counted: bool,
}

impl Segment {
    fn new(first: u64, path: PathBuf, bytes: u64, counted: bool) -> Segment {
        Segment {
            first,
            path,
            bytes,
            readings: 0,
            oldest: None,
            counted,
        }
    }

    fn add(&mut self, readings: u64, at: i64) {
        self.readings += readings;
        self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
    }
}

/// Losses the delivery guarantee allows, each counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Losses {
    /// Readings in segments dropped at the size cap, never acknowledged.
    pub cap_readings: u64,
    pub cap_batches: u64,
    /// Damaged bytes (torn tail, bit flip, zeros) cut off or skipped, and how many times.
    pub corrupt_bytes: u64,
    pub corrupt_cuts: u64,
    /// Frames those damaged bytes held, as far as can be told (their sync markers).
    pub corrupt_frames: u64,
    /// Of `cap_batches`, batches held for a clock (dropped with a held segment).
    pub cap_held_batches: u64,
}

/// What was dropped at the size cap, for the log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub readings: u64,
    pub batches: u64,
    pub first_at: Option<i64>,
    pub last_at: Option<i64>,
}

impl Dropped {
    fn add(&mut self, o: &Dropped) {
        self.readings += o.readings;
        self.batches += o.batches;
        if let Some(t) = o.first_at {
            self.first_at = Some(self.first_at.map_or(t, |m| m.min(t)));
        }
        if let Some(t) = o.last_at {
            self.last_at = Some(self.last_at.map_or(t, |m| m.max(t)));
        }
    }
}

struct Cursor {
    /// Index into `segments` (by first seq, since segments come and go).
    seg_first: u64,
    offset: u64,
    reader: Option<SegmentReader>,
    /// Every seq below this has been read past (handed out, acknowledged or absent).
    floor: u64,
}

/// The backlog could not be read (an I/O error that outlasted its retries).
struct Stall {
    until: Instant,
    wait: Duration,
    kind: io::ErrorKind,
    raw: Option<i32>,
    text: String,
}

impl Stall {
    fn error(&self) -> io::Error {
        match self.raw {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
}

pub struct SpoolLog {
    opts: Options,
    segments: VecDeque<Segment>,
    tail: File,
    next_seq: u64,
    acks: AckFile,
    base: u64,
    acked: SeqSet,
    /// Batches handed to the publisher and not acknowledged: seq → readings (bounded by
    /// what is in flight).
    outstanding: BTreeMap<u64, (u32, i64)>,
    /// Sampling time (µs) of the last batch the cursor read: the batches after it in its
    /// segment are not older (for the oldest unacknowledged time).
    cursor_at: Option<i64>,
    cursor: Cursor,
    /// The next seq when the log was opened: batches below it are counted by the idle
    /// scan, those from it on as they are appended.
    scan_end: u64,
    /// Batches held for a clock, in segments of their own (see `held`).
    held: HeldStore,
    /// Frames read by the log (recovery, backlog, scan, cap, release): how much a start or a
    /// release cost.
    pub frames_read: u64,
    dirty: bool,
    pub losses: Losses,
    read_io: ReadIo,
    _lock: File,
    scratch: Vec<u8>,
    /// The next segment (by first seq) whose frame headers `scan_step` reads.
    scan_from: Option<u64>,
    /// Damage (segment first seq, offset) counted but not marked on disk (too short for a
    /// hole, or the write failed): not counted again while the agent runs.
    unmarked: BTreeSet<(u64, u64)>,
    stall: Option<Stall>,
    /// A failed append left part of a frame behind: the next batch starts a new segment.
    roll_tail: bool,
    /// Batches `hold` copied to the held segments, acknowledged once the copy is synced.
    to_settle: Vec<u64>,
}

/// What the spool knows of one unacknowledged batch: its readings and sampling time (µs).
pub type Summary = (u32, i64);

fn seg_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn parse_seg_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

impl SpoolLog {
    pub fn open(opts: Options) -> io::Result<SpoolLog> {
        fs::create_dir_all(&opts.dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(opts.dir.join("lock"))?;
        if lock.try_lock().is_err() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by another redline-agent (one spool per agent)",
                    opts.dir.display()
                ),
            ));
        }
        let (acks, state) = AckFile::open(&opts.dir)?;
        let mut segments: Vec<Segment> = Vec::new();
        for entry in fs::read_dir(&opts.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if let Some(first) = name.to_str().and_then(parse_seg_name) {
                segments.push(Segment::new(
                    first,
                    entry.path(),
                    entry.metadata()?.len(),
                    false,
                ));
            }
        }
        segments.sort_by_key(|s| s.first);
        let held = HeldStore::open(&opts.dir)?;
        let mut log = SpoolLog {
            tail: File::open(&opts.dir)?, // replaced below
            opts,
            segments: segments.into(),
            next_seq: state.base,
            acks,
            base: state.base,
            acked: state.above,
            outstanding: BTreeMap::new(),
            cursor_at: None,
            scan_end: 0,
            held,
            frames_read: 0,
            cursor: Cursor {
                seg_first: 0,
                offset: SEG_HEAD,
                reader: None,
                floor: state.base,
            },
            dirty: false,
            losses: Losses::default(),
            read_io: ReadIo::default(),
            _lock: lock,
            scratch: Vec::new(),
            scan_from: None,
            unmarked: BTreeSet::new(),
            stall: None,
            roll_tail: false,
            to_settle: Vec::new(),
        };
        log.delete_done_segments()?;
        log.recover_tail()?;
        log.cursor.seg_first = log
            .segments
            .iter()
            .rev()
            .find(|s| s.first <= log.base)
            .or(log.segments.front())
            .map_or(log.next_seq, |s| s.first);
        log.scan_from = log.segments.front().map(|s| s.first);
        log.scan_end = log.next_seq;
        Ok(log)
    }

    /// Reads the frame headers of one more segment (oldest first; the log's, then those of
    /// `held/`) and counts what it holds unacknowledged. False once every segment present
    /// at start was read. Done a segment at a time while idle, so a start with a full spool
    /// is not delayed by it.
    pub fn scan_step(&mut self) -> bool {
        let Some(first) = self.scan_from else {
            return self.scan_held_step();
        };
        let Some(idx) = self.segments.iter().position(|s| s.first >= first) else {
            self.scan_from = None;
            return true;
        };
        let seg = self.segments[idx].clone();
        self.scan_from = self.segments.get(idx + 1).map(|s| s.first);
        let mut readings = 0u64;
        let mut oldest: Option<i64> = None;
        if let Ok(mut r) = SegmentReader::open(&seg.path, seg.bytes, &mut self.read_io)
            && r.magic() != Magic::Short
        {
            let mut summary = Vec::new();
            let mut at = SEG_HEAD;
            // The CRC is checked when the frame is sent; here only the counts matter. Damage
            // is dealt with by the cursor when it gets there; a read error ends this scan.
            while let Ok(item) = r.next(
                at,
                seg.bytes,
                &mut summary,
                Read::Summary,
                &mut self.read_io,
            ) {
                match item {
                    Item::End => break,
                    Item::Hole { end, .. } | Item::Damage { end, .. } => at = end,
                    Item::Frame { end, header, .. } => {
                        at = end;
                        self.frames_read += 1;
                        let seq = header.seq;
                        if seq < self.base || seq >= self.scan_end || self.acked.contains(seq) {
                            continue;
                        }
                        if let Some((n, first_at, _)) = frame::summary(&summary) {
                            readings += n as u64;
                            oldest = Some(oldest.map_or(first_at, |o| o.min(first_at)));
                        }
                    }
                }
            }
        }
        if let Some(s) = self.segments.iter_mut().find(|s| s.first == seg.first) {
            s.readings += readings;
            if let Some(t) = oldest {
                s.oldest = Some(s.oldest.map_or(t, |o| o.min(t)));
            }
            s.counted = true;
        }
        true
    }

    /// Counts the held segments present at start that the idle scan has not reached (their
    /// frame headers only), so that `held_counts` is exact.
    pub fn count_held(&mut self) {
        while self.scan_held_step() {}
    }

    /// Counts the batches of one held segment present at start; false when none is left.
    fn scan_held_step(&mut self) -> bool {
        let Some(seg) = self.held.uncounted() else {
            return false;
        };
        let (mut batches, mut readings) = (0u64, 0u64);
        if let Ok(mut r) = SegmentReader::open(&seg.path, seg.bytes, &mut self.read_io)
            && r.magic() != Magic::Short
        {
            let mut summary = Vec::new();
            let mut at = SEG_HEAD;
            while let Ok(item) = r.next(
                at,
                seg.bytes,
                &mut summary,
                Read::Summary,
                &mut self.read_io,
            ) {
                match item {
                    Item::End => break,
                    Item::Hole { end, .. } | Item::Damage { end, .. } => at = end,
                    Item::Frame { end, .. } => {
                        at = end;
                        self.frames_read += 1;
                        if let Some((n, _, _)) = frame::summary(&summary) {
                            batches += 1;
                            readings += n as u64;
                        }
                    }
                }
            }
        }
        self.held.set_count(seg.n, (batches, readings));
        true
    }

    /// Every seq below this is acknowledged, dropped or never existed.
    pub fn base(&self) -> u64 {
        self.done_below()
    }

    /// Scans the newest segment: where appends resume, damage dealt with (a torn or damaged
    /// tail cut off). A tail in the old format is left as it is and a new segment started.
    fn recover_tail(&mut self) -> io::Result<()> {
        let Some(last) = self.segments.back().cloned() else {
            return self.start_segment(self.next_seq.max(self.base));
        };
        let mut r = SegmentReader::open(&last.path, last.bytes, &mut self.read_io)?;
        let mut len = last.bytes;
        let mut last_seq = None;
        match r.magic() {
            Magic::Short => {
                self.rewrite_short_segment(&last.path)?;
                len = SEG_HEAD;
            }
            Magic::Damaged => self.mend_magic(&last.path, last.first, r.version()),
            Magic::Good => {}
        }
        if r.magic() != Magic::Short {
            let mut payload = Vec::new();
            let mut at = SEG_HEAD;
            loop {
                match r.next(at, len, &mut payload, Read::Full, &mut self.read_io)? {
                    Item::End => break,
                    Item::Frame { end, header, .. } => {
                        self.frames_read += 1;
                        last_seq = Some(header.seq);
                        at = end;
                    }
                    Item::Hole { end, .. } => at = end,
                    Item::Damage {
                        at: bad,
                        end,
                        frames,
                    } => {
                        len = self.mend(&last, r.version(), bad, end, frames, len);
                        r.forget_cache();
                        at = end.min(len);
                    }
                }
            }
        }
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes = len;
        }
        self.next_seq = last_seq.map_or(last.first, |s| s + 1).max(self.base);
        if let Some(max_acked) = self.acked.last() {
            self.next_seq = self.next_seq.max(max_acked + 1);
        }
        if r.version() == Version::V1 {
            // New batches go in the new format, in a segment of their own.
            return self.start_segment(self.next_seq);
        }
        self.tail = OpenOptions::new().append(true).open(&last.path)?;
        Ok(())
    }

    /// A segment shorter than its magic (torn while it was created): made an empty segment.
    /// Counted as damage only if its bytes are not the start of a magic.
    fn rewrite_short_segment(&mut self, path: &Path) -> io::Result<()> {
        let bytes = fs::read(path)?;
        let torn_magic = frame::MAGIC_V2.starts_with(&bytes) || frame::MAGIC_V1.starts_with(&bytes);
        if !torn_magic {
            let copy = self.keep_copy(path, 0);
            self.count_damage(bytes.len() as u64, 0);
            tracing::error!(
                "spool segment {} is damaged at byte 0: {} byte(s) that are not a segment; {}",
                path.display(),
                bytes.len(),
                copy
            );
        }
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(0)?;
        f.write_all_at(frame::MAGIC_V2, 0)?;
        f.sync_all()
    }

    fn count_damage(&mut self, bytes: u64, frames: u64) {
        self.losses.corrupt_bytes += bytes;
        self.losses.corrupt_cuts += 1;
        self.losses.corrupt_frames += frames;
    }

    /// Keeps a copy of a damaged segment under `corrupt/` (the newest `CORRUPT_KEEP`);
    /// returns the words for the log line. A failed copy does not stop the repair.
    fn keep_copy(&self, path: &Path, at: u64) -> String {
        let corrupt = self.opts.dir.join("corrupt");
        let stamp = crate::ops::clock::wall_now_us() / 1_000_000;
        let stem = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let dest = corrupt.join(format!("{stem}.{stamp}.{at}.seg"));
        let done = fs::create_dir_all(&corrupt)
            .and_then(|()| fs::copy(path, &dest))
            .and_then(|_| prune_corrupt(&corrupt));
        match done {
            Ok(()) => format!("a copy is in {}", corrupt.display()),
            Err(e) => format!("no copy could be kept in {} ({e})", corrupt.display()),
        }
    }

    /// Deals with damage `[at, end)` of a segment `len` bytes long, once: copied, counted,
    /// and cut (to the end of the segment, or in an old-format segment) or marked as a hole.
    /// Returns the segment's length after it. Never fails: damage that cannot be marked on
    /// disk is remembered instead (counted again only after a restart).
    fn mend(
        &mut self,
        seg: &Segment,
        version: Version,
        at: u64,
        end: u64,
        frames: u64,
        len: u64,
    ) -> u64 {
        if self.unmarked.contains(&(seg.first, at)) {
            return len;
        }
        let copy = self.keep_copy(&seg.path, at);
        let cut = end >= len || version == Version::V1;
        let bytes = if cut { len - at } else { end - at };
        let done = if cut {
            cut_at(&seg.path, at).map(|()| match version {
                Version::V2 => {
                    format!("cut {bytes} byte(s) ({frames} frame(s)) to the end of the segment")
                }
                // No sync marker to find the next frame by: what follows is lost with it.
                Version::V1 => format!(
                    "cut {bytes} byte(s) to the end of the segment (old format: the frames after the damage go with it)"
                ),
            })
        } else if end - at >= HEADER as u64 {
            mark_hole(&seg.path, at, end).map(|()| {
                format!(
                    "skipped {bytes} byte(s) ({frames} frame(s)) up to the next valid frame at byte {end}"
                )
            })
        } else {
            Err(io::Error::other("too short to be marked as a hole"))
        };
        self.count_damage(bytes, frames);
        match done {
            Ok(what) => {
                tracing::error!(
                    "spool segment {} is damaged at byte {at}: {what}; {copy}",
                    seg.path.display()
                );
                if cut { at } else { len }
            }
            Err(e) => {
                self.unmarked.insert((seg.first, at));
                tracing::error!(
                    "spool segment {} is damaged at byte {at}: {bytes} byte(s) ({frames} frame(s)) skipped, not marked on disk ({e}); {copy}",
                    seg.path.display()
                );
                len
            }
        }
    }

    /// A segment whose magic is damaged: the magic rewritten (the version found from the
    /// frames), the 8 bytes counted.
    fn mend_magic(&mut self, path: &Path, first: u64, version: Version) {
        if self.unmarked.contains(&(first, 0)) {
            return;
        }
        let copy = self.keep_copy(path, 0);
        self.count_damage(SEG_HEAD, 0);
        let done = OpenOptions::new().write(true).open(path).and_then(|f| {
            f.write_all_at(version.magic(), 0)
                .and_then(|()| f.sync_data())
        });
        if let Err(e) = &done {
            self.unmarked.insert((first, 0));
            tracing::error!(
                "spool segment {} is damaged at byte 0 (its magic): could not be rewritten ({e}); {copy}",
                path.display()
            );
        } else {
            tracing::error!(
                "spool segment {} is damaged at byte 0 (its magic): rewritten, no frame lost; {copy}",
                path.display()
            );
        }
    }

    fn start_segment(&mut self, first: u64) -> io::Result<()> {
        if self.segments.back().is_some_and(|s| s.first == first) {
            // The tail holds no batch (only its magic, or part of a frame): made anew.
            self.segments.pop_back();
        }
        let path = self.opts.dir.join(seg_name(first));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        f.write_all(frame::MAGIC_V2)?;
        f.sync_all()?;
        sync_dir(&self.opts.dir)?;
        drop(f);
        self.tail = OpenOptions::new().append(true).open(&path)?;
        self.segments
            .push_back(Segment::new(first, path, SEG_HEAD, true));
        Ok(())
    }

    /// Appends a batch, assigning its sequence number. Returns what the size cap dropped.
    pub fn append(&mut self, batch: &mut Batch) -> io::Result<Dropped> {
        self.write_batch(batch)?;
        self.enforce_cap()
    }

    /// Writes a batch at the end of the log, without the size cap.
    fn write_batch(&mut self, batch: &mut Batch) -> io::Result<()> {
        let tail_full = self.roll_tail
            || self
                .segments
                .back()
                .is_none_or(|s| s.bytes >= self.opts.segment_bytes);
        if tail_full {
            if self.dirty {
                self.tail.sync_data()?;
                self.dirty = false;
            }
            self.start_segment(self.next_seq)?;
            self.roll_tail = false;
        }
        batch.seq = self.next_seq;
        self.scratch.clear();
        frame::encode(batch, &mut self.scratch);
        if let Err(e) = self.tail.write_all(&self.scratch) {
            // Leave no half frame behind for the next append to build on; if it cannot be
            // taken back, the next batch starts a new segment and the reader sees the half
            // frame as this segment's damaged end.
            if let Some(seg) = self.segments.back_mut()
                && self.tail.set_len(seg.bytes).is_err()
            {
                if let Ok(m) = self.tail.metadata() {
                    seg.bytes = m.len();
                }
                self.roll_tail = true;
            }
            return Err(e);
        }
        self.next_seq += 1;
        self.dirty = true;
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes += self.scratch.len() as u64;
            seg.add(batch.len() as u64, batch.first_at);
        }
        Ok(())
    }

    /// Keeps a batch stamped on `boot`'s clock (whose offset to UTC is not known) in the
    /// held segments, out of the log's way. Returns what the size cap dropped.
    pub fn append_held(&mut self, batch: &Batch, boot: [u8; 16]) -> io::Result<Dropped> {
        self.held.append(
            batch,
            boot,
            self.next_seq,
            self.opts.segment_bytes,
            &mut self.scratch,
        )?;
        self.enforce_cap()
    }

    /// A batch read from the log whose boot clock has no known offset: moved to the held
    /// segments. Acknowledged in the log by `settle_held`, once the copy is synced.
    pub fn hold(&mut self, batch: &Batch, boot: [u8; 16]) -> io::Result<Dropped> {
        let dropped = self.append_held(batch, boot)?;
        self.to_settle.push(batch.seq);
        Ok(dropped)
    }

    /// Syncs the batches `hold` copied and lets their place in the log go.
    pub fn settle_held(&mut self) -> io::Result<()> {
        if self.to_settle.is_empty() {
            return Ok(());
        }
        self.held.sync()?;
        for seq in std::mem::take(&mut self.to_settle) {
            self.ack(seq)?;
        }
        Ok(())
    }

    /// The boots that have held batches.
    pub fn held_boots(&self) -> Vec<[u8; 16]> {
        self.held.boots()
    }

    pub fn has_held(&self, boot: &[u8; 16]) -> bool {
        self.held.has_boot(boot)
    }

    /// Held batches and readings known (those of held segments present at start once the
    /// idle scan counted them), and the bytes of the held segments.
    pub fn held_counts(&self) -> (u64, u64, u64) {
        let (b, r) = self.held.counted();
        (b, r, self.held.bytes())
    }

    /// Releases the oldest held segment of `boot`, whose offset to UTC is now `offset`: its
    /// batches converted to UTC and appended to the log, synced, then the held segment
    /// removed. Only that segment is read. Returns (batches, readings) released and what the
    /// cap dropped; `None` when `boot` has no held segment left. On a read or write error
    /// the segment stays held (batches appended before the error are sent twice, never
    /// lost).
    pub fn release_step(
        &mut self,
        boot: &[u8; 16],
        offset: i64,
    ) -> io::Result<Option<(u64, u64, Dropped)>> {
        self.held.close_boot(boot)?;
        let Some(seg) = self.held.take_oldest(Some(boot)) else {
            return Ok(None);
        };
        match self.release_seg(&seg, offset) {
            Ok((batches, readings)) => {
                if let Err(e) = self.held.remove(&seg) {
                    tracing::error!(
                        "spool: released {} but cannot remove it ({e}): its batches may be sent twice",
                        seg.path.display()
                    );
                }
                // The bytes moved from the held segment to the log; the cap weighs them
                // once the held copy is gone (a converted batch is a little longer).
                let dropped = self.enforce_cap()?;
                Ok(Some((batches, readings, dropped)))
            }
            Err(e) => {
                self.held.put_back(seg);
                Err(e)
            }
        }
    }

    fn release_seg(&mut self, seg: &HeldSeg, offset: i64) -> io::Result<(u64, u64)> {
        let (mut batches, mut readings) = (0u64, 0u64);
        let mut r = SegmentReader::open(&seg.path, seg.bytes, &mut self.read_io)?;
        if r.magic() != Magic::Short {
            let mut payload = Vec::new();
            let mut at = SEG_HEAD;
            loop {
                match r.next(at, seg.bytes, &mut payload, Read::Full, &mut self.read_io)? {
                    Item::End => break,
                    Item::Hole { end, .. } => at = end,
                    Item::Damage {
                        at: bad,
                        end,
                        frames,
                    } => {
                        // Counted; the segment goes once released, so it is not marked.
                        self.count_damage(end - bad, frames);
                        tracing::error!(
                            "spool held segment {} is damaged at byte {bad}: {} byte(s) ({frames} frame(s)) skipped",
                            seg.path.display(),
                            end - bad
                        );
                        at = end;
                    }
                    Item::Frame {
                        at: from,
                        end,
                        header,
                    } => {
                        at = end;
                        self.frames_read += 1;
                        let Some(mut b) = frame::decode(header.seq, &payload) else {
                            // Its CRC holds but it does not decode: damage all the same.
                            self.count_damage(end - from, 1);
                            continue;
                        };
                        b.shift_timestamps(offset);
                        b.boot = None;
                        batches += 1;
                        readings += b.len() as u64;
                        self.write_batch(&mut b)?;
                    }
                }
            }
        }
        if self.dirty {
            self.tail.sync_data()?;
            self.dirty = false;
        }
        Ok((batches, readings))
    }

    /// The batch just appended went out live: the cursor need not read it again.
    pub fn handed_live(&mut self, seq: u64, readings: u32, first_at: i64) {
        self.outstanding.insert(seq, (readings, first_at));
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.held.sync()?;
        if self.dirty {
            self.tail.sync_data()?;
            self.dirty = false;
        }
        let base = self.done_below();
        self.acks.sync(base, &self.acked)
    }

    /// Every seq below this is acknowledged or will never be sent.
    fn done_below(&self) -> u64 {
        let mut w = self.cursor.floor;
        if let Some((&o, _)) = self.outstanding.iter().next() {
            w = w.min(o);
        }
        w.max(self.base)
    }

    /// The delivery guarantee in one statement. Segments are deleted only below `base`, and
    /// `base` never passes a batch that may still need delivering: one the cursor has not
    /// read past (`cursor.floor`), or one handed out and not acknowledged (`outstanding`).
    /// (The cap takes what it drops out of `outstanding` first, counted as a loss.)
    /// Checked whenever `base` moves in debug builds, and after every step of the
    /// property test (`tests/spool_log_props.rs`).
    pub fn base_invariant(&self) -> Result<(), String> {
        if self.base > self.cursor.floor {
            return Err(format!(
                "base {} passes the cursor's floor {}: unread batches may be deleted",
                self.base, self.cursor.floor
            ));
        }
        if let Some(&seq) = self.outstanding.keys().next()
            && seq < self.base
        {
            return Err(format!(
                "base {} passes batch {seq}, handed out and not acknowledged",
                self.base
            ));
        }
        Ok(())
    }

    fn debug_check_base(&self) {
        if cfg!(debug_assertions)
            && let Err(e) = self.base_invariant()
        {
            panic!("spool invariant broken: {e}");
        }
    }

    /// The broker acknowledged batch `seq`.
    pub fn ack(&mut self, seq: u64) -> io::Result<()> {
        if let Some((n, _)) = self.outstanding.remove(&seq) {
            let scan_end = self.scan_end;
            if let Some(s) = self.segment_of_mut(seq)
                && (s.counted || seq >= scan_end)
            {
                s.readings = s.readings.saturating_sub(u64::from(n));
                if s.readings == 0 {
                    s.oldest = None;
                }
            }
        }
        if seq >= self.base && self.acked.insert(seq) {
            self.acks.append(seq)?;
        }
        self.advance_base()
    }

    /// Moves `base` up to what is done and lets whole segments below it go.
    fn advance_base(&mut self) -> io::Result<()> {
        let w = self.done_below();
        if w > self.base {
            self.base = w;
            self.debug_check_base();
            self.acked.retain_from(w);
            self.delete_done_segments()?;
        }
        Ok(())
    }

    /// Removes segments whose every batch is below `base` (never the one being written).
    fn delete_done_segments(&mut self) -> io::Result<()> {
        let mut removed = false;
        while self.segments.len() > 1 && self.segments.get(1).is_some_and(|n| n.first <= self.base)
        {
            if let Some(s) = self.segments.pop_front() {
                fs::remove_file(&s.path).or_else(ignore_not_found)?;
                self.forget_unmarked(s.first);
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.opts.dir)?;
        }
        Ok(())
    }

    fn forget_unmarked(&mut self, first: u64) {
        self.unmarked.retain(|&(f, _)| f != first);
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The segment that holds `seq`.
    fn segment_of_mut(&mut self, seq: u64) -> Option<&mut Segment> {
        let idx = self.segments.partition_point(|s| s.first <= seq);
        idx.checked_sub(1).and_then(|i| self.segments.get_mut(i))
    }

    /// Readings in the unacknowledged batches known (exact once the idle scan is done).
    pub fn unacked_readings(&self) -> u64 {
        self.segments.iter().map(|s| s.readings).sum()
    }

    /// Sampling time (µs) of the oldest unacknowledged batch known: the oldest handed out,
    /// or the first segment from the cursor's on that holds unacknowledged readings (in the
    /// cursor's segment, the last batch it read; in a later one, its oldest when counted).
    pub fn oldest_unacked_us(&self) -> Option<i64> {
        let out = self.outstanding.values().map(|&(_, at)| at).min();
        let ahead = self
            .segments
            .iter()
            .filter(|s| s.readings > 0 && s.first >= self.cursor.seg_first)
            .find_map(|s| {
                if s.first == self.cursor.seg_first && self.cursor.offset > SEG_HEAD {
                    self.cursor_at.or(s.oldest)
                } else {
                    s.oldest
                }
            });
        match (out, ahead) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// At the size cap, drops the oldest whole segment, counting what was never delivered.
    /// The loss is counted before any error (removing the file, syncing the directory) is
    /// reported, and logged here since the caller gets only the error.
    fn enforce_cap(&mut self) -> io::Result<Dropped> {
        let mut dropped = Dropped::default();
        let mut removed = 0;
        let mut result = Ok(());
        while self.total_bytes() + self.held.bytes() > self.opts.max_bytes {
            // The oldest segment goes, of the log's (never the one being written) or the
            // held ones (never the one being appended to), by when it was started.
            let log_first = (self.segments.len() > 1)
                .then(|| self.segments.front().map(|s| s.first))
                .flatten();
            let held_order = self.held.oldest().map(|h| h.order);
            let take_held = match (log_first, held_order) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(f), Some(o)) => o <= f,
            };
            if take_held {
                let Some(h) = self.held.take_oldest(None) else {
                    break;
                };
                let this = self.count_held_dropped(&h);
                self.losses.cap_readings += this.readings;
                self.losses.cap_batches += this.batches;
                self.losses.cap_held_batches += this.batches;
                dropped.add(&this);
                removed += 1;
                if let Err(e) = self.held.remove(&h) {
                    result = Err(e);
                    break;
                }
                continue;
            }
            if log_first.is_none() {
                break;
            }
            let Some(s) = self.segments.pop_front() else {
                break;
            };
            let next_first = self.segments.front().map_or(self.next_seq, |n| n.first);
            let this = self.count_dropped(&s);
            self.losses.cap_readings += this.readings;
            self.losses.cap_batches += this.batches;
            dropped.add(&this);
            if self.cursor.seg_first <= s.first {
                self.cursor.seg_first = next_first;
                self.cursor.offset = SEG_HEAD;
                self.cursor.reader = None;
            }
            self.cursor.floor = self.cursor.floor.max(next_first);
            self.outstanding = self.outstanding.split_off(&next_first);
            self.base = self.base.max(next_first.min(self.done_below()));
            self.debug_check_base();
            self.forget_unmarked(s.first);
            removed += 1;
            if let Err(e) = fs::remove_file(&s.path).or_else(ignore_not_found) {
                result = Err(e);
                break;
            }
        }
        if removed > 0 && result.is_ok() {
            result = sync_dir(&self.opts.dir);
        }
        match result {
            Ok(()) => Ok(dropped),
            Err(e) => {
                tracing::error!(
                    "spool full (spool.max_bytes): dropped {removed} segment(s), {} undelivered reading(s) in {} batch(es) (counted), but the disk failed: {e}",
                    dropped.readings,
                    dropped.batches
                );
                Err(e)
            }
        }
    }

    /// What a held segment about to be dropped holds (all of it undelivered).
    fn count_held_dropped(&mut self, h: &HeldSeg) -> Dropped {
        if let Some((batches, readings)) = h.count {
            return Dropped {
                readings,
                batches,
                first_at: None,
                last_at: None,
            };
        }
        self.count_frames(&h.path, h.bytes, true)
    }

    /// The unacknowledged batches of a segment about to be dropped. A batch the publisher
    /// holds is no longer durable either: it is counted, and delivered after all if its
    /// PUBACK still comes.
    fn count_dropped(&mut self, s: &Segment) -> Dropped {
        self.count_frames(&s.path, s.bytes, false)
    }

    /// The batches of a segment file that were never acknowledged (`all`: every batch, for
    /// a held segment, whose batches have no seq of the log).
    fn count_frames(&mut self, path: &Path, bytes: u64, all: bool) -> Dropped {
        let s = Segment::new(0, path.to_path_buf(), bytes, true);
        let mut d = Dropped::default();
        let mut r = match SegmentReader::open(&s.path, s.bytes, &mut self.read_io) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(
                    "spool: cannot read {} to count what the cap drops ({e}): its loss is not counted",
                    s.path.display()
                );
                return d;
            }
        };
        if r.magic() == Magic::Short {
            return d;
        }
        let mut payload = Vec::new();
        let mut at = SEG_HEAD;
        loop {
            match r.next(at, s.bytes, &mut payload, Read::Full, &mut self.read_io) {
                Ok(Item::End) => break,
                Ok(Item::Hole { end, .. } | Item::Damage { end, .. }) => at = end,
                Ok(Item::Frame { end, header, .. }) => {
                    at = end;
                    if !all && (header.seq < self.base || self.acked.contains(header.seq)) {
                        continue;
                    }
                    if let Some((n, first, last)) = frame::summary(&payload) {
                        d.add(&Dropped {
                            readings: n as u64,
                            batches: 1,
                            first_at: Some(first),
                            last_at: Some(last),
                        });
                    }
                }
                Err(e) => {
                    tracing::error!(
                        "spool: cannot read {} at byte {at} to count what the cap drops ({e}): the count stops there",
                        s.path.display()
                    );
                    break;
                }
            }
        }
        d
    }

    /// The next batch of the backlog (oldest first) that is neither acknowledged nor out;
    /// `None` when the cursor has caught up with the writer. An error is a read error that
    /// outlasted its retries: nothing was cut, and the same place is read again later (not
    /// before a pause that grows while the error lasts).
    pub fn next_backlog(&mut self) -> io::Result<Option<Batch>> {
        if let Some(s) = &self.stall
            && Instant::now() < s.until
        {
            return Err(s.error());
        }
        let mut payload = std::mem::take(&mut self.scratch);
        let result = self.next_backlog_into(&mut payload);
        self.scratch = payload;
        match &result {
            Err(e) => {
                let wait = self
                    .stall
                    .as_ref()
                    .map_or(STALL_FIRST, |s| (s.wait * 2).min(STALL_MAX));
                self.stall = Some(Stall {
                    until: Instant::now() + wait,
                    wait,
                    kind: e.kind(),
                    raw: e.raw_os_error(),
                    text: e.to_string(),
                });
            }
            Ok(_) => {
                if let Some(s) = self.stall.take() {
                    tracing::warn!(
                        "spool: the backlog reads again after a read error ({})",
                        s.text
                    );
                }
            }
        }
        result
    }

    fn next_backlog_into(&mut self, payload: &mut Vec<u8>) -> io::Result<Option<Batch>> {
        loop {
            let Some(idx) = self
                .segments
                .iter()
                .position(|s| s.first >= self.cursor.seg_first)
            else {
                return Ok(None);
            };
            let seg = self.segments[idx].clone();
            if seg.first != self.cursor.seg_first {
                self.cursor.seg_first = seg.first;
                self.cursor.offset = SEG_HEAD;
                self.cursor.reader = None;
            }
            let is_tail = idx + 1 == self.segments.len();
            if self.cursor.offset >= seg.bytes {
                if is_tail {
                    self.cursor.floor = self.cursor.floor.max(self.next_seq);
                    self.advance_base()?;
                    return Ok(None);
                }
                self.advance_segment(idx);
                continue;
            }
            if self.cursor.reader.is_none() {
                let r = SegmentReader::open(&seg.path, seg.bytes, &mut self.read_io)?;
                match r.magic() {
                    Magic::Good => {}
                    Magic::Damaged => self.mend_magic(&seg.path, seg.first, r.version()),
                    Magic::Short => {
                        // Shorter than the log knew: nothing in it.
                        if let Some(s) = self.segments.get_mut(idx) {
                            s.bytes = SEG_HEAD.min(s.bytes);
                        }
                        continue;
                    }
                }
                self.cursor.reader = Some(r);
            }
            let Some(reader) = self.cursor.reader.as_mut() else {
                continue;
            };
            let version = reader.version();
            let item = reader.next(
                self.cursor.offset,
                seg.bytes,
                payload,
                Read::Full,
                &mut self.read_io,
            )?;
            match item {
                Item::End => self.cursor.offset = seg.bytes,
                Item::Hole { end, .. } => self.cursor.offset = end,
                Item::Damage { at, end, frames } => self.damaged(idx, version, at, end, frames),
                Item::Frame { at, end, header } => {
                    self.frames_read += 1;
                    self.cursor.offset = end;
                    self.cursor.floor = self.cursor.floor.max(header.seq + 1);
                    let skip = header.seq < self.base
                        || self.acked.contains(header.seq)
                        || self.outstanding.contains_key(&header.seq);
                    if skip {
                        continue;
                    }
                    match frame::decode(header.seq, payload) {
                        Some(b) => {
                            self.outstanding
                                .insert(header.seq, (b.len() as u32, b.first_at));
                            self.cursor_at = Some(b.first_at);
                            return Ok(Some(b));
                        }
                        // Its CRC holds but it does not decode: damage all the same.
                        None => self.damaged(idx, version, at, end, 1),
                    }
                }
            }
        }
    }

    /// The cursor met damage `[at, end)` in segment `idx`: dealt with, and read past.
    fn damaged(&mut self, idx: usize, version: Version, at: u64, end: u64, frames: u64) {
        let Some(seg) = self.segments.get(idx).cloned() else {
            return;
        };
        let len = self.mend(&seg, version, at, end, frames, seg.bytes);
        if let Some(s) = self.segments.get_mut(idx) {
            s.bytes = len;
        }
        self.cursor.offset = end.min(len);
        if let Some(r) = self.cursor.reader.as_mut() {
            r.forget_cache();
        }
    }

    fn advance_segment(&mut self, idx: usize) {
        let next = self
            .segments
            .get(idx + 1)
            .map_or(self.next_seq, |s| s.first);
        self.cursor.floor = self.cursor.floor.max(next);
        self.cursor.seg_first = next;
        self.cursor.offset = SEG_HEAD;
        self.cursor.reader = None;
    }

    /// Batches appended and not yet acknowledged.
    pub fn unacked_batches(&self) -> u64 {
        let acked_above = self.acked.count_in(self.base, u64::MAX);
        self.next_seq
            .saturating_sub(self.base)
            .saturating_sub(acked_above)
    }

    /// The backlog on disk: bytes of the segments that hold an unacknowledged batch. Zero
    /// when every batch is acknowledged, although the segment being written stays (and a
    /// segment goes only once all of it is acknowledged): see `disk_bytes`.
    pub fn bytes(&self) -> u64 {
        let mut total = 0;
        for (i, s) in self.segments.iter().enumerate() {
            let end = self.segments.get(i + 1).map_or(self.next_seq, |n| n.first);
            let start = s.first.max(self.base);
            if end <= start {
                continue;
            }
            let acked = self.acked.count_in(start, end);
            if end - start > acked {
                total += s.bytes;
            }
        }
        total
    }

    /// Bytes of the segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.total_bytes()
    }

    /// Read errors met so far (retried, and those that outlasted their retries).
    pub fn read_io(&self) -> ReadIo {
        self.read_io
    }

    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Makes everything durable and writes the ack file compactly (a clean stop).
    pub fn close(mut self) -> io::Result<()> {
        self.sync()?;
        let base = self.done_below();
        self.acks.compact(base, &self.acked)
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }
}

/// Cuts a segment at `at` (never lengthens it) and makes the cut durable.
fn cut_at(path: &Path, at: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    if f.metadata()?.len() > at {
        f.set_len(at)?;
    }
    f.sync_all()
}

/// Marks damage `[at, end)` (at least a header long) as holes, so no reader counts it again.
fn mark_hole(path: &Path, at: u64, end: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    let max_skip = u64::from(u32::MAX) - HEADER as u64;
    let mut p = at;
    while end - p >= HEADER as u64 {
        let mut skip = (end - p - HEADER as u64).min(max_skip);
        let left = end - p - HEADER as u64 - skip;
        if left > 0 && left < HEADER as u64 {
            // Leave room for one more hole header.
            skip -= HEADER as u64;
        }
        f.write_all_at(&frame::hole(skip as u32), p)?;
        p += HEADER as u64 + skip;
    }
    f.sync_data()
}

fn ignore_not_found(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn prune_corrupt(dir: &Path) -> io::Result<()> {
    let mut files: Vec<_> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    let excess = files.len().saturating_sub(CORRUPT_KEEP);
    for f in files.into_iter().take(excess) {
        fs::remove_file(f).or_else(ignore_not_found)?;
    }
    Ok(())
}
