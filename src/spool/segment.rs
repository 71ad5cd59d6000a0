//! Reading the frames of one segment file: the one place where bytes on disk become frames,
//! holes or damage, used by every reader of the spool (start-up recovery, the backlog
//! cursor, the cap, the idle scan, `spool stats` and `spool export`).
//!
//! - An I/O error (EIO from a flaky SD card) is retried a few times with a short backoff,
//!   counted, and logged once; if it persists it is returned as an error. It is never taken
//!   for damage: only a framing or CRC failure is.
//! - Damage in a v2 segment ends at the next valid frame (found by its sync marker, its
//!   header CRC and its CRC) or at the end of the segment; in a v1 segment, which has no
//!   sync marker, at the end of the segment.

use super::frame::{self, HEADER, SUMMARY, SYNC, Version};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Waits before each retry of a failed read: four tries in all, 310 ms at most. (A failed
/// read-ahead is first narrowed to the bytes asked for, without a wait.)
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
];
/// Read-ahead: frames are small, segments are read front to back.
const CACHE: usize = 64 * 1024;

/// Read errors met on segment files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadIo {
    /// Reads tried again after an I/O error.
    pub retries: u64,
    /// Reads that still failed after every retry (returned as errors; nothing cut).
    pub failures: u64,
}

/// What a segment holds at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A valid frame `[at, end)`; its payload is in the caller's buffer (`Read::Full`), or
    /// its first `SUMMARY` bytes (`Read::Summary`).
    Frame {
        at: u64,
        end: u64,
        header: frame::Header,
    },
    /// Damage already dealt with (v2): skip `[at, end)`.
    Hole { at: u64, end: u64 },
    /// Bytes `[at, end)` that are no frame: `end` is the next valid frame or hole, or the end
    /// of the segment. `frames`: how many frames it held, as far as can be told (v2: the
    /// sync markers in it, the first one counted even with one or two of its bytes damaged;
    /// zeros hold none; v1: 1).
    Damage { at: u64, end: u64, frames: u64 },
    /// Nothing more before the limit.
    End,
}

/// How much of a frame to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// The whole payload, checked against its CRC.
    Full,
    /// The header (checked by its own CRC in v2) and the payload's summary, for counts.
    Summary,
}

/// The state of a segment's magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    Good,
    /// Fewer than 8 bytes: a segment torn while it was created (it holds no frame).
    Short,
    /// Not a known magic; the version was found from the frames after it.
    Damaged,
}

pub struct SegmentReader {
    file: File,
    path: PathBuf,
    version: Version,
    magic: Magic,
    /// Reads never go past this (the segment's length as the log knows it).
    limit: u64,
    cache: Vec<u8>,
    cache_at: u64,
}

