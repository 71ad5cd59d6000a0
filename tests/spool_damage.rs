//! The spool log against damage and faults, on real files: a flipped byte costs only the
//! frame that holds it (resynchronisation), a read error is retried and never taken for
//! damage, an old-format spool is still read, and the small holes of issue 12 (the cap path
//! counts before it reports an error, the `boots` rename is followed by a directory sync, a
//! non-ASCII boot id is a parse error, backlog bytes are zero with zero batches).
//!
//! Segment files are parsed here by their documented layout, independently of the agent:
//! ```text
//! segment v2: "RDLSEG02" | frames…
//!   frame: sync FF 52 44 4C | len u32 LE | seq u64 LE | crc u32 LE | hcrc u32 LE | payload
//!   (hole: seq = u64::MAX, the len bytes after the header are skipped damage)
//! segment v1: "RDLSEG01" | frames…   frame: len u32 LE | seq u64 LE | crc u32 LE | payload
//! payload: first_at i64 LE | last_at i64 LE | n u32 LE | …
//! ```

use redline_agent::sample::batch::Batch;
use redline_agent::spool::{Options, SpoolLog};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const VEHICLE: &str = "GT3-RACER-01";
const SESSION: &str = "5f0c7a52-9a7e-4a7c-8f0e-1d2b3c4d5e6f";
const T0_MS: i64 = 1_705_267_200_000;

/// A realistic batch: `n` records as the agent writes them, 100 ms apart, from batch `k`.
fn batch(k: u64, n: u32) -> Batch {
    let mut body = Vec::new();
    let mut ends = Vec::new();
    let t0 = T0_MS + k as i64 * 1000;
    for i in 0..i64::from(n) {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(
            format!(
                "{{\"vehicle_id\":\"{VEHICLE}\",\"timestamp\":{},\"session_id\":\"{SESSION}\",\"brake_disc_temp_fl\":{:.1},\"brake_disc_temp_fr\":{:.1},\"engine_rpm\":{},\"engine_oil_temp\":{:.1}}}",
                t0 + i * 100,
                600.0 + (k % 97) as f64,
                590.0 + (k % 89) as f64,
                6000 + (k * 37 + i as u64) % 2500,
                104.0 + (k % 7) as f64 / 10.0
            )
            .as_bytes(),
        );
        ends.push(body.len() as u32);
    }
    Batch {
        seq: 0,
        first_at: t0 * 1000,
        last_at: (t0 + (i64::from(n) - 1) * 100) * 1000,
        body,
        ends,
        boot: None,
    }
}

/// The readings of a batch, by their timestamps (ms).
fn readings(b: &Batch) -> Vec<i64> {
    let n = b.ends.len() as i64;
    (0..n).map(|i| b.first_at / 1000 + i * 100).collect()
}

fn opts(dir: &Path, segment_bytes: u64, max_bytes: u64) -> Options {
    Options {
        dir: dir.to_path_buf(),
        segment_bytes,
        max_bytes,
    }
}

/// Writes `batches` batches of 10 readings into a new spool and closes it.
fn build(dir: &Path, segment_bytes: u64, batches: u64) -> BTreeSet<i64> {
    let mut log = SpoolLog::open(opts(dir, segment_bytes, 1 << 30)).expect("open");
    let mut all = BTreeSet::new();
    for k in 0..batches {
        let mut b = batch(k, 10);
        log.append(&mut b).expect("append");
        all.extend(readings(&b));
    }
    log.close().expect("close");
    all
}

