//! The spool's thread (`spool::service`) on real files: a read error in the backlog is not a
//! disk fault, a persistent EIO in the last segment at start is a disk fault (the agent runs
//! from memory), never a configuration error; read errors and damaged frames are published
//! in `SpoolStats`. Issue 12, glue of items 3 and 4.

use redline_agent::config::{Order, PayloadMode};
use redline_agent::sample::batch::Batch;
use redline_agent::spool::service::{self, Cmd, Settings, SpoolStats};
use redline_agent::spool::{Options, SpoolLog};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

const T0_MS: i64 = 1_705_267_200_000;

/// A batch of `n` small records from batch `k`.
pub fn batch(k: u64, n: u32) -> Batch {
    let mut body = Vec::new();
    let mut ends = Vec::new();
    let t0 = T0_MS + k as i64 * 1000;
    for i in 0..i64::from(n) {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(
            format!(
                "{{\"vehicle_id\":\"GT3-RACER-01\",\"timestamp\":{},\"engine_rpm\":{}}}",
                t0 + i * 100,
                6000 + k % 2500
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

pub fn opts(dir: &Path, segment_bytes: u64, max_bytes: u64) -> Options {
    Options {
        dir: dir.to_path_buf(),
        segment_bytes,
        max_bytes,
    }
}

pub fn settings(o: Options) -> Settings {
    Settings {
        log: o,
        sync_interval: Some(Duration::from_millis(200)),
        order: Order::LiveFirst,
        mode: PayloadMode::Records,
        max_payload: 128 * 1024,
        memory_batches: 3600,
        memory_bytes: 8 << 20,
        temporary: false,
    }
}

pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Waits up to `within` for `cond`.
pub fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

#[cfg(feature = "test-hooks")]
mod read_errors {
    use super::*;
    use redline_agent::spool::fault;

    /// A closed spool of several 4 KiB segments.
    fn spool(dir: &Path) -> Vec<PathBuf> {
        let mut log = SpoolLog::open(opts(dir, 4096, 1 << 30)).expect("open");
        for k in 0..30 {
            log.append(&mut batch(k, 10)).expect("append");
        }
        log.close().expect("close");
        segment_files(dir)
    }

    #[test]
    fn a_read_error_in_the_backlog_is_no_disk_fault_and_is_published() {
        let work = tempfile::tempdir().expect("tempdir");
        let segs = spool(work.path());
        assert!(segs.len() >= 3, "{segs:?}");
        fault::fail_reads_on_any_thread(&segs[1], 1000, 1_000);
        let stats = Arc::new(SpoolStats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (thread, mut channels) = service::start(
            settings(opts(work.path(), 4096, 1 << 30)),
            rx,
            stats.clone(),
        )
        .expect("start");
        // The backlog goes up to the unreadable frame.
        let failed = wait_for(Duration::from_secs(10), || {
            while channels.backlog.try_recv().is_ok() {}
            stats.read_failures.load(Relaxed) > 0
        });
        assert!(failed, "the read failure is published in SpoolStats");
        assert!(stats.read_retries.load(Relaxed) >= 3, "retries published");
        assert_eq!(
            stats.write_errors.load(Relaxed),
            0,
            "a read error is not a write error"
        );
        assert_eq!(stats.fault(), None, "the spool is still writable");
        // New batches still go to the disk (not to the memory buffer).
        stats.queued_appends.fetch_add(1, Relaxed);
        tx.send(Cmd::Append(batch(100, 10))).expect("send");
        assert!(wait_for(Duration::from_secs(5), || {
            stats.unacked_batches.load(Relaxed) == 31
        }));
        assert_eq!(stats.memory_batches.load(Relaxed), 0);
        let line = stats.line();
        assert!(line.contains("read_failures="), "{line}");
        fault::clear_on_any_thread(&segs[1]);
        drop(tx);
        thread.join().expect("join");
    }

    #[test]
    fn a_persistent_eio_in_the_last_segment_at_start_is_a_disk_fault() {
        let work = tempfile::tempdir().expect("tempdir");
        let segs = spool(work.path());
        let last = segs.last().expect("a segment").clone();
        fault::fail_reads_on_any_thread(&last, 100, 1_000_000);
        let stats = Arc::new(SpoolStats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let started = service::start(
            settings(opts(work.path(), 4096, 1 << 30)),
            rx,
            stats.clone(),
        );
        let (thread, mut channels) = match started {
            Ok(s) => s,
            Err(e) => {
                fault::clear_on_any_thread(&last);
                panic!("an EIO at start is taken for a configuration error: {e}");
            }
        };
        assert!(stats.fault().is_some(), "the disk fault is reported");
        // Runs from memory: a new batch is published live.
        stats.queued_appends.fetch_add(1, Relaxed);
        tx.send(Cmd::Append(batch(100, 10))).expect("send");
        let live = wait_for(Duration::from_secs(5), || channels.live.try_recv().is_ok());
        assert!(live, "a batch goes out from memory");
        // The card answers again: the spool is taken up, the batch written to it.
        fault::clear_on_any_thread(&last);
        assert!(
            wait_for(Duration::from_secs(5), || stats.fault().is_none()),
            "the spool is taken up once it reads"
        );
        assert_eq!(stats.written_from_memory_batches.load(Relaxed), 1);
        drop(tx);
        thread.join().expect("join");
    }
}

#[test]
fn corrupt_frames_are_published() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut log = SpoolLog::open(opts(work.path(), 1 << 20, 1 << 30)).expect("open");
    for k in 0..10 {
        log.append(&mut batch(k, 10)).expect("append");
    }
    log.close().expect("close");
    // Flip a byte in the payload of the third frame (frames are 24-byte headers + payload).
    let seg = segment_files(work.path()).remove(0);
    let mut bytes = std::fs::read(&seg).expect("read");
    let frame = (bytes.len() - 8) / 10;
    let pos = 8 + 2 * frame + 40;
    bytes[pos] ^= 0x55;
    std::fs::write(&seg, &bytes).expect("write");
    let stats = Arc::new(SpoolStats::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, mut channels) = service::start(
        settings(opts(work.path(), 1 << 20, 1 << 30)),
        rx,
        stats.clone(),
    )
    .expect("start");
    let seen = wait_for(Duration::from_secs(5), || {
        while channels.backlog.try_recv().is_ok() {}
        stats.corrupt_frames.load(Relaxed) == 1
    });
    assert!(
        seen,
        "corrupt_frames = {}",
        stats.corrupt_frames.load(Relaxed)
    );
    assert!(
        stats.line().contains("corrupt_frames=1"),
        "{}",
        stats.line()
    );
    drop(tx);
    thread.join().expect("join");
}

/// A batch stamped on `boot`'s clock (µs since that boot), from batch `k`.
fn boot_batch(k: u64, boot: [u8; 16]) -> Batch {
    let mut b = batch(k, 10);
    let shift = -T0_MS * 1000;
    b.shift_timestamps(shift);
    b.boot = Some(boot);
    b
}

fn held_files(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir.join("held")) {
        Ok(d) => d.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .chain(held_files(dir).iter())
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// Issue 12, item 5: a boot that never got a trusted clock, spanning a full spool, then a
/// run of the same boot with the clock trusted. The held batches do not pin the log: what
/// is acknowledged is deleted, the cap drops only the oldest held data it must (counted as
/// held), and the held batches are released, converted to UTC, by reading only them.
#[test]
fn a_never_trusted_boot_spanning_a_full_spool_does_not_pin_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    let (seg, max) = (8 * 1024, 256 * 1024);
    let boot = [0xA5; 16];
    let sent_held = 600u64;
    // Run 1: the clock never trusted. Every batch is held.
    {
        let stats = Arc::new(SpoolStats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (thread, mut channels) =
            service::start(settings(opts(dir, seg, max)), rx, stats.clone()).expect("start");
        for k in 0..sent_held {
            stats.queued_appends.fetch_add(1, Relaxed);
            tx.send(Cmd::Append(boot_batch(k, boot))).expect("send");
        }
        assert!(wait_for(Duration::from_secs(10), || {
            stats.queued_appends.load(Relaxed) == 0
        }));
        assert!(
            channels.live.try_recv().is_err() && channels.backlog.try_recv().is_err(),
            "nothing held is published"
        );
        drop(tx);
        thread.join().expect("join");
        assert!(
            dir_bytes(dir) <= max,
            "the cap holds: {} bytes",
            dir_bytes(dir)
        );
        let dropped = stats.cap_dropped_held_batches.load(Relaxed);
        assert!(dropped > 0, "the cap dropped the oldest held batches");
        assert_eq!(
            stats.cap_dropped_readings.load(Relaxed),
            10 * dropped,
            "only held batches were dropped"
        );
    }
    let report = redline_agent::spool::inspect::stats(dir).expect("stats");
    let held_before = report.boot_clock_batches;
    assert!(held_before > 100, "{report:?}");
    assert!(report.held_segments > 10, "{report:?}");
    // The restart reads none of the held data.
    let t = Instant::now();
    let log = SpoolLog::open(opts(dir, seg, max)).expect("open");
    let restart = t.elapsed();
    assert_eq!(log.frames_read, 0, "the start read no held frame");
    drop(log);
    // Run 2: the same boot, the clock trusted now.
    let stats = Arc::new(SpoolStats::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, mut channels) =
        service::start(settings(opts(dir, seg, max)), rx, stats.clone()).expect("start");
    // Live batches, acknowledged as they go out: deleted, never dropped.
    let live = 300u64;
    let mut acked_live = 0u64;
    for k in 0..live {
        stats.queued_appends.fetch_add(1, Relaxed);
        tx.send(Cmd::Append(batch(10_000 + k, 10))).expect("send");
        let got = wait_for(Duration::from_secs(5), || {
            while let Ok(p) = channels.live.try_recv() {
                for b in p.batches {
                    tx.send(Cmd::Ack(b.seq)).expect("ack");
                    acked_live += 1;
                }
            }
            acked_live == k + 1
        });
        assert!(got, "live batch {k} went out");
    }
    assert!(wait_for(Duration::from_secs(5), || {
        stats.unacked_batches.load(Relaxed) == 0
    }));
    assert!(
        segment_files(dir).len() <= 2,
        "acknowledged segments are deleted: {:?}",
        segment_files(dir)
    );
    let dropped_live = stats.cap_dropped_readings.load(Relaxed)
        - 10 * stats.cap_dropped_held_batches.load(Relaxed);
    assert_eq!(
        dropped_live, 0,
        "no live (acknowledged) reading is counted as dropped"
    );
    let dropped_held_2 = stats.cap_dropped_held_batches.load(Relaxed);
    let held_now = redline_agent::spool::inspect::stats(dir)
        .expect("stats")
        .boot_clock_batches;
    assert_eq!(held_now + dropped_held_2, held_before);
    // The clock of that boot is known now: its held batches go, converted.
    let offset = 1_800_000_000_000_000i64;
    let t = Instant::now();
    tx.send(Cmd::BootOffset {
        boot_id: boot,
        offset,
    })
    .expect("send");
    let mut released = Vec::new();
    let all = wait_for(Duration::from_secs(30), || {
        while let Ok(p) = channels.backlog.try_recv() {
            for b in p.batches {
                tx.send(Cmd::Ack(b.seq)).expect("ack");
                released.push(b);
            }
            tx.send(Cmd::Wake).expect("wake");
        }
        let dropped = stats.cap_dropped_held_batches.load(Relaxed) - dropped_held_2;
        released.len() as u64 + dropped == held_now && held_files(dir).is_empty()
    });
    let release = t.elapsed();
    let dropped_in_release = stats.cap_dropped_held_batches.load(Relaxed) - dropped_held_2;
    assert!(
        all,
        "{} of {held_now} held batches released, {dropped_in_release} dropped, held files {:?}",
        released.len(),
        held_files(dir)
    );
    // A converted batch is a little longer (UTC times have more digits): with the spool at
    // its cap, that may cost one held segment, no more.
    assert!(
        dropped_in_release <= 16,
        "{dropped_in_release} held batches dropped during the release"
    );
    for b in &released {
        assert_eq!(b.boot, None, "converted");
        let k = (b.first_at - offset + T0_MS * 1000) / 1_000_000 - T0_MS / 1000;
        assert!(
            (k as u64) < sent_held,
            "a held batch, converted: {}",
            b.first_at
        );
        assert_eq!(b.first_at, boot_batch(k as u64, boot).first_at + offset);
    }
    // The newest held batches are the ones kept (the cap dropped the oldest).
    let last = released.iter().map(|b| b.first_at).max().expect("some");
    assert_eq!(last, boot_batch(sent_held - 1, boot).first_at + offset);
    assert!(
        wait_for(Duration::from_secs(5), || held_files(dir).is_empty()),
        "the held segments are removed once released: {:?}",
        held_files(dir)
    );
    assert!(wait_for(Duration::from_secs(5), || {
        stats.unacked_batches.load(Relaxed) == 0
    }));
    drop(tx);
    thread.join().expect("join");
    eprintln!(
        "held batches: {held_before} in {} KiB of held segments; restart (open) {:.1} ms reading no held frame; release of {held_now} batches to the last one out {:.1} ms ({dropped_in_release} dropped at the cap)",
        max / 1024,
        restart.as_secs_f64() * 1e3,
        release.as_secs_f64() * 1e3
    );
}

/// A spool written before held segments existed has boot-clock batches in the log: the
/// backlog moves them to `held/` (so they no longer pin the log), and they are released
/// once their boot's offset is known.
#[test]
fn boot_clock_batches_in_the_log_are_moved_out_of_its_way() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    let boot = [0x3c; 16];
    let mut log = SpoolLog::open(opts(dir, 4096, 1 << 30)).expect("open");
    for k in 0..40 {
        log.append(&mut boot_batch(k, boot)).expect("append");
    }
    log.close().expect("close");
    let segments_before = segment_files(dir).len();
    assert!(segments_before > 3);
    let stats = Arc::new(SpoolStats::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, mut channels) =
        service::start(settings(opts(dir, 4096, 1 << 30)), rx, stats.clone()).expect("start");
    assert!(
        wait_for(Duration::from_secs(10), || {
            stats.unacked_batches.load(Relaxed) == 0 && stats.held_batches.load(Relaxed) == 40
        }),
        "moved to held/: unacked {} held {}",
        stats.unacked_batches.load(Relaxed),
        stats.held_batches.load(Relaxed)
    );
    assert!(channels.backlog.try_recv().is_err(), "nothing published");
    assert!(
        wait_for(Duration::from_secs(5), || segment_files(dir).len() == 1),
        "the log's segments go: {:?}",
        segment_files(dir)
    );
    let offset = 1_800_000_000_000_000i64;
    tx.send(Cmd::BootOffset {
        boot_id: boot,
        offset,
    })
    .expect("send");
    let mut got = Vec::new();
    assert!(wait_for(Duration::from_secs(10), || {
        while let Ok(p) = channels.backlog.try_recv() {
            for b in p.batches {
                tx.send(Cmd::Ack(b.seq)).expect("ack");
                got.push(b.first_at);
            }
            tx.send(Cmd::Wake).expect("wake");
        }
        got.len() == 40
    }));
    let want: Vec<i64> = (0..40)
        .map(|k| boot_batch(k, boot).first_at + offset)
        .collect();
    assert_eq!(got, want, "every batch, converted, in order");
    drop(tx);
    thread.join().expect("join");
}

/// The status's oldest unacknowledged time follows the acknowledgements within a segment
/// (the counts are kept per segment, not per batch).
#[test]
fn the_oldest_unacknowledged_time_moves_within_a_segment() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    let mut log = SpoolLog::open(opts(dir, 1 << 20, 1 << 30)).expect("open");
    for k in 0..100 {
        log.append(&mut batch(k, 10)).expect("append");
    }
    log.close().expect("close");
    assert_eq!(segment_files(dir).len(), 1);
    let stats = Arc::new(SpoolStats::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, mut channels) =
        service::start(settings(opts(dir, 1 << 20, 1 << 30)), rx, stats.clone()).expect("start");
    let mut first = None;
    assert!(wait_for(Duration::from_secs(5), || {
        if first.is_none() {
            first = channels.backlog.try_recv().ok();
        }
        first.is_some() && stats.unacked_readings.load(Relaxed) == 1000
    }));
    assert_eq!(stats.oldest_unacked_ms.load(Relaxed), T0_MS as u64);
    let first = first.expect("a parcel");
    let last_k = first.batches.len() as u64;
    assert!(last_k < 100, "{last_k} batches in the first parcel");
    for b in &first.batches {
        tx.send(Cmd::Ack(b.seq)).expect("ack");
    }
    tx.send(Cmd::Wake).expect("wake");
    let want = (T0_MS + last_k as i64 * 1000) as u64;
    assert!(
        wait_for(Duration::from_secs(5), || {
            stats.oldest_unacked_ms.load(Relaxed) == want
        }),
        "oldest {} ms, want {want} ms",
        stats.oldest_unacked_ms.load(Relaxed)
    );
    assert_eq!(
        stats.unacked_readings.load(Relaxed),
        1000 - 10 * last_k,
        "the readings follow the acknowledgements"
    );
    drop(tx);
    thread.join().expect("join");
}

/// A stop reports every held batch, even those of held segments the idle scan had not
/// counted yet (a short run with a spool to read).
#[test]
fn a_stop_reports_every_held_batch() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    let boot = [0x77; 16];
    let mut log = SpoolLog::open(opts(dir, 4096, 1 << 30)).expect("open");
    for k in 0..50 {
        log.append_held(&boot_batch(k, boot), boot)
            .expect("append held");
    }
    for k in 0..200 {
        log.append(&mut batch(1000 + k, 10)).expect("append");
    }
    log.close().expect("close");
    let stats = Arc::new(SpoolStats::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, _channels) =
        service::start(settings(opts(dir, 4096, 1 << 30)), rx, stats.clone()).expect("start");
    drop(tx);
    thread.join().expect("join");
    assert_eq!(stats.held_batches.load(Relaxed), 50);
    assert_eq!(stats.unacked_batches.load(Relaxed), 200);
}
