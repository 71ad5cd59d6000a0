//! The serial source against real pseudo-terminals.
//!
//! Each test opens its own pty pairs (`/dev/ptmx`), points the agent (`run --stdout`) at a
//! slave, or at a symlink to one as `/dev/serial/by-id/...` would be, and plays the sensor on
//! the master: known values in each line format with garbage and bad lines in between, an
//! unplug and replug, a device that appears only after the start. `simulate --serial` is
//! checked on its own (the test reads the master) and end to end, bridged by the test into the
//! master of the agent's pty.
//!
//! The test writes to a master only once the agent has logged that it opened the slave: the
//! agent sets the line to raw mode then, and what it reads is deterministic from there (a
//! newline first syncs the framer). Before a master is closed, the symlink the agent follows is
//! pointed away, so that a retrying agent can never open a pty number that another test got.

#![cfg(target_os = "linux")]

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::json::{self, PayloadMode, Record};
use support::process::{Proc, poll, tail};

/// Pseudo-terminal pairs with std and the C library std already links (no extra crates).
mod pty {
    use std::ffi::{CStr, c_char, c_int};
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::{Path, PathBuf};

    /// Linux's O_NOCTTY: a test process must not get a controlling terminal.
    const O_NOCTTY: c_int = 0o400;

    unsafe extern "C" {
        fn grantpt(fd: c_int) -> c_int;
        fn unlockpt(fd: c_int) -> c_int;
        fn ptsname_r(fd: c_int, buf: *mut c_char, buflen: usize) -> c_int;
    }

    /// A pty master (std opens it close-on-exec: no child inherits it) and its slave's path.
    pub struct Pty {
        pub master: File,
        pub slave: PathBuf,
    }

    pub fn open() -> Pty {
        let master = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_NOCTTY)
            .open("/dev/ptmx")
            .expect("open /dev/ptmx");
        let fd = master.as_raw_fd();
        // SAFETY: `fd` is an open pty master, owned by `master` for the whole block.
        unsafe {
            assert_eq!(grantpt(fd), 0, "grantpt: {}", io::Error::last_os_error());
            assert_eq!(unlockpt(fd), 0, "unlockpt: {}", io::Error::last_os_error());
        }
        let mut name: [c_char; 128] = [0; 128];
        // SAFETY: the buffer is writable for its length; ptsname_r NUL-terminates on success.
        let rc = unsafe { ptsname_r(fd, name.as_mut_ptr(), name.len()) };
        assert_eq!(rc, 0, "ptsname_r: {}", io::Error::from_raw_os_error(rc));
        // SAFETY: NUL-terminated by ptsname_r (rc == 0), inside `name`.
        let slave = unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_str()
            .expect("pty name is UTF-8")
            .to_owned();
        Pty {
            master,
            slave: PathBuf::from(slave),
        }
    }

    /// Opens a slave, e.g. to keep the pair alive while another process writes to it.
    pub fn open_slave(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_NOCTTY)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    }
}

const VEHICLE: &str = "GT3-SER";
const SESSION: &str = "s";
const LINE_PERIOD: Duration = Duration::from_millis(50);
/// Later than this after the last line, every field must be null (stale after 500 ms).
const STALE_MARGIN_MS: i64 = 700;
/// From this long after the first line of new values, records must carry them.
const SETTLE_MS: i64 = 250;
/// A reading stamped T may hold what arrived up to this long after T: the sampler reads the
/// table when it wakes, and a wake-up a whole period (100 ms) late samples the later tick
/// instead (counted as a missed tick); 50 ms more for a thread preempted in between. So
/// values sent at t can show in readings stamped after t - SAMPLE_LAG_MS, never before: the
/// edges of the windows do not assume that the sampler wakes on time.
const SAMPLE_LAG_MS: i64 = 150;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("serial-pty-")
        .tempdir()
        .expect("temp dir")
}

