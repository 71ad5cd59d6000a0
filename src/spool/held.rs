//! Batches held for a clock: stamped on a boot clock whose offset to UTC is not known (yet),
//! so they may not be published. They are kept out of the log's way, in segments of their
//! own under `held/`, one boot per segment:
//!
//! ```text
//! held/<order: 20 digits>-<n: 10 digits>-<boot id: 32 hex digits>.seg   (segment format 2)
//! ```
//! `order` is the log's next sequence number when the segment was started (the cap drops
//! the oldest segment of the log or of `held/`, by it); `n` numbers the held segments. Held
//! batches take no sequence number of the log, so they never keep a segment of the log from
//! being deleted. Start-up lists the directory and reads nothing; once the offset of a boot
//! is known, its segments are read (and nothing else) and their batches appended to the log
//! in UTC, a segment at a time.

use super::acks::sync_dir;
use super::frame;
use crate::sample::batch::Batch;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct HeldSeg {
    pub order: u64,
    pub n: u64,
    pub boot: [u8; 16],
    pub path: PathBuf,
    pub bytes: u64,
    /// Batches and readings in it: known for a segment written since the start, and for
    /// one counted by the idle scan; `None` until then.
    pub count: Option<(u64, u64)>,
}

pub struct HeldStore {
    dir: PathBuf,
    /// Oldest first (by `order`, then `n`).
    pub segs: Vec<HeldSeg>,
    /// The segment being appended to (its index in `segs` is found by `n`) and its file.
    tail: Option<(u64, File)>,
    dirty: bool,
    next_n: u64,
}

fn name(order: u64, n: u64, boot: &[u8; 16]) -> String {
    format!(
        "{order:020}-{n:010}-{}.seg",
        crate::ops::clock::boot_id_hex(boot)
    )
}

fn parse_name(name: &str) -> Option<(u64, u64, [u8; 16])> {
    let stem = name.strip_suffix(".seg")?;
    let mut parts = stem.split('-');
    let order = parts.next()?.parse().ok()?;
    let n = parts.next()?.parse().ok()?;
    let hex = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let line = format!("{hex} 0");
    let parsed = super::boots::parse(line.as_bytes());
    let boot = *parsed.offsets.keys().next()?;
    Some((order, n, boot))
}

/// The held segments of a spool directory, oldest first (read only; for `spool stats`).
pub fn list(dir: &Path) -> io::Result<Vec<HeldSeg>> {
    let held = dir.join("held");
    let mut segs = Vec::new();
    let entries = match fs::read_dir(&held) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(segs),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Some((order, n, boot)) = entry.file_name().to_str().and_then(parse_name) else {
            continue;
        };
        segs.push(HeldSeg {
            order,
            n,
            boot,
            path: entry.path(),
            bytes: entry.metadata()?.len(),
            count: None,
        });
    }
    segs.sort_by_key(|s| (s.order, s.n));
    Ok(segs)
}

