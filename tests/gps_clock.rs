//! GPS time on the CAN bus as a clock source (`[clock] gps`), for the garage where there is
//! no NTP:
//! - a candump log stamped by a logger without a battery-backed clock (1970) is moved onto
//!   GPS time as a whole, readings from before the fix included; a log whose clock already
//!   agrees with GPS time, or whose receiver never had a fix, keeps its timestamps;
//! - live, against a real broker with mutual TLS: an agent whose wall clock is untrusted
//!   (the test clock file) takes the time from the simulated car's GPS receiver within
//!   seconds, and every reading arrives on the 100 ms grid at the true UTC time.

mod support;

use redline_agent::source::can::GT3_DBC;
use redline_agent::source::dbc::Dbc;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;
use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::process::{Proc, poll};
use support::{candump_frame, logged_at, now_ms};

/// The logger's clock at the first frame: 1970, a thousand seconds after power-on.
const LOG_T0: f64 = 1_000.0;
/// The true UTC time of the first frame (2027-01-15T08:00:00Z; after the build, which
/// is the floor below which a receiver's time is refused).
const TRUE_T0: f64 = 1_800_000_000.0;
/// How late the receiver's time is heard on the bus.
const LATENCY: f64 = 0.020;

/// 20 s of the GT3 bus stamped from `log_t0`: the engine at 100 Hz, the GPS receiver at
/// 10 Hz, which sends 0 (no fix) for the first `no_fix_s` seconds and then the true UTC
/// time (`true_t0` at the first frame) heard `LATENCY` late.
fn write_log(path: &Path, log_t0: f64, true_t0: f64, no_fix_s: f64) {
    let dbc = Dbc::from_text(GT3_DBC).expect("dbc");
    let mut log = String::new();
    for k in 0..2000u32 {
        let dt = f64::from(k) * 0.01 + 0.000_123;
        let t = log_t0 + dt;
        let rpm = 6000.0 + f64::from(k % 500) * 7.0;
        let _ = writeln!(
            log,
            "({t:.6}) can0 {}",
            candump_frame(&dbc, "Engine", &[("RPM", rpm)])
        );
        if k % 10 == 5 {
            let utc = if dt < no_fix_s {
                0.0
            } else {
                true_t0 + dt - LATENCY
            };
            let f = candump_frame(&dbc, "GpsTime", &[("UtcTime", utc)]);
            let _ = writeln!(log, "({t:.6}) can0 {f}");
        }
    }
    std::fs::write(path, log).expect("write log");
}

fn replay(dir: &Path, log: &Path) -> (Vec<Value>, String) {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        "[vehicle]\nid = \"GT3-TEST\"\n\n[clock]\ngps = \"GpsTime.UtcTime\"\n",
    )
    .expect("config");
    let out = support::run_agent(
        &[
            "replay",
            log.to_str().expect("utf-8"),
            "--config",
            cfg.to_str().expect("utf-8"),
            "--stdout",
            "--speed",
            "max",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let records = out
        .stdout_text
        .lines()
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            v["records"].as_array().cloned().unwrap_or_default()
        })
        .collect();
    (records, out.stderr.clone())
}

/// The timestamps, checked to be the contiguous 100 ms grid after `first_ms`, with the
/// engine's RPM of the frame sent just before each tick.
fn assert_on_grid(records: &[Value], first_ms: i64, what: &str) {
    assert_eq!(
        records.len(),
        199,
        "{what}: one reading per 100 ms of 20 s of log"
    );
    for (k, r) in records.iter().enumerate() {
        let k = k as i64;
        assert_eq!(
            r["timestamp"].as_i64(),
            Some(first_ms + 100 * k),
            "{what}: reading {k}: {r}"
        );
        // Tick k + 1 (at 100 ms × (k + 1) after the first frame) sees engine frame 10k + 9.
        let rpm = 6000 + ((10 * k + 9) % 500) * 7;
        assert_eq!(
            r["engine_rpm"].as_i64(),
            Some(rpm),
            "{what}: reading {k}: {r}"
        );
    }
}

#[test]
fn a_1970_log_is_moved_onto_gps_time_readings_before_the_fix_included() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("garage.log");
    write_log(&log, LOG_T0, TRUE_T0, 5.0);
    let (records, stderr) = replay(dir.path(), &log);
    assert!(
        stderr.contains("timestamps moved by +1799999000.0 s onto it"),
        "the shift is said, a whole number of ticks:\n{stderr}"
    );
    // The first tick is 100 ms after the first frame, on true UTC time: the readings of
    // the 5 s before the receiver had a fix are placed too.
    assert_on_grid(&records, (TRUE_T0 * 1000.0) as i64 + 100, "1970 log");
}

