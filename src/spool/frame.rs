//! The on-disk framing of one batch: length, sequence number, CRC, payload.
//!
//! ```text
//! frame:   len: u32 LE | seq: u64 LE | crc32: u32 LE | payload (len bytes)
//! payload: first_at: i64 LE | last_at: i64 LE | n: u32 LE | clock: u8 (0: UTC, 1: boot)
//!          | boot id: 16 bytes (clock 1 only) | ends: n × u32 LE | body
//! ```
//! The CRC covers `len`, `seq` and the payload, so a zero-filled or torn tail never passes.

use crate::batch::Batch;

pub const HEADER: usize = 16;
/// No batch comes near this (128 KiB of records plus offsets); anything larger is damage.
pub const MAX_PAYLOAD: usize = 4 << 20;

pub fn encode(batch: &Batch, out: &mut Vec<u8>) {
    let start = out.len();
    let clock = if batch.boot.is_some() { 17 } else { 1 };
    let len = 20 + clock + 4 * batch.ends.len() + batch.body.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&batch.seq.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
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
    let crc = checksum(&out[start..start + 12], &out[start + HEADER..]);
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
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
    raw: [u8; 12],
}

pub fn header(bytes: &[u8; HEADER]) -> Option<Header> {
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if !(21..=MAX_PAYLOAD).contains(&len) {
        return None;
    }
    let mut raw = [0u8; 12];
    raw.copy_from_slice(&bytes[..12]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[4..12]);
    Some(Header {
        len,
        seq: u64::from_le_bytes(seq),
        crc: u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
        raw,
    })
}

impl Header {
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

    #[test]
    fn round_trip_and_any_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode(&batch(), &mut buf);
        let h = header(buf[..HEADER].try_into().expect("16 bytes")).expect("header");
        assert_eq!((h.len, h.seq), (buf.len() - HEADER, 42));
        assert!(h.verify(&buf[HEADER..]));
        assert_eq!(decode(h.seq, &buf[HEADER..]), Some(batch()));
        // Every bit, the length, the sequence number and the CRC included: the frame is
        // refused by the header check or by the CRC, whatever the flipped field decodes to.
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let ok = header(bad[..HEADER].try_into().expect("16 bytes"))
                .is_some_and(|h| h.verify(&bad[HEADER..]));
            assert!(!ok, "flipped bit {bit} went unnoticed");
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
    fn zeros_are_not_a_frame() {
        assert!(header(&[0; HEADER]).is_none());
    }
}
