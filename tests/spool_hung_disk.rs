//! A spool disk that hangs (issue 12: an SD card or USB stick that stops answering). No
//! error comes back: the spool thread blocks in its write or fsync, and the batches made
//! meanwhile queue for it. That queue is bounded by `delivery.memory_bytes` (and
//! `delivery.memory_batches`); past the bound new batches are dropped, counted and logged
//! once, and the agent goes on sampling. Once the disk answers, the queue drains and every
//! reading sampled is either delivered or counted as dropped.
//!
//! A real hung disk, no mocks: the spool is on ext4 on a loop device, and the kernel is made
//! to block every write to it (`fsfreeze --freeze`, the FIFREEZE ioctl: what
//! `dmsetup suspend` does to the file system on top of a device it suspends) until
//! `fsfreeze --unfreeze`. The spool thread sits in the kernel in uninterruptible sleep, as
//! on a card that stops answering. (This machine's kernel has no device-mapper driver, no
//! nbd and no ublk, so the device itself cannot be suspended here.) A Mosquitto with mutual
//! TLS and a `mosquitto_sub` show what arrived. Needs root and loop devices.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::json::coverage;
use support::process::{Proc, poll, send_signal, tail};
use support::spool::{Tuning, message_records, numbers_after, render_config};

/// Generous bound on each wait for the agent (a loaded 2-core machine).
const STEP: Duration = Duration::from_secs(60);
/// `delivery.memory_bytes`: the bound of the queue to the hung spool thread.
const MEMORY_BYTES: u64 = 16 * 1024;
/// `batch.max_bytes`: at 50 Hz a batch of about 1 KiB closes every ~150 ms, so the bound
/// is reached about 2 s into the hang.
const BATCH_MAX_BYTES: u64 = 1024;
// The config's minimum: memory_bytes is at least twice batch.max_bytes.
const _: () = assert!(BATCH_MAX_BYTES * 2 <= MEMORY_BYTES);
/// `delivery.memory_batches`: left at its default, far above what 16 KiB holds, so it is
/// the byte bound that is reached.
const MEMORY_BATCHES: u64 = 3600;
/// How long the disk stays hung once the drops have started.
const HANG_AFTER_DROPS: Duration = Duration::from_secs(5);
/// How much the agent's RSS may grow during the hang over its largest value before it.
/// The queue holds at most 16 KiB of batches (plus their `Batch` headers and the channel's
/// nodes, a few hundred bytes each at most); 2 MiB leaves room for allocator and page
/// granularity noise on a debug build, and is some 200 times less than the ~450 MiB the
/// count bound alone allowed (3,600 batches of up to 128 KiB).
const RSS_GROWTH_MAX_KIB: u64 = 2 * 1024;
/// The agent's RSS at any point of the run (a debug build; the release build is 7-8 MiB).
const RSS_MAX_KIB: u64 = 32 * 1024;

const TOOLS_HINT: &str = "this test needs root, loop devices and the tools losetup, \
    mkfs.ext4, mount, fsfreeze: apt-get install util-linux e2fsprogs mount";

const SBIN: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The path of a system tool (PATH, then the sbin directories root has).
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found ({TOOLS_HINT})"))
}

/// Runs a system tool to its end; panics (saying what is needed) if it fails.
fn sh(name: &str, args: &[&str]) -> String {
    let out = Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e} ({TOOLS_HINT})"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({TOOLS_HINT}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a system tool, ignoring the outcome (cleanup: never panics).
fn sh_quiet(name: &str, args: &[&str]) -> bool {
    let Some(exe) = SBIN
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
    else {
        return false;
    };
    Command::new(exe)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A loop device (the first free one: unique per test) over an image in `dir`, with an
/// ext4 mounted from it. Undone when dropped, also after a failure: thaw, umount,
/// losetup -d.
struct LoopDisk {
    loop_dev: String,
    mnt: PathBuf,
    mounted: bool,
}

impl LoopDisk {
    fn create(dir: &Path, bytes: u64) -> LoopDisk {
        for t in ["losetup", "mkfs.ext4", "mount", "umount", "fsfreeze"] {
            tool(t);
        }
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(bytes))
            .expect("the disk image");
        let img_s = img.to_str().expect("utf-8 path");
        let loop_dev = sh("losetup", &["-f", "--show", img_s]).trim().to_owned();
        let mut disk = LoopDisk {
            loop_dev,
            mnt: dir.join("mnt"),
            mounted: false,
        };
        sh("mkfs.ext4", &["-q", "-F", &disk.loop_dev]);
        std::fs::create_dir_all(&disk.mnt).expect("mkdir mnt");
        sh("mount", &[&disk.loop_dev, disk.mnt_str()]);
        disk.mounted = true;
        disk
    }

    fn mnt_str(&self) -> &str {
        self.mnt.to_str().expect("utf-8 path")
    }

    /// Every write to the disk blocks in the kernel until the returned guard thaws it
    /// (also when a failing test unwinds, before the agent is killed: a process blocked
    /// there cannot die until then).
    fn hang(&self) -> Hang<'_> {
        sh("fsfreeze", &["--freeze", self.mnt_str()]);
        Hang {
            disk: self,
            thawed: false,
        }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if self.mounted {
            let mnt = self.mnt.to_str().unwrap_or_default().to_owned();
            sh_quiet("fsfreeze", &["--unfreeze", &mnt]);
            if !sh_quiet("umount", &[&mnt]) {
                sh_quiet("umount", &["-l", &mnt]);
            }
        }
        sh_quiet("losetup", &["-d", &self.loop_dev]);
    }
}

