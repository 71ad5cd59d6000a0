//! Property test of batches held for a clock (issue 12, item 5), on a real filesystem:
//! random sequences of appends (in UTC, or held on a boot clock whose offset is unknown),
//! hand-outs, acknowledgements, restarts and releases. A held batch never comes out of the
//! backlog before its boot's offset is known, never keeps the log's segments from going,
//! and comes out, converted, once released; nothing is lost.

use proptest::prelude::*;
use redline_agent::sample::batch::Batch;
use redline_agent::spool::{Options, SpoolLog};
use std::collections::BTreeSet;
use std::path::Path;

const BOOT: [u8; 16] = [0x42; 16];
const OFFSET: i64 = 1_700_000_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Hold(u8),
    Read,
    Ack(usize),
    Sync,
    Restart,
    Release,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..30).prop_map(Op::Append),
        4 => (1u8..30).prop_map(Op::Hold),
        3 => Just(Op::Read),
        3 => any::<usize>().prop_map(Op::Ack),
        1 => Just(Op::Sync),
        1 => Just(Op::Restart),
        1 => Just(Op::Release),
    ]
}

/// A batch whose `first_at` tells its tag (ms); held batches are on the boot clock.
fn batch(tag: u64, records: u8, held: bool) -> Batch {
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
        boot: held.then_some(BOOT),
    }
}

fn opts(dir: &Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        segment_bytes: 2048,
        max_bytes: 1 << 30,
    }
}

/// The tag of a batch out of the backlog (released ones were shifted by `OFFSET`).
fn tag_of(b: &Batch) -> (u64, bool) {
    if b.first_at >= OFFSET {
        (((b.first_at - OFFSET) / 1000) as u64, true)
    } else {
        ((b.first_at / 1000) as u64, false)
    }
}

/// Releases every held segment of `BOOT`.
fn release(log: &mut SpoolLog) {
    while log.release_step(&BOOT, OFFSET).expect("release").is_some() {}
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut log = SpoolLog::open(opts(dir.path())).expect("open");
    let mut next_tag = 0u64;
    let mut held_tags = BTreeSet::new();
    let mut all = BTreeSet::new();
    let mut delivered = BTreeSet::new();
    let mut handed: Vec<(u64, u64)> = Vec::new();
    let mut released = false;
    for op in ops {
        match op {
            Op::Append(n) => {
                let mut b = batch(next_tag, *n, false);
                log.append(&mut b).expect("append");
                all.insert(next_tag);
                next_tag += 1;
            }
            Op::Hold(n) => {
                let mut b = batch(next_tag, *n, true);
                if released {
                    // The offset is known: the batch is converted when it is read.
                    log.append(&mut b).expect("append");
                } else {
                    log.append_held(&b, BOOT).expect("append held");
                    held_tags.insert(next_tag);
                }
                all.insert(next_tag);
                next_tag += 1;
            }
            Op::Read => {
                if let Some(b) = log.next_backlog().expect("read") {
                    let (tag, shifted) = tag_of(&b);
                    prop_assert!(
                        !held_tags.contains(&tag) || (released && shifted && b.boot.is_none()),
                        "held batch {tag} out before its release"
                    );
                    handed.push((b.seq, tag));
                }
            }
            Op::Ack(i) => {
                if !handed.is_empty() {
                    let (seq, tag) = handed.remove(i % handed.len());
                    log.ack(seq).expect("ack");
                    delivered.insert(tag);
                }
            }
            Op::Sync => log.sync().expect("sync"),
            Op::Restart => {
                log.close().expect("close");
                log = SpoolLog::open(opts(dir.path())).expect("reopen");
                handed.clear();
            }
            Op::Release => {
                release(&mut log);
                released = true;
            }
        }
        // Held batches never pin the log: with nothing handed out and everything read, only
        // the segment being written stays.
        prop_assert!(log.segments() >= 1);
    }
    // The clock is known at last: everything comes out, nothing is lost.
    release(&mut log);
    for (seq, tag) in handed.drain(..) {
        log.ack(seq).expect("ack");
        delivered.insert(tag);
    }
    while let Some(b) = log.next_backlog().expect("read") {
        let (tag, _) = tag_of(&b);
        log.ack(b.seq).expect("ack");
        delivered.insert(tag);
    }
    prop_assert_eq!(&delivered, &all, "every batch delivered");
    prop_assert_eq!(log.held_counts().2, 0, "no held segment left");
    prop_assert_eq!(log.unacked_batches(), 0);
    prop_assert!(
        log.segments() <= 1,
        "acknowledged segments go: {}",
        log.segments()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn held_batches_are_kept_apart_and_released_whole(ops in proptest::collection::vec(op(), 1..120)) {
        run(&ops)?;
    }
}
