//! Property tests of the spool log on a real filesystem: random sequences of append,
//! hand-out, acknowledge, restart, torn tails and flipped bytes keep the delivery guarantee,
//! and a flipped byte anywhere in any segment costs at most the frame that holds it
//! (resynchronisation on the next valid frame).

use proptest::prelude::*;
use redline_agent::sample::batch::Batch;
use redline_agent::spool::frame::{self, HEADER, Version};
use redline_agent::spool::{Options, SpoolLog};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Read,
    Ack(usize),
    Sync,
    Restart,
    TearTail(u16),
    /// Flips one byte: (which segment, which byte, with the log closed and reopened).
    Flip(u16, u32, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..40).prop_map(Op::Append),
        3 => Just(Op::Read),
        3 => any::<usize>().prop_map(Op::Ack),
        1 => Just(Op::Sync),
        1 => Just(Op::Restart),
        1 => any::<u16>().prop_map(Op::TearTail),
        2 => (any::<u16>(), any::<u32>(), any::<bool>()).prop_map(|(s, b, r)| Op::Flip(s, b, r)),
    ]
}

fn batch(tag: u64, records: u8) -> Batch {
    let mut body = Vec::new();
    let mut ends = Vec::new();
    for i in 0..records {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(format!("{{\"tag\":{tag},\"i\":{i}}}").as_bytes());
        ends.push(body.len() as u32);
    }
    Batch {
        seq: 0,
        first_at: tag as i64 * 1000,
        last_at: tag as i64 * 1000 + i64::from(records),
        body,
        ends,
        boot: None,
    }
}

fn opts(dir: &Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        segment_bytes: 4096,
        max_bytes: 1 << 30,
    }
}

/// A frame of a segment file, by the documented v2 layout: `[at, end)`, and its seq (`None`
/// for a hole). Damage is skipped up to the next valid frame, as a reader does.
#[derive(Debug, Clone, Copy)]
struct Frame {
    at: u64,
    end: u64,
    seq: Option<u64>,
}

fn frame_at(bytes: &[u8], at: usize) -> Option<Frame> {
    let h = frame::header(Version::V2, bytes.get(at..at + HEADER)?)?;
    let end = at + HEADER + h.len;
    let payload = bytes.get(at + HEADER..end)?;
    if !h.is_hole() && !h.verify(payload) {
        return None;
    }
    Some(Frame {
        at: at as u64,
        end: end as u64,
        seq: (!h.is_hole()).then_some(h.seq),
    })
}

fn frames(path: &Path) -> Vec<Frame> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let mut at = 8usize;
    let mut out = Vec::new();
    while at < bytes.len() {
        match frame_at(&bytes, at) {
            Some(f) => {
                out.push(f);
                at = f.end as usize;
            }
            None => at += 1,
        }
    }
    out
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "seg"))
                .collect()
        })
        .unwrap_or_default();
    segs.sort();
    segs
}

/// Flips one byte of one segment in place; the seq of the frame that held it (if any) may be
/// lost. Returns 1 if a byte was flipped.
fn flip(dir: &Path, which: u16, byte: u32, lost: &mut BTreeSet<u64>) -> u64 {
    let segs = segment_files(dir);
    if segs.is_empty() {
        return 0;
    }
    let seg = &segs[usize::from(which) % segs.len()];
    let bytes = std::fs::read(seg).expect("read");
    if bytes.is_empty() {
        return 0;
    }
    let pos = byte as usize % bytes.len();
    if let Some(seq) = frames(seg)
        .iter()
        .find(|f| f.at <= pos as u64 && (pos as u64) < f.end)
        .and_then(|f| f.seq)
    {
        lost.insert(seq);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(seg)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &[bytes[pos] ^ 0x5a], pos as u64).expect("flip");
    1
}

