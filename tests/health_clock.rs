//! Health and clock, against a real broker: the retained online message and the counters,
//! the last will on SIGKILL, `redline-agent status` during a broker outage; and readings
//! sampled before the wall clock is trusted, which must arrive with correct timestamps
//! (the 100 ms grid unbroken) and survive a restart of the agent.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::process::{Proc, poll};
use support::{logged_at, now_ms, parse_rfc3339_ms};

struct Rig {
    dir: tempfile::TempDir,
    pki: Pki,
    broker: Broker,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
        let broker = Broker::start(&pki, dir.path(), false);
        Rig { dir, pki, broker }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, extra: &str) -> PathBuf {
        let spec = support::ConfigSpec {
            port: self.broker.tls_port,
            ca: &self.pki.ca,
            cert: &self.pki.client_cert,
            key: &self.pki.client_key,
            payload: "records",
        };
        let text = format!(
            "{}\n[spool]\ndir = {}\n{extra}",
            spec.render(),
            support::toml_path(&self.path("spool"))
        );
        let path = self.path("agent.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn run(&self, cfg: &Path, clock_file: Option<&Path>) -> Proc {
        let mut cmd = support::agent();
        cmd.args(["run", "--config"]).arg(cfg);
        if let Some(f) = clock_file {
            cmd.env("REDLINE_TEST_CLOCK_FILE", f);
        }
        let mut agent = Proc::spawn("redline-agent", cmd);
        if clock_file.is_some() {
            expect_hook(&mut agent, "REDLINE_TEST_CLOCK_FILE");
        }
        agent
    }
}

/// The agent honours a test hook only when built with the `test-hooks` feature, and then says
/// so at start. Fails at once, saying why, when it does not.
fn expect_hook(agent: &mut Proc, var: &str) {
    let needle = format!("test hook active: {var}=");
    let seen = poll(Duration::from_secs(30), || {
        let err = agent.stderr_text();
        if err.contains(&needle) {
            return Some(true);
        }
        (err.contains("wall clock") || !agent.is_running()).then_some(false)
    });
    assert_eq!(
        seen,
        Some(true),
        "the agent does not honour {var}: it was built without the `test-hooks` feature. \
         Run the tests with `cargo test --features test-hooks` (scripts/test.sh does).\n{}",
        agent.stderr_text()
    );
}

/// SIGTERM: exit 0, and no batch left unacknowledged in the spool.
fn assert_all_acknowledged(status: std::process::ExitStatus, stderr: &str) {
    assert!(status.success(), "SIGTERM: exit 0, got {status}\n{stderr}");
    assert!(
        !stderr.contains("not acknowledged by the broker yet"),
        "batches left unacknowledged at the end:\n{stderr}"
    );
}

/// The summary's `readings=N`: how many readings the agent sampled in its run.
fn readings_sampled(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.contains("summary: "))
        .flat_map(str::split_whitespace)
        .find_map(|t| t.strip_prefix("readings=")?.parse().ok())
        .unwrap_or_else(|| panic!("no `summary: readings=N` line:\n{stderr}"))
}

/// Wall clock minus boot clock now, in ms (what the agent converts boot-clock stamps with).
fn wall_minus_boot_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME)");
    now_ms() - (ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000)
}

fn status_messages(sub: &Subscriber) -> Vec<Value> {
    sub.messages()
        .into_iter()
        .filter(|(t, _)| t == "redline/status/GT3-TEST")
        .filter_map(|(_, p)| serde_json::from_str(&p).ok())
        .collect()
}

fn timestamps(sub: &Subscriber) -> Vec<i64> {
    sub.telemetry_timestamps()
}