/// Points `link` at `target` with an atomic rename of a new symlink over it.
fn point_link(link: &Path, target: &Path) {
    let fresh = link.with_extension("new");
    let _ = std::fs::remove_file(&fresh);
    std::os::unix::fs::symlink(target, &fresh).expect("symlink");
    std::fs::rename(&fresh, link).expect("rename the new symlink into place");
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

// ---------------------------------------------------------------------------------------------
// The agent

fn write_config(dir: &Path, device: &Path, format: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"[vehicle]
id = "{VEHICLE}"
session_id = "{SESSION}"

[source]
kind = "serial"
device = {device}
baud = 115200
format = "{format}"
max_line = 512
{extra}
"#,
        device = support::toml_path(device),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn start_agent(config: &Path) -> Proc {
    let mut cmd = support::agent();
    cmd.arg("run").arg("--config").arg(config).arg("--stdout");
    Proc::spawn("redline-agent run", cmd)
}

/// Waits until stderr holds one of `needles`; panics with the log if the agent exits first or
/// `timeout` passes.
fn wait_log(agent: &mut Proc, needles: &[&str], timeout: Duration) {
    let found = poll(timeout, || {
        let err = agent.stderr_text();
        if needles.iter().any(|n| err.contains(n)) {
            return Some(true);
        }
        if !agent.is_running() {
            return Some(false);
        }
        None
    });
    if found != Some(true) {
        panic!(
            "the agent did not log any of {needles:?} within {timeout:?} (running: {})\n--- stderr ---\n{}",
            agent.is_running(),
            tail(&agent.stderr_text(), 6000)
        );
    }
}

/// What the agent left behind once stopped.
struct Finished {
    stderr: String,
    records: Vec<Record>,
    summary: Summary,
}

impl Finished {
    /// stderr lines about the serial device holding `word`.
    fn device_logs(&self, word: &str) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.contains("serial device") && l.contains(word))
            .collect()
    }
}

/// SIGTERM; the agent must exit 0 with a summary, and its stdout must keep the message contract.
fn stop_agent(agent: &mut Proc) -> Finished {
    let status: ExitStatus = agent.terminate();
    let stderr = agent.stderr_text();
    assert!(
        status.success(),
        "the agent must exit 0 on SIGTERM, got {status:?}\n--- stderr ---\n{}",
        tail(&stderr, 6000)
    );
    let summary = parse_summary(&stderr);
    let records = records_of(&agent.stdout_lines(), summary.ticks_missed, &stderr);
    Finished {
        stderr,
        records,
        summary,
    }
}

#[derive(Debug)]
struct Summary {
    lines: u64,
    ticks_missed: u64,
    rejected: BTreeMap<String, u64>,
}

fn parse_summary(stderr: &str) -> Summary {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains("summary: "))
        .unwrap_or_else(|| panic!("no `summary:` line on stderr\n{}", tail(stderr, 6000)));
    let counter = |name: &str| {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(name)?.strip_prefix('='))
            .map_or(0, |v| {
                v.parse::<u64>()
                    .unwrap_or_else(|e| panic!("{name}={v} in {line:?}: {e}"))
            })
    };
    let mut rejected = BTreeMap::new();
    if let Some((_, rest)) = line.split_once("rejected:") {
        for token in rest.split_whitespace() {
            let (reason, n) = token
                .split_once('=')
                .unwrap_or_else(|| panic!("`{token}` after `rejected:` in {line:?}"));
            let n = n
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("`{token}` in {line:?}: {e}"));
            rejected.insert(reason.to_owned(), n);
        }
    }
    Summary {
        lines: counter("lines"),
        ticks_missed: counter("ticks_missed"),
        rejected,
    }
}

/// Every record of every stdout line, checked: the message shape, 10 records a line (fewer in
/// the last, or where a missed tick let a batch close on age), the vehicle and session, the
/// 100 ms grid, time order.
fn records_of(lines: &[String], ticks_missed: u64, stderr: &str) -> Vec<Record> {
    let mut records = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let rs = json::check_message(line, PayloadMode::Records)
            .unwrap_or_else(|e| panic!("stdout line {} breaks the contract: {e}", i + 1));
        let last = i + 1 == lines.len();
        assert!(
            rs.len() == 10 || ((last || ticks_missed > 0) && rs.len() < 10),
            "stdout line {} carries {} records, expected 10 (ticks_missed={ticks_missed})",
            i + 1,
            rs.len()
        );
        records.extend(rs);
    }
    assert!(
        !records.is_empty(),
        "no records on stdout\n--- stderr ---\n{}",
        tail(stderr, 6000)
    );
    for r in &records {
        assert_eq!(r.vehicle_id, VEHICLE);
        assert_eq!(r.session_id, SESSION);
        assert_eq!(r.timestamp % 100, 0, "timestamp off the 100 ms grid: {r:?}");
    }
    for w in records.windows(2) {
        assert!(
            w[1].timestamp > w[0].timestamp,
            "records out of time order: {} then {}",
            w[0].timestamp,
            w[1].timestamp
        );
    }
    records
}

