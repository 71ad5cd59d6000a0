//! The disk spool end to end: the agent against a real Mosquitto with mutual TLS while the
//! broker freezes, crashes or is missing, while the agent itself is killed, while the
//! spool is damaged, capped or on a full file system. A `mosquitto_sub` on the broker's
//! plain listener checks what arrived; `spool export` and `spool stats` show what the
//! spool holds in between.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::broker::{Broker, Subscriber};
use support::certs::Pki;
use support::json::{Coverage, Record, assert_exact_grid, coverage};
use support::process::{Proc, poll, send_signal, tail};
use support::spool::{
    Arrival, Arrivals, Rng, Tmpfs, Tuning, broker_pid, copy_dir_files, dir_file_bytes,
    fill_until_enospc, frames, message_records, numbers_after, run_agent_to_end, segment_bytes,
    segment_files, simulate_args, spawn_agent, spool_export, spool_stats, write_config,
};
use support::{ConfigSpec, SESSION_ID, START, START_MS, TOPIC, VEHICLE_ID};

/// Readings per batch (`batch.max_records` of the base config).
const BATCH: i64 = 10;
/// A second simulated day, for runs whose readings must not meet those of `START`.
const DAY2: &str = "2024-01-15T21:20:00Z";
const DAY2_MS: i64 = START_MS + 86_400_000;

