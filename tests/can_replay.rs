//! candump replay through the real decoding path: the same log gives the same records at any
//! speed; malformed lines are counted and reported with their line number; bindings to
//! what the DBC lacks are configuration errors naming both.

mod support;

use redline_agent::source::can::GT3_DBC;
use redline_agent::source::dbc::Dbc;
use std::path::Path;
use std::time::Duration;
use support::candump_frame;

const T0: f64 = 1_705_267_200.0;

/// Three seconds of the GT3 bus at 100 Hz (engine), 20 Hz (brakes), 5 Hz (oil), with
/// malformed lines at known line numbers. Returns the log and those line numbers.
fn write_log(path: &Path) -> Vec<usize> {
    let dbc = Dbc::from_text(GT3_DBC).expect("dbc");
    let mut log = String::new();
    let mut bad = Vec::new();
    let mut line = 0usize;
    let push = |log: &mut String, text: String| {
        log.push_str(&text);
        log.push('\n');
    };
    for k in 0..300u32 {
        let t = T0 + f64::from(k) * 0.01 + 0.000_123;
        let rpm = 6000.0 + f64::from(k) * 7.0;
        let frame = candump_frame(&dbc, "Engine", &[("RPM", rpm)]);
        line += 1;
        push(&mut log, format!("({t:.6}) can0 {frame}"));
        if k % 5 == 0 {
            let fl = 300.0 + f64::from(k);
            let frame = candump_frame(&dbc, "BrakeTemps", &[("DiscFL", fl), ("DiscFR", fl - 4.2)]);
            line += 1;
            push(&mut log, format!("({t:.6}) can0 {frame}"));
        }
        if k % 20 == 0 {
            let frame = candump_frame(
                &dbc,
                "EngineTemps",
                &[("OilTemp", 90.0 + f64::from(k) / 10.0)],
            );
            line += 1;
            push(&mut log, format!("({t:.6}) can0 {frame}"));
        }
        if k % 50 == 25 {
            for garbage in [
                format!("({t:.6}) can0 30#ZZ"),
                "(not a time) can0 100#00".to_string(),
                format!("({t:.6}) can0 100#ABC"),
                format!("({t:.6}) can0"),
            ] {
                line += 1;
                bad.push(line);
                push(&mut log, garbage);
            }
        }
    }
    std::fs::write(path, log).expect("write log");
    bad
}

fn replay(log: &Path, speed: &str) -> support::process::Finished {
    support::run_agent(
        &[
            "replay",
            log.to_str().expect("utf-8"),
            "--stdout",
            "--speed",
            speed,
        ],
        Duration::from_secs(60),
    )
}

#[test]
fn the_same_log_gives_the_same_records_at_any_speed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stint.log");
    let bad = write_log(&log);
    // The session id is a new UUID per run: compare records without it.
    let strip = |out: &support::process::Finished| -> Vec<String> {
        out.stdout_text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json line");
                let mut v = v;
                for r in v["records"].as_array_mut().expect("records") {
                    r.as_object_mut().expect("object").remove("session_id");
                }
                v.to_string()
            })
            .collect()
    };
    let max = replay(&log, "max");
    assert_eq!(max.code(), Some(0), "{}", max.describe());
    let fast = replay(&log, "10");
    let real = replay(&log, "1");
    let (a, b, c) = (strip(&max), strip(&fast), strip(&real));
    assert!(!a.is_empty(), "no records: {}", max.describe());
    assert_eq!(a, b, "speed max vs 10");
    assert_eq!(a, c, "speed max vs 1");

    // 3 s of log (first frame at T0 + 123 µs): a tick every 100 ms after the first frame up
    // to the last one.
    let records: Vec<serde_json::Value> = max
        .stdout_text
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            v["records"].as_array().cloned().unwrap_or_default()
        })
        .collect();
    assert_eq!(records.len(), 29, "one reading per 100 ms of log");
    let t0_ms = (T0 * 1000.0) as i64;
    for (k, r) in records.iter().enumerate() {
        assert_eq!(r["timestamp"].as_i64(), Some(t0_ms + 100 * (k as i64 + 1)));
    }
    // The tick at T0 + 1 s sees the frames sent before it: engine frame 99, brake frame 95,
    // oil frame 80 (each frame goes out 123 µs after its 10 ms slot).
    let r = &records[9];
    assert_eq!(r["engine_rpm"].as_i64(), Some(6000 + 99 * 7), "{r}");
    assert_eq!(r["brake_disc_temp_fl"].as_f64(), Some(395.0), "{r}");
    assert_eq!(r["brake_disc_temp_fr"].as_f64(), Some(390.8), "{r}");
    assert_eq!(r["engine_oil_temp"].as_f64(), Some(98.0), "{r}");

    // Every malformed line is counted; the first 20 are reported by number, the rest summed.
    let stderr = &max.stderr;
    for n in bad.iter().take(20) {
        assert!(
            stderr.contains(&format!("line {n}:")),
            "line {n} not reported:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains(&format!("line {}:", bad[20])),
        "the 21st bad line is only counted"
    );
    assert!(
        stderr.contains(&format!("{} malformed line(s) in all", bad.len())),
        "{stderr}"
    );
    for reason in [
        "bad_id=6",
        "bad_timestamp=6",
        "odd_hex_digits=6",
        "missing_frame=6",
    ] {
        assert!(stderr.contains(reason), "{reason} not counted:\n{stderr}");
    }
}