/// The disk hung; it answers again when dropped.
struct Hang<'a> {
    disk: &'a LoopDisk,
    thawed: bool,
}

impl Hang<'_> {
    fn thaw(&mut self) {
        sh("fsfreeze", &["--unfreeze", self.disk.mnt_str()]);
        self.thawed = true;
    }
}

impl Drop for Hang<'_> {
    fn drop(&mut self) {
        if !self.thawed {
            sh_quiet("fsfreeze", &["--unfreeze", self.disk.mnt_str()]);
        }
    }
}

/// A number in the status file (0 when missing).
fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// The agent's resident set, KiB (`VmRSS` in /proc/PID/status).
fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// What the test sees of the agent while it runs: the status file and the RSS.
struct Watch {
    status_path: PathBuf,
    pid: u32,
    /// The most `spool.queued_bytes` (and batches) any status snapshot showed.
    max_queued_bytes: u64,
    max_queued_batches: u64,
    max_rss_kib: u64,
}

impl Watch {
    fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(&self.status_path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// One look: the status snapshot (if any) and the RSS, both kept track of.
    fn look(&mut self) -> Option<Value> {
        if let Some(rss) = rss_kib(self.pid) {
            self.max_rss_kib = self.max_rss_kib.max(rss);
        }
        let v = self.status()?;
        self.max_queued_bytes = self.max_queued_bytes.max(num(&v, "/spool/queued_bytes"));
        self.max_queued_batches = self
            .max_queued_batches
            .max(num(&v, "/spool/queued_batches"));
        Some(v)
    }
}

fn report(agent: &Proc, watch: &Watch, broker: &Broker) -> String {
    format!(
        "--- agent stderr (tail) ---\n{}\n--- status file ---\n{}\n--- broker log (tail) ---\n{}",
        tail(&agent.stderr_text(), 8000),
        watch
            .status()
            .map_or_else(|| "(none)".to_owned(), |v| format!("{v:#}")),
        tail(&broker.log(), 2000)
    )
}

#[test]
fn a_hung_disk_bounds_the_queue_by_bytes_and_loses_only_counted_readings() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    // The disk first: it is undone last, after the agent is gone.
    let disk = LoopDisk::create(dir.path(), 32 << 20);
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let sub = Subscriber::start(&broker);

    let spec = support::ConfigSpec::for_broker(&pki, &broker);
    let tuning = Tuning {
        spool_dir: Some(disk.mnt.join("spool")),
        max_bytes: "8MiB",
        segment_bytes: "1MiB",
        sync_interval: "always",
        memory_batches: MEMORY_BATCHES as usize,
        ..Tuning::default()
    };
    // The status file is on the tempdir's file system, not on the disk that hangs.
    let status_path = dir.path().join("status.json");
    let base = render_config(&spec, &tuning)
        .replace("rate_hz = 10\n", "rate_hz = 50\n")
        .replace("max_records = 10\n", "max_records = 50\n")
        .replace("max_bytes = \"128KiB\"\n", "max_bytes = \"1KiB\"\n");
    assert!(
        base.contains("rate_hz = 50") && base.contains("max_bytes = \"1KiB\""),
        "the base config changed shape:\n{base}"
    );
    // `render_config` ends with the `[delivery]` table.
    let text = format!(
        "{base}memory_bytes = \"{}KiB\"\n\n[status]\nfile = {}\nfile_interval = \"100ms\"\n",
        MEMORY_BYTES / 1024,
        support::toml_path(&status_path),
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, &text).expect("write config");

    let mut cmd = support::agent();
    cmd.args(["run", "--config"]).arg(&config);
    let mut agent = Proc::spawn("redline-agent", cmd);
    let mut watch = Watch {
        status_path,
        pid: agent.pid(),
        max_queued_bytes: 0,
        max_queued_batches: 0,
        max_rss_kib: 0,
    };