#[test]
fn online_status_counters_and_last_will() {
    let rig = Rig::new();
    let cfg = rig.config("[status]\ninterval = \"1s\"\nfile = \"\"\n");
    let mut sub = Subscriber::start(&rig.broker);
    let mut agent = rig.run(&cfg, None);
    let counters = poll(Duration::from_secs(30), || {
        status_messages(&sub)
            .into_iter()
            .find(|m| m["state"] == "running" && m["counters"]["readings"].as_u64() > Some(10))
    });
    let counters =
        counters.unwrap_or_else(|| panic!("no status with counters: {}", agent.stderr_text()));
    assert_eq!(counters["vehicle_id"], "GT3-TEST");
    assert_eq!(counters["link"]["connected"], true);
    assert!(
        counters["counters"]["pubacks"].as_u64() > Some(0),
        "{counters}"
    );
    assert!(counters["backlog"]["batches"].is_u64(), "{counters}");
    assert!(
        counters["losses"]["dropped_at_cap_readings"].is_u64(),
        "{counters}"
    );
    let online = status_messages(&sub)
        .into_iter()
        .find(|m| m["state"] == "online");
    let online = online.expect("an online message at connect");
    assert_eq!(online["source"], "simulator");
    assert_eq!(online["session_id"], "test-session");

    // SIGKILL: no goodbye; the broker publishes the last will.
    support::process::send_signal(agent.pid(), "KILL");
    let will = poll(Duration::from_secs(30), || {
        status_messages(&sub)
            .into_iter()
            .find(|m| m["state"] == "offline" && m["reason"] == "connection lost")
    });
    assert!(will.is_some(), "no last will after SIGKILL");
    let _ = agent.wait_timeout(Duration::from_secs(5));

    // Retained: a subscriber that arrives now still learns the car is offline.
    let mut cmd = std::process::Command::new(support::broker::find_exe("mosquitto_sub"));
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(rig.broker.plain_port.to_string())
        .args(["-t", "redline/status/GT3-TEST", "-C", "1", "-W", "5"]);
    let got = support::process::run("mosquitto_sub", cmd, Duration::from_secs(10));
    let retained = got.stdout_text.trim().to_string();
    let v: Value = serde_json::from_str(&retained).expect("retained status is JSON");
    assert_eq!(v["state"], "offline", "{retained}");
    sub.sync();
}

#[test]
fn status_command_reports_a_broker_outage() {
    let mut rig = Rig::new();
    let file = rig.path("status.json");
    let cfg = rig.config(&format!(
        "[status]\ninterval = \"1s\"\nfile = {}\nfile_interval = \"500ms\"\n",
        support::toml_path(&file)
    ));
    let mut agent = rig.run(&cfg, None);
    let status = |cfg: &Path| {
        support::run_agent(
            &["status", "--config", cfg.to_str().expect("utf-8")],
            Duration::from_secs(10),
        )
    };
    let up = poll(Duration::from_secs(30), || {
        let out = status(&cfg);
        out.stdout_text
            .contains("link:     CONNECTED")
            .then_some(out)
    });
    assert!(
        up.is_some(),
        "never reported connected: {}",
        agent.stderr_text()
    );
    let stopped_at = now_ms();
    rig.broker.stop();
    let down = poll(Duration::from_secs(30), || {
        let out = status(&cfg);
        out.stdout_text.contains("NOT CONNECTED").then_some(out)
    });
    let down = down.unwrap_or_else(|| panic!("outage not reported: {}", agent.stderr_text()));
    // How fast the agent noticed, on its own clock: the time it gives the error.
    let error_at = down
        .stdout_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("last error (network) at "))
        .and_then(|rest| rest.split_once(": "))
        .and_then(|(at, _)| parse_rfc3339_ms(at))
        .unwrap_or_else(|| {
            panic!(
                "no `last error (network) at TIME: ...`:\n{}",
                down.stdout_text
            )
        });
    assert!(
        error_at >= stopped_at - 5,
        "the error reported ({error_at}) is older than the outage ({stopped_at}):\n{}",
        down.stdout_text
    );
    assert!(
        error_at - stopped_at < 3000,
        "the agent noticed the outage {} ms after the broker stopped (its own clock)",
        error_at - stopped_at
    );
    eprintln!(
        "outage noticed by the agent {} ms after the broker was stopped",
        error_at - stopped_at
    );
    assert!(
        down.stdout_text.contains("backlog:"),
        "{}",
        down.stdout_text
    );
    agent.terminate();
    let out = status(&cfg);
    assert!(
        out.stdout_text.contains("the agent has stopped"),
        "{}",
        out.stdout_text
    );
}

/// Every run's readings: a contiguous 100 ms grid within the run's wall-clock span.
/// `from_ms`: when the agent judged the clock, by its own log; sampling starts right after
/// (the first tick at or after it; the offset of a conversion is rounded to the grid).
/// `to_ms`: after the agent exited.
fn assert_grid(ts: &[i64], from_ms: i64, to_ms: i64, what: &str) {
    assert!(!ts.is_empty(), "{what}: no readings");
    for w in ts.windows(2) {
        assert_eq!(
            w[1] - w[0],
            100,
            "{what}: grid broken between {} and {}",
            w[0],
            w[1]
        );
    }
    assert!(
        ts[0] >= from_ms - 150 && ts[0] <= from_ms + 1000,
        "{what}: first reading {} but the agent judged the clock at {from_ms} (its log)",
        ts[0]
    );
    assert!(
        *ts.last().unwrap_or(&0) <= to_ms + 150,
        "{what}: reading after the run ended"
    );
}