impl SegmentReader {
    /// Opens a segment of `len` bytes and reads its magic.
    pub fn open(path: &Path, len: u64, io_stats: &mut ReadIo) -> io::Result<SegmentReader> {
        let mut r = SegmentReader {
            file: File::open(path)?,
            path: path.to_path_buf(),
            version: Version::V2,
            magic: Magic::Good,
            limit: len,
            cache: Vec::new(),
            cache_at: 0,
        };
        if len < frame::SEG_HEAD {
            r.magic = Magic::Short;
            return Ok(r);
        }
        let mut magic = [0u8; 8];
        match r.read_at(&mut magic, 0, io_stats) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                r.magic = Magic::Short;
                return Ok(r);
            }
            Err(e) => return Err(e),
        }
        match Version::of_magic(&magic) {
            Some(v) => r.version = v,
            None => {
                r.magic = Magic::Damaged;
                // A damaged magic: the first frame tells the format (v2 when none is valid,
                // so that the frames after the damage are still found).
                let mut scratch = Vec::new();
                let at = frame::SEG_HEAD;
                if r.frame_at(at, &mut scratch, Read::Full, io_stats)?
                    .is_none()
                {
                    r.version = Version::V1;
                    if r.frame_at(at, &mut scratch, Read::Full, io_stats)?
                        .is_none()
                    {
                        r.version = Version::V2;
                    }
                }
            }
        }
        Ok(r)
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn magic(&self) -> Magic {
        self.magic
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The segment was changed in place (a hole written, a cut): read it again from disk.
    pub fn forget_cache(&mut self) {
        self.cache.clear();
    }

    /// What the segment holds at `at`, reading no further than `limit`. An `Err` is an I/O
    /// error that persisted through the retries; nothing about the segment is known then.
    pub fn next(
        &mut self,
        at: u64,
        limit: u64,
        payload: &mut Vec<u8>,
        read: Read,
        io_stats: &mut ReadIo,
    ) -> io::Result<Item> {
        self.limit = limit;
        if self.cache_at.saturating_add(self.cache.len() as u64) > limit {
            self.cache.clear();
        }
        if at >= limit {
            return Ok(Item::End);
        }
        if let Some(item) = self.frame_at(at, payload, read, io_stats)? {
            return Ok(item);
        }
        let (end, frames) = match self.version {
            Version::V1 => (limit, 1),
            Version::V2 => self.resync(at, payload, io_stats)?,
        };
        Ok(Item::Damage { at, end, frames })
    }

    /// The valid frame or hole that starts at `at`, if there is one.
    fn frame_at(
        &mut self,
        at: u64,
        payload: &mut Vec<u8>,
        read: Read,
        io_stats: &mut ReadIo,
    ) -> io::Result<Option<Item>> {
        let hl = self.version.header_len();
        if at.saturating_add(hl as u64) > self.limit {
            return Ok(None);
        }
        let mut head = [0u8; HEADER];
        if !self.read_or_eof(&mut head[..hl], at, io_stats)? {
            return Ok(None);
        }
        let Some(header) = frame::header(self.version, &head[..hl]) else {
            return Ok(None);
        };
        let end = at + hl as u64 + header.len as u64;
        if end > self.limit {
            return Ok(None);
        }
        if header.is_hole() {
            return Ok(Some(Item::Hole { at, end }));
        }
        match read {
            Read::Full => {
                payload.resize(header.len, 0);
                if !self.read_or_eof(payload, at + hl as u64, io_stats)? || !header.verify(payload)
                {
                    return Ok(None);
                }
            }
            Read::Summary => {
                payload.resize(SUMMARY.min(header.len), 0);
                if !self.read_or_eof(payload, at + hl as u64, io_stats)? {
                    return Ok(None);
                }
            }
        }
        Ok(Some(Item::Frame { at, end, header }))
    }

    /// From damage at `at` (v2): the next offset where a valid frame or hole starts (or the
    /// limit), and how many frames the damaged bytes held (see `Item::Damage`).
    fn resync(
        &mut self,
        at: u64,
        payload: &mut Vec<u8>,
        io_stats: &mut ReadIo,
    ) -> io::Result<(u64, u64)> {
        let mut first = [0u8; 4];
        let n = (self.limit - at).min(4) as usize;
        let mut markers = 0u64;
        if self.read_or_eof(&mut first[..n], at, io_stats)? {
            let alike = first[..n]
                .iter()
                .zip(SYNC)
                .filter(|(a, b)| **a == *b)
                .count();
            // A whole marker is counted by the scan below; a damaged one here.
            if (2..SYNC.len()).contains(&alike) {
                markers = 1;
            }
        }
        let mut chunk = Vec::new();
        let mut from = at;
        while from < self.limit {
            let n = (self.limit - from).min(CACHE as u64) as usize;
            chunk.resize(n, 0);
            if !self.read_or_eof(&mut chunk, from, io_stats)? {
                break;
            }
            // A marker that starts in this chunk is looked at whole, even across its end.
            let mut i = 0;
            while let Some(k) = chunk[i..].iter().position(|&b| b == SYNC[0]) {
                let p = from + (i + k) as u64;
                i += k + 1;
                let whole = if i + SYNC.len() - 1 <= chunk.len() {
                    chunk[i - 1..i - 1 + SYNC.len()] == SYNC
                } else {
                    let mut m = [0u8; 4];
                    p + 4 <= self.limit && self.read_or_eof(&mut m, p, io_stats)? && m == SYNC
                };
                if !whole {
                    continue;
                }
                if p > at && self.frame_at(p, payload, Read::Full, io_stats)?.is_some() {
                    return Ok((p, markers));
                }
                markers += 1;
            }
            from += n as u64;
        }
        Ok((self.limit, markers))
    }

    /// `read_at`, with the end of the file as `false`.
    fn read_or_eof(&mut self, buf: &mut [u8], at: u64, io_stats: &mut ReadIo) -> io::Result<bool> {
        match self.read_at(buf, at, io_stats) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Fills `buf` from offset `at`, through the read-ahead cache (never past the limit).
    fn read_at(&mut self, buf: &mut [u8], at: u64, io_stats: &mut ReadIo) -> io::Result<()> {
        let len = buf.len() as u64;
        let cache_end = self.cache_at + self.cache.len() as u64;
        if at >= self.cache_at && at + len <= cache_end {
            let from = (at - self.cache_at) as usize;
            buf.copy_from_slice(&self.cache[from..from + buf.len()]);
            return Ok(());
        }
        if buf.len() >= CACHE {
            return self.pread(buf, at, io_stats);
        }
        let n = self.limit.saturating_sub(at).min(CACHE as u64) as usize;
        if n < buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut cache = std::mem::take(&mut self.cache);
        cache.resize(n, 0);
        if let Err(e) = self.pread_once(&mut cache, at) {
            cache.clear();
            self.cache = cache;
            // What was asked may still be readable: a bad sector further on in the read-ahead
            // (tried again, with the retries, on the exact bytes), or a file shorter than the
            // log knew.
            if e.kind() != io::ErrorKind::UnexpectedEof {
                io_stats.retries += 1;
            }
            return self.pread(buf, at, io_stats);
        }
        buf.copy_from_slice(&cache[..buf.len()]);
        self.cache = cache;
        self.cache_at = at;
        Ok(())
    }

    /// One positional read, retried on I/O errors (not at the end of the file).
    fn pread(&mut self, buf: &mut [u8], at: u64, io_stats: &mut ReadIo) -> io::Result<()> {
        let mut tries = 0;
        loop {
            match self.pread_once(buf, at) {
                Ok(()) => {
                    if tries > 0 {
                        tracing::warn!(
                            "spool: reading {} at byte {at} failed and succeeded after {tries} retr{} (a read error, not damage)",
                            self.path.display(),
                            if tries == 1 { "y" } else { "ies" }
                        );
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(e),
                Err(e) => match RETRY_DELAYS.get(tries) {
                    Some(&delay) => {
                        io_stats.retries += 1;
                        tries += 1;
                        std::thread::sleep(delay);
                    }
                    None => {
                        io_stats.failures += 1;
                        tracing::error!(
                            "spool: cannot read {} at byte {at} ({e}), {tries} retries: nothing is cut, the read is tried again later",
                            self.path.display()
                        );
                        return Err(e);
                    }
                },
            }
        }
    }

    fn pread_once(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        #[cfg(any(test, feature = "test-hooks"))]
        super::fault::check(&self.path, at, buf.len())?;
        self.file.read_exact_at(buf, at)
    }
}