/// Opens the spool and reads the whole backlog: the readings it hands out, and the log.
fn drain(dir: &Path, segment_bytes: u64) -> (BTreeSet<i64>, SpoolLog) {
    let mut log = SpoolLog::open(opts(dir, segment_bytes, 1 << 30)).expect("open");
    let mut got = BTreeSet::new();
    while let Some(b) = log.next_backlog().expect("read the backlog") {
        for t in readings(&b) {
            assert!(got.insert(t), "reading {t} handed out twice");
        }
    }
    (got, log)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// One frame of a segment, by the documented layout: where it starts and ends, its seq and
/// its readings' timestamps; `None` for a hole.
#[derive(Debug, Clone)]
struct Frame {
    at: usize,
    end: usize,
    seq: Option<u64>,
    readings: Vec<i64>,
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// The frames of an intact segment (either format).
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let v2 = match &bytes[..8] {
        b"RDLSEG02" => true,
        b"RDLSEG01" => false,
        m => panic!("unknown segment magic {m:?}"),
    };
    let head = if v2 { 24 } else { 16 };
    let mut out = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let (len, seq) = if v2 {
            assert_eq!(&bytes[at..at + 4], b"\xFFRDL", "sync marker at {at}");
            (le32(&bytes[at + 4..]) as usize, le64(&bytes[at + 8..]))
        } else {
            (le32(&bytes[at..]) as usize, le64(&bytes[at + 4..]))
        };
        let end = at + head + len;
        assert!(end <= bytes.len(), "frame at {at} runs past the end");
        let (seq, readings) = if v2 && seq == u64::MAX {
            (None, Vec::new())
        } else {
            let p = &bytes[at + head..end];
            let first_ms = le64(p) as i64 / 1000;
            let n = le32(&p[16..]);
            (
                Some(seq),
                (0..i64::from(n)).map(|i| first_ms + i * 100).collect(),
            )
        };
        out.push(Frame {
            at,
            end,
            seq,
            readings,
        });
        at = end;
    }
    out
}

fn flip(path: &Path, pos: usize) {
    let mut bytes = std::fs::read(path).expect("read segment");
    bytes[pos] ^= 0x10;
    std::fs::write(path, &bytes).expect("write segment");
}

const SEG_64K: u64 = 64 << 10;

/// The figure of issue 12, item 4: one flipped byte in the middle of a 64 KiB segment of 31
/// frames of 10 readings. Before spool format 2 (this test at commit 23a3bc9) it cost 160
/// readings (the damaged frame and every frame after it in the segment, 33,856 bytes cut);
/// now it costs the 10 readings of the damaged frame (its 2,124 bytes).
#[test]
fn one_flipped_byte_in_a_64k_segment_costs_only_its_frame() {
    let work = tempfile::tempdir().expect("tempdir");
    let orig = work.path().join("orig");
    let all = build(&orig, SEG_64K, 150);
    let segs = segment_files(&orig);
    assert!(segs.len() >= 4, "several 64 KiB segments: {segs:?}");
    let seg0 = std::fs::read(&segs[0]).expect("read");
    let layout = frames(&seg0);
    let pos = seg0.len() / 2;
    let victim = layout
        .iter()
        .find(|f| f.at <= pos && pos < f.end)
        .expect("a frame holds the middle byte");

    let dir = work.path().join("flipped");
    copy_dir(&orig, &dir);
    flip(&dir.join(segs[0].file_name().expect("name")), pos);
    let (got, log) = drain(&dir, SEG_64K);
    let lost: BTreeSet<i64> = all.difference(&got).copied().collect();
    eprintln!(
        "one flipped byte (byte {pos} of a {} byte segment, {} frames of 10 readings): {} readings lost, \
         corrupt_cuts={} corrupt_bytes={}",
        seg0.len(),
        layout.len(),
        lost.len(),
        log.losses.corrupt_cuts,
        log.losses.corrupt_bytes
    );
    let expected: BTreeSet<i64> = victim.readings.iter().copied().collect();
    assert_eq!(
        lost, expected,
        "only the readings of the damaged frame (at byte {}) may be lost",
        victim.at
    );
    assert_eq!(lost.len(), 10);
    assert_eq!(log.losses.corrupt_cuts, 1, "the damage is counted once");
    assert_eq!(
        log.losses.corrupt_bytes,
        (victim.end - victim.at) as u64,
        "the damaged frame's bytes are counted"
    );
    drop(log);
    // The damage was dealt with: a new start finds nothing more to count, and the copy of
    // the damaged segment is kept.
    let (again, log) = drain(&dir, SEG_64K);
    assert_eq!(again, got, "the same readings after a restart");
    assert_eq!(
        log.losses.corrupt_cuts, 0,
        "the damage is not counted twice"
    );
    let copies = std::fs::read_dir(dir.join("corrupt"))
        .expect("corrupt/")
        .count();
    assert_eq!(copies, 1, "one copy of the damaged segment");
}