/// Records with `from_ms <= timestamp <= to_ms`; at least `min` of them.
fn window(records: &[Record], from_ms: i64, to_ms: i64, min: usize, what: &str) -> Vec<Record> {
    let got: Vec<Record> = records
        .iter()
        .filter(|r| r.timestamp >= from_ms && r.timestamp <= to_ms)
        .cloned()
        .collect();
    assert!(
        got.len() >= min,
        "{what}: expected at least {min} records in [{from_ms}, {to_ms}], got {} (record times {:?}..{:?})",
        got.len(),
        records.first().map(|r| r.timestamp),
        records.last().map(|r| r.timestamp)
    );
    got
}

fn assert_all_null(records: &[Record], what: &str) {
    for r in records {
        assert_eq!(
            r.values, [None; 4],
            "{what}: every field must be null at {}",
            r.timestamp
        );
    }
}

fn assert_all_equal(records: &[Record], expected: [Option<f64>; 4], what: &str) {
    for r in records {
        assert_eq!(
            r.values, expected,
            "{what}: record at {} (expected {expected:?})",
            r.timestamp
        );
    }
}

fn assert_plausible(values: [f64; 4], what: &str) {
    let [fl, fr, rpm, oil] = values;
    assert!(
        (0.0..=1200.0).contains(&fl),
        "{what}: brake_disc_temp_fl {fl}"
    );
    assert!(
        (0.0..=1200.0).contains(&fr),
        "{what}: brake_disc_temp_fr {fr}"
    );
    assert!((1000.0..=9000.0).contains(&rpm), "{what}: engine_rpm {rpm}");
    assert!(
        (0.0..=160.0).contains(&oil),
        "{what}: engine_oil_temp {oil}"
    );
}

// ---------------------------------------------------------------------------------------------
// The sensor side

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Kv,
    Csv,
    Nmea,
}

/// What a sensor line carries; the floats have a second decimal so that rounding shows.
#[derive(Debug, Clone, Copy)]
struct Car {
    fl: f64,
    fr: f64,
    rpm: i64,
    oil: f64,
}

const CAR_A: Car = Car {
    fl: 652.34,
    fr: 648.06,
    rpm: 7850,
    oil: 105.21,
};
const CAR_B: Car = Car {
    fl: 701.27,
    fr: 689.94,
    rpm: 8120,
    oil: 110.96,
};
const CAR_C: Car = Car {
    fl: 312.88,
    fr: 305.02,
    rpm: 4410,
    oil: 98.74,
};

impl Car {
    /// The record's values: floats rounded to one decimal.
    fn expected(self) -> [Option<f64>; 4] {
        [
            Some(round1(self.fl)),
            Some(round1(self.fr)),
            Some(self.rpm as f64),
            Some(round1(self.oil)),
        ]
    }
}

fn nmea_checksum(body: &[u8]) -> u8 {
    body.iter().fold(0, |sum, b| sum ^ b)
}

fn nmea(body: &str) -> String {
    format!("${body}*{:02X}", nmea_checksum(body.as_bytes()))
}

/// kv keys of the format test: two fields renamed, two under their own names.
const KV_KEYS: &str = "[source.keys]\nbrake_disc_temp_fl = \"BTFL\"\nengine_rpm = \"RPM\"\n";
/// csv columns of the format test: reordered, with a skipped text column and an empty one.
const CSV_COLUMNS: &str = "columns = [\"engine_rpm\", \"-\", \"brake_disc_temp_fl\", \"\", \
                           \"brake_disc_temp_fr\", \"engine_oil_temp\"]\n";

/// A valid line of `car`; `variant` varies the separators, padding and terminator.
fn valid_line(format: Format, car: Car, variant: usize) -> Vec<u8> {
    let Car { fl, fr, rpm, oil } = car;
    let mut line = match format {
        Format::Kv => {
            let seps = [" ", ",", "\t", " , "];
            let s = |k: usize| seps[(variant + k) % seps.len()];
            format!(
                "BTFL={fl}{}brake_disc_temp_fr={fr}{}RPM={rpm}{}engine_oil_temp={oil}",
                s(0),
                s(1),
                s(2)
            )
        }
        Format::Csv => {
            let pad = if variant.is_multiple_of(2) { "" } else { " " };
            format!("{rpm},ECU,{pad}{fl}{pad},,{fr},{oil}")
        }
        Format::Nmea => nmea(&format!("RDLTM,{fl},{fr},{rpm},{oil}")),
    }
    .into_bytes();
    line.extend_from_slice(if variant.is_multiple_of(2) {
        b"\n"
    } else {
        b"\r\n"
    });
    line
}