#[test]
fn a_binding_to_what_the_dbc_lacks_names_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dbc = dir.path().join("car.dbc");
    std::fs::write(&dbc, GT3_DBC).expect("write dbc");
    for (binding, names) in [
        ("\"Brakes.DiscFL\"", vec!["Brakes"]),
        ("\"BrakeTemps.DiscXX\"", vec!["BrakeTemps", "DiscXX"]),
        ("\"NoDot\"", vec!["Message.Signal"]),
    ] {
        let cfg = dir.path().join("can.toml");
        std::fs::write(
            &cfg,
            format!(
                "[vehicle]\nid = \"GT3\"\n[source]\nkind = \"can\"\ninterface = \"can0\"\ndbc = {}\n[source.signals]\nbrake_disc_temp_fl = {binding}\n",
                support::toml_path(&dbc)
            ),
        )
        .expect("write config");
        let out = support::run_agent(
            &["check-config", "--config", cfg.to_str().expect("utf-8")],
            Duration::from_secs(10),
        );
        assert_eq!(out.code(), Some(2), "{}", out.describe());
        assert!(
            out.stderr.contains("source.signals.brake_disc_temp_fl"),
            "{}",
            out.describe()
        );
        for n in names {
            assert!(out.stderr.contains(n), "{n}: {}", out.describe());
        }
    }
}

fn config_on(dir: &Path, interface: &str) -> std::path::PathBuf {
    let dbc = dir.join("gt3.dbc");
    std::fs::write(&dbc, GT3_DBC).expect("write dbc");
    let config = dir.join("can.toml");
    std::fs::write(
        &config,
        format!(
            r#"[vehicle]
id = "GT3-TEST"

[source]
kind = "can"
interface = "{interface}"
dbc = "gt3.dbc"

[source.signals]
brake_disc_temp_fl = "BrakeTemps.DiscFL"
brake_disc_temp_fr = "BrakeTemps.DiscFR"
engine_rpm = "Engine.RPM"
engine_oil_temp = "EngineTemps.OilTemp"
"#
        ),
    )
    .expect("write config");
    config
}

fn replay_with(log: &Path, config: &Path, extra: &[&str]) -> support::process::Finished {
    let mut args = vec![
        "replay",
        log.to_str().expect("utf-8"),
        "--config",
        config.to_str().expect("utf-8"),
        "--stdout",
    ];
    args.extend_from_slice(extra);
    support::run_agent(&args, Duration::from_secs(60))
}

#[test]
fn a_log_of_another_interface_says_what_it_holds_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stint.log");
    write_log(&log);
    let config = config_on(dir.path(), "vcan0");
    let out = replay_with(&log, &config, &[]);
    assert_eq!(
        out.code(),
        Some(4),
        "nothing usable exits 4\n{}",
        out.describe()
    );
    assert!(out.stdout_text.trim().is_empty(), "no records expected");
    assert!(
        out.stderr.contains("frame(s) on can0")
            && out.stderr.contains("none on vcan0")
            && out.stderr.contains("--interface can0"),
        "the log's interfaces and the way out are named:\n{}",
        out.stderr
    );
    let fixed = replay_with(&log, &config, &["--interface", "can0"]);
    assert_eq!(fixed.code(), Some(0), "{}", fixed.describe());
    assert_eq!(fixed.stdout_text.lines().count(), 3, "{}", fixed.describe());
}

#[test]
fn a_file_that_is_not_a_candump_log_fails_with_a_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("notes.txt");
    std::fs::write(&log, "lap 1: 1:58.2\nlap 2: 1:57.9\n").expect("write");
    let out = replay(&log, "max");
    assert_eq!(out.code(), Some(4), "{}", out.describe());
    assert!(
        out.stderr.contains("is it a `candump -L` log?"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_far_future_line_costs_a_minute_of_readings_not_years() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stint.log");
    write_log(&log);
    // One line stamped ten years later, as a broken logger writes.
    let dbc = Dbc::from_text(GT3_DBC).expect("dbc");
    let frame = candump_frame(&dbc, "Engine", &[("RPM", 7000.0)]);
    let mut text = std::fs::read_to_string(&log).expect("read");
    text.push_str(&format!("({:.6}) can0 {frame}\n", T0 + 315_360_000.0));
    std::fs::write(&log, text).expect("write");
    let out = replay(&log, "max");
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let records: usize = out
        .stdout_text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            v["records"].as_array().map_or(0, Vec::len)
        })
        .sum();
    // The 3 s of log, one minute of silence, and nothing of the ten years.
    assert!(
        (629..=632).contains(&records),
        "{records} readings\n{}",
        support::process::tail(&out.stderr, 2000)
    );
    assert!(
        out.stderr.contains("the data is silent from") && out.stderr.contains("skipped"),
        "{}",
        out.stderr
    );
}