/// Every position of a segment, sampled: a flipped byte costs exactly the frame that holds
/// it (nothing for the segment's magic).
#[test]
fn a_flipped_byte_anywhere_costs_only_its_frame() {
    let work = tempfile::tempdir().expect("tempdir");
    let orig = work.path().join("orig");
    let all = build(&orig, SEG_64K, 80);
    let segs = segment_files(&orig);
    let name = segs[0].file_name().expect("name").to_owned();
    let seg0 = std::fs::read(&segs[0]).expect("read");
    let layout = frames(&seg0);
    // The magic, every byte of the first two frame headers, then a stride across the rest.
    let mut positions: Vec<usize> = (0..8 + 2 * 24).collect();
    positions.extend((8 + 2 * 24..seg0.len()).step_by(251));
    positions.push(seg0.len() - 1);
    let mut worst = 0;
    for (i, &pos) in positions.iter().enumerate() {
        let dir = work.path().join(format!("p{i}"));
        copy_dir(&orig, &dir);
        flip(&dir.join(&name), pos);
        let (got, log) = drain(&dir, SEG_64K);
        let lost: BTreeSet<i64> = all.difference(&got).copied().collect();
        let expected: BTreeSet<i64> = layout
            .iter()
            .find(|f| f.at <= pos && pos < f.end)
            .map(|f| f.readings.iter().copied().collect())
            .unwrap_or_default();
        assert_eq!(
            lost, expected,
            "byte {pos}: only the readings of the frame holding it may be lost"
        );
        assert_eq!(log.losses.corrupt_cuts, 1, "byte {pos}: counted once");
        assert_eq!(
            log.losses.corrupt_frames,
            u64::from(pos >= 8),
            "byte {pos}: the frames the damage held"
        );
        worst = worst.max(lost.len());
        drop(log);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
    eprintln!(
        "{} positions of a {} byte segment flipped one at a time: at most {worst} readings lost each",
        positions.len(),
        seg0.len()
    );
}

/// The tail's end: zeros after the last frame cost nothing; a torn last frame costs itself.
#[test]
fn zeros_after_the_tail_and_a_torn_tail_are_cut() {
    let work = tempfile::tempdir().expect("tempdir");
    let orig = work.path().join("orig");
    let all = build(&orig, SEG_64K, 40);
    let tail = segment_files(&orig).pop().expect("a segment");
    let name = tail.file_name().expect("name").to_owned();
    let bytes = std::fs::read(&tail).expect("read");
    let layout = frames(&bytes);

    let zeros = work.path().join("zeros");
    copy_dir(&orig, &zeros);
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0u8; 4096]);
    std::fs::write(zeros.join(&name), &padded).expect("write");
    let (got, log) = drain(&zeros, SEG_64K);
    assert_eq!(got, all, "zeros damage no frame");
    assert_eq!(
        (
            log.losses.corrupt_cuts,
            log.losses.corrupt_bytes,
            log.losses.corrupt_frames
        ),
        (1, 4096, 0)
    );
    drop(log);
    assert_eq!(
        std::fs::read(zeros.join(&name)).expect("read"),
        bytes,
        "cut back to the last frame"
    );

    let torn = work.path().join("torn");
    copy_dir(&orig, &torn);
    let last = layout.last().expect("a frame");
    let cut = (last.at + last.end) / 2;
    std::fs::write(torn.join(&name), &bytes[..cut]).expect("write");
    let (got, mut log) = drain(&torn, SEG_64K);
    let lost: BTreeSet<i64> = all.difference(&got).copied().collect();
    assert_eq!(lost, last.readings.iter().copied().collect());
    assert_eq!(
        (
            log.losses.corrupt_cuts,
            log.losses.corrupt_bytes,
            log.losses.corrupt_frames
        ),
        (1, (cut - last.at) as u64, 1)
    );
    // Appends go on after the cut, in a segment that reads clean.
    let mut b = batch(999, 10);
    log.append(&mut b).expect("append");
    assert_eq!(
        b.seq,
        last.seq.expect("a batch"),
        "the torn batch's seq is free again"
    );
    drop(log);
    let f = frames(&std::fs::read(torn.join(&name)).expect("read"));
    assert_eq!(f.last().and_then(|f| f.seq), Some(b.seq));
}