impl HeldStore {
    /// Lists `held/` (nothing is read).
    pub fn open(dir: &Path) -> io::Result<HeldStore> {
        let segs = list(dir)?;
        let next_n = segs.iter().map(|s| s.n + 1).max().unwrap_or(0);
        Ok(HeldStore {
            dir: dir.join("held"),
            segs,
            tail: None,
            dirty: false,
            next_n,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.bytes).sum()
    }

    /// Held batches and readings known (see `HeldSeg::count`).
    pub fn counted(&self) -> (u64, u64) {
        self.segs
            .iter()
            .filter_map(|s| s.count)
            .fold((0, 0), |(b, r), (b2, r2)| (b + b2, r + r2))
    }

    pub fn has_boot(&self, boot: &[u8; 16]) -> bool {
        self.segs.iter().any(|s| &s.boot == boot)
    }

    pub fn boots(&self) -> Vec<[u8; 16]> {
        let mut v: Vec<[u8; 16]> = self.segs.iter().map(|s| s.boot).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn tail_n(&self) -> Option<u64> {
        self.tail.as_ref().map(|(n, _)| *n)
    }

    /// Appends a batch stamped on `boot`'s clock; `order`: the log's next sequence number.
    pub fn append(
        &mut self,
        batch: &Batch,
        boot: [u8; 16],
        order: u64,
        segment_bytes: u64,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let tail = self
            .tail_n()
            .and_then(|n| self.segs.iter().position(|s| s.n == n));
        let fits =
            tail.is_some_and(|i| self.segs[i].boot == boot && self.segs[i].bytes < segment_bytes);
        let idx = match (fits, tail) {
            (true, Some(i)) => i,
            _ => self.start(boot, order)?,
        };
        scratch.clear();
        frame::encode(batch, scratch);
        let Some((_, file)) = self.tail.as_mut() else {
            return Err(io::Error::other("no held segment open"));
        };
        if let Err(e) = file.write_all(scratch) {
            // A half frame is damage the reader skips; the next batch starts a new segment.
            self.tail = None;
            if let Ok(m) = fs::metadata(&self.segs[idx].path) {
                self.segs[idx].bytes = m.len();
            }
            return Err(e);
        }
        self.dirty = true;
        let seg = &mut self.segs[idx];
        seg.bytes += scratch.len() as u64;
        if let Some((b, r)) = seg.count.as_mut() {
            *b += 1;
            *r += batch.ends.len() as u64;
        }
        Ok(())
    }

    fn start(&mut self, boot: [u8; 16], order: u64) -> io::Result<usize> {
        self.sync()?;
        self.tail = None;
        fs::create_dir_all(&self.dir)?;
        let n = self.next_n;
        let path = self.dir.join(name(order, n, &boot));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        f.write_all(frame::MAGIC_V2)?;
        f.sync_all()?;
        sync_dir(&self.dir)?;
        drop(f);
        let file = OpenOptions::new().append(true).open(&path)?;
        self.next_n += 1;
        self.segs.push(HeldSeg {
            order,
            n,
            boot,
            path,
            bytes: frame::SEG_HEAD,
            count: Some((0, 0)),
        });
        self.tail = Some((n, file));
        Ok(self.segs.len() - 1)
    }

    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            if let Some((_, f)) = &self.tail {
                f.sync_data()?;
            }
            self.dirty = false;
        }
        Ok(())
    }

    /// Takes the oldest segment out of the list (for the cap, or to be released); never the
    /// one being appended to.
    pub fn take_oldest(&mut self, boot: Option<&[u8; 16]>) -> Option<HeldSeg> {
        let tail = self.tail_n();
        let idx = self
            .segs
            .iter()
            .position(|s| Some(s.n) != tail && boot.is_none_or(|b| &s.boot == b))?;
        Some(self.segs.remove(idx))
    }

    /// The oldest segment the cap may drop (never the one being appended to).
    pub fn oldest(&self) -> Option<&HeldSeg> {
        let tail = self.tail_n();
        self.segs.iter().find(|s| Some(s.n) != tail)
    }

    /// Stops appending to `boot`'s segment (its clock is known now: it is to be released).
    pub fn close_boot(&mut self, boot: &[u8; 16]) -> io::Result<()> {
        let tail_boot = self
            .tail_n()
            .and_then(|n| self.segs.iter().find(|s| s.n == n))
            .map(|s| s.boot);
        if tail_boot.as_ref() == Some(boot) {
            self.sync()?;
            self.tail = None;
        }
        Ok(())
    }

    /// Gives a segment taken out back (its release failed).
    pub fn put_back(&mut self, seg: HeldSeg) {
        self.segs.push(seg);
        self.segs.sort_by_key(|s| (s.order, s.n));
    }

    /// Removes a segment's file (released or dropped) and makes it durable.
    pub fn remove(&self, seg: &HeldSeg) -> io::Result<()> {
        match fs::remove_file(&seg.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_dir(&self.dir)
    }

    /// The next segment whose batches are not counted yet.
    pub fn uncounted(&self) -> Option<HeldSeg> {
        self.segs.iter().find(|s| s.count.is_none()).cloned()
    }

    pub fn set_count(&mut self, n: u64, count: (u64, u64)) {
        if let Some(s) = self.segs.iter_mut().find(|s| s.n == n) {
            s.count = Some(count);
        }
    }
}
