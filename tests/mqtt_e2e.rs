//! End to end against a real Mosquitto with mutual TLS: the agent publishes
//! simulated telemetry, a `mosquitto_sub` on the broker's plain listener checks
//! what arrived.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::broker::{Broker, Subscriber, mosquitto_pub};
use support::certs::Pki;
use support::json::{Coverage, PayloadMode, Record, assert_exact_grid, check_message, coverage};
use support::process::{Finished, Proc, poll, run, tail};
use support::{ConfigSpec, SESSION_ID, START, START_MS, TOPIC, VEHICLE_ID, agent};

/// A broker with mutual TLS, a subscriber on its plain listener, and the PKI.
struct Setup {
    // Field order is drop order: subscriber, then broker, then the files.
    sub: Subscriber,
    broker: Broker,
    pki: Pki,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(persistence: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path(), VEHICLE_ID);
        let broker = Broker::start(&pki, dir.path(), persistence);
        let sub = Subscriber::start(&broker);
        Setup {
            sub,
            broker,
            pki,
            dir,
        }
    }

    fn config(&self, name: &str, payload: &str, cert: &Path, key: &Path) -> PathBuf {
        ConfigSpec {
            port: self.broker.tls_port,
            ca: &self.pki.ca,
            cert,
            key,
            payload,
        }
        .write(self.dir.path(), name)
    }

    fn good_config(&self, payload: &str) -> PathBuf {
        self.config(
            "agent.toml",
            payload,
            &self.pki.client_cert,
            &self.pki.client_key,
        )
    }

    /// Every telemetry message so far, checked against the message contract.
    fn telemetry_records(&self, mode: PayloadMode) -> (usize, Vec<Record>) {
        let msgs = self.sub.telemetry();
        let mut records = Vec::new();
        for (topic, payload) in &msgs {
            assert_eq!(topic, TOPIC, "telemetry on an unexpected topic");
            let rs = check_message(payload, mode)
                .unwrap_or_else(|e| panic!("message on {topic} breaks the contract: {e}"));
            records.extend(rs);
        }
        (msgs.len(), records)
    }

    fn describe(&self) -> String {
        format!(
            "--- broker log (tail) ---\n{}\n--- subscriber stderr ---\n{}",
            tail(&self.broker.log(), 4000),
            self.sub.stderr_text()
        )
    }
}

fn simulate_args<'a>(
    config: &'a Path,
    duration: &'a str,
    speed: &'a str,
    seed: &'a str,
) -> Vec<&'a str> {
    vec![
        "simulate",
        "--config",
        config.to_str().unwrap(),
        "--duration",
        duration,
        "--speed",
        speed,
        "--seed",
        seed,
        "--start",
        START,
    ]
}

fn run_simulate(args: &[&str], timeout: Duration) -> Finished {
    let mut cmd = agent();
    cmd.args(args);
    run("redline-agent simulate", cmd, timeout)
}

fn check_identity(cov: &Coverage) {
    for r in cov.distinct.values() {
        assert_eq!(r.vehicle_id, VEHICLE_ID, "vehicle_id of {:?}", r.json);
        assert_eq!(r.session_id, SESSION_ID, "session_id of {:?}", r.json);
    }
}

/// Tests 1 and 2: 30 s of simulation at full speed, every reading arrives.
fn every_reading_arrives(payload: &str, mode: PayloadMode) {
    let mut s = Setup::new(false);
    let config = s.good_config(payload);
    let out = run_simulate(
        &simulate_args(&config, "30s", "max", "7"),
        Duration::from_secs(25),
    );
    assert_eq!(
        out.code(),
        Some(0),
        "simulate against a healthy broker must exit 0\n{}\n{}",
        out.describe(),
        s.describe()
    );

    // Exit 0 means every batch was PUBACKed, so the broker has them all.
    let complete = poll(Duration::from_secs(10), || {
        let (_, records) = s.telemetry_records(mode);
        let cov = coverage(&records).unwrap();
        (cov.distinct.len() >= 300).then_some(())
    });
    s.sub.sync(); // and whatever duplicates were still on their way
    let (messages, records) = s.telemetry_records(mode);
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        complete.is_some(),
        "after exit 0 the subscriber got only {} distinct readings in {messages} messages\n{}\n{}",
        cov.distinct.len(),
        out.describe(),
        s.describe()
    );
    assert_exact_grid(&cov, START_MS, 300);
    check_identity(&cov);
    eprintln!(
        "{messages} messages, {} records, {} distinct, {} duplicates",
        records.len(),
        cov.distinct.len(),
        cov.duplicates
    );
    if mode == PayloadMode::Single {
        assert!(messages >= 300, "single mode: one message per record");
    } else {
        // A simulation at full speed runs ahead of the link: the stored backlog goes out
        // coalesced, up to 500 records and 128 KiB per message (check_message enforces both).
        let msgs = s.sub.telemetry();
        for (_, p) in &msgs {
            let n = check_message(p, mode).unwrap().len();
            assert!(
                n.is_multiple_of(10),
                "a message carries whole batches of 10, got {n}"
            );
        }
        assert!(
            messages < 30,
            "the backlog was coalesced: {messages} messages for 300 readings"
        );
    }
}