#[test]
fn a_log_that_agrees_with_gps_time_or_has_no_fix_keeps_its_timestamps() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Stamped by a synchronised logger: GPS time agrees within the bus latency.
    let log = dir.path().join("synced.log");
    write_log(&log, TRUE_T0, TRUE_T0, 0.0);
    let (records, stderr) = replay(dir.path(), &log);
    assert!(
        stderr.contains("agrees with GPS time"),
        "the log's clock agrees:\n{stderr}"
    );
    assert_on_grid(&records, (TRUE_T0 * 1000.0) as i64 + 100, "synced log");

    // A receiver that never got a fix: nothing to believe, the log's own clock stays.
    let log = dir.path().join("nofix.log");
    write_log(&log, LOG_T0, TRUE_T0, 1e9);
    let (records, stderr) = replay(dir.path(), &log);
    assert!(
        stderr.contains("no GPS time to believe in the log"),
        "it says why nothing moved:\n{stderr}"
    );
    assert_on_grid(
        &records,
        (LOG_T0 * 1000.0) as i64 + 100,
        "log without a fix",
    );
}

#[test]
fn live_an_untrusted_clock_takes_gps_time_and_every_reading_arrives_on_true_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
    let broker = Broker::start(&pki, dir.path(), false);
    let spec = support::ConfigSpec::for_broker(&pki, &broker);
    let cfg = dir.path().join("agent.toml");
    let text = format!(
        "{}\n[spool]\ndir = {}\n\n[status]\nfile = \"\"\n\n[clock]\ngps = \"GpsTime.UtcTime\"\n",
        spec.render(),
        support::toml_path(&dir.path().join("spool"))
    );
    std::fs::write(&cfg, text).expect("config");
    // The wall clock stays untrusted all run long: only GPS time can make readings UTC.
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "untrusted").expect("clock file");
    let mut sub = Subscriber::start(&broker);
    let mut cmd = support::agent();
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("REDLINE_TEST_CLOCK_FILE", &clock);
    let mut agent = Proc::spawn("redline-agent", cmd);
    let trusted = poll(Duration::from_secs(30), || {
        agent
            .stderr_text()
            .contains("clock trusted from GPS time")
            .then_some(())
    });
    assert!(
        trusted.is_some(),
        "GPS time never trusted:\n{}",
        agent.stderr_text()
    );
    std::thread::sleep(Duration::from_secs(3));
    let status = agent.terminate();
    let stopped = now_ms();
    sub.sync();
    let stderr = agent.stderr_text();
    assert!(
        status.success(),
        "exit 0 on SIGTERM, got {status}\n{stderr}"
    );

    // The figure: from the verdict "untrusted" at start to GPS time believed.
    let untrusted_at = logged_at(&stderr, "wall clock not trusted")
        .unwrap_or_else(|| panic!("no `wall clock not trusted` line:\n{stderr}"));
    let gps_at = logged_at(&stderr, "clock trusted from GPS time").expect("logged");
    let to_trust = gps_at - untrusted_at;
    eprintln!("time to trust from GPS: {to_trust} ms");
    assert!(
        (1_900..=6_000).contains(&to_trust),
        "GPS time believed {to_trust} ms after start: needs 2 s of agreeing samples, and \
         the watcher looks every second"
    );

    let ts = sub.telemetry_timestamps();
    assert!(ts.len() >= 40, "readings of ~5 s: got {}", ts.len());
    for w in ts.windows(2) {
        assert_eq!(
            w[1] - w[0],
            100,
            "grid broken between {} and {}",
            w[0],
            w[1]
        );
    }
    // Readings sampled on the boot clock before GPS time was believed are on true UTC time
    // (this machine's wall clock is right; only the agent was told not to trust it).
    assert!(
        (untrusted_at - 200..=untrusted_at + 1_000).contains(&ts[0]),
        "first reading at {} but the run started at {untrusted_at}",
        ts[0]
    );
    assert!(
        *ts.last().unwrap_or(&0) <= stopped + 150,
        "a reading after the run ended"
    );
    assert!(
        !stderr.contains("not acknowledged by the broker yet"),
        "everything was delivered:\n{stderr}"
    );
}