/// A broker with mutual TLS, a subscriber on its plain listener, the PKI, a temp dir.
struct Rig {
    // Field order is drop order: subscriber, then broker, then the files.
    sub: Subscriber,
    broker: Broker,
    pki: Pki,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new(persistence: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path(), VEHICLE_ID);
        let broker = Broker::start(&pki, dir.path(), persistence);
        let sub = Subscriber::start(&broker);
        Rig {
            sub,
            broker,
            pki,
            dir,
        }
    }

    fn config(&self, name: &str, t: &Tuning) -> PathBuf {
        let spec = ConfigSpec {
            port: self.broker.tls_port,
            ca: &self.pki.ca,
            cert: &self.pki.client_cert,
            key: &self.pki.client_key,
            payload: "records",
        };
        write_config(&spec, t, self.dir.path(), name)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every telemetry payload so far (all on the vehicle's topic).
    fn payloads(&self) -> Vec<String> {
        self.sub
            .telemetry()
            .into_iter()
            .map(|(topic, payload)| {
                assert_eq!(topic, TOPIC, "telemetry on an unexpected topic");
                payload
            })
            .collect()
    }

    /// Every record received so far, each message checked against the contract.
    fn records(&self) -> Vec<Record> {
        message_records(&self.payloads()).concat()
    }

    /// Distinct timestamps received so far.
    fn timestamps(&self) -> BTreeSet<i64> {
        self.records().iter().map(|r| r.timestamp).collect()
    }

    fn describe(&self) -> String {
        format!(
            "--- broker log (tail) ---\n{}\n--- subscriber stderr ---\n{}",
            tail(&self.broker.log(), 3000),
            self.sub.stderr_text()
        )
    }

    fn report(&self, agent: &Proc) -> String {
        format!(
            "--- agent stderr (tail) ---\n{}\n{}",
            tail(&agent.stderr_text(), 6000),
            self.describe()
        )
    }
}

fn check_identity(cov: &Coverage) {
    for r in cov.distinct.values() {
        assert_eq!(r.vehicle_id, VEHICLE_ID, "vehicle_id of {:?}", r.json);
        assert_eq!(r.session_id, SESSION_ID, "session_id of {:?}", r.json);
    }
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// Polls arrivals every 5 ms until the agent has exited (panics after `deadline`), then
/// for another `settle` so that what was acknowledged last has reached the subscriber.
fn record_until_exit(
    rig: &Rig,
    agent: &mut Proc,
    arrivals: &mut Arrivals,
    deadline: Instant,
    settle: Duration,
) {
    while agent.is_running() {
        arrivals.poll(&rig.sub);
        assert!(
            Instant::now() < deadline,
            "the agent did not exit in time\n{}",
            rig.report(agent)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let until = Instant::now() + settle;
    while Instant::now() < until {
        arrivals.poll(&rig.sub);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every record of `expected` was received, with the same content.
fn assert_all_arrived(expected: &[Record], cov: &Coverage, what: &str) {
    let missing: Vec<i64> = expected
        .iter()
        .filter(|r| !cov.distinct.contains_key(&r.timestamp))
        .map(|r| r.timestamp)
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} records never arrived, first ones (ms): {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(20)]
    );
    for r in expected {
        assert_eq!(
            cov.distinct[&r.timestamp].json, r.json,
            "{what}: the record received for {} differs from the stored one",
            r.timestamp
        );
    }
}

// 1. ---------------------------------------------------------------------------------

#[test]
fn frozen_then_killed_broker_every_reading_arrives() {
    let t0 = Instant::now();
    let mut rig = Rig::new(true);
    // Mosquitto saves its sessions when stopped with SIGTERM. After this restart the
    // subscriber's session (with its subscription) is in the store that the broker started
    // after the SIGKILL below loads: what the agent publishes before mosquitto_sub has
    // reconnected is queued for the subscriber instead of being dropped.
    rig.broker.stop();
    rig.broker.start_again();
    rig.sub.sync();

    let config = rig.config(
        "agent.toml",
        &Tuning {
            spool_dir: Some(rig.path("spool")),
            ..Tuning::default()
        },
    );
    let started = Instant::now();
    let mut agent = spawn_agent(&simulate_args(&config, Some("15s"), "1", 1, START));
    let flowing = poll(Duration::from_secs(3), || {
        (!rig.sub.telemetry().is_empty()).then_some(())
    });
    assert!(
        flowing.is_some(),
        "no telemetry within 3 s of start\n{}",
        rig.report(&agent)
    );

    sleep_until(started + Duration::from_secs(3));
    let pid = broker_pid(rig.dir.path());
    send_signal(pid, "STOP");
    let frozen_at = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let seen_frozen = rig.sub.telemetry().len();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        rig.sub.telemetry().len(),
        seen_frozen,
        "the broker forwarded messages while SIGSTOPped: the freeze did not happen"
    );
    assert!(
        agent.is_running(),
        "the agent exited while the broker was frozen\n{}",
        rig.report(&agent)
    );

    send_signal(pid, "KILL");
    rig.broker.stop(); // reaps the killed process
    let killed_at = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    rig.broker.start_again();
    let restarted_at = started.elapsed();

    let status = agent.wait_or_panic(Duration::from_secs(50).saturating_sub(started.elapsed()));
    let exited_at = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "every batch is acknowledged by the new broker, so the run must exit 0\n{}",
        rig.report(&agent)
    );

    // Exit 0: the broker has every batch; the subscriber's session gets them all.
    poll(Duration::from_secs(10), || {
        (rig.timestamps().len() >= 150).then_some(())
    });
    rig.sub.sync();
    let records = rig.records();
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    let after_restart = cov
        .distinct
        .keys()
        .filter(|t| **t >= START_MS + restarted_at.as_millis() as i64)
        .count();
    assert_exact_grid(&cov, START_MS, 150);
    check_identity(&cov);
    assert!(
        after_restart > 0,
        "nothing sampled after the restart arrived"
    );
    let stats = spool_stats(&config);
    assert_eq!(
        stats.num("unacked batches"),
        0,
        "after exit 0 the spool must hold nothing unacknowledged:\n{}",
        stats.text
    );
    eprintln!(
        "frozen at {frozen_at:?}, killed at {killed_at:?}, new broker at {restarted_at:?}, exit 0 at \
         {exited_at:?}; {} messages, 150 of 150 readings ({after_restart} sampled after the restart), \
         {} duplicates; test took {:?}",
        rig.sub.telemetry().len(),
        cov.duplicates,
        t0.elapsed()
    );
}

// 2. ---------------------------------------------------------------------------------

/// Slack for the broker and the subscriber between the agent's publish and the poll that
/// sees a message: they may delay and bunch messages by this much on a loaded machine. A
/// rate is therefore checked as a token bucket over every span of messages, with this much
/// time added to each span: short bursts of forwarding are forgiven, a rate above the limit
/// sustained over seconds is not.
const FORWARDING: Duration = Duration::from_secs(1);

/// Token bucket over the arrivals: the weight of messages i..=j is at most
/// `burst + rate * (longest time they can have taken + FORWARDING)`. Returns the worst excess
/// over that bound and the span (i, j) where it is.
fn worst_excess(
    msgs: &[Arrival],
    weight: impl Fn(&Arrival) -> f64,
    rate: f64,
    burst: f64,
) -> (f64, usize, usize) {
    let mut worst = (f64::MIN, 0, 0);
    for (i, from) in msgs.iter().enumerate() {
        let mut sum = 0.0;
        for (j, to) in msgs.iter().enumerate().skip(i) {
            sum += weight(to);
            let dt = to.at.duration_since(from.after) + FORWARDING;
            let excess = sum - (burst + rate * dt.as_secs_f64());
            if excess > worst.0 {
                worst = (excess, i, j);
            }
        }
    }
    worst
}

#[test]
fn broker_down_at_start_backlog_arrives_within_publish_rate() {
    const RATE: usize = 5;
    let t0 = Instant::now();
    let mut rig = Rig::new(true);
    let config = rig.config(
        "agent.toml",
        &Tuning {
            spool_dir: Some(rig.path("spool")),
            max_publish_per_sec: RATE as u32,
            ..Tuning::default()
        },
    );
    // Persistence: the subscriber's session survives the stop, so it receives what the
    // agent publishes before mosquitto_sub has noticed that the broker is back.
    rig.broker.stop();
    let started = Instant::now();
    let mut agent = spawn_agent(&simulate_args(&config, Some("120s"), "10", 2, START));
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        agent.is_running(),
        "the agent exited while the broker was down\n{}",
        rig.report(&agent)
    );
    rig.broker.start_again();
    let up_at = started.elapsed();
    rig.sub.sync();
    // Messages the broker queued while the subscriber was reconnecting come in one burst:
    // that is the broker, not the agent. The rate is measured on what arrives from now on.
    let mut arrivals = Arrivals::new();
    arrivals.poll(&rig.sub);
    let checked_from = arrivals.msgs.len();
    record_until_exit(
        &rig,
        &mut agent,
        &mut arrivals,
        started + Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let exited_at = started.elapsed();
    let status = agent.wait_or_panic(Duration::from_secs(1));
    assert_eq!(
        status.code(),
        Some(0),
        "the whole backlog is acknowledged, so the run must exit 0\n{}",
        rig.report(&agent)
    );
    rig.sub.sync();
    arrivals.poll(&rig.sub);

    let payloads: Vec<String> = arrivals.msgs.iter().map(|a| a.payload.clone()).collect();
    let per_message = message_records(&payloads); // <= 500 records and <= 128 KiB each
    let records = per_message.concat();
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    assert_exact_grid(&cov, START_MS, 1200);
    check_identity(&cov);

    let measured = &arrivals.msgs[checked_from..];
    let times: Vec<Instant> = measured.iter().map(|a| a.at).collect();
    assert!(
        times.len() >= 3 * RATE,
        "only {} messages arrived after the subscriber was back: nothing to measure\n{}",
        times.len(),
        rig.describe()
    );
    // At most RATE messages a second (one more at once), over every span of messages.
    let (excess, from, to) = worst_excess(measured, |_| 1.0, RATE as f64, 1.0);
    let offsets: Vec<u128> = times
        .iter()
        .map(|t| t.duration_since(times[0]).as_millis())
        .collect();
    assert!(
        excess <= 0.0,
        "messages {from}..={to} are {excess:.1} more than max_publish_per_sec = {RATE} allows \
         (with {FORWARDING:?} for forwarding); arrival offsets (ms): {offsets:?}"
    );
    let span = times
        .last()
        .map_or(Duration::ZERO, |l| l.duration_since(times[0]));
    let most = times.len() as f64 / span.as_secs_f64().max(1e-3);
    let largest = per_message.iter().map(Vec::len).max().unwrap_or(0);
    let biggest = payloads.iter().map(String::len).max().unwrap_or(0);
    eprintln!(
        "broker up at {up_at:?}, exit 0 at {exited_at:?}; {} messages ({} measured, {most:.1}/s \
         on average over {span:?}), largest {largest} records / {biggest} bytes, {} duplicates; \
         test took {:?}",
        payloads.len(),
        times.len(),
        cov.duplicates,
        t0.elapsed()
    );
}

#[test]
fn backlog_respects_bytes_per_second() {
    const RATE: f64 = 64.0 * 1024.0;
    // The bucket holds one whole message (128 KiB payload + 1 KiB), so that a message
    // never waits for ever; that much may go at once.
    const BURST: f64 = 129.0 * 1024.0;
    let t0 = Instant::now();
    let mut rig = Rig::new(false);
    let config = rig.config(
        "agent.toml",
        &Tuning {
            max_publish_per_sec: 0,
            max_bytes_per_sec: "64KiB",
            ..Tuning::default()
        },
    );
    let started = Instant::now();
    // 3000 readings at full speed: about 500 KB of backlog, four times the burst.
    let mut agent = spawn_agent(&simulate_args(&config, Some("300s"), "max", 3, START));
    let mut arrivals = Arrivals::new();
    record_until_exit(
        &rig,
        &mut agent,
        &mut arrivals,
        started + Duration::from_secs(45),
        Duration::from_millis(500),
    );
    let exited_at = started.elapsed();
    let status = agent.wait_or_panic(Duration::from_secs(1));
    assert_eq!(
        status.code(),
        Some(0),
        "everything acknowledged: exit 0\n{}",
        rig.report(&agent)
    );
    rig.sub.sync();
    arrivals.poll(&rig.sub);
    let payloads: Vec<String> = arrivals.msgs.iter().map(|a| a.payload.clone()).collect();
    let records = message_records(&payloads).concat();
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    assert_exact_grid(&cov, START_MS, 3000);

    // Token bucket: the bytes sent from message i to message j are at most
    // BURST + RATE * (t_j - t_i).
    let sizes: Vec<f64> = arrivals
        .msgs
        .iter()
        .map(|a| a.payload.len() as f64)
        .collect();
    let total: f64 = sizes.iter().sum();
    let worst = worst_excess(&arrivals.msgs, |a| a.payload.len() as f64, RATE, BURST);
    let span = arrivals
        .msgs
        .last()
        .map(|l| l.at.duration_since(arrivals.msgs[0].at))
        .unwrap_or_default();
    assert!(
        worst.0 <= 0.0,
        "messages {}..={} carried {:.0} bytes more than max_bytes_per_sec = 64KiB allows \
         (burst of one message and {FORWARDING:?} for forwarding included); {} messages, \
         {total:.0} bytes in {span:?}",
        worst.1,
        worst.2,
        worst.0,
        sizes.len()
    );
    eprintln!(
        "{} messages, {total:.0} bytes in {span:?} ({:.0} B/s), exit 0 at {exited_at:?}; test took {:?}",
        sizes.len(),
        total / span.as_secs_f64().max(1e-3),
        t0.elapsed()
    );
}

// 3. ---------------------------------------------------------------------------------

/// Start of kill-loop run `i`: one hour apart, so that runs never share a timestamp.
fn hour_start(i: u64) -> (String, i64) {
    (
        format!("2024-01-15T{i:02}:00:00Z"),
        1_705_276_800_000 + i as i64 * 3_600_000,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    StopBroker,
    Kill,
    StartBroker,
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The agent's status file as it stands: (when it was written by the agent's clock, ms;
/// batches closed by then). `None` while there is none (or between writes).
fn status_snapshot(path: &Path) -> Option<(i64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((v["at_ms"].as_i64()?, v["counters"]["batches"].as_u64()?))
}

/// Sleeps until `t`, reading the status file every 10 ms meanwhile.
fn watch_status_until(t: Instant, path: &Path, seen: &mut Vec<(i64, u64)>) {
    loop {
        if let Some(s) = status_snapshot(path)
            && seen.last() != Some(&s)
        {
            seen.push(s);
        }
        let Some(left) = t.checked_duration_since(Instant::now()) else {
            return;
        };
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}

#[test]
fn kill_9_loop_loses_no_durable_reading() {
    const RUNS: u64 = 20;
    const HOUR: i64 = 3_600_000;
    let t0 = Instant::now();
    let mut rig = Rig::new(true);
    let config = rig.config(
        "agent.toml",
        &Tuning {
            spool_dir: Some(rig.path("spool")),
            sync_interval: "always",
            shutdown_timeout: "2s",
            ..Tuning::default()
        },
    );
    // The agent's status file, every 100 ms: how many batches it had closed, and when (its
    // own clock). Every batch closed more than DURABLE_AFTER before a kill must survive it:
    // each batch is synced as it is written (sync_interval = "always"); the margin is for
    // the spool thread's queue and fsync on a loaded machine.
    const DURABLE_AFTER_MS: i64 = 1000;
    let status_path = rig.path("status.json");
    // The killed runs only: a run that ends by itself need not write one.
    let kill_config = rig.path("agent-killed.toml");
    std::fs::write(
        &kill_config,
        format!(
            "{}\n[status]\nfile = {}\nfile_interval = \"100ms\"\n",
            std::fs::read_to_string(&config).expect("config"),
            support::toml_path(&status_path)
        ),
    )
    .expect("config");
    let mut durable: BTreeMap<u64, u64> = BTreeMap::new();
    let seed = std::env::var("SPOOL_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("kill loop seed {seed} (SPOOL_KILL_SEED={seed} repeats it)");
    let mut rng = Rng::new(seed);
    let mut exported: BTreeMap<i64, Record> = BTreeMap::new();
    let mut journal = Vec::new();
    let mut broker_restarts = 0;

    for i in 0..RUNS {
        let kill_after = Duration::from_millis(rng.range(300, 2001));
        let mut steps = vec![(kill_after, Step::Kill)];
        let what = match i % 4 {
            1 => {
                // Down from before the start, back at a random moment (maybe after the kill).
                rig.broker.stop();
                let up = Duration::from_millis(rng.range(0, 2500));
                steps.push((up, Step::StartBroker));
                format!("broker down at start, up at {up:?}")
            }
            3 => {
                // Stopped at a random moment of the run, back after the kill.
                let down = Duration::from_millis(rng.range(0, kill_after.as_millis() as u64));
                steps.push((down, Step::StopBroker));
                steps.push((kill_after, Step::StartBroker));
                format!("broker stopped at {down:?}")
            }
            _ => "broker up".to_owned(),
        };
        steps.sort();
        let (start, _) = hour_start(i);
        let _ = std::fs::remove_file(&status_path);
        let mut agent = spawn_agent(&simulate_args(&kill_config, None, "5", i + 1, &start));
        let spawned = Instant::now();
        let mut snapshots: Vec<(i64, u64)> = Vec::new();
        let mut killed_at = 0;
        for (at, step) in steps {
            watch_status_until(spawned + at, &status_path, &mut snapshots);
            match step {
                Step::StopBroker => rig.broker.stop(),
                Step::StartBroker => {
                    rig.broker.start_again();
                    broker_restarts += 1;
                }
                Step::Kill => {
                    assert!(
                        agent.is_running(),
                        "run {i}: the agent exited by itself before the kill\n{}",
                        rig.report(&agent)
                    );
                    killed_at = wall_ms();
                    send_signal(agent.pid(), "KILL");
                    let status = agent.wait_or_panic(Duration::from_secs(10));
                    assert_eq!(status.signal(), Some(9), "run {i}: {status}");
                    // The last snapshot it wrote.
                    watch_status_until(Instant::now(), &status_path, &mut snapshots);
                }
            }
        }
        // The durable, unacknowledged records after the crash.
        let export = spool_export(&config, None);
        for r in &export {
            if let Some(seen) = exported.get(&r.timestamp) {
                assert_eq!(
                    seen.json, r.json,
                    "two exports disagree on reading {}",
                    r.timestamp
                );
            }
            exported.insert(r.timestamp, r.clone());
        }
        // Batches closed (by the agent's own account) long enough before the kill.
        let closed = snapshots
            .iter()
            .filter(|(at, _)| *at <= killed_at - DURABLE_AFTER_MS)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        durable.insert(i, closed);
        journal.push(format!(
            "run {i:2}: killed after {kill_after:?} ({what}); export holds {} readings; {closed} \
             batch(es) closed more than {DURABLE_AFTER_MS} ms before the kill ({} status \
             snapshots)",
            export.len(),
            snapshots.len()
        ));
    }

    // The last run, with the broker up, delivers everything left and exits 0.
    let (start, _) = hour_start(RUNS);
    let out = run_agent_to_end(
        &simulate_args(&config, Some("3s"), "5", RUNS + 1, &start),
        Duration::from_secs(40),
    );
    assert_eq!(
        out.code(),
        Some(0),
        "the final run must deliver every leftover and exit 0\n{}\n{}\n{}",
        journal.join("\n"),
        out.describe(),
        rig.describe()
    );
    poll(Duration::from_secs(10), || {
        let got = rig.timestamps();
        exported.keys().all(|t| got.contains(t)).then_some(())
    });
    rig.sub.sync();

    let messages = message_records(&rig.payloads());
    let all: Vec<Record> = messages.concat();
    let cov = coverage(&all).unwrap_or_else(|e| panic!("{e}"));
    check_identity(&cov);
    let exported_list: Vec<Record> = exported.values().cloned().collect();
    assert_all_arrived(&exported_list, &cov, "records seen in a `spool export`");

    // Which run and grid index each reading belongs to.
    let (_, base) = hour_start(0);
    let locate = |t: i64| -> (u64, i64) {
        let off = t - base;
        assert!(
            off >= 0 && off % 100 == 0 && off / HOUR <= RUNS as i64,
            "reading {t} is on no run's grid"
        );
        ((off / HOUR) as u64, (off % HOUR) / 100)
    };
    let mut per_run: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    for &t in cov.distinct.keys() {
        let (run, k) = locate(t);
        per_run.entry(run).or_default().push(k);
    }
    let mut counts = Vec::new();
    for run in 0..=RUNS {
        let ks = per_run.get(&run).cloned().unwrap_or_default();
        let n = ks.len() as i64;
        let holes: Vec<i64> = (0..n).filter(|k| ks.binary_search(k).is_err()).collect();
        assert!(
            holes.is_empty(),
            "run {run}: received readings are not a prefix of its grid: {n} readings, missing \
             indexes {holes:?}\n{}",
            journal.join("\n")
        );
        if run < RUNS {
            assert_eq!(
                n % BATCH,
                0,
                "run {run} was killed: it can only have left whole batches, got {n} readings"
            );
            // The lower bound: whatever it had closed well before the kill was kept (exported
            // or delivered, and in the end delivered).
            let closed = durable[&run];
            assert!(
                n >= closed as i64 * BATCH,
                "run {run}: {closed} batch(es) closed more than {DURABLE_AFTER_MS} ms before the \
                 kill, but only {n} readings survived it\n{}",
                journal.join("\n")
            );
        } else {
            assert_eq!(n, 30, "the final 3 s run at 10 Hz");
        }
        counts.push(n);
    }

    // Duplicates: only whole batches. Every message carries whole batches, and every
    // reading of one batch arrived the same number of times.
    let mut times_seen: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &all {
        *times_seen.entry(r.timestamp).or_default() += 1;
    }
    for (m, recs) in messages.iter().enumerate() {
        let mut per_batch: BTreeMap<(u64, i64), i64> = BTreeMap::new();
        for r in recs {
            let (run, k) = locate(r.timestamp);
            *per_batch.entry((run, k / BATCH)).or_default() += 1;
        }
        for ((run, b), n) in per_batch {
            assert_eq!(
                n, BATCH,
                "message {m} carries {n} readings of batch {b} of run {run}: not a whole batch"
            );
        }
    }
    let mut batch_mult: BTreeMap<(u64, i64), BTreeSet<usize>> = BTreeMap::new();
    for (&t, &n) in &times_seen {
        let (run, k) = locate(t);
        batch_mult.entry((run, k / BATCH)).or_default().insert(n);
    }
    let mut dup_batches = 0;
    for ((run, b), mults) in &batch_mult {
        assert_eq!(
            mults.len(),
            1,
            "batch {b} of run {run}: its readings arrived {mults:?} times: a partial duplicate"
        );
        dup_batches += mults.iter().next().map_or(0, |m| m - 1);
    }
    let bounded = durable.values().filter(|n| **n > 0).count();
    assert!(
        bounded > 0,
        "no run lived long enough to have batches closed {DURABLE_AFTER_MS} ms before its kill: \
         the lower bound checked nothing\n{}",
        journal.join("\n")
    );
    assert!(
        cov.duplicates <= cov.distinct.len() / 2,
        "{} duplicate records for {} readings: acknowledgements are not kept",
        cov.duplicates,
        cov.distinct.len()
    );
    eprintln!(
        "{}\nkill loop: {RUNS} kills, {broker_restarts} broker restarts; readings per run {counts:?}; \
         {bounded} runs with a lower bound (batches closed >{DURABLE_AFTER_MS} ms before the kill: \
         {:?}); \
         {} distinct readings in {} messages, {} duplicate records ({dup_batches} duplicate batches); \
         {} distinct readings seen in exports, all delivered; test took {:?}",
        journal.join("\n"),
        durable.values().collect::<Vec<_>>(),
        cov.distinct.len(),
        messages.len(),
        cov.duplicates,
        exported.len(),
        t0.elapsed()
    );
}

// 4. ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    /// The last segment cut in the middle of a frame.
    TruncatedTail,
    /// One bit flipped in the middle of the oldest segment.
    FlippedBitInOlderSegment,
    /// 4 KiB of zeros after the last frame of the last segment.
    ZerosAppended,
}

/// The readings a segment's frames hold, by the documented payload layout (`first_at: i64
/// LE` in µs, `last_at: i64 LE`, `n: u32 LE`): (frame, first reading's ms, readings).
fn frame_batches(path: &Path) -> Vec<(support::spool::Frame, i64, u32)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    frames(path)
        .into_iter()
        .map(|f| {
            let p = (f.offset + support::spool::FRAME_HEADER) as usize;
            let first_us = i64::from_le_bytes(bytes[p..p + 8].try_into().unwrap());
            let last_us = i64::from_le_bytes(bytes[p + 8..p + 16].try_into().unwrap());
            let n = u32::from_le_bytes(bytes[p + 16..p + 20].try_into().unwrap());
            assert_eq!(
                last_us - first_us,
                (i64::from(n) - 1) * 100_000,
                "{}: frame at {} is not {n} readings 100 ms apart",
                path.display(),
                f.offset
            );
            (f, first_us / 1000, n)
        })
        .collect()
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn damaged_spool_is_cut_and_the_rest_arrives(damage: Damage) {
    let t0 = Instant::now();
    let mut rig = Rig::new(false);
    let orig = rig.path("spool");
    let tuning = Tuning {
        spool_dir: Some(orig.clone()),
        segment_bytes: "64KiB",
        shutdown_timeout: "1s",
        max_publish_per_sec: 0,
        max_bytes_per_sec: "0",
        ..Tuning::default()
    };
    let config = rig.config("backlog.toml", &tuning);

    // A backlog of 1500 readings in several 64 KiB segments: the broker is down.
    rig.broker.stop();
    let out = run_agent_to_end(
        &simulate_args(&config, Some("150s"), "max", 4, START),
        Duration::from_secs(40),
    );
    assert_eq!(
        out.code(),
        Some(3),
        "nothing acknowledged: exit 3\n{}",
        out.describe()
    );
    // What the test wrote, independently of the spool: the same simulation (seed, start,
    // duration) printed on stdout; deterministic on the data's own clock.
    let mut stdout_args = simulate_args(&config, Some("150s"), "max", 4, START);
    stdout_args.push("--stdout".to_owned());
    let printed = run_agent_to_end(&stdout_args, Duration::from_secs(40));
    assert_eq!(printed.code(), Some(0), "{}", printed.describe());
    let written = support::stdout_records(&printed, support::json::PayloadMode::Records);
    let written: BTreeMap<i64, Record> = written.into_iter().map(|r| (r.timestamp, r)).collect();
    assert_eq!(
        written.keys().copied().collect::<Vec<_>>(),
        (0..1500).map(|k| START_MS + k * 100).collect::<Vec<_>>(),
        "150 s at 10 Hz from START"
    );
    let before = spool_export(&config, None);
    assert_eq!(
        before.len(),
        1500,
        "the spool keeps every reading of the run"
    );
    for r in &before {
        assert_eq!(
            written[&r.timestamp].json, r.json,
            "the spool holds reading {} changed",
            r.timestamp
        );
    }
    let segs = segment_files(&orig);
    assert!(
        segs.len() >= 3,
        "expected several 64 KiB segments, got {segs:?}"
    );
    // The frames, in order, hold the readings in order, ten to a batch.
    let layout: Vec<Vec<(support::spool::Frame, i64, u32)>> =
        segs.iter().map(|p| frame_batches(p)).collect();
    let mut next = START_MS;
    for (f, first, n) in layout.iter().flatten() {
        assert_eq!(
            (*first, *n),
            (next, BATCH as u32),
            "frame {f:?}: expected the batch of 10 readings from {next}"
        );
        next += BATCH * 100;
    }
    assert_eq!(
        next,
        START_MS + 1500 * 100,
        "the frames hold all 1500 readings"
    );

    // Damage a copy.
    let spool = rig.path("damaged");
    copy_dir_files(&orig, &spool);
    let damaged_config = rig.config(
        "damaged.toml",
        &Tuning {
            spool_dir: Some(spool.clone()),
            ..tuning.clone()
        },
    );
    let names: Vec<_> = segs
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    let last = names.len() - 1;
    // (segment, offset where its first damaged frame starts, length of the damaged file)
    let (victim, cut_at, damaged_len) = match damage {
        Damage::TruncatedTail => {
            let path = spool.join(&names[last]);
            let fr = frames(&path);
            let f = fr[fr.len() / 2];
            set_len(&path, f.offset + f.len / 2);
            (last, f.offset, f.offset + f.len / 2)
        }
        Damage::FlippedBitInOlderSegment => {
            let path = spool.join(&names[0]);
            let mut bytes = std::fs::read(&path).unwrap();
            let pos = bytes.len() as u64 / 2;
            let f = frames(&path)
                .into_iter()
                .find(|f| f.offset <= pos && pos < f.offset + f.len)
                .expect("a frame holds the middle byte");
            bytes[pos as usize] ^= 0x10;
            std::fs::write(&path, &bytes).unwrap();
            (0, f.offset, bytes.len() as u64)
        }
        Damage::ZerosAppended => {
            let path = spool.join(&names[last]);
            let len = std::fs::metadata(&path).unwrap().len();
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.extend_from_slice(&[0u8; 4096]);
            std::fs::write(&path, &bytes).unwrap();
            (last, len, len + 4096)
        }
    };
    // What must arrive: every batch but those the damage cuts, the damaged frame and what
    // follows it in its segment (from the frame offsets, not from the agent).
    let expected: Vec<Record> = layout
        .iter()
        .enumerate()
        .flat_map(|(seg, fs)| {
            fs.iter()
                .filter(move |(f, _, _)| seg != victim || f.offset < cut_at)
                .flat_map(|(_, first, n)| (0..i64::from(*n)).map(move |k| first + k * 100))
        })
        .map(|t| written[&t].clone())
        .collect();
    let lost = before.len() - expected.len();
    if damage == Damage::ZerosAppended {
        assert_eq!(lost, 0, "zeros after the last frame damage no frame");
    } else {
        assert!(lost > 0, "the damage must hit a frame");
    }
    let stats = spool_stats(&damaged_config);
    assert_eq!(
        stats.num("damaged segments"),
        1,
        "`spool stats` must see the damage:\n{}",
        stats.text
    );

    // Broker up: the agent starts on the damaged spool, cuts, keeps a copy, delivers the rest.
    rig.broker.start_again();
    rig.sub.sync();
    let out = run_agent_to_end(
        &simulate_args(&damaged_config, Some("1s"), "max", 5, DAY2),
        Duration::from_secs(45),
    );
    let report = format!("{}\n{}", out.describe(), rig.describe());
    assert_eq!(
        out.code(),
        Some(0),
        "{damage:?}: every undamaged batch is deliverable, so the run must exit 0\n{report}"
    );
    let damage_lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("is damaged at byte") && l.contains("a copy is in"))
        .collect();
    assert!(
        !damage_lines.is_empty(),
        "{damage:?}: no log line `... is damaged at byte ... a copy is in ...`\n{report}"
    );
    let victim_name = names[victim].to_str().unwrap();
    assert!(
        damage_lines.iter().any(|l| l.contains(victim_name)
            && numbers_after(l, "is damaged at byte ").contains(&cut_at)),
        "{damage:?}: expected a damage line naming {victim_name} at byte {cut_at}, got:\n{}",
        damage_lines.join("\n")
    );
    let copies: Vec<(PathBuf, u64)> = std::fs::read_dir(spool.join("corrupt"))
        .unwrap_or_else(|e| panic!("{damage:?}: no corrupt/ directory in the spool: {e}"))
        .map(|e| {
            let p = e.unwrap().path();
            let len = std::fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .collect();
    assert!(
        copies.iter().any(|(_, len)| *len == damaged_len),
        "{damage:?}: corrupt/ holds no copy of the damaged segment ({damaged_len} bytes): {copies:?}"
    );

    poll(Duration::from_secs(10), || {
        let got = rig.timestamps();
        expected
            .iter()
            .all(|r| got.contains(&r.timestamp))
            .then_some(())
    });
    rig.sub.sync();
    let records = rig.records();
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    check_identity(&cov);
    assert_all_arrived(&expected, &cov, &format!("{damage:?}: undamaged frames"));
    let mut new_run = 0;
    for (t, r) in &cov.distinct {
        if *t >= DAY2_MS {
            new_run += 1;
            continue;
        }
        let s = written
            .get(t)
            .unwrap_or_else(|| panic!("{damage:?}: reading {t} arrived but was never written"));
        assert_eq!(s.json, r.json, "{damage:?}: reading {t} arrived changed");
    }
    // The damaged frame itself never arrives (its CRC no longer matches).
    if let Some((_, first, n)) = layout[victim].iter().find(|(f, _, _)| f.offset == cut_at) {
        let leaked: Vec<i64> = (0..i64::from(*n))
            .map(|k| first + k * 100)
            .filter(|t| cov.distinct.contains_key(t))
            .collect();
        assert!(
            leaked.is_empty(),
            "{damage:?}: readings of the damaged frame arrived: {leaked:?}"
        );
    }
    assert_eq!(new_run, 10, "{damage:?}: the new 1 s run's readings");
    let after = spool_stats(&damaged_config);
    assert_eq!(after.num("unacked batches"), 0, "{}", after.text);
    assert_eq!(after.num("damaged segments"), 0, "{}", after.text);
    eprintln!(
        "{damage:?}: {} segments, damage in {victim_name} at byte {cut_at}; {} of {} stored readings \
         deliverable ({lost} lost with the damaged frame and what followed it in that segment), \
         {} delivered, {} duplicates; log: {}; test took {:?}",
        segs.len(),
        expected.len(),
        before.len(),
        cov.distinct.len() - new_run,
        cov.duplicates,
        damage_lines.join(" | "),
        t0.elapsed()
    );
}

#[test]
fn corruption_truncated_tail() {
    damaged_spool_is_cut_and_the_rest_arrives(Damage::TruncatedTail);
}

#[test]
fn corruption_flipped_bit_in_older_segment() {
    damaged_spool_is_cut_and_the_rest_arrives(Damage::FlippedBitInOlderSegment);
}

#[test]
fn corruption_zeros_appended() {
    damaged_spool_is_cut_and_the_rest_arrives(Damage::ZerosAppended);
}

// 5. ---------------------------------------------------------------------------------

#[test]
fn spool_cap_drops_the_oldest_and_counts_it() {
    const MAX_BYTES: u64 = 256 * 1024;
    const SEGMENT: u64 = 64 * 1024;
    const READINGS: i64 = 9000;
    let t0 = Instant::now();
    let mut rig = Rig::new(true);
    let spool = rig.path("spool");
    let config = rig.config(
        "agent.toml",
        &Tuning {
            spool_dir: Some(spool.clone()),
            max_bytes: "256KiB",
            segment_bytes: "64KiB",
            shutdown_timeout: "1s",
            max_publish_per_sec: 0,
            max_bytes_per_sec: "0",
            ..Tuning::default()
        },
    );
    rig.broker.stop();
    // 9000 readings, about 1.5 MiB of batches, with nowhere to send them.
    let started = Instant::now();
    let mut agent = spawn_agent(&simulate_args(&config, Some("900s"), "max", 7, START));
    let mut largest = 0;
    while agent.is_running() {
        largest = largest.max(dir_file_bytes(&spool));
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the agent did not exit\n{}",
            rig.report(&agent)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = agent.wait_or_panic(Duration::from_secs(1));
    let stderr = agent.stderr_text();
    assert_eq!(
        status.code(),
        Some(3),
        "nothing acknowledged: exit 3\n{}",
        rig.report(&agent)
    );
    let dropped: Vec<u64> = numbers_after(
        &stderr,
        "spool full (spool.max_bytes): dropped the oldest segment, ",
    );
    let dropped_total: u64 = dropped.iter().sum();
    assert!(
        dropped_total > 0,
        "no `spool full (spool.max_bytes): dropped the oldest segment, N undelivered reading(s)` \
         line with N > 0\n{}",
        tail(&stderr, 4000)
    );
    assert!(
        largest <= MAX_BYTES + SEGMENT,
        "the spool dir reached {largest} bytes: more than max_bytes + one segment"
    );
    let at_rest = segment_bytes(&spool);
    assert!(
        at_rest <= MAX_BYTES,
        "{at_rest} bytes of segments at rest, over max_bytes"
    );

    // What the spool kept: the newest readings, contiguous up to the last one.
    let retained = spool_export(&config, None);
    let ks: Vec<i64> = retained
        .iter()
        .map(|r| (r.timestamp - START_MS) / 100)
        .collect();
    let first = ks.first().copied().unwrap_or(READINGS);
    assert!(first > 0, "the oldest readings must be gone");
    assert_eq!(
        ks,
        (first..READINGS).collect::<Vec<_>>(),
        "the spool must keep a contiguous run of the newest readings"
    );
    let stats = spool_stats(&config);
    assert_eq!(
        stats.num("unacked readings"),
        retained.len() as u64,
        "{}",
        stats.text
    );
    let dropped_ok = dropped_total == first as u64;

    // Broker up: the retained part arrives, the oldest never does.
    rig.broker.start_again();
    rig.sub.sync();
    let out = run_agent_to_end(
        &simulate_args(&config, Some("1s"), "max", 8, DAY2),
        Duration::from_secs(45),
    );
    assert_eq!(
        out.code(),
        Some(0),
        "the retained backlog is deliverable: exit 0\n{}\n{}",
        out.describe(),
        rig.describe()
    );
    poll(Duration::from_secs(10), || {
        (rig.timestamps().len() >= retained.len() + 10).then_some(())
    });
    rig.sub.sync();
    let records = rig.records();
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    check_identity(&cov);
    assert_all_arrived(&retained, &cov, "the retained part of the spool");
    let old: Vec<i64> = cov
        .distinct
        .keys()
        .copied()
        .filter(|t| *t < DAY2_MS)
        .collect();
    assert_eq!(
        old.len(),
        retained.len(),
        "only the retained readings of the first run may arrive (oldest arrived: {:?})",
        old.first()
    );
    assert_eq!(
        cov.distinct.keys().filter(|t| **t >= DAY2_MS).count(),
        10,
        "the second run's readings"
    );
    eprintln!(
        "cap: largest spool dir {largest} bytes (cap {MAX_BYTES} + segment {SEGMENT}); {} cap line(s) \
         counting {dropped_total} undelivered readings; the spool kept readings {first}..{READINGS} \
         ({} readings), so {first} were dropped; all retained delivered; test took {:?}",
        dropped.len(),
        retained.len(),
        t0.elapsed()
    );
    assert!(
        dropped_ok,
        "the cap log lines count {dropped_total} dropped readings ({dropped:?}), but the oldest \
         {first} readings are gone: every dropped reading must be counted\n{}",
        tail(&stderr, 3000)
    );
}

// 6. ---------------------------------------------------------------------------------

#[test]
fn full_filesystem_keeps_publishing_and_recovers() {
    let t0 = Instant::now();
    let mut rig = Rig::new(false);
    let mnt = rig.path("fs");
    let _fs = Tmpfs::mount(&mnt, "512k");
    let config = rig.config(
        "agent.toml",
        &Tuning {
            spool_dir: Some(mnt.join("spool")),
            ..Tuning::default()
        },
    );
    let latest = |rig: &Rig| rig.timestamps().last().copied().unwrap_or(0);
    // Each step waits for the agent's answer (generous bounds, for a loaded machine); the
    // run lasts until the test has seen them all and stops it: no step races the end of a
    // fixed-length run.
    const STEP: Duration = Duration::from_secs(30);

    let started = Instant::now();
    let mut agent = spawn_agent(&simulate_args(&config, Some("3600s"), "5", 9, START));
    assert!(
        poll(STEP, || (!rig.sub.telemetry().is_empty()).then_some(())).is_some(),
        "no telemetry within {STEP:?}\n{}",
        rig.report(&agent)
    );

    let filler = mnt.join("filler");
    let filled = fill_until_enospc(&filler);
    let filled_at = started.elapsed();
    assert!(
        poll(STEP, || agent
            .stderr_text()
            .contains("not writable (")
            .then_some(()))
        .is_some(),
        "the disk is full ({filled} bytes of filler) but no `not writable (` line\n{}",
        rig.report(&agent)
    );
    let fault_at = started.elapsed();
    // Still publishing: readings sampled 2 s (simulated) after the fault keep arriving.
    let at_fault = latest(&rig);
    let kept = poll(STEP, || (latest(&rig) >= at_fault + 2000).then_some(()));
    assert!(
        kept.is_some(),
        "with the spool not writable no reading after {at_fault} arrived\n{}",
        rig.report(&agent)
    );
    assert!(
        agent.is_running(),
        "the agent stopped while the disk was full\n{}",
        rig.report(&agent)
    );
    let flowing_at = started.elapsed();
    let recovered_before = agent.stderr_text().matches("spool writable again").count();
    std::fs::remove_file(&filler).unwrap();
    let freed_at = started.elapsed();
    let recovered = poll(STEP, || {
        (agent.stderr_text().matches("spool writable again").count() > recovered_before)
            .then_some(())
    });
    let recovered_at = started.elapsed();
    assert!(
        recovered.is_some(),
        "filler deleted at {freed_at:?} but no new `spool writable again` line\n{}",
        rig.report(&agent)
    );
    // And through the spool again: readings sampled 2 s (simulated) after the recovery.
    let at_recovery = latest(&rig);
    let spooled = poll(STEP, || (latest(&rig) >= at_recovery + 2000).then_some(()));
    assert!(
        spooled.is_some(),
        "no reading after {at_recovery} arrived once the spool was writable again\n{}",
        rig.report(&agent)
    );
    send_signal(agent.pid(), "TERM");
    let status = agent.wait_or_panic(STEP);
    let stderr = agent.stderr_text();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM: every batch was published and acknowledged: exit 0\n{}",
        rig.report(&agent)
    );
    let sampled = stderr
        .lines()
        .filter(|l| l.contains("summary: "))
        .flat_map(str::split_whitespace)
        .find_map(|t| t.strip_prefix("readings=")?.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("no `summary: readings=N`\n{stderr}"));
    poll(Duration::from_secs(10), || {
        (rig.timestamps().len() as i64 >= sampled).then_some(())
    });
    rig.sub.sync();
    let records = rig.records();
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    // Every reading sampled arrived, before, during and after the full disk.
    assert_exact_grid(&cov, START_MS, sampled);
    check_identity(&cov);
    let stats = spool_stats(&config);
    assert_eq!(stats.num("unacked batches"), 0, "{}", stats.text);
    eprintln!(
        "filled {filled} bytes at {filled_at:?}, `not writable` seen at {fault_at:?}, still publishing at \
         {flowing_at:?}, filler deleted at {freed_at:?}, `writable again` at {recovered_at:?}, exit 0 at \
         {:?}; `not writable (` lines: {}, `writable again` lines: {} ({recovered_before} before the \
         filler went); {sampled} of {sampled} readings, {} duplicates; test took {:?}",
        started.elapsed(),
        stderr.matches("not writable (").count(),
        stderr.matches("spool writable again").count(),
        cov.duplicates,
        t0.elapsed()
    );
}

// 7. ---------------------------------------------------------------------------------

#[test]
fn second_agent_on_the_same_spool_is_refused() {
    let t0 = Instant::now();
    let rig = Rig::new(false);
    let config = rig.config(
        "agent.toml",
        &Tuning {
            spool_dir: Some(rig.path("spool")),
            ..Tuning::default()
        },
    );
    let mut first = spawn_agent(&simulate_args(&config, None, "1", 10, START));
    assert!(
        poll(Duration::from_secs(5), || (!rig.sub.telemetry().is_empty())
            .then_some(()))
        .is_some(),
        "the first agent published nothing within 5 s\n{}",
        rig.report(&first)
    );

    let second = run_agent_to_end(
        &simulate_args(&config, Some("2s"), "max", 11, DAY2),
        Duration::from_secs(20),
    );
    assert_eq!(
        second.code(),
        Some(2),
        "a second agent on the same spool dir must exit 2\n{}",
        second.describe()
    );
    assert!(
        second.stderr.contains("spool.dir"),
        "the refusal must name `spool.dir`\n{}",
        second.describe()
    );
    assert!(
        first.is_running(),
        "the first agent must keep running\n{}",
        rig.report(&first)
    );

    send_signal(first.pid(), "TERM");
    let status = first.wait_or_panic(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM: drain and exit 0\n{}",
        rig.report(&first)
    );
    // The lock goes with its agent.
    let third = run_agent_to_end(
        &simulate_args(&config, Some("1s"), "max", 12, "2024-01-16T21:20:00Z"),
        Duration::from_secs(20),
    );
    assert_eq!(
        third.code(),
        Some(0),
        "after the first agent stopped the spool must be free again\n{}",
        third.describe()
    );
    let got = rig.timestamps();
    assert!(
        !got.iter()
            .any(|t| (DAY2_MS..DAY2_MS + 86_400_000).contains(t)),
        "the refused agent published readings"
    );
    eprintln!(
        "second agent: exit 2 naming spool.dir ({}); first agent exit 0 on SIGTERM; third exit 0; \
         test took {:?}",
        second
            .stderr
            .lines()
            .find(|l| l.contains("spool.dir"))
            .unwrap_or(""),
        t0.elapsed()
    );
}