/// Default kv keys and csv/nmea columns (the record's fields in order).
fn default_line(format: Format, car: Car) -> Vec<u8> {
    let Car { fl, fr, rpm, oil } = car;
    let line = match format {
        Format::Kv => format!(
            "brake_disc_temp_fl={fl} brake_disc_temp_fr={fr},engine_rpm={rpm} engine_oil_temp={oil}"
        ),
        Format::Csv => format!("{fl},{fr},{rpm},{oil}"),
        Format::Nmea => nmea(&format!("RDLTM,{fl},{fr},{rpm},{oil}")),
    };
    format!("{line}\r\n").into_bytes()
}

/// A line of random bytes that is not UTF-8 and holds no line terminator.
fn garbage(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let len = 40 + (next() % 40) as usize;
    let mut line = vec![0xFF, 0xC3, 0x28];
    while line.len() < len {
        let b = next() as u8;
        if b != b'\n' && b != b'\r' {
            line.push(b);
        }
    }
    line.push(b'\n');
    line
}

/// A bad input the format test sends between two valid lines.
enum Bad {
    /// A whole line (with terminator), and the reason the summary must count it under.
    Line(Vec<u8>, &'static str),
    /// More than `max_line` bytes, sent without a newline, then a newline. Its content would
    /// parse (with values of 1) if it were not dropped.
    Overlong(Vec<u8>),
}

fn bad_inputs(format: Format, car: Car) -> Vec<Bad> {
    let Car { fl, fr, rpm, oil } = car;
    let line = |s: String, reason| Bad::Line(format!("{s}\n").into_bytes(), reason);
    match format {
        Format::Kv => vec![
            Bad::Line(garbage(1), "not_utf8"),
            Bad::Overlong("RPM=1 ".repeat(110).into_bytes()),
            line(
                format!("BTFL=abc brake_disc_temp_fr={fr} RPM={rpm} engine_oil_temp={oil}"),
                "bad_number",
            ),
            line(
                format!(
                    "tyre_fl=80 BTFL={fl} brake_disc_temp_fr={fr} RPM={rpm} engine_oil_temp={oil}"
                ),
                "unknown_key",
            ),
            // The field's own name where the config renamed its key.
            line("brake_disc_temp_fl=1.0".into(), "unknown_key"),
            Bad::Line(garbage(2), "not_utf8"),
            line(format!("BTFL={fl} RPM=78x0"), "bad_number"),
        ],
        Format::Csv => vec![
            Bad::Line(garbage(3), "not_utf8"),
            Bad::Overlong(format!("1,ECU,1,,1,{}1", " ".repeat(600)).into_bytes()),
            line(format!("{rpm},ECU,6x2.3,,{fr},{oil}"), "bad_number"),
            line("1,2,3".into(), "wrong_column_count"),
            line("1,ECU,1,,1,1,1".into(), "wrong_column_count"),
            Bad::Line(garbage(4), "not_utf8"),
            line(format!("{rpm},ECU,{fl},,{fr},--5"), "bad_number"),
        ],
        Format::Nmea => {
            let body = "RDLTM,1,1,1,1";
            let wrong = nmea_checksum(body.as_bytes()) ^ 0x5A;
            vec![
                Bad::Line(garbage(5), "not_utf8"),
                Bad::Overlong(format!("{}{}", " ".repeat(600), nmea(body)).into_bytes()),
                line(nmea(&format!("RDLTM,{fl},6x8.1,{rpm},{oil}")), "bad_number"),
                line(format!("${body}*{wrong:02X}"), "bad_checksum"),
                line(format!("${body}"), "missing_checksum"),
                Bad::Line(garbage(6), "not_utf8"),
                line(nmea("GPRMC,1,1,1,1"), "unknown_sentence"),
                line(nmea("RDLTM,1,1,1"), "wrong_column_count"),
            ]
        }
    }
}

/// Sends what `line(i)` gives every 50 ms, `count` times; returns the wall time (ms) of the first
/// and the last. The pieces `line` returns are written with a pause between them, so that the
/// agent reads them apart.
fn send_lines(
    master: &mut File,
    count: usize,
    mut line: impl FnMut(usize) -> Vec<Vec<u8>>,
) -> (i64, i64) {
    let start = Instant::now();
    let (mut first, mut last) = (0, 0);
    for i in 0..count {
        let due = start + LINE_PERIOD * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        last = now_ms();
        if i == 0 {
            first = last;
        }
        for (k, piece) in line(i).iter().enumerate() {
            if k > 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            master.write_all(piece).expect("write to the pty master");
        }
    }
    (first, last)
}

// ---------------------------------------------------------------------------------------------
// 1. Each line format: values, rounding, rejections

fn format_test(format: Format) {
    let dir = tempdir();
    let pty::Pty { mut master, slave } = pty::open();
    let (name, extra) = match format {
        Format::Kv => ("kv", KV_KEYS),
        Format::Csv => ("csv", CSV_COLUMNS),
        Format::Nmea => ("nmea", ""),
    };
    let config = write_config(dir.path(), &slave, name, extra);
    let mut agent = start_agent(&config);
    wait_log(
        &mut agent,
        &["reading serial device"],
        Duration::from_secs(30),
    );

    // A few ticks with nothing received yet.
    std::thread::sleep(Duration::from_millis(350));
    let t_sync = now_ms();
    master.write_all(b"\n").expect("sync newline");
    // 40 valid lines at 20 Hz: car A, then car B; a bad input after every third line, away
    // from the switch.
    const LINES: usize = 40;
    const SWITCH: usize = 20;
    let slots = [2, 5, 8, 11, 14, 17, 26, 29, 32, 35];
    let car = |i: usize| if i < SWITCH { CAR_A } else { CAR_B };
    // Each bad input in the version of the phase it is sent in: a bad line that still carries
    // good values carries that phase's.
    let mut bad_a: Vec<Option<Bad>> = bad_inputs(format, CAR_A).into_iter().map(Some).collect();
    let mut bad_b: Vec<Option<Bad>> = bad_inputs(format, CAR_B).into_iter().map(Some).collect();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut bad_lines = 0u64;
    let mut t_switch = 0;
    let (t_first, t_last) = send_lines(&mut master, LINES, |i| {
        if i == SWITCH {
            t_switch = now_ms();
        }
        let mut out = vec![valid_line(format, car(i), i)];
        let Some(k) = slots.iter().position(|&s| s == i) else {
            return out;
        };
        let phase = if i < SWITCH { &mut bad_a } else { &mut bad_b };
        match phase.get_mut(k).and_then(Option::take) {
            Some(Bad::Line(bytes, reason)) => {
                out.push(bytes);
                *expected.entry(reason.into()).or_default() += 1;
                bad_lines += 1;
            }
            Some(Bad::Overlong(bytes)) => {
                // Past the limit without a newline, in two pieces, then the newline.
                assert!(bytes.len() > 512);
                let (a, b) = bytes.split_at(bytes.len() / 2);
                out.extend([a.to_vec(), b.to_vec(), b"\n".to_vec()]);
                *expected.entry("overlong".into()).or_default() += 1;
            }
            None => {}
        }
        out
    });
    // Let the fields go stale before stopping.
    std::thread::sleep(Duration::from_millis(1300));
    let done = stop_agent(&mut agent);
    drop(master);

    // Rejections: exactly what was sent, by reason.
    let mut rejected = done.summary.rejected.clone();
    let partial = rejected.remove("partial_at_start").unwrap_or(0);
    assert!(
        partial <= 1,
        "{name}: partial_at_start={partial} after one open"
    );
    assert_eq!(
        rejected,
        expected,
        "{name}: rejected counts (left: the summary, right: sent)\n{}",
        tail(&done.stderr, 3000)
    );
    // Every valid line was taken (and nothing counted that was not sent).
    let valid = LINES as u64;
    assert!(
        done.summary.lines >= valid && done.summary.lines <= valid + bad_lines,
        "{name}: lines={} but {valid} valid lines and {bad_lines} bad ones were sent",
        done.summary.lines
    );

    // Records: null before any line; car A, then car B, exactly as rounded; null once stale.
    let r = &done.records;
    let before = window(
        r,
        0,
        (t_sync - 1).min(t_first - SAMPLE_LAG_MS),
        1,
        "before the first line",
    );
    assert_all_null(&before, "never received");
    let a = window(r, t_first + SETTLE_MS, t_switch - SAMPLE_LAG_MS, 5, "car A");
    assert_all_equal(&a, CAR_A.expected(), &format!("{name} car A"));
    let b = window(r, t_switch + SETTLE_MS, t_last, 5, "car B");
    assert_all_equal(&b, CAR_B.expected(), &format!("{name} car B"));
    // Around the switch each field holds A or B, and once B, stays B.
    let mid = window(
        r,
        t_switch - SAMPLE_LAG_MS,
        t_switch + SETTLE_MS,
        0,
        "switch",
    );
    for f in 0..4 {
        let (va, vb) = (CAR_A.expected()[f], CAR_B.expected()[f]);
        let mut seen_b = false;
        for rec in &mid {
            let v = rec.values[f];
            assert!(
                v == va || v == vb,
                "{name}: field {f} at {} is {v:?}, neither {va:?} nor {vb:?}",
                rec.timestamp
            );
            assert!(
                !(seen_b && v == va),
                "{name}: field {f} went back to car A at {}",
                rec.timestamp
            );
            seen_b |= v == vb;
        }
    }
    let stale = window(
        r,
        t_last + STALE_MARGIN_MS,
        i64::MAX,
        3,
        "after the last line",
    );
    assert_all_null(&stale, "stale after 500 ms");
}

#[test]
fn kv_lines_give_their_values_and_bad_input_is_counted_by_reason() {
    format_test(Format::Kv);
}

#[test]
fn csv_lines_give_their_values_and_bad_input_is_counted_by_reason() {
    format_test(Format::Csv);
}

#[test]
fn nmea_lines_give_their_values_and_bad_input_is_counted_by_reason() {
    format_test(Format::Nmea);
}

// ---------------------------------------------------------------------------------------------
// 2. Unplug and replug

#[test]
fn unplugged_device_goes_stale_and_readings_resume_after_replug() {
    let dir = tempdir();
    let link = dir.path().join("usb-FTDI_RDL-if00-port0");
    let absent = dir.path().join("absent");
    let first = pty::open();
    point_link(&link, &first.slave);
    let mut first_master = Some(first.master);
    let mut second: Option<pty::Pty> = None;
    let config = write_config(dir.path(), &link, "csv", "");
    let mut agent = start_agent(&config);
    wait_log(
        &mut agent,
        &["reading serial device"],
        Duration::from_secs(30),
    );

    let master = first_master.as_mut().expect("first master");
    master.write_all(b"\n").expect("sync");
    let (a_first, a_last) = send_lines(master, 20, |_| vec![default_line(Format::Csv, CAR_A)]);

    // Unplug: the by-id link goes away with the device, then the device itself. (Bytes still in
    // the tty when the master closes are flushed by the hangup: give the last line time first.)
    std::thread::sleep(Duration::from_millis(200));
    point_link(&link, &absent);
    let t_unplug = now_ms();
    drop(first_master.take());
    wait_log(&mut agent, &[" lost", " closed"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));

    // Replug: a new device behind the same path.
    let pty = second.insert(pty::open());
    point_link(&link, &pty.slave);
    wait_log(&mut agent, &["back after"], Duration::from_secs(30));
    pty.master.write_all(b"\n").expect("sync");
    let (c_first, c_last) = send_lines(&mut pty.master, 20, |_| {
        vec![default_line(Format::Csv, CAR_C)]
    });
    std::thread::sleep(Duration::from_millis(300));
    let done = stop_agent(&mut agent);
    drop(second);

    let lost = done.device_logs(" lost");
    let closed = done.device_logs(" closed");
    let unavailable = done.device_logs(" unavailable");
    assert_eq!(
        lost.len() + closed.len() + unavailable.len(),
        1,
        "one log line for the outage, got lost={lost:?} closed={closed:?} unavailable={unavailable:?}"
    );
    assert_eq!(
        lost.len() + closed.len(),
        1,
        "the loss is logged as lost or closed"
    );
    let back = done.device_logs("back after");
    assert_eq!(back.len(), 1, "one `back after`: {back:?}");

    let mut rejected = done.summary.rejected.clone();
    let partial = rejected.remove("partial_at_start").unwrap_or(0);
    assert!(partial <= 2, "partial_at_start={partial} after two opens");
    assert!(
        rejected.is_empty(),
        "only valid lines were sent: {rejected:?}"
    );
    assert!(
        done.summary.lines >= 40,
        "lines={}, 40 valid lines were sent",
        done.summary.lines
    );

    let r = &done.records;
    let a = window(r, a_first + SETTLE_MS, a_last, 5, "before the unplug");
    assert_all_equal(&a, CAR_A.expected(), "before the unplug");
    let gone = window(
        r,
        t_unplug + STALE_MARGIN_MS,
        c_first - SAMPLE_LAG_MS,
        5,
        "while unplugged",
    );
    assert_all_null(&gone, "stale while unplugged");
    let c = window(r, c_first + SETTLE_MS, c_last, 5, "after the replug");
    assert_all_equal(&c, CAR_C.expected(), "after the replug");
}

// ---------------------------------------------------------------------------------------------
// 3. Device missing at start

#[test]
fn device_missing_at_start_is_logged_once_and_read_when_it_appears() {
    let dir = tempdir();
    let link = dir.path().join("usb-FTDI_RDL-if00-port0");
    point_link(&link, &dir.path().join("absent"));
    let mut plugged: Option<pty::Pty> = None;
    let config = write_config(dir.path(), &link, "kv", "");
    let started = Instant::now();
    let mut agent = start_agent(&config);
    wait_log(&mut agent, &["unavailable"], Duration::from_secs(30));
    // Several retries (0.25 s, then doubling) fail meanwhile.
    if let Some(wait) = Duration::from_millis(1200).checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }

