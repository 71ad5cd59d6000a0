//! The spool on disk: an append-only log of batches in segment files, a cursor that reads
//! the backlog oldest first, and the acknowledged state that lets whole segments go.
//!
//! Start-up reads the ack file and scans only the newest segment (to find where writing
//! resumes and to cut a torn tail); older segments are read lazily by the cursor, checked
//! frame by frame as they go out. Nothing acknowledged is scanned again.

use super::acks::{AckFile, sync_dir};
use super::frame::{self, HEADER};
use crate::batch::Batch;
use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RDLSEG01";
const SEG_HEAD: u64 = MAGIC.len() as u64;
const CORRUPT_KEEP: usize = 8;

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
}

/// Losses the delivery guarantee allows, each counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Losses {
    /// Readings in segments dropped at the size cap, never acknowledged.
    pub cap_readings: u64,
    pub cap_batches: u64,
    /// Bytes cut after a damaged frame (torn tail, bit flip), and how many times.
    pub corrupt_bytes: u64,
    pub corrupt_cuts: u64,
}

/// Read errors met on segment files: retried, and never taken for damage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadIo {
    /// Reads tried again after an I/O error.
    pub retries: u64,
    /// Reads that still failed after every retry (reported as an error, nothing cut).
    pub failures: u64,
}

/// What was dropped at the size cap, for the log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub readings: u64,
    pub batches: u64,
    pub first_at: Option<i64>,
    pub last_at: Option<i64>,
}

/// A segment file whose reads pass the test seam for injected I/O errors.
struct Hooked {
    file: File,
    #[cfg(any(test, feature = "test-hooks"))]
    path: PathBuf,
    #[cfg(any(test, feature = "test-hooks"))]
    pos: u64,
}

impl Hooked {
    fn open(path: &Path) -> io::Result<Hooked> {
        Ok(Hooked {
            file: File::open(path)?,
            #[cfg(any(test, feature = "test-hooks"))]
            path: path.to_path_buf(),
            #[cfg(any(test, feature = "test-hooks"))]
            pos: 0,
        })
    }
}

impl Read for Hooked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(any(test, feature = "test-hooks"))]
        super::fault::check(&self.path, self.pos, buf.len())?;
        let n = self.file.read(buf)?;
        #[cfg(any(test, feature = "test-hooks"))]
        {
            self.pos += n as u64;
        }
        Ok(n)
    }
}

impl Seek for Hooked {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let p = self.file.seek(to)?;
        #[cfg(any(test, feature = "test-hooks"))]
        {
            self.pos = p;
        }
        Ok(p)
    }
}

struct Cursor {
    /// Index into `segments` (by first seq, since segments come and go).
    seg_first: u64,
    offset: u64,
    reader: Option<BufReader<Hooked>>,
    /// Every seq below this has been read past (handed out, acknowledged or absent).
    floor: u64,
}

pub struct SpoolLog {
    opts: Options,
    segments: VecDeque<Segment>,
    tail: File,
    next_seq: u64,
    acks: AckFile,
    base: u64,
    acked: BTreeSet<u64>,
    outstanding: BTreeSet<u64>,
    cursor: Cursor,
    dirty: bool,
    pub losses: Losses,
    _lock: File,
    scratch: Vec<u8>,
    /// The next segment (by first seq) whose frame headers `scan_step` reads.
    scan_from: Option<u64>,
}

/// What the spool knows of one unacknowledged batch: its readings and sampling time (µs).
pub type Summary = (u32, i64);

fn seg_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn parse_seg_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