#[test]
fn readings_before_the_clock_is_trusted_arrive_with_correct_times() {
    let rig = Rig::new();
    let cfg = rig.config("[status]\nfile = \"\"\n");
    let clock = rig.path("clock");
    std::fs::write(&clock, "untrusted").expect("clock file");
    let mut sub = Subscriber::start(&rig.broker);
    let mut agent = rig.run(&cfg, Some(&clock));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        sub.telemetry().is_empty(),
        "nothing may be published before the clock is trusted"
    );
    std::fs::write(&clock, "trusted").expect("clock file");
    std::thread::sleep(Duration::from_millis(2500));
    let status = agent.terminate();
    let stopped = now_ms();
    sub.sync();
    let ts = timestamps(&sub);
    let stderr = agent.stderr_text();
    assert!(stderr.contains("wall clock trusted now"), "{stderr}");
    let judged = logged_at(&stderr, "wall clock not trusted")
        .unwrap_or_else(|| panic!("no `wall clock not trusted` line:\n{stderr}"));
    assert_grid(&ts, judged, stopped, "one run across the switch");
    assert_eq!(
        ts.len(),
        readings_sampled(&stderr),
        "every reading sampled arrived once"
    );
    assert_all_acknowledged(status, &stderr);
}

#[test]
fn a_restart_while_untrusted_loses_nothing() {
    let rig = Rig::new();
    let cfg = rig.config("[status]\nfile = \"\"\n");
    let clock = rig.path("clock");
    std::fs::write(&clock, "untrusted").expect("clock file");
    let mut sub = Subscriber::start(&rig.broker);
    let t1 = now_ms();
    let mut first = rig.run(&cfg, Some(&clock));
    std::thread::sleep(Duration::from_millis(2000));
    first.terminate();
    let t1_end = now_ms();
    let judged1 = logged_at(&first.stderr_text(), "wall clock not trusted").unwrap_or_else(|| {
        panic!(
            "run 1: no `wall clock not trusted`:\n{}",
            first.stderr_text()
        )
    });

    // Between the runs the spool holds them, stamped on this boot's clock.
    let export = support::run_agent(
        &["spool", "export", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(10),
    );
    let held: Vec<Value> = export
        .stdout_text
        .lines()
        .map(|l| serde_json::from_str(l).expect("export line is JSON"))
        .collect();
    assert!(!held.is_empty(), "{}", export.describe());
    for r in &held {
        assert_eq!(r["timestamp_clock"], "boot", "{r}");
        assert!(
            r["timestamp"].as_i64() < Some(t1),
            "a boot-clock time, not a made-up UTC one: {r}"
        );
    }

    let t2 = now_ms();
    let mut second = rig.run(&cfg, Some(&clock));
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&clock, "trusted").expect("clock file");
    let offset = wall_minus_boot_ms();
    std::thread::sleep(Duration::from_millis(2500));
    let status = second.terminate();
    let t2_end = now_ms();
    sub.sync();
    let ts = timestamps(&sub);
    let stderr2 = second.stderr_text();
    let judged2 = logged_at(&stderr2, "wall clock not trusted")
        .unwrap_or_else(|| panic!("run 2: no `wall clock not trusted`:\n{stderr2}"));
    let (run1, run2): (Vec<i64>, Vec<i64>) = ts.iter().partition(|t| **t < t2 - 50);
    assert_grid(&run1, judged1, t1_end, "the run stopped while untrusted");
    assert_grid(&run2, judged2, t2_end, "the run that saw the clock trusted");
    assert_eq!(
        run1.len(),
        held.len(),
        "every held reading of the first run arrived, and nothing else of that run"
    );
    // Each held reading arrived as itself: its boot-clock time plus one offset, the wall
    // clock minus the boot clock (rounded to the grid by the agent).
    let mut held_ts: Vec<i64> = held
        .iter()
        .map(|r| r["timestamp"].as_i64().expect("timestamp"))
        .collect();
    held_ts.sort_unstable();
    let shifts: std::collections::BTreeSet<i64> =
        run1.iter().zip(&held_ts).map(|(a, b)| a - b).collect();
    assert_eq!(
        shifts.len(),
        1,
        "held readings converted with different offsets: {shifts:?}"
    );
    let shift = *shifts.first().expect("one offset");
    assert!(
        (shift - offset).abs() <= 100,
        "held readings converted with {shift} ms, but the wall clock is {offset} ms ahead of the boot clock"
    );
    assert_eq!(
        run2.len(),
        readings_sampled(&stderr2),
        "every reading of the second run arrived once"
    );
    assert_all_acknowledged(status, &stderr2);
}

