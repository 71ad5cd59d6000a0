//! Per boot, the offset from its boot clock to UTC, once known: what converts readings
//! stamped while the wall clock was not trusted. Kept in the spool (`boots`), so the
//! conversion survives a restart of the agent within the same boot.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

pub struct Boots {
    path: PathBuf,
    offsets: HashMap<[u8; 16], i64>,
    /// Lines of the file that could not be read (logged at load).
    pub bad_lines: usize,
}

impl Boots {
    pub fn load(dir: &Path) -> Boots {
        let path = dir.join("boots");
        let parsed = parse_file(&path);
        if parsed.bad_lines > 0 {
            tracing::warn!(
                "spool: {} line(s) of {} are not `<boot id: 32 hex digits> <offset µs>`: ignored (readings of those boots stay held)",
                parsed.bad_lines,
                path.display()
            );
        }
        Boots {
            path,
            offsets: parsed.offsets,
            bad_lines: parsed.bad_lines,
        }
    }

    pub fn get(&self, id: &[u8; 16]) -> Option<i64> {
        self.offsets.get(id).copied()
    }

    /// Records the offset of a boot (atomically rewritten and its directory synced, so a
    /// power cut leaves the old file or the new one; a failure is reported and the offset
    /// still used in memory).
    pub fn set(&mut self, id: [u8; 16], offset: i64) -> io::Result<()> {
        if self.offsets.insert(id, offset) == Some(offset) {
            return Ok(());
        }
        let mut text = String::new();
        for (id, off) in &self.offsets {
            text.push_str(&crate::ops::clock::boot_id_hex(id));
            text.push(' ');
            text.push_str(&off.to_string());
            text.push('\n');
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        match self.path.parent() {
            Some(dir) => super::acks::sync_dir(dir),
            None => Ok(()),
        }
    }
}

/// What a `boots` file holds, and how many of its lines could not be read.
#[derive(Debug, Default)]
pub struct Parsed {
    pub offsets: HashMap<[u8; 16], i64>,
    pub bad_lines: usize,
}

/// The offsets in a spool directory (read only; for `spool export`).
pub fn read(path: &Path) -> HashMap<[u8; 16], i64> {
    parse_file(path).offsets
}

/// Reads a `boots` file; a missing file is empty, an unreadable one is logged.
pub fn parse_file(path: &Path) -> Parsed {
    match std::fs::read(path) {
        Ok(bytes) => parse(&bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Parsed::default(),
        Err(e) => {
            tracing::warn!(
                "spool: cannot read {} ({e}): readings stamped on a boot clock stay held",
                path.display()
            );
            Parsed::default()
        }
    }
}

/// One line per boot: its id in 32 hex digits, a space, the offset to UTC in µs. Any other
/// line (not UTF-8, not ASCII hex, a bad number) counts as bad and is skipped.
pub fn parse(bytes: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    for line in bytes.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(line) {
            Some((id, off)) => {
                out.offsets.insert(id, off);
            }
            None => out.bad_lines += 1,
        }
    }
    out
}

fn parse_line(line: &[u8]) -> Option<([u8; 16], i64)> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    let (hex, off) = (parts.next()?, parts.next()?);
    let off = off.parse::<i64>().ok()?;
    let hex = hex.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (b, pair) in id.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *b = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some((id, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_survive_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Boots::load(dir.path());
        assert_eq!(b.get(&[1; 16]), None);
        b.set([1; 16], 1_700_000_000_000_000).expect("set");
        b.set([2; 16], -5).expect("set");
        let b = Boots::load(dir.path());
        assert_eq!(b.get(&[1; 16]), Some(1_700_000_000_000_000));
        assert_eq!(b.get(&[2; 16]), Some(-5));
    }

    #[test]
    fn bad_lines_are_counted_never_a_panic() {
        // 32 bytes that are not 32 ASCII characters (a two-byte "é" across a hex pair), bad
        // UTF-8, a bad number, a short id, and a good line.
        let mut text = format!("a{}b 5\n", "é".repeat(15)).into_bytes();
        text.extend_from_slice(b"\xff\xfe 1\n");
        text.extend_from_slice(b"0123456789abcdef0123456789abcdef x\n");
        text.extend_from_slice(b"0123 1\n");
        text.extend_from_slice(b"0123456789ABCDEF0123456789abcdef -7\n\n");
        let p = parse(&text);
        assert_eq!(p.bad_lines, 4);
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef][i % 8];
        }
        assert_eq!(p.offsets.get(&id), Some(&-7));
        assert_eq!(p.offsets.len(), 1);
    }
}
