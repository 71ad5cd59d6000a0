//! Which batches the broker has acknowledged, kept durably.
//!
//! ```text
//! acks: magic "RDLACK01" | base: u64 LE | crc32(base): u32 LE | entries…
//! entry: seq: u64 LE | crc32(seq): u32 LE
//! ```
//! Every sequence number below `base` is done (acknowledged, or never to be sent); each entry
//! is one more acknowledged batch above it. An entry is written at once (a killed process
//! loses none) and synced on the spool's interval; the file is rewritten atomically, with a
//! higher base and fewer entries, when it grows.

use super::seqset::SeqSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RDLACK01";
const HEAD: usize = 20;
const ENTRY: usize = 12;
/// Rewrite the file once it holds this many entries.
const COMPACT_AFTER: usize = 4096;

pub struct AckFile {
    path: PathBuf,
    file: File,
    /// Entries appended since the file was last written whole.
    entries: usize,
    dirty: bool,
}

/// The acknowledged state read back at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AckState {
    pub base: u64,
    pub above: SeqSet,
    /// Entries that failed their CRC (a torn last write); ignored.
    pub damaged: usize,
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Reads the acknowledged state without changing anything (for inspection).
pub fn read_state(dir: &Path) -> io::Result<AckState> {
    let path = dir.join("acks");
    let mut state = AckState::default();
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(state),
        Err(e) => return Err(e),
    }
    parse(&bytes, &mut state);
    Ok(state)
}

fn parse(bytes: &[u8], state: &mut AckState) {
    let head_ok = bytes.len() >= HEAD
        && &bytes[..8] == MAGIC
        && crc(&bytes[8..16]).to_le_bytes() == bytes[16..20];
    if head_ok {
        state.base = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
        for entry in bytes[HEAD..].chunks(ENTRY) {
            let good = entry.len() == ENTRY && crc(&entry[..8]).to_le_bytes() == entry[8..];
            if good {
                let seq = u64::from_le_bytes(entry[..8].try_into().unwrap_or([0; 8]));
                if seq >= state.base {
                    state.above.insert(seq);
                }
            } else {
                state.damaged += 1;
            }
        }
    } else if !bytes.is_empty() {
        // Unreadable: start from nothing acknowledged. The cost is duplicates, not loss.
        state.damaged += 1;
    }
}

impl AckFile {
    pub fn open(dir: &Path) -> io::Result<(AckFile, AckState)> {
        let path = dir.join("acks");
        let state = read_state(dir)?;
        let file = write_fresh(&path, state.base, &state.above)?;
        let entries = 0;
        Ok((
            AckFile {
                path,
                file,
                entries,
                dirty: false,
            },
            state,
        ))
    }

    /// Records one acknowledged batch (written now, synced later).
    pub fn append(&mut self, seq: u64) -> io::Result<()> {
        let mut entry = [0u8; ENTRY];
        entry[..8].copy_from_slice(&seq.to_le_bytes());
        entry[8..].copy_from_slice(&crc(&seq.to_le_bytes()).to_le_bytes());
        self.file.write_all(&entry)?;
        self.entries += 1;
        self.dirty = true;
        Ok(())
    }

    /// Makes the entries durable; rewrites the file when it has grown, with `base` and
    /// the acknowledged batches above it.
    pub fn sync(&mut self, base: u64, above: &SeqSet) -> io::Result<()> {
        // Counted since the last rewrite: when the base cannot move (batches held for a
        // clock that never came) the file is not rewritten at every sync.
        if self.entries >= COMPACT_AFTER {
            self.file = write_fresh(&self.path, base, above)?;
            self.entries = 0;
            self.dirty = false;
            return Ok(());
        }
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Rewrites the file now (at a clean stop, and when a base moved far).
    pub fn compact(&mut self, base: u64, above: &SeqSet) -> io::Result<()> {
        self.file = write_fresh(&self.path, base, above)?;
        self.entries = 0;
        self.dirty = false;
        Ok(())
    }
}

/// Writes a new ack file beside the old one, syncs it, and renames it into place.
fn write_fresh(path: &Path, base: u64, above: &SeqSet) -> io::Result<File> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = io::BufWriter::new(File::create(&tmp)?);
        f.write_all(MAGIC)?;
        f.write_all(&base.to_le_bytes())?;
        f.write_all(&crc(&base.to_le_bytes()).to_le_bytes())?;
        for seq in above.iter_from(base) {
            f.write_all(&seq.to_le_bytes())?;
            f.write_all(&crc(&seq.to_le_bytes()).to_le_bytes())?;
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    OpenOptions::new().append(true).open(path)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_survive_reopen_and_a_torn_entry_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut f, s) = AckFile::open(dir.path()).expect("open");
        assert_eq!(s, AckState::default());
        for seq in [3, 5, 9] {
            f.append(seq).expect("append");
        }
        drop(f);
        // A torn last write: half an entry.
        let mut raw = OpenOptions::new()
            .append(true)
            .open(dir.path().join("acks"))
            .expect("open raw");
        raw.write_all(&[1, 2, 3, 4, 5]).expect("write");
        drop(raw);
        let (mut f, s) = AckFile::open(dir.path()).expect("reopen");
        assert_eq!(s.above, SeqSet::from_iter([3, 5, 9]));
        assert_eq!(s.damaged, 1);
        f.compact(6, &SeqSet::from_iter([9])).expect("compact");
        drop(f);
        let (_, s) = AckFile::open(dir.path()).expect("reopen");
        assert_eq!((s.base, s.above), (6, SeqSet::from_iter([9])));
    }
}