#[test]
fn a_withheld_puback_drops_the_connection_and_resends() {
    let rig = Rig::new();
    // keep_alive 30 s: without the PUBACK timeout a frozen broker went unnoticed for a minute.
    let cfg = rig.config("[status]\nfile = \"\"\nenabled = false\n");
    let text = std::fs::read_to_string(&cfg).expect("config");
    let text = text.replacen(
        "max_inflight = 20",
        "max_inflight = 20\nack_timeout = \"2s\"\nconnect_timeout = \"2s\"",
        1,
    );
    std::fs::write(&cfg, text).expect("config");
    let mut sub = Subscriber::start(&rig.broker);
    let mut agent = rig.run(&cfg, None);
    // Publishing before the freeze: something has been acknowledged.
    let flowing = poll(Duration::from_secs(30), || {
        (!sub.telemetry().is_empty()).then_some(())
    });
    assert!(
        flowing.is_some(),
        "nothing published:\n{}",
        agent.stderr_text()
    );
    let pid = support::spool::broker_pid(rig.dir.path());
    support::process::send_signal(pid, "STOP");
    let frozen_at = now_ms();
    // The agent gives up on the PUBACK (ack_timeout 2 s) while the broker is frozen and
    // drops the connection: its line `link to ENDPOINT lost (<no PUBACK for | nothing
    // acknowledged for> ...)`.
    let endpoint = format!("localhost:{}", rig.broker.tls_port);
    let lost_line = format!("link to {endpoint} lost (");
    let gave_up_at = |err: &str| -> Option<usize> {
        err.match_indices(&lost_line).map(|(i, _)| i).find(|&i| {
            let rest = &err[i + lost_line.len()..];
            rest.starts_with("no PUBACK for") || rest.starts_with("nothing acknowledged for")
        })
    };
    let gave_up = poll(Duration::from_secs(30), || {
        gave_up_at(&agent.stderr_text()).map(|_| ())
    });
    let thawed_at = now_ms();
    support::process::send_signal(pid, "CONT");
    // The reconnect after it: the publisher's line `connected to ENDPOINT after ...`.
    let reconnected = format!("connected to {endpoint} after ");
    let healed = poll(Duration::from_secs(30), || {
        let err = agent.stderr_text();
        let lost = gave_up_at(&err)?;
        err[lost..].contains(&reconnected).then_some(())
    });
    // Readings sampled after the thaw arrive too.
    let after = poll(Duration::from_secs(30), || {
        timestamps(&sub)
            .last()
            .is_some_and(|t| *t > thawed_at + 1000)
            .then_some(())
    });
    let status = agent.terminate();
    let stderr = agent.stderr_text();
    assert!(
        gave_up.is_some(),
        "no `{lost_line}no PUBACK for ...` (or `nothing acknowledged for`) while the broker \
         was frozen:\n{stderr}"
    );
    assert!(
        healed.is_some(),
        "no `{reconnected}...` line after the PUBACK timeout:\n{stderr}"
    );
    assert!(
        after.is_some(),
        "nothing sampled after the thaw arrived:\n{stderr}"
    );
    assert_all_acknowledged(status, &stderr);
    sub.sync();
    let mut ts = timestamps(&sub);
    ts.dedup();
    for w in ts.windows(2) {
        assert_eq!(
            w[1] - w[0],
            100,
            "a reading was lost around the freeze:\n{stderr}"
        );
    }
    assert!(
        ts.first().is_some_and(|t| *t < frozen_at) && ts.last().is_some_and(|t| *t > thawed_at),
        "the readings do not span the freeze ({frozen_at}..{thawed_at}): {:?}..{:?}",
        ts.first(),
        ts.last()
    );
    assert_eq!(
        ts.len(),
        readings_sampled(&stderr),
        "every reading sampled arrived (duplicates removed)"
    );
}