    let t_plug = now_ms();
    let pty = plugged.insert(pty::open());
    point_link(&link, &pty.slave);
    wait_log(&mut agent, &["back after"], Duration::from_secs(30));
    pty.master.write_all(b"\n").expect("sync");
    let (first, last) = send_lines(&mut pty.master, 20, |_| {
        vec![default_line(Format::Kv, CAR_A)]
    });
    std::thread::sleep(Duration::from_millis(300));
    let done = stop_agent(&mut agent);
    drop(plugged);

    let unavailable = done.device_logs(" unavailable");
    assert_eq!(
        unavailable.len(),
        1,
        "one `unavailable` line, not one per retry: {unavailable:?}"
    );
    let lost: Vec<&str> = done
        .device_logs(" lost")
        .into_iter()
        .chain(done.device_logs(" closed"))
        .collect();
    assert!(lost.is_empty(), "nothing was lost: {lost:?}");
    let back = done.device_logs("back after");
    assert_eq!(back.len(), 1, "one `back after`: {back:?}");

    let mut rejected = done.summary.rejected.clone();
    rejected.remove("partial_at_start");
    assert!(
        rejected.is_empty(),
        "only valid lines were sent: {rejected:?}"
    );
    assert!(done.summary.lines >= 20, "lines={}", done.summary.lines);

