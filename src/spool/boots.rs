//! Per boot, the offset from its boot clock to UTC, once known: what converts readings
//! stamped while the wall clock was not trusted. Kept in the spool (`boots`), so the
//! conversion survives a restart of the agent within the same boot.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

pub struct Boots {
    path: PathBuf,
    offsets: HashMap<[u8; 16], i64>,
}

impl Boots {
    pub fn load(dir: &Path) -> Boots {
        let path = dir.join("boots");
        let offsets = read(&path);
        Boots { path, offsets }
    }

    pub fn get(&self, id: &[u8; 16]) -> Option<i64> {
        self.offsets.get(id).copied()
    }

    /// Records the offset of a boot (atomically rewritten; a failure is reported and the
    /// offset still used in memory).
    pub fn set(&mut self, id: [u8; 16], offset: i64) -> io::Result<()> {
        if self.offsets.insert(id, offset) == Some(offset) {
            return Ok(());
        }
        let mut text = String::new();
        for (id, off) in &self.offsets {
            text.push_str(&crate::clock::boot_id_hex(id));
            text.push(' ');
            text.push_str(&off.to_string());
            text.push('\n');
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// The offsets in a spool directory (read only; for `spool export`).
pub fn read(path: &Path) -> HashMap<[u8; 16], i64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(hex), Some(off)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(off) = off.parse::<i64>() else {
            continue;
        };
        if hex.len() != 32 {
            continue;
        }
        let mut id = [0u8; 16];
        let ok = (0..16).all(|i| {
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map(|b| id[i] = b)
                .is_ok()
        });
        if ok {
            out.insert(id, off);
        }
    }
    out
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
}
