//! The uplink on the car's real links: the agent publishes through a link emulator
//! (`support::link`, a rate-limited, delayed TCP proxy) to a real Mosquitto with mutual TLS,
//! and a timestamping subscriber measures when every reading arrives.
//!
//! Each scenario asserts figures, not only arrival: live latency percentiles from the
//! sampling instant, reconnects, bytes that crossed the link against the bytes of distinct
//! readings delivered, and the share of the spare capacity the backlog used.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::broker::{Broker, free_ports};
use support::certs::Pki;
use support::json::{PayloadMode, Record, check_message};
use support::link::{LinkProxy, LinkSpec, TimedSubscriber, now_epoch_ms};
use support::process::{Proc, send_signal, tail};
use support::spool::{spawn_agent, spool_stats};
use support::{ConfigSpec, toml_path};

/// A broker, the link in front of its TLS port, a timestamping subscriber, files.
struct Rig {
    sub: TimedSubscriber,
    proxy: LinkProxy,
    _broker: Broker,
    pki: Pki,
    dir: tempfile::TempDir,
}

/// What one configuration of the agent differs in.
struct Knobs {
    port: u16,
    ack_timeout: &'static str,
    max_bytes_per_sec: &'static str,
}

impl Rig {
    fn new(spec: LinkSpec) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::generate(dir.path(), support::VEHICLE_ID);
        let broker = Broker::start(&pki, dir.path(), false);
        let proxy = LinkProxy::start(broker.tls_port, spec);
        let sub = TimedSubscriber::start(&broker);
        Rig {
            sub,
            proxy,
            _broker: broker,
            pki,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, name: &str, k: &Knobs) -> PathBuf {
        let spec = ConfigSpec {
            port: k.port,
            ca: &self.pki.ca,
            cert: &self.pki.client_cert,
            key: &self.pki.client_key,
            payload: "records",
        };
        let mut s = spec.render();
        s.push_str(&format!(
            "reconnect_min = \"1s\"\nreconnect_max = \"60s\"\nconnect_timeout = \"10s\"\nack_timeout = \"{}\"\n",
            k.ack_timeout
        ));
        s.push_str(&format!(
            "\n[spool]\ndir = {}\nsync_interval = \"1s\"\n",
            toml_path(&self.path("spool"))
        ));
        s.push_str(&format!(
            "\n[delivery]\nshutdown_timeout = \"15s\"\nmax_publish_per_sec = 50\nmax_bytes_per_sec = \"{}\"\n",
            k.max_bytes_per_sec
        ));
        s.push_str(&format!(
            "\n[status]\ninterval = \"10s\"\nfile = {}\nfile_interval = \"1s\"\n",
            toml_path(&self.path("status.json"))
        ));
        let path = self.path(name);
        std::fs::write(&path, s).expect("write config");
        path
    }

    /// The agent's config through the link emulator, as on the car (AWS's byte rate limit).
    fn through_link(&self, ack_timeout: &'static str) -> PathBuf {
        self.config(
            "agent.toml",
            &Knobs {
                port: self.proxy.port(),
                ack_timeout,
                max_bytes_per_sec: "256KiB",
            },
        )
    }

    /// Fills the spool with `minutes` of readings that end now, sampled while no broker
    /// could be reached.
    fn backlog(&self, minutes: u64) -> i64 {
        let [dead] = free_ports::<1>();
        let config = self.config(
            "offline.toml",
            &Knobs {
                port: dead,
                ack_timeout: "30s",
                max_bytes_per_sec: "0",
            },
        );
        let start_ms = (now_epoch_ms() as i64 / 1000 - 60 * minutes as i64) * 1000;
        let start = time_arg(start_ms);
        let out = support::spool::run_agent_to_end(
            &[
                "simulate".into(),
                "--config".into(),
                path_arg(&config),
                "--speed".into(),
                "max".into(),
                "--duration".into(),
                format!("{minutes}m"),
                "--seed".into(),
                "7".into(),
                "--start".into(),
                start,
            ],
            Duration::from_secs(120),
        );
        let stats = spool_stats(&config);
        let batches = stats.num("unacked batches");
        assert!(
            batches >= minutes * 60 - 1,
            "the offline run left {batches} batches in the spool, expected {}\n{}",
            minutes * 60,
            out.describe()
        );
        start_ms
    }