    let r = &done.records;
    let missing = window(
        r,
        0,
        (t_plug - 1).min(first - SAMPLE_LAG_MS),
        5,
        "before the device appeared",
    );
    assert_all_null(&missing, "no device yet");
    let values = window(r, first + SETTLE_MS, last, 5, "once the device appeared");
    assert_all_equal(&values, CAR_A.expected(), "once the device appeared");
}

// ---------------------------------------------------------------------------------------------
// 4. `simulate --serial`

/// Reads `from` in a thread until EOF or EIO (every slave closed); the chunks come through the
/// channel, which closes at the end.
fn read_all(mut from: File) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// Everything `rx` gives until it closes; panics after `timeout`.
fn collect(rx: &mpsc::Receiver<Vec<u8>>, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut all = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => all.extend_from_slice(&chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => return all,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the pty master did not reach its end within {timeout:?}")
            }
        }
    }
}

fn simulate_serial(slave: &Path, duration: &str) -> Proc {
    let mut cmd = support::agent();
    cmd.args(["simulate", "--serial"]).arg(slave).args([
        "--format",
        "nmea",
        "--duration",
        duration,
        "--speed",
        "1",
    ]);
    Proc::spawn("redline-agent simulate --serial", cmd)
}

/// `wrote N line(s)` from simulate's log.
fn lines_written(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            let rest = &l[l.find("wrote ")? + "wrote ".len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no `wrote N line(s)` in\n{stderr}"))
}

/// Checks one nmea sentence (checksum computed here) and returns its four values.
fn parse_nmea(line: &str) -> Result<[f64; 4], String> {
    let body = line.strip_prefix('$').ok_or("does not start with `$`")?;
    let (body, sum) = body.split_once('*').ok_or("no `*`")?;
    if sum.len() != 2 {
        return Err(format!("checksum `{sum}` is not two hex digits"));
    }
    let sum = u8::from_str_radix(sum, 16).map_err(|e| format!("checksum `{sum}`: {e}"))?;
    let computed = nmea_checksum(body.as_bytes());
    if sum != computed {
        return Err(format!("checksum {sum:02X}, computed {computed:02X}"));
    }
    let cells: Vec<&str> = body.split(',').collect();
    if cells[0] != "RDLTM" || cells.len() != 5 {
        return Err(format!("expected RDLTM and 4 cells, got {cells:?}"));
    }
    let mut values = [0.0; 4];
    for (v, cell) in values.iter_mut().zip(&cells[1..]) {
        *v = cell
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("cell `{cell}` is not a finite number"))?;
    }
    if values[2].fract() != 0.0 {
        return Err(format!("engine_rpm {} is not whole", values[2]));
    }
    Ok(values)
}