// 1.
#[test]
fn every_reading_arrives_in_batches() {
    every_reading_arrives("records", PayloadMode::Records);
}

// 2.
#[test]
fn every_reading_arrives_one_per_message() {
    every_reading_arrives("single", PayloadMode::Single);
}

fn tls_error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            l.contains("ERROR")
                && (l.contains("TLS") || l.to_lowercase().contains("certificate"))
                && l.to_lowercase().contains("check")
        })
        .collect()
}

// 3.
#[test]
fn client_cert_from_another_ca_is_refused() {
    let mut s = Setup::new(false);
    let tls_port = s.broker.tls_port.to_string();
    let ca = s.pki.ca.to_str().unwrap().to_owned();

    // Control: the right client certificate is accepted by the broker.
    let with_cert = mosquitto_pub(&[
        "-h",
        "localhost",
        "-p",
        &tls_port,
        "--cafile",
        &ca,
        "--cert",
        s.pki.client_cert.to_str().unwrap(),
        "--key",
        s.pki.client_key.to_str().unwrap(),
        "-q",
        "1",
        "-t",
        "redline/control/mtls",
        "-m",
        "with-cert",
    ]);
    assert_eq!(
        with_cert.code(),
        Some(0),
        "valid client cert refused\n{}\n{}",
        with_cert.describe(),
        s.describe()
    );

    // The broker enforces mutual TLS: no client certificate, no connection.
    let no_cert = mosquitto_pub(&[
        "-h",
        "localhost",
        "-p",
        &tls_port,
        "--cafile",
        &ca,
        "-q",
        "1",
        "-t",
        TOPIC,
        "-m",
        "no-cert",
    ]);
    assert_ne!(
        no_cert.code(),
        Some(0),
        "mosquitto_pub without a client certificate was accepted\n{}",
        s.describe()
    );

    // ... and a certificate from another CA is refused too.
    let other = mosquitto_pub(&[
        "-h",
        "localhost",
        "-p",
        &tls_port,
        "--cafile",
        &ca,
        "--cert",
        s.pki.other_client_cert.to_str().unwrap(),
        "--key",
        s.pki.other_client_key.to_str().unwrap(),
        "-q",
        "1",
        "-t",
        TOPIC,
        "-m",
        "other-ca",
    ]);
    assert_ne!(
        other.code(),
        Some(0),
        "mosquitto_pub with another CA's certificate was accepted\n{}",
        s.describe()
    );

    s.sub.sync();
    assert!(
        s.sub
            .messages()
            .iter()
            .any(|(t, p)| t == "redline/control/mtls" && p == "with-cert"),
        "the control message did not arrive\n{}",
        s.describe()
    );
    assert!(
        s.sub.telemetry().is_empty(),
        "refused clients' messages arrived"
    );

    let config = s.config(
        "other-ca.toml",
        "records",
        &s.pki.other_client_cert,
        &s.pki.other_client_key,
    );
    let connects_before = s.broker.tls_connections();
    let out = run_simulate(
        &simulate_args(&config, "6s", "1", "1"),
        Duration::from_secs(25),
    );
    let connects = s.broker.tls_connections() - connects_before;
    let report = format!("{}\n{}", out.describe(), s.describe());

    assert_eq!(
        out.code(),
        Some(3),
        "simulate whose batches were never acknowledged must exit 3\n{report}"
    );
    assert!(
        out.elapsed >= Duration::from_millis(5500),
        "the agent must keep retrying until the 6 s duration ends, exited after {:?}\n{report}",
        out.elapsed
    );
    let errors = tls_error_lines(&out.stderr);
    assert!(
        !errors.is_empty(),
        "no ERROR line naming TLS (or the certificate) and what to check\n{report}"
    );
    assert!(
        errors.len() <= 3,
        "{} TLS error lines in one outage (want one per outage, not one per retry):\n{}",
        errors.len(),
        errors.join("\n")
    );
    assert!(
        connects >= 2,
        "the agent must keep retrying: {connects} TLS connections seen by the broker\n{report}"
    );
    assert!(
        connects as f64 <= out.elapsed.as_secs_f64() + 1.0,
        "{connects} connection attempts in {:?}: more than 1 connect/s\n{report}",
        out.elapsed
    );

    eprintln!(
        "exit {:?} after {:?}; {connects} TLS connection attempts; error lines:\n{}",
        out.code(),
        out.elapsed,
        errors.join("\n")
    );
    s.sub.sync();
    assert!(
        s.sub.telemetry().is_empty(),
        "telemetry arrived from a client the broker should refuse: {:?}",
        s.sub.telemetry()
    );
}