    // Running and delivering on a healthy disk (every batch fsynced) for a few seconds.
    let healthy = poll(STEP, || {
        assert!(
            agent.is_running(),
            "the agent exited before the hang\n{}",
            report(&agent, &watch, &broker)
        );
        watch.look().filter(|v| {
            v.pointer("/spool/writable") == Some(&Value::Bool(true))
                && num(v, "/counters/readings_acknowledged") >= 150
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "no readings acknowledged on the healthy disk\n{}",
            report(&agent, &watch, &broker)
        )
    });
    assert_eq!(
        num(&healthy, "/counters/dropped_readings"),
        0,
        "readings dropped before the disk hung (a healthy loop device too slow?)\n{}",
        report(&agent, &watch, &broker)
    );
    let rss_before_kib = watch.max_rss_kib;

    // The disk hangs.
    let mut hang = disk.hang();
    let hung_at = Instant::now();
    let readings_at_hang = num(&healthy, "/counters/readings");
    let dropping = poll(STEP, || {
        assert!(
            agent.is_running(),
            "the agent died on the hung disk\n{}",
            report(&agent, &watch, &broker)
        );
        watch
            .look()
            .filter(|v| num(v, "/counters/dropped_readings") > 0)
    })
    .unwrap_or_else(|| {
        panic!(
            "the disk hung and no reading was dropped: is the queue unbounded?\n{}",
            report(&agent, &watch, &broker)
        )
    });
    let drops_after = hung_at.elapsed();
    assert!(
        num(&dropping, "/spool/queued_batches") > 0,
        "the queue to the spool thread is empty while dropping:\n{dropping:#}"
    );
    // Hung a while longer: the agent keeps sampling, dropping and counting, its memory flat.
    let mut last = dropping.clone();
    let hold = Instant::now();
    while hold.elapsed() < HANG_AFTER_DROPS {
        assert!(
            agent.is_running(),
            "the agent died on the hung disk\n{}",
            report(&agent, &watch, &broker)
        );
        if let Some(v) = watch.look() {
            last = v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        num(&last, "/counters/dropped_readings") > num(&dropping, "/counters/dropped_readings"),
        "no more drops counted while the disk stayed hung\n{}",
        report(&agent, &watch, &broker)
    );
    assert!(
        num(&last, "/counters/readings") > readings_at_hang + 100,
        "sampling stopped while the disk hung\n{}",
        report(&agent, &watch, &broker)
    );
    let rss_hung_kib = watch.max_rss_kib;
    let dropped_while_hung = num(&last, "/counters/dropped_readings");

    // The disk answers again: the queue drains, everything goes out.
    hang.thaw();
    let hang_time = hung_at.elapsed();
    drop(hang);
    let drained = poll(STEP * 2, || {
        assert!(
            agent.is_running(),
            "the agent exited after the disk came back\n{}",
            report(&agent, &watch, &broker)
        );
        watch.look().filter(|v| {
            num(v, "/spool/queued_batches") == 0
                && num(v, "/backlog/batches") <= 3
                && num(v, "/counters/readings_acknowledged") + num(v, "/counters/dropped_readings")
                    >= num(&last, "/counters/readings")
        })
    });
    assert!(
        drained.is_some(),
        "the queue and backlog did not drain after the disk came back\n{}",
        report(&agent, &watch, &broker)
    );

    send_signal(agent.pid(), "TERM");
    let status = agent.wait_or_panic(STEP);
    let stderr = agent.stderr_text();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM: exit 0 with everything acknowledged\n{}",
        report(&agent, &watch, &broker)
    );
    // The last snapshot (written while running): the peak is a maximum since the start.
    let final_status = watch.status().expect("a status file");
    let peak = num(&final_status, "/spool/queued_peak_bytes");

    // The figures of the exit summary.
    let summary = |line_has: &str, key: &str| {
        stderr
            .lines()
            .filter(|l| l.contains(line_has))
            .find_map(|l| numbers_after(l, &format!(" {key}=")).first().copied())
            .unwrap_or_else(|| {
                panic!(
                    "no `{line_has}` line with {key}=N in the log\n{}",
                    tail(&stderr, 6000)
                )
            })
    };
    let sampled = summary("summary: readings=", "readings");
    let dropped = summary("summary: readings=", "dropped_readings");
    let from_memory = summary("summary: spool:", "dropped_from_memory_readings");
    let at_cap = summary("summary: spool:", "dropped_at_cap_readings");
    let write_errors = summary("summary: spool:", "write_errors");

    // One clear log line for the hung disk, at the byte bound.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("(a hung disk?)"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one hung-disk error line, got {}:\n{}",
        lines.len(),
        tail(&stderr, 6000)
    );
    assert!(lines[0].contains("ERROR"), "{}", lines[0]);
    let logged_batches = *numbers_after(lines[0], "none of the last ")
        .first()
        .unwrap_or_else(|| panic!("no batch count in {}", lines[0]));
    let logged_bytes = *numbers_after(lines[0], "batch(es), ")
        .first()
        .unwrap_or_else(|| panic!("no byte count in {}", lines[0]));
    // The largest batch costs its body (at most batch.max_bytes) and 4 bytes per record.
    let largest_batch = BATCH_MAX_BYTES + 4 * 50;
    assert!(
        logged_bytes <= MEMORY_BYTES && logged_bytes + largest_batch > MEMORY_BYTES,
        "drops start once the queued bytes ({logged_bytes}) reach the bound ({MEMORY_BYTES}): {}",
        lines[0]
    );
    assert!(
        logged_batches < MEMORY_BATCHES,
        "the byte bound, not the batch count, was reached: {}",
        lines[0]
    );

