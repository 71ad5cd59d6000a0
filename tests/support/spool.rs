//! Helpers of the disk-spool tests (`tests/spool_e2e.rs`): agent configs with `[spool]`
//! and `[delivery]`, the spool's files as documented (segments of CRC frames), the
//! `spool export` and `spool stats` commands, signals to a running Mosquitto, arrival
//! times of messages, a small tmpfs, and a seeded random generator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::broker::Subscriber;
use super::json::{self, PayloadMode, Record};
use super::process::{Finished, Proc, run};
use super::{ConfigSpec, agent, toml_path};

/// The tables a spool test adds to the base config of `ConfigSpec`.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// `None`: no `[spool]` table (`simulate` then uses a temporary spool).
    pub spool_dir: Option<PathBuf>,
    pub max_bytes: &'static str,
    pub segment_bytes: &'static str,
    pub sync_interval: &'static str,
    pub order: &'static str,
    pub max_publish_per_sec: u32,
    pub max_bytes_per_sec: &'static str,
    pub shutdown_timeout: &'static str,
    pub memory_batches: usize,
    /// `mqtt.reconnect_max`: short, so that no test waits long for a reconnect.
    pub reconnect_max: &'static str,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            spool_dir: None,
            max_bytes: "1GiB",
            segment_bytes: "8MiB",
            sync_interval: "1s",
            order: "live-first",
            max_publish_per_sec: 50,
            max_bytes_per_sec: "256KiB",
            shutdown_timeout: "5s",
            memory_batches: 3600,
            reconnect_max: "2s",
        }
    }
}

/// The base config (which ends with the `[mqtt]` table) plus the backoff keys, `[spool]`
/// and `[delivery]`.
pub fn render_config(spec: &ConfigSpec, t: &Tuning) -> String {
    let mut s = spec.render();
    s.push_str(&format!(
        "reconnect_min = \"1s\"\nreconnect_max = \"{}\"\n",
        t.reconnect_max
    ));
    if let Some(dir) = &t.spool_dir {
        s.push_str(&format!(
            "\n[spool]\ndir = {}\nmax_bytes = \"{}\"\nsegment_bytes = \"{}\"\nsync_interval = \"{}\"\n",
            toml_path(dir),
            t.max_bytes,
            t.segment_bytes,
            t.sync_interval
        ));
    }
    s.push_str(&format!(
        "\n[delivery]\norder = \"{}\"\nmax_publish_per_sec = {}\nmax_bytes_per_sec = \"{}\"\nshutdown_timeout = \"{}\"\nmemory_batches = {}\n",
        t.order, t.max_publish_per_sec, t.max_bytes_per_sec, t.shutdown_timeout, t.memory_batches
    ));
    s
}

/// Writes the config into `dir/name` and returns its path.
pub fn write_config(spec: &ConfigSpec, t: &Tuning, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, render_config(spec, t)).unwrap();
    path
}

/// `simulate --config FILE [--duration D] --speed S --seed N --start T`.
pub fn simulate_args(
    config: &Path,
    duration: Option<&str>,
    speed: &str,
    seed: u64,
    start: &str,
) -> Vec<String> {
    let mut a = vec![
        "simulate".to_owned(),
        "--config".to_owned(),
        config.to_str().expect("utf-8 path").to_owned(),
    ];
    if let Some(d) = duration {
        a.push("--duration".to_owned());
        a.push(d.to_owned());
    }
    for (k, v) in [
        ("--speed", speed.to_owned()),
        ("--seed", seed.to_string()),
        ("--start", start.to_owned()),
    ] {
        a.push(k.to_owned());
        a.push(v);
    }
    a
}

/// Starts the agent in the background.
pub fn spawn_agent(args: &[String]) -> Proc {
    let mut cmd = agent();
    cmd.args(args);
    Proc::spawn("redline-agent", cmd)
}