fn last_segment(dir: &Path) -> Option<std::path::PathBuf> {
    segment_files(dir).pop()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn the_log_never_loses_or_resends_what_it_must_not(ops in prop::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = SpoolLog::open(opts(dir.path())).expect("open");
        // seq -> the batch as appended
        let mut appended: BTreeMap<u64, Batch> = BTreeMap::new();
        let mut acked: BTreeSet<u64> = BTreeSet::new();
        let mut lost: BTreeSet<u64> = BTreeSet::new();
        let mut out: BTreeSet<u64> = BTreeSet::new();
        let mut read_since_start: Vec<u64> = Vec::new();
        let mut tag = 0u64;
        // Damage the log counted (over every reopen), and the damage done to it.
        let mut cuts = 0u64;
        let mut damage_done = 0u64;
        for op in ops {
            match op {
                Op::Append(n) => {
                    tag += 1;
                    let mut b = batch(tag, n);
                    log.append(&mut b).expect("append");
                    // Only a sequence number torn off before it was ever acknowledged may
                    // be given again.
                    prop_assert!(
                        !appended.contains_key(&b.seq) || lost.remove(&b.seq),
                        "seq {} reused", b.seq
                    );
                    prop_assert!(!acked.contains(&b.seq), "acknowledged seq {} reused", b.seq);
                    appended.insert(b.seq, b);
                }
                Op::Read => {
                    if let Some(b) = log.next_backlog().expect("read") {
                        prop_assert!(!acked.contains(&b.seq), "acked batch {} read again", b.seq);
                        prop_assert!(!out.contains(&b.seq), "batch {} handed out twice", b.seq);
                        prop_assert_eq!(Some(&b), appended.get(&b.seq), "content of {}", b.seq);
                        if let Some(&prev) = read_since_start.last() {
                            prop_assert!(b.seq > prev, "backlog out of order: {} after {}", b.seq, prev);
                        }
                        read_since_start.push(b.seq);
                        out.insert(b.seq);
                    }
                }
                Op::Ack(i) => {
                    if !out.is_empty() {
                        let seq = *out.iter().nth(i % out.len()).expect("in range");
                        out.remove(&seq);
                        log.ack(seq).expect("ack");
                        acked.insert(seq);
                    }
                }
                Op::Sync => log.sync().expect("sync"),
                Op::Restart => {
                    cuts += log.losses.corrupt_cuts;
                    drop(log);
                    log = SpoolLog::open(opts(dir.path())).expect("reopen");
                    out.clear();
                    read_since_start.clear();
                }
                Op::TearTail(k) => {
                    cuts += log.losses.corrupt_cuts;
                    drop(log);
                    if let Some(seg) = last_segment(dir.path()) {
                        let len = std::fs::metadata(&seg).expect("meta").len();
                        let cut = u64::from(k) % (len + 1);
                        let new_len = len - cut;
                        damage_done += u64::from(cut > 0);
                        for f in frames(&seg) {
                            if let (Some(seq), true) = (f.seq, f.end > new_len) {
                                lost.insert(seq);
                            }
                        }
                        let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open seg");
                        f.set_len(new_len).expect("truncate");
                    }
                    log = SpoolLog::open(opts(dir.path())).expect("reopen after tear");
                    out.clear();
                    read_since_start.clear();
                }
                Op::Flip(which, byte, reopen) => {
                    if reopen {
                        cuts += log.losses.corrupt_cuts;
                        drop(log);
                        damage_done += flip(dir.path(), which, byte, &mut lost);
                        log = SpoolLog::open(opts(dir.path())).expect("reopen after a flip");
                        out.clear();
                        read_since_start.clear();
                    } else {
                        // On the file under a running log, as a bit flip on the card.
                        log.sync().expect("sync");
                        damage_done += flip(dir.path(), which, byte, &mut lost);
                    }
                }
            }
            // The guarantee in one statement, after every step (see `SpoolLog::base_invariant`).
            if let Err(e) = log.base_invariant() {
                prop_assert!(false, "after {:?}: {}", op, e);
            }
        }
        // Drain: everything appended, not acknowledged, not torn away, not already out,
        // comes back exactly once.
        while let Some(b) = log.next_backlog().expect("drain") {
            prop_assert!(!acked.contains(&b.seq));
            prop_assert!(out.insert(b.seq), "batch {} handed out twice", b.seq);
        }
        let expected: BTreeSet<u64> = appended
            .keys()
            .copied()
            .filter(|s| !acked.contains(s) && !lost.contains(s))
            .collect();
        let missing: Vec<_> = expected.difference(&out).collect();
        prop_assert!(missing.is_empty(), "never delivered: {:?}", missing);
        // Each piece of damage is counted once at most (holes are not counted again).
        cuts += log.losses.corrupt_cuts;
        prop_assert!(cuts <= damage_done, "{} damage counts for {} damages", cuts, damage_done);
        // Acknowledging everything empties the log down to the segment being written.
        for seq in out.clone() {
            log.ack(seq).expect("ack");
        }
        prop_assert_eq!(log.unacked_batches(), 0);
        prop_assert!(log.segments() <= 1, "{} segments left", log.segments());
    }
}
