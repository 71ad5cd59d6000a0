//! The on-disk framing of one batch.
//!
//! A segment file starts with an 8-byte magic that names its format; every frame after it
//! holds one batch.
//!
//! ```text
//! segment v2: "RDLSEG02" | frames…   (written since spool format 2)
//!   frame: sync FF 52 44 4C ("\xFFRDL") | len: u32 LE | seq: u64 LE | crc: u32 LE
//!          | hcrc: u32 LE | payload (len bytes)
//!   crc:  CRC32 of len, seq and the payload
//!   hcrc: CRC32 of the 20 header bytes before it (sync, len, seq, crc)
//!   hole: seq = u64::MAX: the len bytes after the header are damage already counted and
//!         kept in corrupt/; a reader skips them (their CRC is not checked)
//! segment v1: "RDLSEG01" | frames…   (read, never written)
//!   frame: len: u32 LE | seq: u64 LE | crc: u32 LE (of len, seq, payload) | payload
//! payload: first_at: i64 LE | last_at: i64 LE | n: u32 LE | clock: u8 (0: UTC, 1: boot)
//!          | boot id: 16 bytes (clock 1 only) | ends: n × u32 LE | body
//! ```
//! The CRC covers the length and the sequence number, so a zero-filled or torn tail never
//! passes. In v2 the sync marker and the header's own CRC let a reader find the next frame
//! after damage (resynchronise): a damaged byte costs the frame that holds it, not the rest
//! of the segment. The marker's first byte, 0xFF, never occurs in UTF-8 (the JSON body).

use crate::sample::batch::Batch;

/// Segment formats, by their magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

pub const MAGIC_V1: &[u8; 8] = b"RDLSEG01";
pub const MAGIC_V2: &[u8; 8] = b"RDLSEG02";
/// Bytes before the first frame of a segment (the magic).
pub const SEG_HEAD: u64 = 8;
/// The sync marker that starts every v2 frame.
pub const SYNC: [u8; 4] = [0xFF, b'R', b'D', b'L'];
/// A v2 frame header.
pub const HEADER: usize = 24;
/// A v1 frame header.
pub const HEADER_V1: usize = 16;
/// The sequence number of a hole (skipped damage).
pub const HOLE_SEQ: u64 = u64::MAX;
/// The smallest payload (a batch of no record on the UTC clock).
pub const MIN_PAYLOAD: usize = 21;
/// No batch comes near this (128 KiB of records plus offsets); anything larger is damage.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Payload bytes that hold the record count and time span (see `summary`).
pub const SUMMARY: usize = 20;

impl Version {
    pub fn of_magic(magic: &[u8]) -> Option<Version> {
        match magic {
            m if m == MAGIC_V2 => Some(Version::V2),
            m if m == MAGIC_V1 => Some(Version::V1),
            _ => None,
        }
    }

    pub fn magic(self) -> &'static [u8; 8] {
        match self {
            Version::V1 => MAGIC_V1,
            Version::V2 => MAGIC_V2,
        }
    }

    pub fn header_len(self) -> usize {
        match self {
            Version::V1 => HEADER_V1,
            Version::V2 => HEADER,
        }
    }
}

/// Appends the batch as one v2 frame.
pub fn encode(batch: &Batch, out: &mut Vec<u8>) {
    let start = out.len();
    let clock = if batch.boot.is_some() { 17 } else { 1 };
    let len = 20 + clock + 4 * batch.ends.len() + batch.body.len();
    out.extend_from_slice(&SYNC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&batch.seq.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&batch.first_at.to_le_bytes());
    out.extend_from_slice(&batch.last_at.to_le_bytes());
    out.extend_from_slice(&(batch.ends.len() as u32).to_le_bytes());
    match &batch.boot {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(id);
        }
        None => out.push(0),
    }
    for e in &batch.ends {
        out.extend_from_slice(&e.to_le_bytes());
    }
    out.extend_from_slice(&batch.body);
    let crc = checksum(&out[start + 4..start + 16], &out[start + HEADER..]);
    out[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32fast::hash(&out[start..start + 20]);
    out[start + 20..start + 24].copy_from_slice(&hcrc.to_le_bytes());
}

/// The header of a hole: the `skip` bytes after it are damage, already counted.
pub fn hole(skip: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&SYNC);
    h[4..8].copy_from_slice(&skip.to_le_bytes());
    h[8..16].copy_from_slice(&HOLE_SEQ.to_le_bytes());
    let crc = checksum(&h[4..16], &[]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&hcrc.to_le_bytes());
    h
}

fn checksum(len_seq: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len_seq);
    h.update(payload);
    h.finalize()
}

/// What a frame header says: the payload length and sequence number, and its CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub seq: u64,
    crc: u32,
    /// The length and sequence number as stored (what the CRC covers with the payload).
    raw: [u8; 12],
    hole: bool,
}