/// Runs the agent to its end (panics after `timeout`).
pub fn run_agent_to_end(args: &[String], timeout: std::time::Duration) -> Finished {
    let mut cmd = agent();
    cmd.args(args);
    run("redline-agent", cmd, timeout)
}

fn spool_command(args: &[&str]) -> Finished {
    let mut cmd = agent();
    cmd.arg("spool").args(args);
    run(
        "redline-agent spool",
        cmd,
        std::time::Duration::from_secs(30),
    )
}

/// `spool export --config FILE [--dir DIR]`: every unacknowledged record, checked
/// against the record contract.
pub fn spool_export(config: &Path, dir: Option<&Path>) -> Vec<Record> {
    let mut args = vec!["export", "--config", config.to_str().expect("utf-8 path")];
    if let Some(d) = dir {
        args.push("--dir");
        args.push(d.to_str().expect("utf-8 path"));
    }
    let out = spool_command(&args);
    assert_eq!(
        out.code(),
        Some(0),
        "`spool export` failed\n{}",
        out.describe()
    );
    out.stdout_text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            json::parse(line)
                .and_then(|j| json::check_record(&j))
                .unwrap_or_else(|e| {
                    panic!("`spool export` line {} breaks the contract: {e}", i + 1)
                })
        })
        .collect()
}

/// `spool stats --config FILE`, as `key -> value` (keys such as `unacked batches`).
pub struct SpoolStats {
    pub fields: BTreeMap<String, String>,
    pub text: String,
}

impl SpoolStats {
    /// The leading number of a field; panics naming the field if it is missing.
    pub fn num(&self, key: &str) -> u64 {
        let v = self.fields.get(key).unwrap_or_else(|| {
            panic!(
                "`spool stats` prints no `{key}:` line; output:\n{}",
                self.text
            )
        });
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("`spool stats` `{key}: {v}` is not a number"))
    }
}

pub fn spool_stats(config: &Path) -> SpoolStats {
    let out = spool_command(&["stats", "--config", config.to_str().expect("utf-8 path")]);
    assert_eq!(
        out.code(),
        Some(0),
        "`spool stats` failed\n{}",
        out.describe()
    );
    let fields = out
        .stdout_text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    SpoolStats {
        fields,
        text: out.stdout_text,
    }
}

/// The magic at the start of every segment file the agent writes (spool format 2; format 1,
/// `RDLSEG01` with 16-byte frame headers and no sync marker, is still read by the agent).
pub const SEG_MAGIC: &[u8; 8] = b"RDLSEG02";
/// A frame header: sync marker FF 52 44 4C, u32 LE payload length, u64 LE seq, u32 LE CRC32
/// (of length, seq and payload), u32 LE CRC32 of the 20 header bytes before it.
pub const FRAME_HEADER: u64 = 24;
/// The sync marker that starts every frame.
pub const FRAME_SYNC: [u8; 4] = [0xFF, b'R', b'D', b'L'];
/// The seq of a hole: damage the agent already counted; its `len` bytes are skipped.
pub const HOLE_SEQ: u64 = u64::MAX;

/// One frame of a segment file: where it starts and how long it is (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub offset: u64,
    pub len: u64,
    pub seq: u64,
}

/// The segment files of a spool directory, oldest first (by their 20-digit name).
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".seg"))
                    .is_some_and(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    segs.sort();
    segs
}

/// Total size of the segment files of `dir`.
pub fn segment_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".seg")))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The frames of an intact segment, found by their sync markers and length fields (CRCs not
/// checked); holes are left out.
pub fn frames(path: &Path) -> Vec<Frame> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        bytes.len() >= 8 && &bytes[..8] == SEG_MAGIC,
        "{} does not start with {:?}",
        path.display(),
        std::str::from_utf8(SEG_MAGIC).unwrap()
    );
    let mut out = Vec::new();
    let mut at = 8usize;
    while at + FRAME_HEADER as usize <= bytes.len() {
        assert_eq!(
            bytes[at..at + 4],
            FRAME_SYNC,
            "{}: no sync marker at byte {at}",
            path.display()
        );
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as u64;
        let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        let total = FRAME_HEADER + len;
        if at as u64 + total > bytes.len() as u64 {
            break;
        }
        if seq != HOLE_SEQ {
            out.push(Frame {
                offset: at as u64,
                len: total,
                seq,
            });
        }
        at += total as usize;
    }
    assert_eq!(
        at,
        bytes.len(),
        "{}: frames do not end where the file ends",
        path.display()
    );
    out
}