/// Reads the next frame at `offset`. `Ok(None)` at a clean end; `Err(offset)` at damage.
fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Option<frame::Header>, ()> {
    let mut head = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    let h = frame::header(&head).ok_or(())?;
    payload.resize(h.len, 0);
    r.read_exact(payload).map_err(|_| ())?;
    if !h.verify(payload) {
        return Err(());
    }
    Ok(Some(h))
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
                segments.push(Segment {
                    first,
                    path: entry.path(),
                    bytes: entry.metadata()?.len(),
                });
            }
        }
        segments.sort_by_key(|s| s.first);
        let mut log = SpoolLog {
            tail: File::open(&opts.dir)?, // replaced below
            opts,
            segments: segments.into(),
            next_seq: state.base,
            acks,
            base: state.base,
            acked: state.above,
            outstanding: BTreeSet::new(),
            cursor: Cursor {
                seg_first: 0,
                offset: SEG_HEAD,
                reader: None,
                floor: state.base,
            },
            dirty: false,
            losses: Losses::default(),
            _lock: lock,
            scratch: Vec::new(),
            scan_from: None,
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
        Ok(log)
    }

    /// Reads the frame headers of one more segment (oldest first) and adds what it holds
    /// unacknowledged to `known`. False once every segment present at start was read. Done a
    /// segment at a time while idle, so a start with a full spool is not delayed by it.
    pub fn scan_step(&mut self, known: &mut std::collections::BTreeMap<u64, Summary>) -> bool {
        let Some(first) = self.scan_from else {
            return false;
        };
        let Some(idx) = self.segments.iter().position(|s| s.first >= first) else {
            self.scan_from = None;
            return false;
        };
        let seg = self.segments[idx].clone();
        self.scan_from = self.segments.get(idx + 1).map(|s| s.first);
        let Ok(f) = File::open(&seg.path) else {
            return self.scan_from.is_some();
        };
        let mut r = BufReader::with_capacity(64 * 1024, f);
        let mut magic = [0u8; 8];
        if r.read_exact(&mut magic).is_err() {
            return self.scan_from.is_some();
        }
        let mut head = [0u8; HEADER];
        let mut summary = [0u8; 20];
        let mut offset = SEG_HEAD;
        while offset < seg.bytes && r.read_exact(&mut head).is_ok() {
            let Some(h) = frame::header(&head) else { break };
            if r.read_exact(&mut summary).is_err() {
                break;
            }
            // The CRC is checked when the frame is sent; here only the counts matter.
            if r.seek_relative(h.len as i64 - 20).is_err() {
                break;
            }
            offset += (HEADER + h.len) as u64;
            if h.seq < self.base || self.acked.contains(&h.seq) {
                continue;
            }
            if let Some((n, first_at, _)) = frame::summary(&summary) {
                known.entry(h.seq).or_insert((n as u32, first_at));
            }
        }
        self.scan_from.is_some()
    }

    /// Every seq below this is acknowledged, dropped or never existed.
    pub fn base(&self) -> u64 {
        self.done_below()
    }

    /// Scans the newest segment: where appends resume, and a torn or damaged tail cut off.
    fn recover_tail(&mut self) -> io::Result<()> {
        let Some(last) = self.segments.back().cloned() else {
            return self.start_segment(self.next_seq.max(self.base));
        };
        let mut r = BufReader::new(Hooked::open(&last.path)?);
        let mut magic = [0u8; 8];
        let magic_ok = r.read_exact(&mut magic).is_ok() && &magic == MAGIC;
        let mut good_end = SEG_HEAD;
        let mut last_seq = None;
        let mut payload = Vec::new();
        let mut damaged = !magic_ok;
        if magic_ok {
            loop {
                match read_frame(&mut r, &mut payload) {
                    Ok(Some(h)) => {
                        good_end += (HEADER + h.len) as u64;
                        last_seq = Some(h.seq);
                    }
                    Ok(None) => break,
                    Err(()) => {
                        damaged = true;
                        break;
                    }
                }
            }
        }
        drop(r);
        if damaged {
            if !magic_ok {
                good_end = 0;
            }
            self.cut(&last.path, good_end, last.bytes)?;
        }
        let file = OpenOptions::new().append(true).open(&last.path)?;
        if good_end == 0 {
            file.set_len(0)?;
            (&file).write_all(MAGIC)?;
            good_end = SEG_HEAD;
        }
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes = good_end;
        }
        self.tail = file;
        self.next_seq = last_seq.map_or(last.first, |s| s + 1).max(self.base);
        if let Some(&max_acked) = self.acked.iter().next_back() {
            self.next_seq = self.next_seq.max(max_acked + 1);
        }
        Ok(())
    }

    /// Keeps a copy of a damaged segment under `corrupt/` and cuts it at `good_end`.
    fn cut(&mut self, path: &Path, good_end: u64, len: u64) -> io::Result<()> {
        let corrupt = self.opts.dir.join("corrupt");
        fs::create_dir_all(&corrupt)?;
        if let Some(name) = path.file_name() {
            let stamp = crate::clock::wall_now_us() / 1_000_000;
            let mut dest = corrupt.join(name);
            dest.set_extension(format!("{stamp}.seg"));
            fs::copy(path, &dest)?;
            prune_corrupt(&corrupt)?;
        }
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(good_end)?;
        f.sync_all()?;
        self.losses.corrupt_bytes += len.saturating_sub(good_end);
        self.losses.corrupt_cuts += 1;
        tracing::error!(
            "spool segment {} is damaged at byte {good_end}: cut {} byte(s); a copy is in {}",
            path.display(),
            len.saturating_sub(good_end),
            corrupt.display()
        );
        Ok(())
    }

    fn start_segment(&mut self, first: u64) -> io::Result<()> {
        let path = self.opts.dir.join(seg_name(first));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        f.write_all(MAGIC)?;
        f.sync_all()?;
        sync_dir(&self.opts.dir)?;
        drop(f);
        self.tail = OpenOptions::new().append(true).open(&path)?;
        self.segments.push_back(Segment {
            first,
            path,
            bytes: SEG_HEAD,
        });
        Ok(())
    }

    /// Appends a batch, assigning its sequence number. Returns what the size cap dropped.
    pub fn append(&mut self, batch: &mut Batch) -> io::Result<Dropped> {
        let tail_full = self
            .segments
            .back()
            .is_none_or(|s| s.bytes >= self.opts.segment_bytes);
        if tail_full {
            if self.dirty {
                self.tail.sync_data()?;
                self.dirty = false;
            }
            self.start_segment(self.next_seq)?;
        }
        batch.seq = self.next_seq;
        self.scratch.clear();
        frame::encode(batch, &mut self.scratch);
        if let Err(e) = self.tail.write_all(&self.scratch) {
            // Leave no half frame behind for the next append to build on.
            if let Some(seg) = self.segments.back() {
                let _ = self.tail.set_len(seg.bytes);
            }
            return Err(e);
        }
        self.next_seq += 1;
        self.dirty = true;
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes += self.scratch.len() as u64;
        }
        self.enforce_cap()
    }

    /// Batches read from the backlog but kept back (their clock cannot be converted yet):
    /// they stay unacknowledged, and the cursor reads them again from `rewind_to`.
    pub fn release(&mut self, held: &BTreeSet<u64>) {
        let Some(&lowest) = held.iter().next() else {
            return;
        };
        for seq in held {
            self.outstanding.remove(seq);
        }
        let seg = self
            .segments
            .iter()
            .rev()
            .find(|s| s.first <= lowest)
            .or(self.segments.front())
            .map(|s| s.first);
        if let Some(first) = seg
            && first <= self.cursor.seg_first
        {
            self.cursor.seg_first = first;
            self.cursor.offset = SEG_HEAD;
            self.cursor.reader = None;
        }
        self.cursor.floor = self.cursor.floor.min(lowest);
    }

    /// A sequence number for a batch the disk would not take (kept in memory instead).
    pub fn reserve_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The batch just appended went out live: the cursor need not read it again.
    pub fn handed_live(&mut self, seq: u64) {
        self.outstanding.insert(seq);
    }

    pub fn sync(&mut self) -> io::Result<()> {
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
        if let Some(&o) = self.outstanding.iter().next() {
            w = w.min(o);
        }
        w.max(self.base)
    }

    /// The broker acknowledged batch `seq`.
    pub fn ack(&mut self, seq: u64) -> io::Result<()> {
        self.outstanding.remove(&seq);
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
            self.acked = self.acked.split_off(&w);
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
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.opts.dir)?;
        }
        Ok(())
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// At the size cap, drops the oldest whole segment, counting what was never delivered.
    fn enforce_cap(&mut self) -> io::Result<Dropped> {
        let mut dropped = Dropped::default();
        while self.total_bytes() > self.opts.max_bytes && self.segments.len() > 1 {
            let Some(s) = self.segments.pop_front() else {
                break;
            };
            let next_first = self.segments.front().map_or(self.next_seq, |n| n.first);
            if let Ok(f) = File::open(&s.path) {
                let mut r = BufReader::new(f);
                let mut magic = [0u8; 8];
                let mut payload = Vec::new();
                if r.read_exact(&mut magic).is_ok() {
                    while let Ok(Some(h)) = read_frame(&mut r, &mut payload) {
                        // A batch the publisher holds is no longer durable either: it is
                        // counted, and delivered after all if its PUBACK still comes.
                        self.outstanding.remove(&h.seq);
                        if h.seq < self.base || self.acked.contains(&h.seq) {
                            continue;
                        }
                        if let Some((n, first, last)) = frame::summary(&payload) {
                            dropped.readings += n as u64;
                            dropped.batches += 1;
                            dropped.first_at =
                                Some(dropped.first_at.map_or(first, |f| f.min(first)));
                            dropped.last_at = Some(dropped.last_at.map_or(last, |l| l.max(last)));
                        }
                    }
                }
            }
            fs::remove_file(&s.path).or_else(ignore_not_found)?;
            if self.cursor.seg_first <= s.first {
                self.cursor.seg_first = next_first;
                self.cursor.offset = SEG_HEAD;
                self.cursor.reader = None;
            }
            self.cursor.floor = self.cursor.floor.max(next_first);
            self.outstanding = self.outstanding.split_off(&next_first);
            self.base = self.base.max(next_first.min(self.done_below()));
        }
        if dropped.batches > 0 {
            sync_dir(&self.opts.dir)?;
            self.losses.cap_readings += dropped.readings;
            self.losses.cap_batches += dropped.batches;
        }
        Ok(dropped)
    }

    /// The next batch of the backlog (oldest first) that is neither acknowledged nor out;
    /// `None` when the cursor has caught up with the writer.
    pub fn next_backlog(&mut self) -> io::Result<Option<Batch>> {
        let mut payload = std::mem::take(&mut self.scratch);
        let result = self.next_backlog_into(&mut payload);
        self.scratch = payload;
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
                let mut f = Hooked::open(&seg.path)?;
                f.seek(SeekFrom::Start(self.cursor.offset))?;
                self.cursor.reader = Some(BufReader::with_capacity(64 * 1024, f));
            }
            let Some(reader) = self.cursor.reader.as_mut() else {
                continue;
            };
            match read_frame(reader, payload) {
                Ok(Some(h)) => {
                    self.cursor.offset += (HEADER + h.len) as u64;
                    self.cursor.floor = self.cursor.floor.max(h.seq + 1);
                    let skip = h.seq < self.base
                        || self.acked.contains(&h.seq)
                        || self.outstanding.contains(&h.seq);
                    if skip {
                        continue;
                    }
                    match frame::decode(h.seq, payload) {
                        Some(b) => {
                            self.outstanding.insert(h.seq);
                            return Ok(Some(b));
                        }
                        None => {
                            self.cut(
                                &seg.path,
                                self.cursor.offset - (HEADER + h.len) as u64,
                                seg.bytes,
                            )?;
                            self.after_cut(idx);
                        }
                    }
                }
                Ok(None) => {
                    // The writer's buffered end, or a segment shorter than we knew.
                    if is_tail {
                        self.cursor.reader = None;
                        self.cursor.floor = self.cursor.floor.max(self.next_seq);
                        self.advance_base()?;
                        return Ok(None);
                    }
                    self.advance_segment(idx);
                }
                Err(()) => {
                    self.cut(&seg.path, self.cursor.offset, seg.bytes)?;
                    self.after_cut(idx);
                }
            }
        }
    }

    fn after_cut(&mut self, idx: usize) {
        let offset = self.cursor.offset;
        if let Some(seg) = self.segments.get_mut(idx) {
            seg.bytes = offset;
        }
        self.cursor.reader = None;
        if idx + 1 == self.segments.len() {
            // The segment being written: appends continue after the cut.
            if let Ok(f) = OpenOptions::new()
                .append(true)
                .open(&self.segments[idx].path)
            {
                self.tail = f;
            }
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
        let acked_above = self.acked.range(self.base..).count() as u64;
        self.next_seq
            .saturating_sub(self.base)
            .saturating_sub(acked_above)
    }

    pub fn bytes(&self) -> u64 {
        self.total_bytes()
    }

    /// Bytes of the segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.total_bytes()
    }

    pub fn read_io(&self) -> ReadIo {
        ReadIo::default()
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