fn le32(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

/// Parses a frame header (`version.header_len()` bytes): `None` if it cannot be one. A v2
/// header is checked by its own CRC, a v1 header only by the range of its length.
pub fn header(version: Version, bytes: &[u8]) -> Option<Header> {
    let (fields, crc) = match version {
        Version::V1 => (bytes.get(..12)?, le32(bytes.get(12..16)?)?),
        Version::V2 => {
            if bytes.get(..4)? != SYNC || le32(bytes.get(20..24)?)? != crc32fast::hash(&bytes[..20])
            {
                return None;
            }
            (bytes.get(4..16)?, le32(bytes.get(16..20)?)?)
        }
    };
    let mut raw = [0u8; 12];
    raw.copy_from_slice(fields);
    let len = le32(&raw)? as usize;
    let seq = u64::from_le_bytes(raw[4..12].try_into().ok()?);
    let hole = version == Version::V2 && seq == HOLE_SEQ;
    if !hole && !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
        return None;
    }
    Some(Header {
        len,
        seq,
        crc,
        raw,
        hole,
    })
}

impl Header {
    /// A hole (skipped damage), not a batch.
    pub fn is_hole(&self) -> bool {
        self.hole
    }

    pub fn verify(&self, payload: &[u8]) -> bool {
        payload.len() == self.len && checksum(&self.raw, payload) == self.crc
    }
}

/// Rebuilds the batch from a verified payload. `None` if the payload is inconsistent.
pub fn decode(seq: u64, payload: &[u8]) -> Option<Batch> {
    let first_at = i64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let last_at = i64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    let n = u32::from_le_bytes(payload.get(16..20)?.try_into().ok()?) as usize;
    let (boot, start) = match payload.get(20)? {
        0 => (None, 21usize),
        1 => (Some(payload.get(21..37)?.try_into().ok()?), 37),
        _ => return None,
    };
    let ends_end = start.checked_add(n.checked_mul(4)?)?;
    let ends_bytes = payload.get(start..ends_end)?;
    let body = payload.get(ends_end..)?.to_vec();
    let ends: Vec<u32> = ends_bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if ends.windows(2).any(|w| w[0] >= w[1])
        || ends.last().is_some_and(|&e| e as usize != body.len())
    {
        return None;
    }
    Some(Batch {
        seq,
        first_at,
        last_at,
        body,
        ends,
        boot,
    })
}

/// The boot id of a payload stamped on a boot clock (`None`: UTC).
pub fn boot(payload: &[u8]) -> Option<[u8; 16]> {
    match payload.get(20)? {
        1 => payload.get(21..37)?.try_into().ok(),
        _ => None,
    }
}

/// The record count and time span of a payload, without copying it.
pub fn summary(payload: &[u8]) -> Option<(usize, i64, i64)> {
    let first_at = i64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let last_at = i64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    let n = u32::from_le_bytes(payload.get(16..20)?.try_into().ok()?) as usize;
    Some((n, first_at, last_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            seq: 42,
            first_at: 1_000,
            last_at: 2_000,
            body: b"{\"a\":1},{\"a\":2}".to_vec(),
            ends: vec![7, 15],
            boot: None,
        }
    }

    fn accepted(buf: &[u8]) -> bool {
        header(Version::V2, &buf[..HEADER]).is_some_and(|h| h.verify(&buf[HEADER..]))
    }

    #[test]
    fn round_trip_and_any_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode(&batch(), &mut buf);
        let h = header(Version::V2, &buf[..HEADER]).expect("header");
        assert_eq!((h.len, h.seq), (buf.len() - HEADER, 42));
        assert!(h.verify(&buf[HEADER..]));
        assert_eq!(decode(h.seq, &buf[HEADER..]), Some(batch()));
        // Every bit, the sync marker, the length, the sequence number and both CRCs
        // included: the frame is refused by the header check or by the CRC.
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(!accepted(&bad), "flipped bit {bit} went unnoticed");
        }
    }

    #[test]
    fn a_damaged_header_is_refused_without_its_payload() {
        let mut buf = Vec::new();
        encode(&batch(), &mut buf);
        for bit in 0..HEADER * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                header(Version::V2, &bad[..HEADER]).is_none(),
                "flipped header bit {bit} passed the header CRC"
            );
        }
    }

    #[test]
    fn a_boot_clock_batch_round_trips() {
        let mut b = batch();
        b.boot = Some([9; 16]);
        let mut buf = Vec::new();
        encode(&b, &mut buf);
        assert_eq!(decode(42, &buf[HEADER..]), Some(b));
        assert_eq!(boot(&buf[HEADER..]), Some([9; 16]));
    }

    #[test]
    fn a_hole_is_a_header_of_its_own() {
        let h = header(Version::V2, &hole(1000)).expect("a hole header");
        assert!(h.is_hole());
        assert_eq!(h.len, 1000);
        let h = header(Version::V2, &hole(0)).expect("an empty hole");
        assert!(h.is_hole());
    }

    #[test]
    fn zeros_are_not_a_frame() {
        assert!(header(Version::V2, &[0; HEADER]).is_none());
        assert!(header(Version::V1, &[0; HEADER_V1]).is_none());
    }

    #[test]
    fn a_v1_header_still_parses() {
        // len 30, seq 7, crc of len, seq and 30 payload bytes.
        let payload = [3u8; 30];
        let mut head = Vec::new();
        head.extend_from_slice(&30u32.to_le_bytes());
        head.extend_from_slice(&7u64.to_le_bytes());
        let crc = checksum(&head, &payload);
        head.extend_from_slice(&crc.to_le_bytes());
        let h = header(Version::V1, &head).expect("v1 header");
        assert_eq!((h.len, h.seq), (30, 7));
        assert!(h.verify(&payload));
        assert!(!h.is_hole());
    }
}