/// Copies the regular files of `from` into a new directory `to`.
pub fn copy_dir_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The pid of the mosquitto started by `Broker` with its files in `broker_dir`
/// (found by its command line `mosquitto -c BROKER_DIR/mosquitto.conf`).
pub fn broker_pid(broker_dir: &Path) -> u32 {
    let conf = broker_dir.join("mosquitto.conf");
    let conf = conf.to_str().expect("utf-8 path");
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_mosquitto = args
            .first()
            .is_some_and(|a| a.ends_with(b"/mosquitto") || *a == b"mosquitto");
        if is_mosquitto && args.contains(&conf.as_bytes()) {
            return pid;
        }
    }
    panic!("no mosquitto process runs with {conf}");
}

/// One telemetry message and when it arrived: after `after` (the poll before that saw
/// nothing of it) and no later than `at` (the poll that saw it).
#[derive(Debug, Clone)]
pub struct Arrival {
    pub after: Instant,
    pub at: Instant,
    pub payload: String,
}

/// Arrival times of the telemetry messages of a subscriber, measured by polling. Each
/// message is bracketed by two polls, so a stalled test thread widens the bracket instead
/// of bunching arrivals together.
#[derive(Debug)]
pub struct Arrivals {
    pub msgs: Vec<Arrival>,
    last_poll: Instant,
}

impl Arrivals {
    /// Messages already received when this is made count as arriving at the first poll.
    pub fn new() -> Arrivals {
        Arrivals {
            msgs: Vec::new(),
            last_poll: Instant::now(),
        }
    }

    /// Records the messages that arrived since the last call; returns how many.
    pub fn poll(&mut self, sub: &Subscriber) -> usize {
        let after = self.last_poll;
        let all = sub.telemetry();
        let now = Instant::now();
        self.last_poll = now;
        let new = all.len().saturating_sub(self.msgs.len());
        for (_, payload) in all.into_iter().skip(self.msgs.len()) {
            self.msgs.push(Arrival {
                after,
                at: now,
                payload,
            });
        }
        new
    }
}

impl Default for Arrivals {
    fn default() -> Self {
        Arrivals::new()
    }
}

/// The records of each message, checked against the message contract (at most 500
/// records and 128 KiB each, records in time order).
pub fn message_records(payloads: &[String]) -> Vec<Vec<Record>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json::check_message(p, PayloadMode::Records).unwrap_or_else(|e| {
                panic!(
                    "telemetry message {i} breaks the contract: {e}\n{}",
                    super::process::tail(p, 500)
                )
            })
        })
        .collect()
}

/// The integers that follow `needle` in `text` (one per occurrence that has digits).
pub fn numbers_after(text: &str, needle: &str) -> Vec<u64> {
    text.match_indices(needle)
        .filter_map(|(i, _)| {
            let rest = &text[i + needle.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// A tmpfs of a given size mounted for the life of the value (needs root or
/// CAP_SYS_ADMIN). Unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount(8): {e}"));
        assert!(
            out.status.success(),
            "this test needs to mount a small tmpfs (root or CAP_SYS_ADMIN): \
             `mount -t tmpfs -o size={size} tmpfs {}` failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            path: path.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a child not reaped yet): detach it now, it goes when unused.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Writes zeros into `path` until the file system is full; returns the bytes written.
pub fn fill_until_enospc(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    written
}

/// xorshift64*: a small seeded generator for the test's random moments.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// Total size of the regular files directly in `dir` (segments, `acks`, `lock`).
pub fn dir_file_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len())
        .sum()
}
