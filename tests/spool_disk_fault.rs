//! The spool's disk failing before the agent starts (issue 12, items 1 and 2): a full or
//! read-only file system at start is no crash loop; the agent samples and publishes from
//! its memory buffer, says so (log, status file, systemd STATUS), and takes up the spool
//! once the disk can be written again. What was kept in memory meanwhile then goes to the
//! disk, oldest first, so a kill -9 after the recovery loses none of it; a memory buffer
//! that overflows its byte bound loses readings counted and logged, and no others.
//!
//! Real peers and files: a small tmpfs filled (or remounted read-only) before the start,
//! a Mosquitto with mutual TLS, a `mosquitto_sub` that shows what arrived, a datagram
//! socket as `NOTIFY_SOCKET`.

mod support;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::json::{Record, coverage};
use support::process::{Proc, poll, send_signal, tail};
use support::spool::{
    Tmpfs, Tuning, fill_until_enospc, message_records, numbers_after, render_config, segment_bytes,
    simulate_args, spool_export, spool_stats,
};
use support::{ConfigSpec, START, START_MS, TOPIC};

/// Generous bound on each wait for an answer of the agent (a loaded machine).
const STEP: Duration = Duration::from_secs(30);
/// A second simulated day: the readings of a second run never meet those of `START`.
const DAY2: &str = "2024-01-15T21:20:00Z";
const DAY2_MS: i64 = START_MS + 86_400_000;

struct Rig {
    // Field order is drop order: subscriber, broker, then the files.
    sub: Subscriber,
    broker: Broker,
    pki: Pki,
    dir: tempfile::TempDir,
}

