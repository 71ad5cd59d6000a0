//! `spool stats` and `spool export`: read a spool without changing it (for a pulled SD
//! card, or a stopped daemon).

use super::acks;
use super::frame::{self, HEADER};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub segments: usize,
    pub bytes: u64,
    pub unacked_batches: u64,
    pub unacked_readings: u64,
    pub oldest_ms: Option<i64>,
    pub newest_ms: Option<i64>,
    /// Damaged frames met while reading (the daemon cuts them at its next start).
    pub damaged_segments: u64,
    /// Copies of cut segments kept under `corrupt/`.
    pub corrupt_copies: usize,
    /// Unacknowledged batches stamped on a boot clock whose offset to UTC is not known.
    pub boot_clock_batches: u64,
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

/// Calls `each` with every unacknowledged batch's payload, oldest first.
fn walk(
    dir: &Path,
    report: &mut Report,
    mut each: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let state = acks::read_state(dir)?;
    let offsets = super::boots::read(&dir.join("boots"));
    for path in segments(dir)? {
        report.segments += 1;
        report.bytes += fs::metadata(&path)?.len();
        let mut r = BufReader::new(File::open(&path)?);
        let mut magic = [0u8; 8];
        if r.read_exact(&mut magic).is_err() || &magic != b"RDLSEG01" {
            report.damaged_segments += 1;
            continue;
        }
        let mut head = [0u8; HEADER];
        let mut payload = Vec::new();
        loop {
            match r.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let Some(h) = frame::header(&head) else {
                report.damaged_segments += 1;
                break;
            };
            payload.resize(h.len, 0);
            if r.read_exact(&mut payload).is_err() || !h.verify(&payload) {
                report.damaged_segments += 1;
                break;
            }
            if h.seq < state.base || state.above.contains(&h.seq) {
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
            each(h.seq, &payload)?;
        }
    }
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
                None => Some(crate::clock::boot_id_hex(&id)),
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