/// Writes a spool in the old format (segments `RDLSEG01`, 16-byte frame headers) by hand.
fn write_v1_spool(dir: &Path, batches: u64, per_segment: u64) -> BTreeSet<i64> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut all = BTreeSet::new();
    let mut seq = 0u64;
    while seq < batches {
        let mut bytes = b"RDLSEG01".to_vec();
        let first = seq;
        while seq < batches && seq < first + per_segment {
            let b = batch(seq, 10);
            all.extend(readings(&b));
            let mut payload = Vec::new();
            payload.extend_from_slice(&b.first_at.to_le_bytes());
            payload.extend_from_slice(&b.last_at.to_le_bytes());
            payload.extend_from_slice(&(b.ends.len() as u32).to_le_bytes());
            payload.push(0);
            for e in &b.ends {
                payload.extend_from_slice(&e.to_le_bytes());
            }
            payload.extend_from_slice(&b.body);
            let mut head = Vec::new();
            head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            head.extend_from_slice(&seq.to_le_bytes());
            let mut h = crc32fast::Hasher::new();
            h.update(&head);
            h.update(&payload);
            head.extend_from_slice(&h.finalize().to_le_bytes());
            bytes.extend_from_slice(&head);
            bytes.extend_from_slice(&payload);
            seq += 1;
        }
        std::fs::write(dir.join(format!("{first:020}.seg")), &bytes).expect("write segment");
    }
    all
}

#[test]
fn an_old_format_spool_is_read_and_new_segments_are_written_in_the_new_one() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("v1");
    let all = write_v1_spool(&dir, 40, 15);
    let before = segment_files(&dir);
    assert_eq!(before.len(), 3);
    let mut log = SpoolLog::open(opts(&dir, SEG_64K, 1 << 30)).expect("open a v1 spool");
    let mut b = batch(1000, 10);
    log.append(&mut b).expect("append");
    assert_eq!(
        b.seq, 40,
        "appends continue after the old spool's last batch"
    );
    let mut got = BTreeSet::new();
    while let Some(b) = log.next_backlog().expect("read") {
        got.extend(readings(&b));
    }
    let mut want = all.clone();
    want.extend(readings(&batch(1000, 10)));
    assert_eq!(
        got, want,
        "every reading of the old spool, then the new one"
    );
    assert_eq!(log.losses.corrupt_cuts, 0);
    drop(log);
    let after = segment_files(&dir);
    let newest = std::fs::read(after.last().expect("a segment")).expect("read");
    assert_eq!(
        &newest[..8],
        b"RDLSEG02",
        "the new batch went to a new-format segment"
    );
    let f = frames(&newest);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].seq, Some(40));
    for old in &before {
        let bytes = std::fs::read(old).expect("read");
        assert_eq!(
            &bytes[..8],
            b"RDLSEG01",
            "old segments are left as they are"
        );
    }
    // Damage in an old segment costs what it did (the rest of that segment), counted.
    let dir2 = work.path().join("v1-damaged");
    let all2 = write_v1_spool(&dir2, 40, 15);
    let seg0 = segment_files(&dir2).remove(0);
    let layout = frames(&std::fs::read(&seg0).expect("read"));
    let victim = &layout[5];
    flip(&seg0, victim.at + 40);
    let (got, log) = drain(&dir2, SEG_64K);
    let lost: BTreeSet<i64> = all2.difference(&got).copied().collect();
    let expected: BTreeSet<i64> = layout[5..]
        .iter()
        .flat_map(|f| f.readings.iter().copied())
        .collect();
    assert_eq!(
        lost, expected,
        "v1: the damaged frame and the rest of its segment"
    );
    assert_eq!(log.losses.corrupt_cuts, 1);
}

/// Issue 12, item 8: the status shows backlog bytes with zero batches.
#[test]
fn backlog_bytes_are_zero_when_every_batch_is_acknowledged() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut log = SpoolLog::open(opts(work.path(), 4096, 1 << 30)).expect("open");
    for k in 0..12 {
        log.append(&mut batch(k, 10)).expect("append");
    }
    assert_eq!(log.unacked_batches(), 12);
    assert!(log.bytes() > 0, "the backlog has bytes");
    let mut seqs = Vec::new();
    while let Some(b) = log.next_backlog().expect("read") {
        seqs.push(b.seq);
    }
    assert_eq!(seqs.len(), 12);
    for (i, seq) in seqs.iter().enumerate() {
        log.ack(*seq).expect("ack");
        if i + 1 < seqs.len() {
            assert!(log.bytes() > 0, "unacknowledged batches are on disk");
        }
    }
    assert_eq!(log.unacked_batches(), 0);
    assert_eq!(
        log.bytes(),
        0,
        "no backlog: no backlog bytes (the segment being written still holds {} bytes on disk)",
        log.disk_bytes()
    );
}

