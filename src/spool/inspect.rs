//! `spool stats` and `spool export`: read a spool without changing it (for a pulled SD
//! card, or a stopped daemon).

use super::acks;
use super::frame::{self, SEG_HEAD, Version};
use super::segment::{Item, Magic, Read, ReadIo, SegmentReader};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub segments: usize,
    pub bytes: u64,
    pub unacked_batches: u64,
    pub unacked_readings: u64,
    pub oldest_ms: Option<i64>,
    pub newest_ms: Option<i64>,
    /// Segments with damage (the daemon deals with it when it reads them: cut, or marked as
    /// a hole so that it is counted once). The frames after damage are still read.
    pub damaged_segments: u64,
    /// The damaged bytes met.
    pub damaged_bytes: u64,
    /// Segments in the old format (`RDLSEG01`), read as they are.
    pub old_format_segments: u64,
    /// Copies of damaged segments kept under `corrupt/`.
    pub corrupt_copies: usize,
    /// Unacknowledged batches stamped on a boot clock whose offset to UTC is not known.
    pub boot_clock_batches: u64,
    /// Reads retried after an I/O error.
    pub read_retries: u64,
    /// Segments under `held/` (batches held for a clock, out of the log's way).
    pub held_segments: u64,
}

fn segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    Ok(segs)
}

/// Calls `each` with every unacknowledged batch's payload, oldest first. A read error that
/// outlasts its retries is returned (it is not damage).
fn walk(
    dir: &Path,
    report: &mut Report,
    mut each: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let state = acks::read_state(dir)?;
    let offsets = super::boots::read(&dir.join("boots"));
    let mut io_stats = ReadIo::default();
    let mut payload = Vec::new();
    // The log's segments, then the held ones (batches held for a clock: none acknowledged).
    let held: Vec<PathBuf> = super::held::list(dir)?
        .into_iter()
        .map(|h| h.path)
        .collect();
    let log_segments = segments(dir)?;
    let n_log = log_segments.len();
    for (i, path) in log_segments.into_iter().chain(held).enumerate() {
        let is_held = i >= n_log;
        report.held_segments += u64::from(is_held);
        report.segments += 1;
        let len = fs::metadata(&path)?.len();
        report.bytes += len;
        let mut r = SegmentReader::open(&path, len, &mut io_stats)?;
        let mut damaged = match r.magic() {
            Magic::Good => false,
            Magic::Damaged => true,
            Magic::Short => {
                report.damaged_segments += u64::from(len > 0);
                continue;
            }
        };
        if r.version() == Version::V1 {
            report.old_format_segments += 1;
        }
        let mut at = SEG_HEAD;
        loop {
            match r.next(at, len, &mut payload, Read::Full, &mut io_stats)? {
                Item::End => break,
                Item::Hole { end, .. } => at = end,
                Item::Damage { at: bad, end, .. } => {
                    damaged = true;
                    report.damaged_bytes += end - bad;
                    at = end;
                }
                Item::Frame { end, header, .. } => {
                    at = end;
                    let seq = header.seq;
                    if !is_held && (seq < state.base || state.above.contains(seq)) {
                        continue;
                    }
                    if frame::boot(&payload).is_some_and(|id| !offsets.contains_key(&id)) {
                        report.boot_clock_batches += 1;
                    }
                    if let Some((n, first, last)) = frame::summary(&payload) {
                        report.unacked_batches += 1;
                        report.unacked_readings += n as u64;
                        let (first, last) = (first.div_euclid(1000), last.div_euclid(1000));
                        report.oldest_ms = Some(report.oldest_ms.map_or(first, |o| o.min(first)));
                        report.newest_ms = Some(report.newest_ms.map_or(last, |o| o.max(last)));
                    }
                    each(seq, &payload)?;
                }
            }
        }
        report.damaged_segments += u64::from(damaged);
    }
    report.read_retries = io_stats.retries;
    report.corrupt_copies = fs::read_dir(dir.join("corrupt")).map_or(0, |d| d.count());
    Ok(())
}

pub fn stats(dir: &Path) -> io::Result<Report> {
    let mut report = Report::default();
    walk(dir, &mut report, |_, _| Ok(()))?;
    Ok(report)
}

/// Writes every unacknowledged record as one JSON line. Records stamped on a boot clock
/// are converted to UTC when that boot's offset is known; otherwise they keep their
/// boot-relative `timestamp` (milliseconds since that boot) and say so with
/// `"timestamp_clock":"boot"` and the `boot_id`: never an invented time.
pub fn export(dir: &Path, out: &mut impl Write) -> io::Result<Report> {
    let mut report = Report::default();
    let offsets = super::boots::read(&dir.join("boots"));
    walk(dir, &mut report, |seq, payload| {
        let Some(mut b) = frame::decode(seq, payload) else {
            return Ok(());
        };
        let unconverted = match b.boot {
            Some(id) => match offsets.get(&id) {
                Some(&offset) => {
                    b.shift_timestamps(offset);
                    None
                }
                None => Some(crate::ops::clock::boot_id_hex(&id)),
            },
            None => None,
        };
        for rec in b.records() {
            match (&unconverted, rec.split_last()) {
                (Some(id), Some((b'}', head))) => {
                    out.write_all(head)?;
                    write!(out, ",\"timestamp_clock\":\"boot\",\"boot_id\":\"{id}\"}}")?;
                }
                _ => out.write_all(rec)?,
            }
            out.write_all(b"\n")?;
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(report)
}
