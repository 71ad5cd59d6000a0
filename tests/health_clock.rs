//! Health and clock, against a real broker: the retained online message and the counters,
//! the last will on SIGKILL, `redline-agent status` during a broker outage; and readings
//! sampled before the wall clock is trusted, which must arrive with correct timestamps
//! (the 100 ms grid unbroken) and survive a restart of the agent.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::process::{Proc, poll};

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
        Proc::spawn("redline-agent", cmd)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn status_messages(sub: &Subscriber) -> Vec<Value> {
    sub.messages()
        .into_iter()
        .filter(|(t, _)| t == "redline/status/GT3-TEST")
        .filter_map(|(_, p)| serde_json::from_str(&p).ok())
        .collect()
}

fn timestamps(sub: &Subscriber) -> Vec<i64> {
    let mut ts: Vec<i64> = sub
        .telemetry()
        .iter()
        .flat_map(|(_, p)| {
            let v: Value = serde_json::from_str(p).expect("telemetry is JSON");
            v["records"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| r["timestamp"].as_i64())
        })
        .collect();
    ts.sort_unstable();
    ts
}

#[test]
fn online_status_counters_and_last_will() {
    let rig = Rig::new();
    let cfg = rig.config("[status]\ninterval = \"1s\"\nfile = \"\"\n");
    let mut sub = Subscriber::start(&rig.broker);
    let mut agent = rig.run(&cfg, None);
    let counters = poll(Duration::from_secs(10), || {
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
    let will = poll(Duration::from_secs(10), || {
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
    let up = poll(Duration::from_secs(10), || {
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
    rig.broker.stop();
    let t = Instant::now();
    let down = poll(Duration::from_secs(10), || {
        let out = status(&cfg);
        out.stdout_text.contains("NOT CONNECTED").then_some(out)
    });
    let down = down.unwrap_or_else(|| panic!("outage not reported: {}", agent.stderr_text()));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        down.stdout_text.contains("last error (network)"),
        "{}",
        down.stdout_text
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
        ts[0] >= from_ms - 150 && ts[0] <= from_ms + 400,
        "{what}: first reading {} but the run started at {from_ms}",
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
    let started = now_ms();
    let mut agent = rig.run(&cfg, Some(&clock));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        sub.telemetry().is_empty(),
        "nothing may be published before the clock is trusted"
    );
    std::fs::write(&clock, "trusted").expect("clock file");
    std::thread::sleep(Duration::from_millis(2500));
    agent.terminate();
    let stopped = now_ms();
    sub.sync();
    let ts = timestamps(&sub);
    assert_grid(&ts, started, stopped, "one run across the switch");
    let stderr = agent.stderr_text();
    assert!(stderr.contains("wall clock not trusted"), "{stderr}");
    assert!(stderr.contains("wall clock trusted now"), "{stderr}");
    let readings = stderr
        .split("readings=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("summary readings=");
    assert_eq!(ts.len(), readings, "every reading sampled arrived once");
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
    std::thread::sleep(Duration::from_millis(2500));
    second.terminate();
    let t2_end = now_ms();
    sub.sync();
    let ts = timestamps(&sub);
    let (run1, run2): (Vec<i64>, Vec<i64>) = ts.iter().partition(|t| **t < t2 - 50);
    assert_grid(&run1, t1, t1_end, "the run stopped while untrusted");
    assert_grid(&run2, t2, t2_end, "the run that saw the clock trusted");
    assert!(
        run1.len() >= held.len(),
        "every held reading of the first run arrived: {} of {}",
        run1.len(),
        held.len()
    );
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
    std::thread::sleep(Duration::from_millis(2500));
    let pid = support::spool::broker_pid(rig.dir.path());
    support::process::send_signal(pid, "STOP");
    std::thread::sleep(Duration::from_secs(5));
    support::process::send_signal(pid, "CONT");
    let healed = poll(Duration::from_secs(15), || {
        agent
            .stderr_text()
            .contains("after")
            .then_some(())
            .filter(|_| agent.stderr_text().contains("no PUBACK for"))
    });
    std::thread::sleep(Duration::from_secs(2));
    agent.terminate();
    let stderr = agent.stderr_text();
    assert!(
        healed.is_some(),
        "no PUBACK timeout and reconnect:\n{stderr}"
    );
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
    assert!(ts.len() >= 90, "{} readings", ts.len());
}