/// `chattr +i`: even root cannot remove the file, so the cap's `remove_file` fails.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        let st = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .expect("chattr (e2fsprogs) is needed by this test");
        assert!(
            st.success(),
            "chattr +i {} failed: this test needs root and a file system with the immutable \
             attribute (ext4, tmpfs >= 6.0)",
            path.display()
        );
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// Issue 12, item 8: the cap path counts what it drops before it reports that the segment
/// could not be removed.
#[test]
fn the_cap_counts_its_loss_even_when_the_segment_cannot_be_removed() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("spool");
    let mut log = SpoolLog::open(opts(&dir, 4096, 3 * 4096)).expect("open");
    let mut k = 0;
    while segment_files(&dir).len() < 3 {
        log.append(&mut batch(k, 10)).expect("append");
        k += 1;
    }
    let oldest = segment_files(&dir).remove(0);
    let in_oldest: usize = frames(&std::fs::read(&oldest).expect("read"))
        .iter()
        .map(|f| f.readings.len())
        .sum();
    let _guard = Immutable::set(&oldest);
    let mut err = None;
    for _ in 0..100 {
        match log.append(&mut batch(k, 10)) {
            Ok(d) => assert_eq!(d.batches, 0, "the oldest segment cannot be removed"),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
        k += 1;
    }
    let err = err.expect("the cap was reached and the removal failed");
    eprintln!(
        "cap with an immutable oldest segment: {err}; losses {:?}",
        log.losses
    );
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert_eq!(
        log.losses.cap_readings, in_oldest as u64,
        "the readings of the dropped segment are counted before the error is reported"
    );
    assert!(log.losses.cap_batches > 0);
}

/// Issue 12, item 8: a non-ASCII boot id in `boots` is a parse error, never a panic.
#[test]
fn a_non_ascii_boot_id_is_a_parse_error() {
    let work = tempfile::tempdir().expect("tempdir");
    let path = work.path().join("boots");
    let good = "0123456789abcdef0123456789abcdef 1700000000000000\n";
    // 32 bytes, not 32 characters: "é" is two bytes, and one sits across a hex pair.
    let bad = format!("a{}b 5\n", "é".repeat(15));
    assert_eq!(bad.split(' ').next().map(str::len), Some(32));
    std::fs::write(&path, format!("{bad}{good}")).expect("write");
    let offsets = redline_agent::spool::boots::read(&path);
    assert_eq!(
        offsets.len(),
        1,
        "the good line is read, the bad one skipped"
    );
}

/// The inner half of `the_boots_rename_is_followed_by_a_directory_sync` (run under strace).
#[test]
fn boots_set_inner() {
    let Ok(dir) = std::env::var("REDLINE_TEST_BOOTS_DIR") else {
        return;
    };
    let mut b = redline_agent::spool::boots::Boots::load(Path::new(&dir));
    b.set([7; 16], 1_700_000_000_000_000).expect("set");
}