impl Rig {
    /// `persistence`: the broker keeps the subscriber's session across a restart, so what
    /// the agent publishes before mosquitto_sub has reconnected is queued for it.
    fn new(persistence: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
        let mut broker = Broker::start(&pki, dir.path(), persistence);
        let mut sub = Subscriber::start(&broker);
        if persistence {
            // Saved at this stop: the session (with its subscription) is in the store that
            // every later start of the broker loads.
            broker.stop();
            broker.start_again();
            sub.sync();
        }
        Rig {
            sub,
            broker,
            pki,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent config: spool in `spool_dir`, a status file every 200 ms, and `extra`
    /// lines added to `[delivery]`.
    fn config(&self, spool_dir: &Path, delivery_extra: &str) -> PathBuf {
        let spec = ConfigSpec {
            port: self.broker.tls_port,
            ca: &self.pki.ca,
            cert: &self.pki.client_cert,
            key: &self.pki.client_key,
            payload: "records",
        };
        let t = Tuning {
            spool_dir: Some(spool_dir.to_owned()),
            ..Tuning::default()
        };
        // `render_config` ends with the `[delivery]` table.
        let text = format!(
            "{}{delivery_extra}\n[status]\nfile = {}\nfile_interval = \"200ms\"\n",
            render_config(&spec, &t),
            support::toml_path(&self.status_path()),
        );
        let path = self.path("agent.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn status_path(&self) -> PathBuf {
        self.path("status.json")
    }

    fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.status_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn records(&self) -> Vec<Record> {
        let payloads: Vec<String> = self
            .sub
            .telemetry()
            .into_iter()
            .map(|(topic, payload)| {
                assert_eq!(topic, TOPIC, "telemetry on an unexpected topic");
                payload
            })
            .collect();
        message_records(&payloads).concat()
    }

    fn timestamps(&self) -> BTreeSet<i64> {
        self.records().iter().map(|r| r.timestamp).collect()
    }

    fn report(&self, agent: &Proc) -> String {
        format!(
            "--- agent stderr (tail) ---\n{}\n--- status file ---\n{}\n--- broker log (tail) ---\n{}",
            tail(&agent.stderr_text(), 8000),
            self.status()
                .map_or_else(|| "(none)".to_owned(), |v| v.to_string()),
            tail(&self.broker.log(), 2000)
        )
    }
}

/// A number in the status file (0 when missing).
fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// `NOTIFY_SOCKET` for the agent: every datagram it sends, as text.
struct Notify {
    sock: UnixDatagram,
    got: Vec<String>,
}

impl Notify {
    fn bind(path: &Path) -> Notify {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        sock.set_nonblocking(true).expect("nonblocking");
        Notify {
            sock,
            got: Vec::new(),
        }
    }

    fn drain(&mut self) -> &[String] {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.got
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        &self.got
    }

    /// The STATUS= lines received after datagram `from`.
    fn statuses_since(&mut self, from: usize) -> Vec<String> {
        self.drain()
            .iter()
            .skip(from)
            .flat_map(|d| d.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .map(str::to_owned)
            .collect()
    }
}

fn spawn(args: &[String], notify: Option<&Path>) -> Proc {
    let mut cmd = support::agent();
    cmd.args(args);
    if let Some(p) = notify {
        cmd.env("NOTIFY_SOCKET", p);
    }
    Proc::spawn("redline-agent", cmd)
}

fn mount(args: &[&str], path: &Path) {
    let out = Command::new("mount")
        .args(args)
        .arg(path)
        .output()
        .expect("run mount(8)");
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How the spool's file system fails before the start, and how it is mended.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Filled to ENOSPC by a filler file; mended by deleting it.
    Full,
    /// Remounted read-only; mended by remounting it read-write.
    ReadOnly,
}

impl Fault {
    /// Breaks the file system at `mnt`; returns the errno text the agent must report.
    fn apply(self, mnt: &Path) -> &'static str {
        match self {
            Fault::Full => {
                let filled = fill_until_enospc(&mnt.join("filler"));
                assert!(filled > 0, "nothing written before ENOSPC");
                "No space left on device"
            }
            Fault::ReadOnly => {
                mount(&["-o", "remount,ro"], mnt);
                "Read-only file system"
            }
        }
    }

    fn mend(self, mnt: &Path) {
        match self {
            Fault::Full => std::fs::remove_file(mnt.join("filler")).unwrap(),
            Fault::ReadOnly => mount(&["-o", "remount,rw"], mnt),
        }
    }
}

/// Item 1: `run` on a broken disk starts, publishes every reading, reports the fault in
/// the log, the status file and the systemd STATUS line, and takes up the spool when the
/// disk is mended (the spool then holds segments and the fault is gone from the reports).
fn run_on_a_broken_disk(fault: Fault) {
    let t0 = Instant::now();
    let rig = Rig::new(false);
    let mnt = rig.path("fs");
    let _fs = Tmpfs::mount(&mnt, "512k");
    let spool_dir = mnt.join("spool");
    let config = rig.config(&spool_dir, "");
    let errno = fault.apply(&mnt);
    let sock = rig.path("notify.sock");
    let mut notify = Notify::bind(&sock);

    let started = Instant::now();
    let args: Vec<String> = ["run", "--config", config.to_str().unwrap()]
        .map(str::to_owned)
        .to_vec();
    let mut agent = spawn(&args, Some(&sock));
    let first = poll(STEP, || {
        if !agent.is_running() {
            return Some(false);
        }
        (!rig.sub.telemetry().is_empty()).then_some(true)
    });
    assert_eq!(
        first,
        Some(true),
        "with the spool's disk broken ({fault:?}) the agent must start and publish\n{}",
        rig.report(&agent)
    );
    let publishing_at = started.elapsed();
    let stderr = agent.stderr_text();
    assert!(
        stderr.contains("not writable (") && stderr.contains(errno),
        "no log line saying the spool is not writable ({errno})\n{}",
        rig.report(&agent)
    );
    // The status file says so.
    let snap = poll(STEP, || {
        rig.status()
            .filter(|v| v.pointer("/spool/writable") == Some(&Value::Bool(false)))
    })
    .unwrap_or_else(|| {
        panic!(
            "the status file never said spool.writable = false\n{}",
            rig.report(&agent)
        )
    });
    let err = snap
        .pointer("/spool/fault/error")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        err.contains(errno),
        "status spool.fault.error {err:?} does not name {errno:?}\n{snap:#}"
    );
    // And the systemd STATUS line.
    let fault_status = poll(STEP, || {
        notify
            .statuses_since(0)
            .into_iter()
            .find(|s| s.contains("SPOOL NOT WRITABLE") && s.contains(errno))
    });
    assert!(
        fault_status.is_some(),
        "no STATUS= line with `SPOOL NOT WRITABLE ({errno})`; got {:?}\n{}",
        notify.drain(),
        rig.report(&agent)
    );
    // Still running a few seconds on: no crash loop.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agent.is_running(),
        "the agent stopped while the disk was broken\n{}",
        rig.report(&agent)
    );
    assert_eq!(
        segment_bytes(&spool_dir),
        0,
        "nothing can have been written to the broken disk"
    );

    // Mend the disk: the spool is taken up.
    let mended_at = started.elapsed();
    fault.mend(&mnt);
    let taken_up = poll(STEP, || {
        agent
            .stderr_text()
            .contains("spool writable again")
            .then_some(())
    });
    assert!(
        taken_up.is_some(),
        "disk mended at {mended_at:?} but no `spool writable again` line\n{}",
        rig.report(&agent)
    );
    let taken_up_at = started.elapsed();
    let on_disk = poll(STEP, || (segment_bytes(&spool_dir) > 8).then_some(()));
    assert!(
        on_disk.is_some(),
        "the spool was taken up but holds no batch\n{}",
        rig.report(&agent)
    );
    let ok = poll(STEP, || {
        rig.status()
            .filter(|v| v.pointer("/spool/writable") == Some(&Value::Bool(true)))
    });
    assert!(
        ok.is_some(),
        "the status file still says the spool is not writable\n{}",
        rig.report(&agent)
    );
    let seen = notify.drain().len();
    let clean = poll(STEP, || {
        notify
            .statuses_since(seen)
            .into_iter()
            .find(|s| !s.contains("SPOOL NOT WRITABLE"))
    });
    assert!(
        clean.is_some(),
        "STATUS= still reports the fault after the recovery\n{}",
        rig.report(&agent)
    );
    // Let a few batches go through the spool, then stop: every reading arrived.
    std::thread::sleep(Duration::from_secs(2));
    send_signal(agent.pid(), "TERM");
    let status = agent.wait_or_panic(STEP);
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM: everything acknowledged, exit 0\n{}",
        rig.report(&agent)
    );
    let stderr = agent.stderr_text();
    let sampled = numbers_after(&stderr, "summary: readings=");
    let sampled = *sampled
        .first()
        .unwrap_or_else(|| panic!("no `summary: readings=N`\n{stderr}")) as i64;
    let lost = numbers_after(&stderr, "dropped_from_memory_readings=");
    assert_eq!(lost, [0], "no loss may be counted\n{stderr}");
    poll(Duration::from_secs(10), || {
        (rig.timestamps().len() as i64 >= sampled).then_some(())
    });
    let cov = coverage(&rig.records()).unwrap_or_else(|e| panic!("{e}"));
    let first = *cov.distinct.keys().next().expect("some record");
    // Live: the readings are on a 100 ms grid from the first one, with no gap.
    support::json::assert_exact_grid(&cov, first, sampled);
    eprintln!(
        "{fault:?}: publishing at {publishing_at:?}, mended at {mended_at:?}, `writable again` at \
         {taken_up_at:?}; {sampled} of {sampled} readings, {} duplicates; test took {:?}",
        cov.duplicates,
        t0.elapsed()
    );
}