// 4.
#[test]
fn survives_broker_restart() {
    let mut s = Setup::new(true);
    let config = s.good_config("records");
    let started = Instant::now();
    let mut cmd = agent();
    cmd.args(simulate_args(&config, "12s", "1", "9"));
    let mut agent = Proc::spawn("redline-agent simulate", cmd);

    let flowing = poll(Duration::from_secs(30), || {
        (!s.sub.telemetry().is_empty()).then_some(())
    });
    assert!(
        flowing.is_some(),
        "no telemetry within 30 s of start\n--- agent stderr ---\n{}\n{}",
        agent.stderr_text(),
        s.describe()
    );
    if let Some(rest) = Duration::from_secs(4).checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    assert!(
        agent.is_running(),
        "agent exited early\n{}",
        agent.stderr_text()
    );

    s.broker.stop();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.is_running(),
        "agent exited while the broker was down\n{}",
        agent.stderr_text()
    );
    s.broker.start_again();
    let restarted_at = started.elapsed();
    assert!(
        agent.is_running(),
        "agent exited across the broker restart\n{}",
        agent.stderr_text()
    );
    // Any reading stamped later than this was sampled after the restart
    // (simulated time at --speed 1 never runs ahead of the wall clock since spawn).
    let after_restart_ms = START_MS + restarted_at.as_millis() as i64;

    // The generous bound is for a loaded machine: the run itself takes 12 s.
    let status = agent.wait_or_panic(Duration::from_secs(90).saturating_sub(started.elapsed()));
    let elapsed = started.elapsed();
    let stderr = agent.stderr_text();
    // The spool keeps what the broker could not take: every batch is acknowledged after the
    // restart, so the run exits 0 (3 would mean batches left unacknowledged).
    assert_eq!(
        status.code(),
        Some(0),
        "every reading is spooled and delivered after the restart: exit 0, got {status}\n{stderr}\n{}",
        s.describe()
    );
    assert!(
        elapsed >= Duration::from_secs(11),
        "a 12 s run at --speed 1 ended after {elapsed:?}\n{stderr}"
    );

    // Exit 0: the broker has every batch, and the subscriber's persistent session gets them.
    let complete = poll(Duration::from_secs(30), || {
        let (_, records) = s.telemetry_records(PayloadMode::Records);
        let cov = coverage(&records).ok()?;
        (cov.distinct.len() >= 120).then_some(())
    });
    s.sub.sync();
    let (messages, records) = s.telemetry_records(PayloadMode::Records);
    let cov = coverage(&records).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        complete.is_some(),
        "after exit 0 the subscriber got {} of 120 readings in {messages} messages\n\
         --- agent stderr ---\n{stderr}\n{}",
        cov.distinct.len(),
        s.describe()
    );
    // The full grid: nothing lost before, during or after the outage.
    assert_exact_grid(&cov, START_MS, 120);
    check_identity(&cov);
    let after_restart = cov
        .distinct
        .keys()
        .filter(|t| **t > after_restart_ms)
        .count();
    assert!(
        after_restart > 0,
        "no reading stamped after the restart (> {after_restart_ms}) arrived; \
         {messages} messages\n--- agent stderr ---\n{stderr}\n{}",
        s.describe()
    );
    assert!(s.sub.is_running(), "the checking subscriber died");
    eprintln!(
        "exit {status}; {} of 120 readings arrived ({} duplicates, {after_restart} sampled after \
         the restart); restart at {restarted_at:?}",
        cov.distinct.len(),
        cov.duplicates
    );
}