/// Issue 12, item 8: the `boots` file is renamed into place and then its directory synced
/// (without it, a power cut can lose the rename). Seen with strace.
#[test]
fn the_boots_rename_is_followed_by_a_directory_sync() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("spool");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let trace = work.path().join("trace");
    let exe = std::env::current_exe().expect("current exe");
    let st = std::process::Command::new("strace")
        .arg("-f")
        .arg("-e")
        .arg("trace=openat,rename,renameat,renameat2,fsync,fdatasync")
        .arg("-o")
        .arg(&trace)
        .arg(&exe)
        .args(["boots_set_inner", "--exact", "--test-threads=1"])
        .env("REDLINE_TEST_BOOTS_DIR", &dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("strace is needed by this test (apt-get install strace)");
    assert!(st.success(), "the inner test failed under strace");
    let text = std::fs::read_to_string(&trace).expect("trace");
    let lines: Vec<&str> = text.lines().collect();
    let boots = dir.join("boots");
    let boots = boots.to_str().expect("utf-8 path");
    let rename = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains(&format!("\"{boots}\"")))
        .unwrap_or_else(|| panic!("no rename to {boots} in the trace:\n{text}"));
    let dir_s = dir.to_str().expect("utf-8 path");
    // After the rename: the directory opened (fd N), then fsync(N).
    let fd = lines[rename..]
        .iter()
        .find_map(|l| {
            let l = l.split_once(" ").map_or(*l, |(_, rest)| rest).trim_start();
            (l.starts_with("openat(") && l.contains(&format!("\"{dir_s}\"")))
                .then(|| l.rsplit("= ").next()?.trim().parse::<i32>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("the directory is not opened after the rename:\n{text}"));
    assert!(
        lines[rename..]
            .iter()
            .any(|l| l.contains(&format!("fsync({fd})"))),
        "the directory (fd {fd}) is not synced after the rename:\n{text}"
    );
}

const LOOP_HINT: &str = "this test needs root, loop devices and e2fsprogs (mkfs.ext2, filefrag)";

fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} ({LOOP_HINT})"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({LOOP_HINT}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device and what is mounted from it, undone when dropped (also after a failure).
struct LoopDisk {
    dev: String,
    mounts: Vec<PathBuf>,
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = std::process::Command::new("umount").arg(m).status();
        }
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// Issue 12, item 3, on a real device: one segment of the spool lives on a loop device
/// (bind-mounted over its file) whose capacity is cut below the segment's data, so the
/// kernel answers EIO ("attempt to access beyond end of device"), then given back. The read
/// is retried, reported as an error, nothing is cut, and once the device answers again every
/// reading comes out.
#[test]
fn a_real_eio_from_a_loop_device_is_retried_and_never_cut() {
    let os = |s: &str| std::ffi::OsString::from(s);
    let work = tempfile::tempdir().expect("tempdir");
    let spool = work.path().join("spool");
    let all = build(&spool, 4096, 30);
    let segs = segment_files(&spool);
    assert!(segs.len() >= 3, "{segs:?}");
    let victim = segs[1].clone();
    let original = std::fs::read(&victim).expect("read");

    let img = work.path().join("disk.img");
    const IMG: u64 = 8 << 20;
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(IMG))
        .expect("image");
    run(
        "mkfs.ext2",
        &[
            &os("-q"),
            &os("-F"),
            &os("-b"),
            &os("1024"),
            &os("-O"),
            &os("^resize_inode"),
            img.as_os_str(),
        ],
    );
    let dev = run("losetup", &[&os("-f"), &os("--show"), img.as_os_str()])
        .trim()
        .to_owned();
    let mut disk = LoopDisk {
        dev: dev.clone(),
        mounts: Vec::new(),
    };
    let lo = work.path().join("lo");
    std::fs::create_dir_all(&lo).expect("mkdir");
    run(
        "mount",
        &[&os("-o"), &os("noatime"), &os(&dev), lo.as_os_str()],
    );
    disk.mounts.push(lo.clone());
    let on_disk = lo.join("seg");
    std::fs::write(&on_disk, &original).expect("copy the segment");
    std::fs::File::open(&on_disk)
        .and_then(|f| f.sync_all())
        .expect("sync");
    // Where its data starts on the device (1 KiB blocks).
    let map = run("filefrag", &[&os("-v"), on_disk.as_os_str()]);
    let block: u64 = map
        .lines()
        .find_map(|l| {
            let l = l.trim_start();
            l.starts_with("0:")
                .then(|| {
                    l.split(':')
                        .nth(2)?
                        .trim()
                        .split("..")
                        .next()?
                        .trim()
                        .parse()
                        .ok()
                })
                .flatten()
        })
        .unwrap_or_else(|| panic!("no extent in filefrag's output:\n{map}"));
    // Read-only from now on (nothing else is written to the device), with a cold cache.
    run("umount", &[lo.as_os_str()]);
    disk.mounts.pop();
    run(
        "mount",
        &[&os("-o"), &os("ro,noatime"), &os(&dev), lo.as_os_str()],
    );
    disk.mounts.push(lo.clone());
    run(
        "mount",
        &[&os("--bind"), on_disk.as_os_str(), victim.as_os_str()],
    );
    disk.mounts.push(victim.clone());
    assert_eq!(
        std::fs::metadata(&victim).expect("stat").len(),
        original.len() as u64
    );

    // The device ends where the segment's data begins (the image cut there; the bytes cut
    // off are kept to be put back).
    let cut = block * 1024;
    let image = std::fs::read(&img).expect("read the image");
    let set_capacity = |len: u64| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open the image");
        f.set_len(len).expect("resize the image");
        if len > cut {
            std::os::unix::fs::FileExt::write_all_at(&f, &image[cut as usize..], cut)
                .expect("put the bytes back");
            f.sync_all().expect("sync the image");
        }
        run("losetup", &[&os("-c"), &os(&dev)]);
    };
    set_capacity(cut);
    let mut log = SpoolLog::open(opts(&spool, 4096, 1 << 30)).expect("open");
    let mut got = BTreeSet::new();
    let err = loop {
        match log.next_backlog() {
            Ok(Some(b)) => got.extend(readings(&b)),
            Ok(None) => panic!("the backlog ended without a read error"),
            Err(e) => break e,
        }
    };
    eprintln!(
        "loop device cut below {}: {err}; {:?}",
        victim.display(),
        log.read_io()
    );
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let seg0: BTreeSet<i64> = frames(&std::fs::read(&segs[0]).expect("read"))
        .iter()
        .flat_map(|f| f.readings.iter().copied())
        .collect();
    assert_eq!(got, seg0, "the backlog stops at the unreadable segment");
    assert_eq!(log.losses.corrupt_cuts, 0, "a read error is not damage");
    assert!(log.read_io().retries >= 3, "{:?}", log.read_io());
    assert!(log.read_io().failures >= 1, "{:?}", log.read_io());
    assert!(!spool.join("corrupt").exists(), "no corrupt copy");

    // The device answers again: the backlog resumes.
    set_capacity(IMG);
    let t0 = std::time::Instant::now();
    loop {
        match log.next_backlog() {
            Ok(Some(b)) => got.extend(readings(&b)),
            Ok(None) => break,
            Err(e) if t0.elapsed() < std::time::Duration::from_secs(10) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("the backlog does not resume: {e}"),
        }
    }
    assert_eq!(got, all, "every reading once the device answers");
    assert_eq!(log.losses.corrupt_cuts, 0);
    drop(log);
    assert_eq!(
        std::fs::read(&victim).expect("read"),
        original,
        "the segment is untouched"
    );
    drop(disk);
}