#[test]
fn run_on_a_full_disk_publishes_reports_and_takes_up_the_spool() {
    run_on_a_broken_disk(Fault::Full);
}

#[test]
fn run_on_a_read_only_disk_publishes_reports_and_takes_up_the_spool() {
    run_on_a_broken_disk(Fault::ReadOnly);
}

/// A spool.dir that is a regular file is a configuration error: no disk state mends it.
#[test]
fn spool_dir_that_is_a_file_is_a_config_error() {
    let rig = Rig::new(false);
    let file = rig.path("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let config = rig.config(&file, "");
    let out = support::process::run(
        "redline-agent",
        {
            let mut cmd = support::agent();
            cmd.args(simulate_args(&config, Some("2s"), "max", 1, START));
            cmd
        },
        STEP,
    );
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("spool.dir"), "{}", out.describe());
}

/// Item 2: batches taken into memory while the disk was full reach the disk once it can be
/// written, before any newer batch; a kill -9 after that loses none of them.
///
/// The disk is full (before the start, or filled while the agent runs) and the broker up:
/// every reading is published from memory. The broker then stops (the batches pile up in memory, some handed to the
/// publisher, none acknowledged), the disk is freed, the agent is killed with SIGKILL a
/// few seconds later, and a second run with the broker up delivers the first run's
/// backlog: every reading sampled more than 3 s before the kill arrives.
fn memory_batches_reach_the_disk_and_survive_kill_9(fill_before_start: bool) {
    let t0 = Instant::now();
    let mut rig = Rig::new(true);
    let mnt = rig.path("fs");
    let _fs = Tmpfs::mount(&mnt, "512k");
    let spool_dir = mnt.join("spool");
    let config = rig.config(&spool_dir, "");
    let errno = if fill_before_start {
        Fault::Full.apply(&mnt)
    } else {
        "No space left on device"
    };

    let started = Instant::now();
    let mut agent = spawn(&simulate_args(&config, Some("3600s"), "1", 21, START), None);
    if !fill_before_start {
        let spooled = poll(STEP, || (segment_bytes(&spool_dir) > 8).then_some(()));
        assert!(spooled.is_some(), "nothing spooled\n{}", rig.report(&agent));
        Fault::Full.apply(&mnt);
        let fault = poll(STEP, || {
            agent.stderr_text().contains("not writable (").then_some(())
        });
        assert!(
            fault.is_some(),
            "disk full, no `not writable (` line\n{}",
            rig.report(&agent)
        );
    }
    // Published from memory while the disk is full: readings of 3 more seconds arrive.
    let base = rig.timestamps().last().copied().unwrap_or(START_MS);
    let flowing = poll(STEP, || {
        (rig.timestamps().range(base + 3000..).next().is_some()).then_some(())
    });
    assert!(
        flowing.is_some(),
        "with the disk full ({errno}) no reading 3 s after {base} arrived\n{}",
        rig.report(&agent)
    );
    let full_readings = num(&rig.status().unwrap_or_default(), "/counters/readings") as i64;
    rig.sub.sync();
    let published_while_full = rig.timestamps();
    let gaps: Vec<i64> = (0..published_while_full.len() as i64)
        .map(|k| START_MS + k * 100)
        .filter(|t| !published_while_full.contains(t))
        .collect();
    assert!(
        gaps.is_empty(),
        "published from memory with gaps: {:?}",
        &gaps[..gaps.len().min(20)]
    );

    // The broker goes: nothing is acknowledged now, the batches stay in memory.
    rig.broker.stop();
    let stopped_at = started.elapsed();
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        agent.is_running(),
        "the agent stopped\n{}",
        rig.report(&agent)
    );
    let in_memory = poll(STEP, || {
        rig.status()
            .filter(|v| num(v, "/spool/memory_batches") >= 3)
    })
    .unwrap_or_else(|| {
        panic!(
            "the status file shows no batches held in memory\n{}",
            rig.report(&agent)
        )
    });
    let held = num(&in_memory, "/spool/memory_batches");

    // Space again: the memory batches go to the disk.
    Fault::Full.mend(&mnt);
    let freed_at = started.elapsed();
    let written = poll(STEP, || {
        rig.status().filter(|v| {
            v.pointer("/spool/writable") == Some(&Value::Bool(true))
                && num(v, "/spool/memory_batches") == 0
                && num(v, "/spool/written_from_memory_batches") >= held
        })
    });
    assert!(
        written.is_some(),
        "disk freed at {freed_at:?}; the {held} batch(es) in memory were not written to it\n{}",
        rig.report(&agent)
    );
    let written_at = started.elapsed();
    // Wait past the sync interval; then everything sampled 3 s before the kill is durable.
    std::thread::sleep(Duration::from_secs(4));
    let safe = rig.status().expect("status file");
    let safe_readings = num(&safe, "/counters/readings") as i64;
    assert_eq!(
        num(&safe, "/losses/dropped_from_memory_readings"),
        0,
        "the memory bound was not reached: no loss may be counted\n{safe:#}"
    );
    std::thread::sleep(Duration::from_secs(3));
    send_signal(agent.pid(), "KILL");
    let _ = agent.wait_or_panic(STEP);
    let killed_at = started.elapsed();
    let first_stderr = agent.stderr_text();
    assert!(
        first_stderr.contains("spool writable again"),
        "no `spool writable again` line\n{}",
        rig.report(&agent)
    );
    assert!(
        segment_bytes(&spool_dir) > 8,
        "the spool holds no batch after the recovery"
    );

    // The broker is back; a second run delivers the first run's backlog.
    rig.broker.start_again();
    rig.sub.sync();
    let mut second = spawn(&simulate_args(&config, Some("3s"), "max", 22, DAY2), None);
    let status = second.wait_or_panic(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(0),
        "the second run must deliver the whole backlog and exit 0\n{}",
        rig.report(&second)
    );
    rig.sub.sync();
    let cov = coverage(&rig.records()).unwrap_or_else(|e| panic!("{e}"));
    let missing: Vec<i64> = (0..safe_readings)
        .map(|k| START_MS + k * 100)
        .filter(|t| !cov.distinct.contains_key(t))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of the {safe_readings} readings sampled before the kill never arrived, first ones: {:?} \
         (full-disk period: readings before {}; broker stopped at {stopped_at:?}, disk freed at \
         {freed_at:?})\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        START_MS + full_readings * 100,
        rig.report(&second)
    );
    let day2 = cov
        .distinct
        .keys()
        .filter(|t| (DAY2_MS..DAY2_MS + 86_400_000).contains(*t))
        .count();
    assert_eq!(day2, 30, "the second run's own readings");
    let stats = spool_stats(&config);
    assert_eq!(stats.num("unacked batches"), 0, "{}", stats.text);
    eprintln!(
        "disk full {}; broker stopped at {stopped_at:?} with {held} batch(es) in memory, disk freed at {freed_at:?}, \
         written at {written_at:?}, kill -9 at {killed_at:?}; {safe_readings} of {safe_readings} \
         readings sampled before the kill arrived ({} duplicates); test took {:?}",
        if fill_before_start {
            "before the start"
        } else {
            "after the start"
        },
        cov.duplicates,
        t0.elapsed()
    );
}

