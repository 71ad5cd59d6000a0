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

/// Writes every unacknowledged record as one JSON line.
pub fn export(dir: &Path, out: &mut impl Write) -> io::Result<Report> {
    let mut report = Report::default();
    walk(dir, &mut report, |seq, payload| {
        if let Some(b) = frame::decode(seq, payload) {
            for rec in b.records() {
                out.write_all(rec)?;
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(report)
}