    fn live_agent(&self, config: &Path, duration: &str) -> Proc {
        spawn_agent(&[
            "simulate".into(),
            "--config".into(),
            path_arg(config),
            "--speed".into(),
            "1".into(),
            "--duration".into(),
            duration.into(),
            "--seed".into(),
            "3".into(),
        ])
    }

    fn telemetry(&self) -> Vec<Arrived> {
        self.sub
            .messages()
            .into_iter()
            .filter(|(_, t, _)| t.starts_with("redline/telemetry/"))
            .map(|(at, _, payload)| {
                let records = check_message(&payload, PayloadMode::Records)
                    .unwrap_or_else(|e| panic!("a message breaks the contract: {e}"));
                Arrived {
                    at,
                    bytes: payload.len(),
                    records,
                }
            })
            .collect()
    }
}

fn path_arg(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

/// `--start` for an epoch-millisecond instant (whole seconds).
fn time_arg(ms: i64) -> String {
    let t = time_of(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.0, t.1, t.2, t.3, t.4, t.5
    )
}

/// (year, month, day, hour, minute, second) of epoch milliseconds, UTC.
fn time_of(ms: i64) -> (i64, i64, i64, i64, i64, i64) {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 { y + 1 } else { y },
        m,
        d,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
    )
}

/// One telemetry message at the subscriber.
struct Arrived {
    /// Epoch milliseconds.
    at: f64,
    bytes: usize,
    records: Vec<Record>,
}

/// Every distinct reading: its first arrival, the payload bytes it took, how often it came.
struct Readings {
    first: BTreeMap<i64, (f64, f64)>,
    copies: BTreeMap<i64, Vec<f64>>,
}