#[test]
fn simulate_serial_writes_valid_nmea_sentences_at_the_line_rate() {
    let pty::Pty { master, slave } = pty::open();
    // Held open until simulate is done, so that reading the master does not end early.
    let holder = pty::open_slave(&slave);
    let rx = read_all(master.try_clone().expect("dup master"));
    let started = Instant::now();
    let mut sim = simulate_serial(&slave, "3s");
    let status = sim.wait_or_panic(Duration::from_secs(60));
    let elapsed = started.elapsed();
    let stderr = sim.stderr_text();
    assert!(status.success(), "simulate exit {status:?}\n{stderr}");
    drop(holder);
    let bytes = collect(&rx, Duration::from_secs(30));
    drop(master);

    let text = String::from_utf8(bytes).expect("simulate writes ASCII");
    assert!(text.ends_with('\n'), "the last line is not terminated");
    let lines: Vec<&str> = text
        .split_terminator('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    assert!(
        (55..=65).contains(&lines.len()),
        "{} lines in 3 s at 20 lines/s, expected about 60",
        lines.len()
    );
    assert_eq!(
        lines_written(&stderr),
        lines.len() as u64,
        "simulate's own count"
    );
    assert!(
        elapsed >= Duration::from_millis(2500),
        "--speed 1 for 3 s of simulated time took only {elapsed:?}"
    );
    let mut previous: Option<[f64; 4]> = None;
    for (i, line) in lines.iter().enumerate() {
        let values = parse_nmea(line).unwrap_or_else(|e| panic!("line {}: {e}: {line:?}", i + 1));
        assert_plausible(values, &format!("line {}", i + 1));
        if let Some(p) = previous {
            // 50 ms apart: brake discs and oil cannot jump.
            for f in [0, 1] {
                assert!(
                    (values[f] - p[f]).abs() <= 50.0,
                    "line {}: brake disc temperature jumped {} -> {}",
                    i + 1,
                    p[f],
                    values[f]
                );
            }
            assert!(
                (values[3] - p[3]).abs() <= 2.0,
                "line {}: oil temperature jumped {} -> {}",
                i + 1,
                p[3],
                values[3]
            );
        }
        previous = Some(values);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. End to end: simulate --serial -> (test bridge) -> run --stdout

#[test]
fn simulated_serial_car_bridged_to_the_agent_gives_plausible_records() {
    let dir = tempdir();
    let agent_pty = pty::open();
    let car_pty = pty::open();
    let config = write_config(dir.path(), &agent_pty.slave, "nmea", "");
    let mut agent = start_agent(&config);
    wait_log(
        &mut agent,
        &["reading serial device"],
        Duration::from_secs(30),
    );
    let mut to_agent = agent_pty.master.try_clone().expect("dup master");
    to_agent.write_all(b"\n").expect("sync");

    // Bridge: what simulate writes on the car's slave comes out of its master, and goes into
    // the master of the agent's pty.
    let holder = pty::open_slave(&car_pty.slave);
    let rx = read_all(car_pty.master.try_clone().expect("dup master"));
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut first, mut last) = (None, 0);
        let mut bytes = 0usize;
        for chunk in rx {
            first.get_or_insert_with(now_ms);
            bytes += chunk.len();
            if to_agent.write_all(&chunk).is_err() {
                break;
            }
            last = now_ms();
        }
        let _ = done_tx.send((first, last, bytes));
    });

    let mut sim = simulate_serial(&car_pty.slave, "4s");
    let status = sim.wait_or_panic(Duration::from_secs(60));
    let sim_stderr = sim.stderr_text();
    assert!(status.success(), "simulate exit {status:?}\n{sim_stderr}");
    let written = lines_written(&sim_stderr);
    drop(holder);
    let (first, last, bytes) = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the bridge ends when simulate's side closes");
    let first = first.expect("simulate wrote nothing");
    assert!(bytes > 0);
    std::thread::sleep(Duration::from_millis(300));
    let done = stop_agent(&mut agent);
    drop(car_pty);
    drop(agent_pty);

    let mut rejected = done.summary.rejected.clone();
    let partial = rejected.remove("partial_at_start").unwrap_or(0);
    assert!(partial <= 1, "partial_at_start={partial}");
    assert!(
        rejected.is_empty(),
        "simulate's sentences were rejected: {rejected:?}"
    );
    assert!(
        done.summary.lines + 1 >= written,
        "the agent took lines={} of {written} sentences",
        done.summary.lines
    );

    // From just after the first sentence reached the agent to just after the last (fresh
    // for 500 ms): the bridge's own times, not simulate's exit, which a loaded machine delays.
    let r = window(
        &done.records,
        first + 300,
        last + 300,
        25,
        "while simulate wrote",
    );
    for rec in &r {
        let values = rec.values.map(|v| {
            v.unwrap_or_else(|| panic!("a null field at {}: {:?}", rec.timestamp, rec.values))
        });
        assert_plausible(values, &format!("record at {}", rec.timestamp));
        for f in [0, 1, 3] {
            assert_eq!(
                round1(values[f]),
                values[f],
                "field {f} at {} has more than one decimal",
                rec.timestamp
            );
        }
    }
}