#[cfg(not(feature = "test-hooks"))]
#[test]
fn read_error_tests_need_the_test_hooks_feature() {
    panic!(
        "the read-error tests inject EIO through a test hook that exists only with the \
         `test-hooks` feature: run `cargo test --features test-hooks` (scripts/test.sh does)"
    );
}

/// Issue 12, item 3: a read error is retried, and never taken for damage.
#[cfg(feature = "test-hooks")]
mod read_errors {
    use super::*;
    use redline_agent::spool::fault;

    /// A spool of several 4 KiB segments, closed; returns its readings and segment names.
    fn spool(dir: &Path) -> (BTreeSet<i64>, Vec<String>) {
        let all = build(dir, 4096, 30);
        let names = segment_files(dir)
            .iter()
            .map(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .expect("name")
                    .to_owned()
            })
            .collect();
        (all, names)
    }

    #[test]
    fn a_transient_eio_in_the_backlog_is_retried() {
        let work = tempfile::tempdir().expect("tempdir");
        let (all, names) = spool(work.path());
        assert!(names.len() >= 3, "{names:?}");
        let before = std::fs::read(work.path().join(&names[0])).expect("read");
        fault::clear();
        fault::fail_reads(&names[0], 1500, 2);
        let (got, log) = drain(work.path(), 4096);
        assert_eq!(fault::clear(), 0, "the injected errors were met");
        assert_eq!(got, all, "every reading, despite the read errors");
        assert_eq!(log.losses.corrupt_cuts, 0, "a read error is not damage");
        assert_eq!(log.read_io().retries, 2, "each retry is counted");
        assert_eq!(log.read_io().failures, 0, "the retries succeeded");
        drop(log);
        let after = std::fs::read(work.path().join(&names[0])).expect("read");
        assert_eq!(before, after, "the segment is untouched");
        assert!(!work.path().join("corrupt").exists(), "no corrupt copy");
    }

    #[test]
    fn a_persistent_eio_is_an_error_and_the_data_stays() {
        let work = tempfile::tempdir().expect("tempdir");
        let (all, names) = spool(work.path());
        let before = std::fs::read(work.path().join(&names[1])).expect("read");
        fault::clear();
        fault::fail_reads(&names[1], 1000, 1_000);
        let mut log = SpoolLog::open(opts(work.path(), 4096, 1 << 30)).expect("open");
        let mut got = BTreeSet::new();
        let err = loop {
            match log.next_backlog() {
                Ok(Some(b)) => got.extend(readings(&b)),
                Ok(None) => panic!("the backlog ended without the read error"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        // Everything before the frame that holds the bad byte went out (the read-ahead does
        // not hold back the frames in front of a bad sector), nothing from it on.
        let seg0 = frames(&std::fs::read(work.path().join(&names[0])).expect("read"));
        let seg1 = frames(&before);
        let in_front: BTreeSet<i64> = seg0
            .iter()
            .chain(seg1.iter().take_while(|f| f.end <= 1000))
            .flat_map(|f| f.readings.iter().copied())
            .collect();
        assert_eq!(got, in_front, "the backlog stops at the unreadable frame");
        assert_eq!(log.losses.corrupt_cuts, 0, "a read error is not damage");
        assert_eq!(log.read_io().failures, 1, "the failed read is counted");
        assert!(log.read_io().retries >= 3, "retried before giving up");
        // Again, while the card still fails: still an error, nothing cut (and no new read
        // for a while: the backlog pauses after a read error).
        assert!(log.next_backlog().is_err());
        assert_eq!(log.read_io().failures, 1, "no read during the pause");
        // The card recovers: the backlog resumes where it stopped, after the pause.
        fault::clear();
        let t0 = std::time::Instant::now();
        loop {
            match log.next_backlog() {
                Ok(Some(b)) => got.extend(readings(&b)),
                Ok(None) => break,
                Err(e) if t0.elapsed() < std::time::Duration::from_secs(10) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("the backlog does not resume: {e}"),
            }
        }
        let pause = t0.elapsed();
        assert!(
            pause < std::time::Duration::from_secs(3),
            "resumed after {pause:?}"
        );
        assert_eq!(got, all, "every reading once the card answers again");
        assert_eq!(log.losses.corrupt_cuts, 0);
        drop(log);
        let after = std::fs::read(work.path().join(&names[1])).expect("read");
        assert_eq!(before, after, "the segment is untouched");
    }

    #[test]
    fn a_transient_eio_at_start_is_retried() {
        let work = tempfile::tempdir().expect("tempdir");
        let (all, names) = spool(work.path());
        let last = names.last().expect("a segment").clone();
        let before = std::fs::read(work.path().join(&last)).expect("read");
        fault::clear();
        fault::fail_reads(&last, 100, 2);
        let (got, log) = drain(work.path(), 4096);
        assert_eq!(fault::clear(), 0, "the injected errors were met");
        assert_eq!(got, all);
        assert_eq!(
            log.losses.corrupt_cuts, 0,
            "the tail is not cut for a read error"
        );
        drop(log);
        let after = std::fs::read(work.path().join(&last)).expect("read");
        assert_eq!(before, after, "the tail is untouched");
    }

    #[test]
    fn a_persistent_eio_at_start_fails_the_open_and_cuts_nothing() {
        let work = tempfile::tempdir().expect("tempdir");
        let (_, names) = spool(work.path());
        let last = names.last().expect("a segment").clone();
        let before = std::fs::read(work.path().join(&last)).expect("read");
        fault::clear();
        fault::fail_reads(&last, 100, 1_000);
        let err = SpoolLog::open(opts(work.path(), 4096, 1 << 30))
            .err()
            .expect("the tail cannot be read");
        fault::clear();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let after = std::fs::read(work.path().join(&last)).expect("read");
        assert_eq!(before, after, "the tail is untouched");
    }

    #[test]
    fn spool_stats_retries_a_transient_eio() {
        let work = tempfile::tempdir().expect("tempdir");
        let (all, names) = spool(work.path());
        fault::clear();
        fault::fail_reads(&names[0], 1500, 2);
        let r = redline_agent::spool::inspect::stats(work.path()).expect("stats");
        assert_eq!(fault::clear(), 0, "the injected errors were met");
        assert_eq!(r.damaged_segments, 0, "a read error is not damage");
        assert_eq!(r.unacked_readings, all.len() as u64);
    }
}