#[test]
fn memory_batches_from_a_disk_full_at_start_reach_it_and_survive_kill_9() {
    memory_batches_reach_the_disk_and_survive_kill_9(true);
}

#[test]
fn memory_batches_from_a_disk_filled_while_running_reach_it_and_survive_kill_9() {
    memory_batches_reach_the_disk_and_survive_kill_9(false);
}

/// Item 2: the memory buffer is bounded by bytes; past the bound the oldest batches not yet
/// handed to the publisher go, counted and logged, and nothing else is lost: readings
/// delivered + readings counted lost = readings sampled.
#[test]
fn memory_bound_drops_are_counted_and_nothing_else_is_lost() {
    let t0 = Instant::now();
    let mut rig = Rig::new(true);
    let mnt = rig.path("fs");
    let _fs = Tmpfs::mount(&mnt, "512k");
    let spool_dir = mnt.join("spool");
    let config = rig.config(&spool_dir, "memory_bytes = \"256KiB\"\n");
    Fault::Full.apply(&mnt);
    // No broker: nothing is acknowledged, the memory buffer fills.
    rig.broker.stop();

    let started = Instant::now();
    let mut agent = spawn(
        &simulate_args(&config, Some("3600s"), "10", 31, START),
        None,
    );
    let dropping = poll(STEP * 2, || {
        agent
            .stderr_text()
            .contains("memory buffer full")
            .then_some(())
    });
    assert!(
        dropping.is_some(),
        "256 KiB of memory buffer, no disk, no broker: no `memory buffer full` line\n{}",
        rig.report(&agent)
    );
    let dropping_at = started.elapsed();
    // Losses go on for a while (one log line per 10 s of them).
    std::thread::sleep(Duration::from_secs(12));
    let snap = poll(STEP, || {
        rig.status()
            .filter(|v| num(v, "/losses/dropped_from_memory_readings") > 0)
    })
    .unwrap_or_else(|| panic!("no loss in the status file\n{}", rig.report(&agent)));
    let mem_bytes = num(&snap, "/spool/memory_bytes");
    assert!(
        mem_bytes <= 256 * 1024,
        "the memory buffer holds {mem_bytes} bytes, over its bound of 256 KiB\n{snap:#}"
    );

    // Disk and broker back: what was kept goes out; then a clean stop.
    Fault::Full.mend(&mnt);
    rig.broker.start_again();
    rig.sub.sync();
    let drained = poll(STEP * 2, || {
        rig.status().filter(|v| {
            v.pointer("/spool/writable") == Some(&Value::Bool(true))
                && num(v, "/spool/memory_batches") == 0
                && num(v, "/backlog/batches") <= 3
        })
    });
    assert!(
        drained.is_some(),
        "the backlog did not drain after the recovery\n{}",
        rig.report(&agent)
    );
    send_signal(agent.pid(), "TERM");
    let status = agent.wait_or_panic(STEP);
    assert!(
        matches!(status.code(), Some(0 | 3)),
        "SIGTERM: exit 0 (or 3, a batch left in the spool)\n{}",
        rig.report(&agent)
    );
    let stderr = agent.stderr_text();
    let sampled = *numbers_after(&stderr, "summary: readings=")
        .first()
        .unwrap_or_else(|| panic!("no `summary: readings=N`\n{stderr}")) as i64;
    let lost = *numbers_after(&stderr, "dropped_from_memory_readings=")
        .first()
        .unwrap_or_else(|| panic!("no `dropped_from_memory_readings=N`\n{stderr}"))
        as i64;
    let loss_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("from the memory buffer"))
        .collect();
    let logged: u64 = loss_lines
        .iter()
        .flat_map(|l| numbers_after(l, "dropped "))
        .sum();
    // What the broker has, and what the spool still holds for the next start.
    let kept = spool_export(&config, None);
    poll(Duration::from_secs(10), || {
        (rig.timestamps().len() as i64 + kept.len() as i64 + lost >= sampled).then_some(())
    });
    rig.sub.sync();
    let mut records = rig.records();
    let delivered = coverage(&records)
        .unwrap_or_else(|e| panic!("{e}"))
        .distinct
        .len() as i64;
    records.extend(kept.iter().cloned());
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    let accounted = cov.distinct.len() as i64;
    support::json::assert_on_grid(&cov, START_MS, sampled);
    assert!(lost > 0, "the bound was reached: a loss must be counted");
    assert_eq!(
        logged as i64,
        lost,
        "the `dropped N reading(s) ... from the memory buffer` lines must add up to the counted loss\n{}",
        tail(&stderr, 6000)
    );
    assert_eq!(
        accounted + lost,
        sampled,
        "delivered or kept in the spool ({accounted}) + counted lost ({lost}) must be the {sampled} \
         readings sampled\n{}",
        tail(&stderr, 6000)
    );
    eprintln!(
        "memory bound 256 KiB: dropping at {dropping_at:?}, {mem_bytes} bytes held; {sampled} readings \
         sampled, {delivered} delivered, {} kept in the spool, {lost} counted lost in {} log line(s) \
         ({} duplicates); test took {:?}",
        kept.len(),
        loss_lines.len(),
        cov.duplicates,
        t0.elapsed()
    );
}