fn readings(msgs: &[Arrived]) -> Readings {
    let mut first = BTreeMap::new();
    let mut copies: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for m in msgs {
        let share = m.bytes as f64 / m.records.len().max(1) as f64;
        for r in &m.records {
            first.entry(r.timestamp).or_insert((m.at, share));
            copies.entry(r.timestamp).or_default().push(m.at);
        }
    }
    Readings { first, copies }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn stop(agent: &mut Proc) -> String {
    send_signal(agent.pid(), "TERM");
    agent.wait_or_panic(Duration::from_secs(20));
    agent.stderr_text()
}

fn log_tail(agent_log: &str) -> String {
    tail(agent_log, 4000).to_owned()
}

/// The number after `key` in the agent's last summary line.
fn summary_number(log: &str, key: &str) -> u64 {
    log.lines()
        .rev()
        .find(|l| l.contains("summary:") && l.contains(key))
        .and_then(|l| l.split(key).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{key}` in the agent's summary\n{}", log_tail(log)))
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// One row of the link benchmark (`scripts/link-bench.sh` collects them).
fn bench_row(profile: &str, p50: f64, p95: f64, drain: &str, resent: f64, reconnects: u64) {
    eprintln!(
        "LINK | {profile} | {p50:.0} ms | {p95:.0} ms | {drain} | {:.2} % | {reconnects} |",
        100.0 * resent
    );
}

/// (a) 3 KiB/s each way, 100 ms round trip, 30 minutes of backlog, two minutes of live data.
#[test]
fn thin_link_3k_live_first_while_the_backlog_drains() {
    thin_link(3 * 1024);
}

/// The same at 8 KiB/s, where the agent used to tear down its own connection.
#[test]
fn thin_link_8k_live_first_while_the_backlog_drains() {
    thin_link(8 * 1024);
}

fn thin_link(rate: u64) {
    const RUN_S: u64 = 120;
    let kib = rate / 1024;
    let rig = Rig::new(LinkSpec {
        up_rate: rate,
        down_rate: rate,
        delay: Duration::from_millis(50),
        jitter: Duration::from_millis(10),
    });
    let backlog_start = rig.backlog(30);
    let config = rig.through_link("30s");
    let live_from = now_epoch_ms();
    let started = Instant::now();
    let mut agent = rig.live_agent(&config, &format!("{}s", RUN_S + 30));
    sleep_until(started + Duration::from_secs(RUN_S));
    let up_bytes = rig.proxy.up_bytes();
    let window_end = now_epoch_ms();
    // Readings sampled in the last seconds are still on their way: let them land.
    std::thread::sleep(Duration::from_secs(4));
    let msgs = rig.telemetry();
    let connections = rig.proxy.connections();
    let log = stop(&mut agent);
    let status = std::fs::read_to_string(rig.path("status.json")).unwrap_or_default();

    let r = readings(&msgs);
    // Live: sampled during the run, at least 4 s before its end.
    let live_end = window_end - 4000.0;
    let expected = ((live_end - live_from) / 100.0).floor();
    let live: Vec<(i64, f64)> = r
        .first
        .iter()
        .filter(|(t, _)| **t as f64 >= live_from && (**t as f64) < live_end)
        .map(|(t, (at, _))| (*t, *at - *t as f64))
        .collect();
    let share = live.len() as f64 / expected;
    let lat: Vec<f64> = live.iter().map(|x| x.1).collect();
    let (p50, p95) = (percentile(lat.clone(), 0.5), percentile(lat, 0.95));
    // Bytes: distinct readings that arrived within the window, live and backlog.
    let in_window = |at: f64| at <= window_end;
    let live_bytes: f64 = r
        .first
        .iter()
        .filter(|(t, (at, _))| **t as f64 >= live_from && in_window(*at))
        .map(|(_, (_, b))| b)
        .sum();
    let backlog_bytes: f64 = r
        .first
        .iter()
        .filter(|(t, (at, _))| (**t as f64) < live_from && **t >= backlog_start && in_window(*at))
        .map(|(_, (_, b))| b)
        .sum();
    let duplicates: usize = r.copies.values().map(|c| c.len() - 1).sum();
    let secs = (window_end - live_from) / 1000.0;
    let spare = rate as f64 * secs - live_bytes;
    let spare_used = backlog_bytes / spare;
    let overhead = up_bytes as f64 / (live_bytes + backlog_bytes);
    let resent = summary_number(&log, "resent_bytes=") as f64;
    bench_row(
        &format!("{kib} KiB/s, 100 ms, 30 min of backlog, 2 min"),
        p50,
        p95,
        &format!("{:.0} %", 100.0 * spare_used),
        resent / (live_bytes + backlog_bytes),
        connections.saturating_sub(1),
    );
    eprintln!(
        "{kib} KiB/s: live {}/{expected} ({:.1} %), latency p50 {p50:.0} ms p95 {p95:.0} ms; \
         backlog {backlog_bytes:.0} B = {:.0} % of the spare {spare:.0} B; {up_bytes} B crossed \
         for {:.0} B of distinct readings ({overhead:.3}x); {duplicates} duplicates; {connections} connection(s)",
        live.len(),
        100.0 * share,
        100.0 * spare_used,
        live_bytes + backlog_bytes
    );
    let ctx = || format!("agent log:\n{}\nstatus:\n{status}", log_tail(&log));
    assert!(
        share >= 0.95,
        "only {:.1} % of live readings arrived\n{}",
        100.0 * share,
        ctx()
    );
    assert!(p95 <= 3000.0, "live p95 {p95:.0} ms > 3 s\n{}", ctx());
    assert_eq!(
        connections,
        1,
        "the agent reconnected on a working link\n{}",
        ctx()
    );
    assert!(
        overhead <= 1.15,
        "{overhead:.3}x the distinct bytes crossed the link\n{}",
        ctx()
    );
    assert!(
        spare_used >= 0.80,
        "the backlog used {:.0} % of the spare capacity\n{}",
        100.0 * spare_used,
        ctx()
    );
    // The link model is visible in the status file and `redline-agent status`.
    assert!(
        status.contains("\"rate_bytes_per_s\"") && status.contains("\"queued_bytes\""),
        "the status file shows no link figures:\n{status}"
    );
    let shown = support::run_agent(
        &[
            "status",
            "--file",
            rig.path("status.json").to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(20),
    );
    let measured = shown
        .stdout_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("measured "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no measured link rate in `status`:\n{}", shown.describe()));
    // What the link model measured is what the emulated link carries, within a third.
    assert!(
        (0.66 * rate as f64..=1.5 * rate as f64).contains(&measured),
        "`status` shows {measured} B/s on a {rate} B/s link:\n{}",
        shown.stdout_text
    );
}

/// (c) Laps: 16 KiB/s, link up 40 s and down 20 s, three times.
#[test]
fn laps_every_reading_arrives_and_live_resumes_at_once() {
    const RATE: u64 = 16 * 1024;
    let rig = Rig::new(LinkSpec {
        up_rate: RATE,
        down_rate: RATE,
        delay: Duration::from_millis(40),
        jitter: Duration::from_millis(10),
    });
    let config = rig.through_link("30s");
    let live_from = now_epoch_ms();
    let started = Instant::now();
    const LAPS: u64 = 3;
    let run_s = LAPS * 60;
    let mut agent = rig.live_agent(&config, &format!("{run_s}s"));
    let mut cuts = Vec::new();
    let mut returns = Vec::new();
    let mut reconnect_gaps = Vec::new();
    for lap in 0..LAPS {
        sleep_until(started + Duration::from_secs(lap * 60 + 40));
        rig.proxy.set_up(false);
        cuts.push(now_epoch_ms());
        sleep_until(started + Duration::from_secs(lap * 60 + 60));
        let before = rig.proxy.connections();
        rig.proxy.set_up(true);
        let back = Instant::now();
        returns.push(now_epoch_ms());
        // How long the agent leaves a returned link unused.
        let gap = support::process::poll(Duration::from_secs(15), || {
            (rig.proxy.connections() > before).then(|| back.elapsed())
        });
        reconnect_gaps.push(gap.map_or(f64::INFINITY, |g| g.as_secs_f64()));
    }
    // The run ends by itself once everything is acknowledged.
    let status = agent.wait_timeout(Duration::from_secs(60));
    let log = agent.stderr_text();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the run did not end with everything acknowledged\n{}",
        log_tail(&log)
    );
    let msgs = rig.telemetry();
    let r = readings(&msgs);
    let expected = run_s as i64 * 10;
    let grid_start = *r.first.keys().next().unwrap_or(&0);
    let missing: Vec<i64> = (0..expected)
        .map(|k| grid_start + k * 100)
        .filter(|t| !r.first.contains_key(t))
        .collect();
    assert!(
        (grid_start as f64 - live_from).abs() < 1500.0,
        "the first reading is not from the start of the run"
    );
    assert!(
        missing.is_empty(),
        "{} readings never arrived, first {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        log_tail(&log)
    );
    assert_eq!(r.first.len() as i64, expected, "readings beyond the run");
    // A duplicate is a reading whose first copy arrived before a cut (its PUBACK was lost
    // with the link) within the few seconds a message can be in flight.
    let mut dup = 0;
    for (t, copies) in &r.copies {
        if copies.len() < 2 {
            continue;
        }
        dup += copies.len() - 1;
        let first = copies[0];
        assert!(
            cuts.iter()
                .any(|c| first <= *c + 500.0 && first >= *c - 5000.0),
            "reading {t} arrived twice though its first copy (at {first}) was not in flight at a cut {cuts:?}"
        );
    }
    // Live after each return: readings sampled from 5 s after the return to the next cut.
    let mut lat = Vec::new();
    for (i, back) in returns.iter().enumerate() {
        let until = cuts.get(i + 1).copied().unwrap_or(back + 20_000.0) - 3000.0;
        lat.extend(
            r.first
                .iter()
                .filter(|(t, _)| **t as f64 >= back + 5000.0 && (**t as f64) < until)
                .map(|(t, (at, _))| at - *t as f64),
        );
    }
    let n = lat.len();
    let p50 = percentile(lat.clone(), 0.5);
    let p95 = percentile(lat, 0.95);
    let resent = summary_number(&log, "resent_bytes=");
    let distinct: f64 = r.first.values().map(|(_, b)| b).sum();
    bench_row(
        "16 KiB/s, 80 ms, laps: 40 s up, 20 s down, x3 (live from 5 s after each return)",
        p50,
        p95,
        "all delivered",
        resent as f64 / distinct,
        rig.proxy.connections().saturating_sub(1),
    );
    eprintln!(
        "laps at 16 KiB/s: {} readings, {dup} duplicates, {resent} bytes re-sent ({:.2} % of {distinct:.0}), \
         live p95 after returns {p95:.0} ms over {n} readings; {} connections, {} refused while down, \
         reconnected {reconnect_gaps:.1?} s after the returns",
        r.first.len(),
        100.0 * resent as f64 / distinct,
        rig.proxy.connections(),
        rig.proxy.refused()
    );
    assert!(
        reconnect_gaps.iter().all(|g| *g <= 5.0),
        "the agent left the returned link unused for {reconnect_gaps:?} s (backoff is capped at 4 s)"
    );
    // Only what was in flight at a cut is sent again: at 16 KiB/s about a second of link.
    assert!(
        resent <= LAPS * 40 * 1024,
        "{resent} bytes re-sent for {LAPS} cuts\n{}",
        log_tail(&log)
    );
    assert!(
        n > 100,
        "too few readings after the returns to measure: {n}"
    );
    assert!(
        p95 <= 3000.0,
        "live p95 {p95:.0} ms after the link returned\n{}",
        log_tail(&log)
    );
}

/// (b) 64 KiB/s with a 600 ms round trip: an hour of backlog drains close to the ideal
/// time while live readings keep arriving within seconds.
#[test]
fn long_fat_link_drains_an_hour_near_the_ideal_time() {
    const RATE: u64 = 64 * 1024;
    let rig = Rig::new(LinkSpec {
        up_rate: RATE,
        down_rate: RATE,
        delay: Duration::from_millis(300),
        jitter: Duration::ZERO,
    });
    let backlog_start = rig.backlog(60);
    let backlog_bytes = support::spool::segment_bytes(&rig.path("spool"));
    let config = rig.through_link("30s");
    let live_from = now_epoch_ms();
    let started = Instant::now();
    let mut agent = rig.live_agent(&config, "400s");
    // Drained: every backlog reading has arrived.
    let expected_backlog = 36_000;
    let mut drained_at = None;
    while started.elapsed() < Duration::from_secs(400) {
        std::thread::sleep(Duration::from_secs(2));
        let r = readings(&rig.telemetry());
        let n = r
            .first
            .keys()
            .filter(|t| (**t as f64) < live_from && **t >= backlog_start)
            .count();
        if n >= expected_backlog {
            drained_at = Some(started.elapsed());
            break;
        }
    }
    let msgs = rig.telemetry();
    let log = stop(&mut agent);
    let r = readings(&msgs);
    let Some(drained) = drained_at else {
        panic!(
            "the hour of backlog did not drain in 400 s ({} of {expected_backlog} readings)\n{}",
            r.first.keys().filter(|t| (**t as f64) < live_from).count(),
            log_tail(&log)
        );
    };
    let backlog_payload: f64 = r
        .first
        .iter()
        .filter(|(t, _)| (**t as f64) < live_from)
        .map(|(_, (_, b))| b)
        .sum();
    let live_rate = 1800.0;
    let ideal = backlog_payload / (RATE as f64 - live_rate);
    let ratio = drained.as_secs_f64() / ideal;
    let end = live_from + drained.as_secs_f64() * 1000.0 - 3000.0;
    let lat: Vec<f64> = r
        .first
        .iter()
        .filter(|(t, _)| **t as f64 >= live_from && (**t as f64) < end)
        .map(|(t, (at, _))| at - *t as f64)
        .collect();
    let p50 = percentile(lat.clone(), 0.5);
    let p95 = percentile(lat, 0.95);
    let connections = rig.proxy.connections();
    bench_row(
        "64 KiB/s, 600 ms, 1 h of backlog",
        p50,
        p95,
        &format!("drained in {ratio:.2}x the ideal time"),
        summary_number(&log, "resent_bytes=") as f64 / backlog_payload,
        connections.saturating_sub(1),
    );
    eprintln!(
        "64 KiB/s, 600 ms: {backlog_payload:.0} B of backlog ({backlog_bytes} B on disk) drained in {:.1} s, ideal {ideal:.1} s ({ratio:.2}x); live p95 {p95:.0} ms; {} connection(s)",
        drained.as_secs_f64(),
        rig.proxy.connections()
    );
    assert!(
        ratio <= 1.3,
        "drain took {ratio:.2}x the ideal time\n{}",
        log_tail(&log)
    );
    assert!(
        p95 <= 3000.0,
        "live p95 {p95:.0} ms while draining\n{}",
        log_tail(&log)
    );
    assert_eq!(
        rig.proxy.connections(),
        1,
        "reconnected on a working link\n{}",
        log_tail(&log)
    );
}

/// (d) A frozen broker behind a thin link is still found dead within `ack_timeout`, and
/// the link is re-established once it thaws.
#[test]
fn frozen_broker_is_detected_within_ack_timeout() {
    let rig = Rig::new(LinkSpec {
        up_rate: 16 * 1024,
        down_rate: 16 * 1024,
        delay: Duration::from_millis(40),
        jitter: Duration::ZERO,
    });
    let config = rig.through_link("5s");
    let started = Instant::now();
    let mut agent = rig.live_agent(&config, "40s");
    sleep_until(started + Duration::from_secs(10));
    let pid = support::spool::broker_pid(rig.dir.path());
    send_signal(pid, "STOP");
    let frozen = Instant::now();
    let seen = support::process::poll(Duration::from_secs(12), || {
        agent
            .stderr_text()
            .contains("nothing acknowledged for")
            .then(Instant::now)
    });
    send_signal(pid, "CONT");
    let Some(seen) = seen else {
        panic!(
            "no dead-link detection within 12 s of the freeze\n{}",
            log_tail(&agent.stderr_text())
        );
    };
    let took = seen.duration_since(frozen);
    let status = agent.wait_timeout(Duration::from_secs(60));
    let log = agent.stderr_text();
    eprintln!(
        "frozen broker found dead after {:.1} s (ack_timeout 5 s); {} connections",
        took.as_secs_f64(),
        rig.proxy.connections()
    );
    assert!(
        took <= Duration::from_secs(7),
        "detected after {took:?}, ack_timeout is 5 s\n{}",
        log_tail(&log)
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", log_tail(&log));
    let r = readings(&rig.telemetry());
    assert_eq!(
        r.first.len(),
        400,
        "every reading of the 40 s arrives\n{}",
        log_tail(&log)
    );
    assert!(rig.proxy.connections() >= 2, "the link was re-established");
}