    // Queued bytes never over the bound, and the bound was reached.
    assert!(
        peak <= MEMORY_BYTES && watch.max_queued_bytes <= MEMORY_BYTES,
        "queued bytes over the bound of {MEMORY_BYTES}: peak {peak}, seen {}\n{final_status:#}",
        watch.max_queued_bytes
    );
    assert!(
        peak + largest_batch > MEMORY_BYTES,
        "the queue peaked at {peak} bytes, short of the bound {MEMORY_BYTES}"
    );

    // Memory bounded while hung.
    assert!(
        rss_hung_kib <= rss_before_kib + RSS_GROWTH_MAX_KIB && rss_hung_kib <= RSS_MAX_KIB,
        "RSS while hung {rss_hung_kib} KiB, before {rss_before_kib} KiB: more than \
         {RSS_GROWTH_MAX_KIB} KiB of growth or over {RSS_MAX_KIB} KiB"
    );

    // Nothing else lost: the disk hung, it never failed.
    assert_eq!(
        (from_memory, at_cap, write_errors),
        (0, 0, 0),
        "dropped_from_memory_readings, dropped_at_cap_readings, write_errors\n{}",
        tail(&stderr, 6000)
    );
    assert!(
        dropped >= dropped_while_hung && dropped > 0,
        "dropped_readings={dropped} in the summary, {dropped_while_hung} in the status"
    );

    // Every reading sampled is delivered, counted dropped, or kept on disk, exactly.
    // A clean stop publishes what is live and keeps the backlog on disk for the next start
    // (by design): on a loaded machine the last batches of the drain can still be there.
    // They are no loss: read them back from the spool as `spool export` would.
    let mut exported = Vec::new();
    redline_agent::spool::inspect::export(&disk.mnt.join("spool"), &mut exported)
        .expect("spool export");
    let kept: std::collections::BTreeSet<i64> = String::from_utf8_lossy(&exported)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["timestamp"].as_i64())
        .collect();
    let mut sub = sub;
    poll(STEP, || {
        let payloads: Vec<String> = sub.telemetry().into_iter().map(|(_, p)| p).collect();
        let n = coverage(&message_records(&payloads).concat()).map_or(0, |c| {
            c.distinct.len()
                + kept
                    .iter()
                    .filter(|ts| !c.distinct.contains_key(ts))
                    .count()
        }) as u64;
        (n + dropped >= sampled).then_some(())
    });
    sub.sync();
    let payloads: Vec<String> = sub
        .telemetry()
        .into_iter()
        .map(|(topic, p)| {
            assert_eq!(topic, support::TOPIC, "telemetry on an unexpected topic");
            p
        })
        .collect();
    let cov = coverage(&message_records(&payloads).concat()).unwrap_or_else(|e| panic!("{e}"));
    let delivered = cov.distinct.len() as u64;
    let kept = kept
        .iter()
        .filter(|ts| !cov.distinct.contains_key(ts))
        .count() as u64;
    eprintln!(
        "hung disk (fsfreeze on a loop device, spool.sync_interval = always, memory_bytes = \
         {MEMORY_BYTES}): hung {hang_time:.1?}, drops from {drops_after:.1?} into the hang; \
         peak queued {peak} bytes ({} batches seen at most; logged at the first drop: \
         {logged_batches} batches, {logged_bytes} bytes); RSS {rss_before_kib} KiB before, \
         {rss_hung_kib} KiB at most while hung; {sampled} readings sampled = {delivered} \
         delivered + {dropped} dropped + {kept} kept on disk by the stop ({} duplicates); \
         test took {:.1?}",
        watch.max_queued_batches,
        cov.duplicates,
        t0.elapsed()
    );
    assert_eq!(
        delivered + dropped + kept,
        sampled,
        "delivered ({delivered}) + dropped ({dropped}) + kept in the spool ({kept}) must be \
         the {sampled} readings sampled\n{}",
        tail(&stderr, 6000)
    );
    drop(agent);
    drop(disk);
}
